"""Property tests over random DAG models × partitions × delay modes × clocks × shift."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipecomp
from pipecomp.analysis import COMPUTE_OPS

from . import reference
from .models import RandomNet, specs

SIZE = 16
FRAMES = 7
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@st.composite
def compiled(draw, shift=True):
    spec = draw(specs())
    model = RandomNet(spec, dict_output=draw(st.booleans())).eval()
    options = dict(delays=draw(st.sampled_from(["diagonal", "aligned"])), example_input=(1, 3, SIZE, SIZE))
    clocks = draw(st.sampled_from([None, "halve", "mapping"]))
    if clocks == "mapping":
        p = draw(st.sampled_from([2, 3]))
        options["clocks"] = {"layers.*": (p, draw(st.integers(0, p - 1))), "head": 2}
    else:
        options["clocks"] = clocks
    if clocks is not None:
        options["phases"] = draw(st.sampled_from(["zero", "align"]))
    if shift and draw(st.booleans()):
        options.update(shift="online", shift_place="inplace", shift_fraction=draw(st.sampled_from([0.25, 0.5])))
    largest = pipecomp.compile(model, parallel=1, **options)
    units = sum(n.op in COMPUTE_OPS for n in largest.plan.graph.nodes)
    parallel = draw(st.integers(1, units))
    try:
        net = pipecomp.compile(model, parallel=parallel, **options)
    except ValueError as e:
        assert "largest possible value" in str(e)
        net = pipecomp.compile(model, parallel=int(str(e).rsplit(" ", 1)[1]), **options)
    return model, net


def _frames(batch=2):
    return [torch.randn(batch, 3, SIZE, SIZE) for _ in range(FRAMES)]


@SETTINGS
@given(compiled())
def test_step_equals_reference_interpreter(case):
    _, net = case
    frames = _frames()
    with torch.no_grad():
        want = reference.run(net, frames)
        net.reset()
        got = [net.step(x) for x in frames]
    assert all(_close(g, w) for g, w in zip(got, want))


@SETTINGS
@given(compiled())
def test_clip_equals_repeated_step(case):
    _, net = case
    frames = _frames()
    with torch.no_grad():
        net.reset()
        steps = [net.step(x) for x in frames]
        clip = net(torch.stack(frames, 1))
    for t, s in enumerate(steps):
        got = {k: v[:, t] for k, v in clip.items()} if isinstance(clip, dict) else clip[:, t]
        assert _close(got, s)


@SETTINGS
@given(compiled(shift=False), st.data())
def test_aligned_equals_image_model_delayed_by_latency(case, data):
    model, net = case
    if net.plan.delays != "aligned" or any(p != 1 for p in net.plan.period_of.values()):
        net = pipecomp.compile(model, parallel=net.plan.parallel, delays="aligned",
                               example_input=(1, 3, SIZE, SIZE))
    assert net.latency == net.plan.parallel - 1
    frames = _frames()
    with torch.no_grad():
        net.reset()
        outs = [net.step(x) for x in frames]
        for t in range(FRAMES - net.latency):
            assert _close(outs[t + net.latency], model(frames[t]))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs(), st.integers(2, 5))
def test_aligned_online_shift_equals_the_one_stage_network_delayed_by_latency(spec, parallel):
    # Semantics §6: shift memories stay zero while the pipeline fills, so from the first output on.
    model = RandomNet(spec).eval()
    options = dict(shift="online", shift_place="inplace", shift_fraction=0.5, example_input=(1, 3, SIZE, SIZE))
    try:
        net = pipecomp.compile(model, parallel=parallel, delays="aligned", **options)
    except ValueError as e:
        assert "largest possible value" in str(e)
        net = pipecomp.compile(model, parallel=int(str(e).rsplit(" ", 1)[1]), delays="aligned", **options)
    one = pipecomp.compile(model, **options)
    frames = _frames()
    with torch.no_grad():
        want = [one.step(x) for x in frames]
        got = [net.step(x) for x in frames]
    assert all(_close(g, w) for g, w in zip(got[net.latency:], want))


@SETTINGS
@given(compiled())
def test_plan_obeys_the_rules(case):
    _, net = case
    plan = net.plan
    order = [n for n in plan.graph.nodes if n.op in COMPUTE_OPS]
    stages = [plan.stage_of[n.name] for n in order]
    assert stages == sorted(stages) and set(stages) == set(range(plan.parallel))
    for (u, v), d in plan.delay_of.items():
        span = plan.stage_of[v] - plan.stage_of[u]
        assert span >= 0
        tensor = plan.node(u).meta["pipecomp"]["kind"] == "tensor"
        if span == 0 or not tensor:
            assert d == 0
        else:
            assert d == (1 if plan.delays == "diagonal" else span)
