"""Semantics §6: a shift memory stays zero until a frame reaches the shift's input.

While a pipeline fills, the later stages compute on zero registers; with batch norms whose
bias is not zero those values are not zero, and a shift memory that recorded them would leak
them into the first outputs. The expectations here are the one-stage network (where a frame
reaches every shift at once) and the reference interpreter, which tracks frame dependence
value by value from the text.
"""
import pytest
import torch

import pipecomp
from pipecomp.backends.threaded import Runtime

from . import reference
from .models import TinyResNet

SIZE, T = 16, 8



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyResNet(biases=True, inplace=False).eval()


def compiled(model, **options):
    return pipecomp.compile(model, shift="online", example_input=(1, 3, SIZE, SIZE), **options).eval()


def clip(seed=0):
    return torch.randn(2, T, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def steps(net, frames):
    net.reset()
    with torch.no_grad():
        return torch.stack([net.step(frames[:, t]) for t in range(frames.shape[1])], 1)


def fills(net) -> bool:
    """Does some shift fire before a frame reaches it (a tick that the rule changes)?"""
    return any(s.filling[i] for s in net._stages for i in s.warmup)


@pytest.mark.parametrize("parallel", [3, 4])
def test_aligned_pipeline_equals_the_one_stage_network_delayed_from_its_first_output(model, parallel):
    net, one = compiled(model, parallel=parallel, delays="aligned"), compiled(model)
    assert fills(net) and net.latency == parallel - 1
    frames = clip()
    want = steps(one, frames)
    for got in (steps(net, frames), net(frames)):
        torch.testing.assert_close(got[:, net.latency:], want[:, :T - net.latency], rtol=1e-5, atol=1e-6)


def test_a_shift_memory_records_from_the_tick_a_frame_reaches_its_input(model):
    net = compiled(model, parallel=4, delays="aligned")
    plan = net.plan
    # Aligned delays: a frame reaches a node of stage s after s ticks.
    assert plan.shift_records_from == {s: plan.stage_of[s] for s in plan.shift_nodes}
    starts = [max((plan.stage_of[s] for s in plan.shift_nodes if plan.stage_of[s] == j), default=None)
              for j in range(plan.parallel)]
    assert ("per stage, all record from tick: " + ", ".join("-" if t is None else str(t) for t in starts)
            in net.report())
    last = net._stages[plan.stage_of[plan.shift_nodes[-1]]]
    code = last.code()
    assert f"ticks 0-{plan.stage_of[plan.shift_nodes[-1]] - 1} (the pipeline filling)" in code
    assert f"every tick from tick {len(last.warmup)} on" in code


# Cases where a memory recorded from zero registers changes outputs within T ticks (checked by
# letting the memories record from tick 0: the outputs then differ by 3e-4 relative).
@pytest.mark.parametrize("options", [
    dict(parallel=3, delays="aligned", clocks="halve"),
    dict(parallel=3, delays="aligned", clocks="halve", phases="zero"),
    dict(parallel=4, clocks="halve"),
    dict(parallel=4, clocks="halve", phases="zero"),
], ids=["aligned-halve", "aligned-halve-zero", "diagonal-halve", "diagonal-halve-zero"])
def test_step_and_clip_equal_the_reference_while_the_pipeline_fills(model, options):
    net = compiled(model, **options)
    assert fills(net)
    frames = clip(1)
    got = steps(net, frames)
    with torch.no_grad():
        want = torch.stack(reference.run(net, list(frames.unbind(1))), 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(net(frames), got, rtol=1e-5, atol=1e-6)


def test_threaded_runtime_follows_the_warm_up(model):
    net = compiled(model, parallel=3, clocks="halve")
    assert fills(net)
    frames = clip(2)
    want = steps(net, frames)
    with Runtime(net, 2) as rt, torch.no_grad():
        got = torch.stack([rt.step(frames[:, t]) for t in range(T)], 1)
        rt.reset()
        again = torch.stack(list(rt.run(list(frames.unbind(1)))), 1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want)


def test_processes_follow_the_warm_up(model):
    from pipecomp.backends import distributed
    net = compiled(model, parallel=4, delays="aligned")
    assert fills(net)
    frames = clip(3)
    got = torch.stack(distributed.launch(net, list(frames.unbind(1)), nprocs=2, timeout=120), 1)
    torch.testing.assert_close(got, steps(net, frames), rtol=1e-5, atol=1e-6)
