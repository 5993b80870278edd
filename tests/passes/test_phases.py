"""Aligned clock phases (phases="align"): same semantics, fresher outputs, slow work spread out."""
import pytest
import torch
import torchvision.models as tvm

import pipecomp
from pipecomp.analysis import COMPUTE_OPS

from .. import reference
from ..models import RandomNet

CHAIN = [("conv", 0, 0), ("down", 1, 1), ("conv", 2, 2), ("down", 3, 3), ("conv", 4, 4), ("down", 5, 5),
         ("conv", 6, 6)]


def _chain(phases, parallel=7):
    torch.manual_seed(0)
    return pipecomp.compile(RandomNet(CHAIN).eval(), parallel=parallel, clocks="halve", phases=phases,
                            example_input=(1, 3, 16, 16)).eval()


def _newest_frame(net, frames):
    """Per tick, the newest frame whose change changes that tick's output (-1: none does), measured
    by perturbing one frame at a time and running the reference interpreter."""
    with torch.no_grad():
        base = reference.run(net, frames)
        newest = [-1] * len(frames)
        for s in range(len(frames)):
            changed = [*frames[:s], frames[s] + 1.0, *frames[s + 1:]]
            for t, (a, b) in enumerate(zip(base, reference.run(net, changed))):
                if not torch.allclose(a, b):
                    newest[t] = max(newest[t], s)
    return newest


def test_aligned_phases_compute_what_the_reference_interpreter_computes():
    torch.manual_seed(0)
    net = pipecomp.compile(tvm.resnet18(num_classes=5).eval(), parallel=4, clocks="halve", phases="align",
                           shift="online", example_input=(1, 3, 32, 32)).eval()
    assert len(set(net.plan.phase_of.values())) > 1
    frames = [torch.randn(1, 3, 32, 32) for _ in range(net.plan.hyperperiod + 4)]
    with torch.no_grad():
        want = reference.run(net, frames)
        net.reset()
        got = [net.step(x) for x in frames]
        clip = net(torch.stack(frames, 1))
    for t, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=f"tick {t}")
        torch.testing.assert_close(clip[:, t], w, rtol=1e-4, atol=1e-5, msg=f"clip tick {t}")


def test_aligned_phases_give_fresher_outputs():
    frames = [torch.randn(1, 3, 16, 16) for _ in range(32)]
    zero, aligned = _chain("zero"), _chain("align")
    ages = {}
    for name, net in (("zero", zero), ("align", aligned)):
        newest = _newest_frame(net, frames)
        ages[name] = [t - s for t, s in enumerate(newest)][16:]  # no frame at all counts as t + 1
    # With every phase 0, each stage boundary in front of a slow node costs a whole period: this
    # chain's output depends on no frame for 32 ticks. Aligned, it is at most the pipeline's
    # latency plus the wait of the slowest clock (period 8) old.
    assert min(ages["zero"]) > max(ages["align"]), ages
    assert max(ages["align"]) <= aligned.plan.latency + max(aligned.plan.period_of.values()) - 1, ages


def test_aligned_phases_spread_the_slow_work_over_the_ticks():
    costs = {}
    for phases in ("zero", "align"):
        net = pipecomp.compile(tvm.resnet50(), parallel=7, clocks="halve", phases=phases,
                               example_input=(1, 3, 64, 64))
        placement = pipecomp.schedule(net, 1)
        costs[phases] = (placement.average_tick, placement.worst_tick)
    # The same work (every node still fires once per period), a lighter worst tick.
    assert costs["align"][0] == pytest.approx(costs["zero"][0], rel=0.05)
    assert costs["align"][1] < 0.6 * costs["zero"][1], costs


def test_unpacked_structures_tick_with_their_structure():
    net = _chain("align")
    plan = net.plan
    for n in plan.graph.nodes:
        if n.op in COMPUTE_OPS and n.meta["pipecomp"].get("kind") == "tuple":
            for user in n.users:
                if user.op in COMPUTE_OPS:
                    assert plan.phase_of[user.name] == plan.phase_of[n.name]


def test_phases_option_is_checked():
    with pytest.raises(ValueError, match="phases='late' is not one of 'zero', 'align'"):
        pipecomp.compile(RandomNet(CHAIN), clocks="halve", phases="late", example_input=(1, 3, 16, 16))
