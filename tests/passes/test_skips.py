"""Temporal skips (semantics §9): adapters from `j` stages below, added to the value entering a stage."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import pipecomp
from pipecomp import train
from tests import reference
from tests.test_properties import compiled as graphs
from tests.passes.test_temporal import added_params, assert_stream_equals, clip, randomise_added, steps, stream
from tests.test_train import chain

SIZE = 8


def deep(channels=4, classes=3):
    """Five convolutions at two resolutions: room for 5 stages."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels + 1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels + 1, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def compiled(skips, **options):
    return pipecomp.compile(deep().eval(), skips=skips, example_input=(1, 3, SIZE, SIZE),
                            **{"parallel": 5, **options})


OPTIONS = [dict(), dict(delays="aligned"), dict(clocks="halve"), dict(clocks="halve", phases="align"),
           dict(shift="online", shift_place="inplace", parallel=4)]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("skips", [2, [2, 3]])
def test_fresh_skips_compute_the_image_models_network(skips, options):
    torch.manual_seed(0)
    model = deep().eval()
    plain = pipecomp.compile(copy.deepcopy(model), example_input=(1, 3, SIZE, SIZE), **{"parallel": 5, **options})
    net = pipecomp.compile(model, skips=skips, example_input=(1, 3, SIZE, SIZE), **{"parallel": 5, **options})
    x = clip()
    with torch.no_grad():
        want = plain(x)
        assert torch.equal(net(x), want)
    assert torch.equal(stream(net, x), want)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("skips", [2, [2, 3]])
def test_with_adapters_set_step_equals_clip_and_the_reference(skips, options):
    net = compiled(skips, **options)
    randomise_added(net)
    x = clip(frames=9)
    with torch.no_grad():
        got = net(x)
        want = torch.stack(reference.run(net, list(x.unbind(1))), 1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(stream(net, x), want)


def _entering(plan, s):
    """The last tensor of stage s-1 that stage s reads, found from the plan without the skips."""
    order = list(plan.graph.nodes)
    read = [u for v in plan.graph.nodes if plan.stage_of.get(v.name) == s and v.op != "get_attr"
            for u in v.all_input_nodes if plan.stage_of.get(u.name) == s - 1 and u.op != "get_attr"
            and "added" not in u.meta["pipecomp"]]
    return max(read, key=order.index).name


@pytest.mark.parametrize("delays", ["diagonal", "aligned"])
def test_the_plan_lists_each_adapter_its_stage_delay_and_sources(delays):
    plan = compiled(3, delays=delays).plan
    assert plan.added_nodes == ("skip_s3_j3_resize", "skip_s3_j3", "skip_s3_j3_sum",
                                "skip_s4_j3_resize", "skip_s4_j3", "skip_s4_j3_sum")
    for s in (3, 4):
        resize, total = plan.node(f"skip_s{s}_j3_resize"), plan.node(f"skip_s{s}_j3_sum")
        (src,) = resize.all_input_nodes
        assert src.name == _entering(plan, s - 2)
        assert plan.stage_of[src.name] == s - 3
        assert plan.delay_of[(src.name, resize.name)] == (1 if delays == "diagonal" else 3)
        v = total.args[0]
        assert v.name == _entering(plan, s) and plan.delay_of[(v.name, total.name)] == (1 if delays == "diagonal" else 1)
        assert {plan.stage_of[n] for n in (resize.name, f"skip_s{s}_j3", total.name)} == {s}
        # stage s reads the sum, not v_s
        assert all(plan.stage_of[r.name] != s for r in v.users if r is not total)
        assert total.users
    assert "added skip connections: 6 nodes" in plan.report()
    code = compiled(3, delays=delays).step_code()
    assert "skip_s3_j3 = self.skips.s3_j3(skip_s3_j3_resize)" in code


def _first_tick_that_sees_frame_zero(net, frames=8):
    x = clip(frames=frames)
    y = x.clone()
    y[:, 0] += 1
    a, b = stream(net, x), stream(net, y)
    return next(t for t in range(frames) if not torch.allclose(a[:, t], b[:, t]))


def test_diagonal_skips_lower_the_information_latency():
    plain = compiled(None)
    assert plain.latency == 4
    for j, latency in ((2, 2), (3, 2), (4, 1)):
        net = compiled(j)
        # stage s is first reached by frame 0 at d(s) = min(d(s-1), d(s-j)) + 1
        d = [0]
        for s in range(1, 5):
            d.append(min(d[s - 1], d[s - j] if s >= j else d[s - 1]) + 1)
        assert net.latency == d[4] == latency
        randomise_added(net)
        assert _first_tick_that_sees_frame_zero(net) == net.latency
    aligned = compiled([2, 3], delays="aligned")
    assert aligned.latency == 4
    randomise_added(aligned)
    assert _first_tick_that_sees_frame_zero(aligned) == 4


def test_load_state_dict_of_the_image_model_misses_exactly_the_adapters():
    model = deep()
    net = pipecomp.compile(copy.deepcopy(model), parallel=4, skips=[2, 3], temporal={"0": 2},
                           example_input=(1, 3, SIZE, SIZE))
    result = net.load_state_dict(model.state_dict(), strict=False)
    want = ["skips.s2_j2.weight", "skips.s2_j2.bias", "skips.s3_j2.weight", "skips.s3_j2.bias",
            "skips.s3_j3.weight", "skips.s3_j3.bias", "temporal._0.past1.weight"]
    assert sorted(result.missing_keys) == sorted(want) == sorted(added_params(net))
    assert result.unexpected_keys == []


@pytest.mark.parametrize("rule", ["sideways", "bptt"])
def test_gradients_reach_every_adapter(rule):
    net = compiled([2, 3], parallel=4)
    x, y = clip(frames=9), torch.randint(0, 3, (2, 9))
    train.backward(net, x, y, F.cross_entropy, rule=rule)
    for name, p in added_params(net).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("skips, options", [([2, 3], dict(parallel=4)), ([2, 3], dict(parallel=4, clocks="halve")),
                                             (2, dict(clocks="halve", phases="align"))])
def test_sideways_through_the_skips_equals_the_reference(skips, options):
    net = compiled(skips, **options)
    randomise_added(net)
    x, y = clip(frames=9), torch.randint(0, 3, (2, 9))
    # Stream's ticks W: those whose output depends on a frame (with clocks the output may hold
    # a value older than the latency says until the last node fires).
    first = next(t for t, f in enumerate(net.timeline(9).output) if f is not None)
    W = set(range(first, 9))
    fns = [(lambda o, t=t: F.cross_entropy(o, y[:, t])) if t in W else None for t in range(9)]
    ticks, _, _, _ = reference.sideways(net, list(x.unbind(1)), fns)
    assert_stream_equals(net, x, y, ticks)


def test_bptt_through_the_skips_equals_autograd_through_the_reference():
    net = compiled([2, 3], parallel=4, clocks="halve")
    randomise_added(net)
    x, y = clip(frames=7), torch.randint(0, 3, (2, 7))
    train.backward(net, x, y, F.cross_entropy, rule="bptt", ticks=[3, 5, 6])
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    outs = reference.run(net, list(x.unbind(1)))
    torch.stack([F.cross_entropy(outs[t], y[:, t]) for t in (3, 5, 6)]).mean().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4)


def test_a_skip_onto_a_vector_pools_and_one_onto_a_larger_map_is_bilinear():
    net = pipecomp.compile(chain().eval(), parallel=4, skips=2, cuts=["2", "4", "8"], example_input=(1, 3, SIZE, SIZE))
    assert net.plan.node("skip_s3_j2_resize").target is torch.mean  # into the linear head: a vector
    up = pipecomp.compile(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2),
                                        nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)).eval(),
                          skips=2, cuts=["2", "4"], example_input=(1, 3, SIZE, SIZE))
    resize = up.plan.node("skip_s2_j2_resize")
    assert resize.target is F.interpolate and resize.args[1] == (SIZE, SIZE)
    for net in (net, up):
        randomise_added(net)
        x = clip()
        with torch.no_grad():
            torch.testing.assert_close(net(x), torch.stack(reference.run(net, list(x.unbind(1))), 1))


def test_bad_values_are_refused_with_the_fix():
    for bad in (1, 5, True, [2, 2], [2, 0]):
        with pytest.raises(ValueError, match="integer from 2 to parallel-1|twice"):
            compiled(bad)
    with pytest.raises(ValueError, match="integer from 2 to parallel-1 = 0"):
        compiled(2, parallel=1)
    with pytest.raises(ValueError, match="skips='2' must be"):
        compiled("2")


# -- every backend runs the added connections ----------------------------------------------------
def _both(**options):
    """A fresh net with skips and temporal filters, the same net with its adapters set, and the plain one."""
    torch.manual_seed(0)
    model = deep().eval()
    shape = dict(example_input=(2, 3, SIZE, SIZE), parallel=4, clocks="halve", **options)
    plain = pipecomp.compile(copy.deepcopy(model), **shape).eval()
    fresh = pipecomp.compile(copy.deepcopy(model), skips=[2, 3], temporal=2, **shape).eval()
    tuned = pipecomp.compile(model, skips=[2, 3], temporal=2, **shape).eval()
    randomise_added(tuned)
    return plain, fresh, tuned, [torch.randn(2, 3, SIZE, SIZE) for _ in range(7)]


@pytest.mark.parametrize("prepare", [None, "freeze"])
def test_threads_run_the_added_connections(prepare):
    from pipecomp.backends.threaded import Runtime
    plain, fresh, tuned, xs = _both()
    for net, want in ((fresh, steps(plain, xs)), (tuned, steps(tuned, xs))):
        with Runtime(net, 2, prepare=prepare) as rt:
            got = [rt.step(x) for x in xs]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_processes_run_the_added_connections():
    from pipecomp.backends import distributed
    plain, fresh, tuned, xs = _both(shift="online", shift_place="inplace")
    for net, want in ((fresh, steps(plain, xs)), (tuned, steps(tuned, xs))):
        got = distributed.launch(net, xs, nprocs=2, timeout=120)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_tvm_runs_the_added_connections():
    # A fresh net's step equals the plain net's (above), so one build of the tuned net suffices.
    pytest.importorskip("tvm")
    from pipecomp.backends import tvm as backend
    _, _, tuned, xs = _both()
    want = steps(tuned, xs)
    with backend.build(tuned, "host", workers=1) as program:
        program.reset()
        got = [torch.from_numpy(program.step(x.numpy())) for x in xs]
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-4 * w.abs().max()


def test_pictures_draw_added_nodes_and_edges_in_their_own_style():
    pytest.importorskip("graphviz")
    from pipecomp.viz import to_dot
    from tests.test_viz import _check, parse
    net = compiled(2, parallel=4, temporal={"0": 2})
    plan = net.plan
    nodes, box_of = _check(plan, to_dot(net, collapse=10).source)  # every crossing drawn, with its delay
    assert {n for n, (_, a) in nodes.items() if a.get("class") == "pc-added"} == set(plan.added_nodes)
    source = to_dot(net, collapse=10).source
    assert "added temporal skip (starts at zero)" in source and "added temporal filter (starts at zero)" in source
    assert f"{len(plan.added_nodes)} added nodes" in source and "added connection's node" in source
    _, edges, _ = parse(source)
    drawn = {(a, b): e for a, b, e in edges}
    tap = drawn[("input_1", "_0_past1")]  # inside stage 0, one tick old
    assert tap["class"] == "pc-added" and tap["label"] == "d=1" and tap["style"] == "bold"
    first = plan.node(next(n for n in plan.added_nodes if n.startswith("skip_s2_j2")))
    skip = drawn[(first.args[0].name, first.name)]
    assert skip["class"] == "pc-crossing pc-skip pc-added" and skip["label"] == "d=1 skip"
    assert skip["style"] == "dashed"


def test_the_command_line_compiles_added_connections(capsys):
    from pipecomp.cli import main
    assert main(["compile", "torchvision:resnet18,num_classes=10", "--parallel", "4", "--skips", "2,3",
                 "--temporal", "layer1.*=2", "--input", "1,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "added skip connections: 9 nodes" in out  # 3 adapters (s2 j2, s3 j2, s3 j3) of 3 nodes
    assert "added temporal connections: 8 nodes" in out  # the 4 convolutions of layer1, k = 2


@pytest.mark.parametrize("argv, message", [
    (["--skips", "two"], "'two' is not a jump J"),
    (["--skips", "1"], "skip jump 1 must be an integer from 2 to parallel-1 = 3"),
    (["--temporal", "x=y"], "'x=y' is not a filter length K"),
    (["--temporal", "1"], "temporal filter length 1 must be an integer >= 2"),
    (["--temporal", "layer9*=2"], "temporal pattern 'layer9*' matches no convolution"),
])
def test_the_command_line_refuses_bad_added_connections(argv, message, capsys):
    from pipecomp.cli import main
    assert main(["compile", "torchvision:resnet18", "--parallel", "4", "--input", "1,3,32,32", *argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("pipecomp: error:")]
    assert len(errors) == 1 and message in errors[0], err


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_on_random_graphs_fresh_connections_change_nothing_and_set_ones_match_the_reference(data):
    model, plain = data.draw(graphs(shift=False))
    options = {k: getattr(plain.plan, k) for k in ("delays", "phases")}
    clocks = {n: (plain.plan.period_of[n], plain.plan.phase_of[n]) for n in plain.plan.period_of}
    parallel = plain.plan.parallel
    added = dict(temporal=data.draw(st.sampled_from([None, 2, {"stem": 3}])))
    if parallel >= 3:
        added["skips"] = data.draw(st.sampled_from([2, list(range(2, parallel))]))
    # The plain net's own clocks, by node name, so that both compile to the same schedule.
    try:
        net = pipecomp.compile(model, parallel=parallel, clocks=lambda n: clocks.get(n.name),
                               example_input=(1, 3, 16, 16), **options, **added)
    except pipecomp.CompileError as e:  # a stage fed only by a long edge has no value entering it
        assert "reads no tensor from stage" in str(e)
        assume(False)
    x = torch.randn(2, 5, 3, 16, 16)
    leaves = torch.utils._pytree.tree_leaves
    with torch.no_grad():
        for a, b in zip(leaves(net(x)), leaves(plain(x)), strict=True):
            assert torch.equal(a, b)
    randomise_added(net)
    with torch.no_grad():
        got = leaves(net(x))
        ref = reference.run(net, list(x.unbind(1)))
        net.reset()
        steps = [net.step(x[:, t]) for t in range(5)]
    for t in range(5):
        for clip_t, step_t, ref_t in zip([a[:, t] for a in got], leaves(steps[t]), leaves(ref[t]), strict=True):
            torch.testing.assert_close(clip_t, ref_t)
            torch.testing.assert_close(step_t, ref_t)
