"""Feedback (semantics §9): the output's tensor of tick t-d, added to the first convolution's output."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_leaves

import pipecomp
from pipecomp import train
from tests import reference
from tests.passes.test_temporal import assert_stream_equals, clip, steps, stream
from tests.test_properties import compiled as graphs
from tests.test_train import chain

SIZE = 8


def segmenter():
    """A feature-map output at half the first convolution's resolution: fed back bilinearly."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))


class TwoHeads(nn.Module):
    """A dict output: its first entry is fed back."""

    def __init__(self):
        super().__init__()
        self.body = chain()
        self.extra = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        return {"logits": self.body(x), "map": self.extra(x)}


class Sizes(nn.Module):
    """Returns a tuple of sizes: no tensor to feed back."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).shape[-2:]


class Count(Sizes):
    """Returns an int."""

    def forward(self, x):
        return self.conv(x).shape[1]


class Halves(Sizes):
    """Returns the tuple that one node makes: its first tensor is no node of its own."""

    def forward(self, x):
        return torch.split(self.conv(x), 2, 1)


MODELS = {"classifier": chain, "segmenter": segmenter}


def compiled(model="classifier", d=1, **options):
    torch.manual_seed(0)
    return pipecomp.compile(MODELS[model]().eval(), feedback=d, example_input=(1, 3, SIZE, SIZE), **options)


def feedback_params(net):
    return {n: p for n, p in net.named_parameters() if n.startswith("feedback.")}


def randomise_feedback(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in feedback_params(net).values():
            p.copy_(torch.randn(p.shape, generator=g))


OPTIONS = [dict(parallel=1), dict(parallel=3), dict(parallel=3, delays="aligned"), dict(parallel=3, clocks="halve"),
           dict(parallel=4, clocks={"4": 2, "5": 2, "6": 2}, phases="zero"),
           dict(parallel=3, shift="online", shift_place="inplace")]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("d", [1, 2])
def test_fresh_feedback_computes_the_network_without_it(d, options):
    torch.manual_seed(0)
    model = chain().eval()
    plain = pipecomp.compile(copy.deepcopy(model), example_input=(1, 3, SIZE, SIZE), **options)
    net = pipecomp.compile(model, feedback=d, example_input=(1, 3, SIZE, SIZE), **options)
    x = clip()
    with torch.no_grad():
        want = plain(x)
        assert torch.equal(net(x), want)
    assert torch.equal(stream(net, x), want)
    assert net.latency == plain.latency
    assert net.timeline(9).table() == plain.timeline(9).table()


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("model", ["classifier", "segmenter"])
@pytest.mark.parametrize("d", [1, 2])
def test_set_feedback_step_equals_clip_and_the_reference(d, model, options):
    if model == "segmenter" and "clocks" in options and isinstance(options["clocks"], dict):
        options = {**options, "clocks": {"2": 2, "3": 2}}
    net = compiled(model, d, **options)
    plain = pipecomp.compile(MODELS[model]().eval(), example_input=(1, 3, SIZE, SIZE), **options)
    plain.load_state_dict(net.state_dict(), strict=False)
    randomise_feedback(net)
    x = clip(frames=8)
    with torch.no_grad():
        got = net(x)
        want = torch.stack(reference.run(net, list(x.unbind(1))), 1)
        without = plain(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(stream(net, x), want)
    assert not torch.allclose(got, without)  # the feedback changes the outputs


def test_one_tick_by_hand():
    # y_t = head(relu(conv(x_t) + W y_{t-1}[:, :, None, None] + b)), with one stage
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    net = pipecomp.compile(copy.deepcopy(model), feedback=1, example_input=(1, 3, SIZE, SIZE))
    randomise_feedback(net)
    w, b = net.feedback.conv.weight[:, :, 0, 0], net.feedback.conv.bias
    x = clip(frames=5)
    y, want = torch.zeros(2, 3), []
    with torch.no_grad():
        for t in range(5):
            h = model[0](x[:, t]) + (y @ w.T + b)[:, :, None, None]
            y = model[4](model[3](model[2](model[1](h))))
            want.append(y)
        torch.testing.assert_close(net(x), torch.stack(want, 1))


def test_a_model_that_is_its_first_convolution_feeds_back_the_sum():
    # y_t = conv(x_t) + W y_{t-2} + b: the output is the first convolution's, feedback included
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    net = pipecomp.compile(nn.Sequential(copy.deepcopy(conv)), feedback=2, example_input=(1, 3, SIZE, SIZE))
    assert net.plan.feedback == ("feedback_sum", "feedback_in", 2)
    randomise_feedback(net)
    x, ys = clip(frames=6), [torch.zeros(2, 4, SIZE, SIZE)] * 2
    with torch.no_grad():
        for t in range(6):
            ys.append(conv(x[:, t]) + net.feedback.conv(ys[-2]))
        torch.testing.assert_close(net(x), torch.stack(ys[2:], 1))
        torch.testing.assert_close(stream(net, x), torch.stack(ys[2:], 1))


def test_the_plan_lists_the_nodes_their_stage_clock_delay_and_state():
    net = compiled("classifier", 2, parallel=3, clocks="halve")
    plan = net.plan
    assert plan.added_nodes == ("feedback_in", "feedback_resize", "feedback", "feedback_sum")
    assert plan.feedback == ("_8", "feedback_in", 2)  # the linear head, in the last stage
    assert plan.stage_of["_8"] == 2
    for name in plan.added_nodes:
        assert plan.stage_of[name] == 0
        assert (plan.period_of[name], plan.phase_of[name]) == (plan.period_of["_0"], plan.phase_of["_0"])
        assert plan.node(name).meta["pipecomp"]["added"] == "feedback"
    assert plan.delay_of[("_8", "feedback_in")] == 2 and plan.registers["_8"] == 2
    total = plan.node("feedback_sum")
    assert [a.name for a in total.args] == ["_0", "feedback"]
    assert [u.name for u in plan.node("_0").users] == ["feedback_sum"]  # the first convolution's readers read the sum
    assert plan.node("feedback_resize").args[1:] == (-1, 3, 1, 1)  # a vector: broadcast over height and width
    report = net.report()
    assert "added feedback connections: 4 nodes, 16 params" in report  # 3 -> 4 channels, weight and bias
    assert "feedback: the output's '_8' of tick t-2, read in stage 0 as 'feedback_in'" in report
    code = net.step_code()
    assert "_8_d2 = state['_8_d2']" in code and "feedback = self.feedback.conv(feedback_resize)" in code
    seg = compiled("segmenter", 1, parallel=2).plan
    resize = seg.node("feedback_resize")
    assert resize.target is F.interpolate and resize.args[1:] == ((SIZE, SIZE), None, "bilinear", False)


def test_a_dict_feeds_back_its_first_entry():
    torch.manual_seed(0)
    net = pipecomp.compile(TwoHeads().eval(), feedback=1, parallel=2, example_input=(1, 3, SIZE, SIZE))
    assert net.plan.feedback[0] == "body_8"
    randomise_feedback(net)
    x = clip(frames=5)
    with torch.no_grad():
        got = net(x)
        want = reference.run(net, list(x.unbind(1)))
    for key in ("logits", "map"):
        torch.testing.assert_close(got[key], torch.stack([w[key] for w in want], 1))


def test_load_state_dict_of_the_image_model_misses_exactly_the_adapter():
    model = chain()
    net = pipecomp.compile(copy.deepcopy(model), parallel=3, feedback=1, temporal={"0": 2},
                           example_input=(1, 3, SIZE, SIZE))
    result = net.load_state_dict(model.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["feedback.conv.bias", "feedback.conv.weight", "temporal._0.past1.weight"]
    assert result.unexpected_keys == []


def test_with_a_temporal_filter_on_the_first_convolution():
    net = pipecomp.compile(chain().eval(), parallel=3, feedback=1, temporal={"0": 2}, example_input=(1, 3, SIZE, SIZE))
    assert [a.name for a in net.plan.node("feedback_sum").args] == ["_0_sum1", "feedback"]
    randomise_feedback(net)
    with torch.no_grad():
        net.temporal._0.past1.weight.normal_()
    x = clip(frames=6)
    with torch.no_grad():
        torch.testing.assert_close(net(x), torch.stack(reference.run(net, list(x.unbind(1))), 1))


@pytest.mark.parametrize("rule", ["sideways", "bptt"])
def test_gradients_reach_the_adapter(rule):
    net = compiled("classifier", 1, parallel=3)
    x, y = clip(frames=9), torch.randint(0, 3, (2, 9))
    train.backward(net, x, y, F.cross_entropy, rule=rule)
    for name, p in feedback_params(net).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("d, options", [(1, dict(parallel=3)), (2, dict(parallel=3)), (2, dict(parallel=1)),
                                        (1, dict(parallel=3, clocks={"4": 2, "5": 2, "6": 2}, phases="zero"))])
def test_sideways_through_the_feedback_equals_the_reference(d, options):
    net = compiled("classifier", d, **options)
    randomise_feedback(net)
    x, y = clip(frames=9), torch.randint(0, 3, (2, 9))
    first = next(t for t, f in enumerate(net.timeline(9).output) if f is not None)
    fns = [(lambda o, t=t: F.cross_entropy(o, y[:, t])) if t >= first else None for t in range(9)]
    ticks, _, _, _ = reference.sideways(net, list(x.unbind(1)), fns)
    assert any("feedback.conv.weight" in g for g in ticks)
    assert_stream_equals(net, x, y, ticks)


def test_sideways_on_threads_equals_one_thread():
    net = compiled("classifier", 2, parallel=3)
    randomise_feedback(net)
    x, y = clip(frames=8), torch.randint(0, 3, (2, 8))
    train.backward(net, x, y, F.cross_entropy)
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    train.backward(net, x, y, F.cross_entropy, workers=2)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[n])


def test_bptt_through_the_feedback_equals_autograd_through_the_reference():
    net = compiled("segmenter", 2, parallel=3, clocks="halve")
    randomise_feedback(net)
    x, y = clip(frames=7), torch.randn(2, 7, 2, SIZE // 2, SIZE // 2)
    train.backward(net, x, y, F.mse_loss, rule="bptt", ticks=[3, 5, 6])
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    outs = reference.run(net, list(x.unbind(1)))
    torch.stack([F.mse_loss(outs[t], y[:, t]) for t in (3, 5, 6)]).mean().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="leave workers= unset"):
        train.backward(net, x, y, F.mse_loss, rule="bptt", workers=2)


def test_bad_values_are_refused_with_the_fix():
    for bad in (0, -1, True, 1.5, "1"):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            compiled(d=bad)
    for model in (Sizes(), Count()):
        with pytest.raises(pipecomp.CompileError, match="output holds no tensor"):
            pipecomp.compile(model, feedback=1, example_input=(1, 3, SIZE, SIZE))
    with pytest.raises(pipecomp.CompileError, match="inside the structure that node 'split' returns"):
        pipecomp.compile(Halves(), feedback=1, example_input=(1, 3, SIZE, SIZE))
    with pytest.raises(pipecomp.CompileError, match="has no 2-d convolution"):
        pipecomp.compile(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 3)), feedback=1,
                         example_input=(1, 3, SIZE, SIZE))
    with pytest.raises(pipecomp.CompileError, match=r"has shape \[1, 4, 64\]"):
        pipecomp.compile(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(2)), feedback=1,
                         example_input=(1, 3, SIZE, SIZE))
    named = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3), feedback=nn.Conv2d(4, 4, 1)))
    with pytest.raises(pipecomp.CompileError, match="has a node named 'feedback'"):
        pipecomp.compile(named, feedback=1, example_input=(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="shift='online'"):
        pipecomp.compile(chain(), feedback=1, shift="offline", shift_place="inplace", example_input=(1, 3, SIZE, SIZE))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_on_random_graphs_fresh_feedback_changes_nothing_and_set_feedback_matches_the_reference(data):
    model, plain = data.draw(graphs(shift=False))
    options = {k: getattr(plain.plan, k) for k in ("delays", "phases", "parallel")}
    clocks = {n: (plain.plan.period_of[n], plain.plan.phase_of[n]) for n in plain.plan.period_of}
    # The plain net's own clocks, by node name, so that both compile to the same schedule.
    net = pipecomp.compile(model, clocks=lambda n: clocks.get(n.name), feedback=data.draw(st.sampled_from([1, 2])),
                           example_input=(1, 3, 16, 16), **options)
    x = torch.randn(2, 5, 3, 16, 16)
    with torch.no_grad():
        for a, b in zip(tree_leaves(net(x)), tree_leaves(plain(x)), strict=True):
            assert torch.equal(a, b)
    randomise_feedback(net)
    with torch.no_grad():
        got = tree_leaves(net(x))
        ref = reference.run(net, list(x.unbind(1)))
        net.reset()
        steps = [net.step(x[:, t]) for t in range(5)]
    for t in range(5):
        for clip_t, step_t, ref_t in zip([a[:, t] for a in got], tree_leaves(steps[t]), tree_leaves(ref[t]),
                                         strict=True):
            torch.testing.assert_close(clip_t, ref_t)
            torch.testing.assert_close(step_t, ref_t)


# -- every backend runs the feedback -------------------------------------------------------------
@pytest.fixture(scope="module")
def nets():
    """A fresh net with feedback, the same net with its adapter set, the plain one, and frames."""
    torch.manual_seed(0)
    model = chain().eval()
    shape = dict(example_input=(2, 3, SIZE, SIZE), parallel=3, clocks={"4": 2, "5": 2, "6": 2}, phases="zero")
    plain = pipecomp.compile(copy.deepcopy(model), **shape).eval()
    fresh = pipecomp.compile(copy.deepcopy(model), feedback=2, **shape).eval()
    tuned = pipecomp.compile(model, feedback=2, **shape).eval()
    randomise_feedback(tuned)
    return plain, fresh, tuned, [torch.randn(2, 3, SIZE, SIZE) for _ in range(7)]


@pytest.mark.parametrize("prepare", [None, "freeze"])
def test_threads_run_the_feedback(nets, prepare):
    from pipecomp.backends.threaded import Runtime
    plain, fresh, tuned, xs = nets
    for net, want in ((fresh, steps(plain, xs)), (tuned, steps(tuned, xs))):
        with Runtime(net, 3, prepare=prepare) as rt:
            got = [rt.step(x) for x in xs]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_processes_run_the_feedback(nets):
    from pipecomp.backends import distributed
    _, _, tuned, xs = nets
    got = distributed.launch(tuned, xs, nprocs=2, timeout=120)
    for g, w in zip(got, steps(tuned, xs)):
        torch.testing.assert_close(g, w)


def test_tvm_runs_the_feedback(nets):
    # A fresh net's step equals the plain net's (above), so one build of the tuned net suffices.
    pytest.importorskip("tvm")
    from pipecomp.backends import tvm as backend
    _, _, tuned, xs = nets
    want = steps(tuned, xs)
    with backend.build(tuned, "host", workers=1) as program:
        program.reset()
        got = [torch.from_numpy(program.step(x.numpy())) for x in xs]
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-4 * w.abs().max()


def test_pictures_draw_the_back_edge_in_its_own_style():
    pytest.importorskip("graphviz")
    from pipecomp.viz import to_dot
    from tests.test_viz import _check, parse
    net = compiled("classifier", 2, parallel=3)
    plan = net.plan
    source = to_dot(net, collapse=10).source
    nodes, _ = _check(plan, source)  # every fx edge drawn with its delay, and the back edge dashed as it crosses
    assert {n for n, (_, a) in nodes.items() if a.get("class") == "pc-added"} == set(plan.added_nodes)
    assert "added feedback (starts at zero)" in source and "back to the first convolution" in source
    _, edges, _ = parse(source)
    drawn = {(a, b): e for a, b, e in edges}
    back = drawn[("_8", "feedback_in")]
    assert back["class"] == "pc-crossing pc-feedback pc-added" and back["label"] == "d=2 feedback"
    assert back["style"] == "dashed" and back["arrowhead"] == "onormal" and back["constraint"] == "false"
    one = compiled("classifier", 1, parallel=1)
    _, edges, _ = parse(to_dot(one, collapse=10).source)
    inside = {(a, b): e for a, b, e in edges}[("_8", "feedback_in")]
    assert inside["class"] == "pc-feedback pc-added" and inside["style"] == "bold"


def test_the_command_line_compiles_feedback(tmp_path, capsys):
    from pipecomp.cli import main
    factory = tmp_path / "tiny.py"
    factory.write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), "
                       "nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n")
    assert main(["compile", f"{factory}:make", "--parallel", "2", "--feedback", "2", "--input", "1,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "added feedback connections: 4 nodes, 16 params" in out
    assert "feedback: the output's '_4' of tick t-2" in out
    assert main(["compile", f"{factory}:make", "--feedback", "0", "--input", "1,3,8,8"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pipecomp: error:")]
    assert len(errors) == 1 and "feedback=0 must be an integer >= 1" in errors[0]

