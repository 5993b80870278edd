"""Distillation (Massively Parallel Video Networks sec. 3.3, semantics §8): against autograd and the reference.

The teacher's activations are taken in the tests by forward hooks on a copy of the image model,
the student's from the image model itself or from tests/reference.py, never from pipecomp.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_flatten

import pipecomp
from pipecomp import train

from . import reference
from .test_properties import compiled
from .test_train import SIZE, _streamed, assert_grads_close, chain, episode, grads_of

WEIGHT = 0.7


def clocked():
    """A chain that, compiled with cuts=["_2", "_6"] and halving clocks, has full-resolution nodes
    (period 1) in stage 1 read only by a period-2 node: at odd ticks `_3` fires, but nobody reads
    it, so the tick function drops it; it still has a term."""
    model = chain()
    model.insert(6, nn.Conv2d(4, 4, 3, padding=1))
    return model


def perturbed(net, seed=1):
    """The net after some training: its parameters moved, so that it differs from its teacher."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return net


def taught(model, frames, modules):
    """The frozen teacher frame by frame: per frame (output, {module name: activation})."""
    model = copy.deepcopy(model).eval()
    out, acts = [], {}
    for m in modules:
        model.get_submodule(m).register_forward_hook(lambda mod, a, y, m=m: acts.__setitem__(m, y))
    with torch.no_grad():
        for x in frames:
            out.append((model(x), dict(acts)))
    return out


def kl(student, teacher, temperature=1.0):
    """τ² Σ_k p_k (log p_k − log q_k) per frame, averaged over the batch (p: teacher, q: student)."""
    p = torch.softmax(teacher / temperature, 1)
    log_q = torch.log_softmax(student / temperature, 1)
    return temperature ** 2 * (p * (p.log() - log_q)).sum(1).mean()


def term(a, target, channels=4):
    return WEIGHT * (a - target).pow(2).sum() / channels / a.shape[0]


@pytest.mark.parametrize("rule", train.RULES)
@pytest.mark.parametrize("labels", [True, False])
def test_one_stage_equals_exact_per_frame_gradients(rule, labels):
    model = chain()
    teacher = copy.deepcopy(model)
    net = pipecomp.compile(copy.deepcopy(model), example_input=(1, 3, SIZE, SIZE))
    d = train.Distill(net, nodes=["1", "3"], weight=WEIGHT, outputs="mse" if labels else "auto",
                      temperature=2.0)
    perturbed(net)  # training changes the net, not the teacher made before
    student = copy.deepcopy(model)
    student.load_state_dict(net.state_dict())
    clip, y = episode()
    T = clip.shape[1]
    losses = train.backward(net, clip, y if labels else None, F.cross_entropy if labels else None, rule=rule,
                            distill=d)
    mine = {}
    for m in ("1", "3"):
        student.get_submodule(m).register_forward_hook(lambda mod, a, out, m=m: mine.__setitem__(m, out))
    want = []
    for t, (tout, tacts) in enumerate(taught(teacher, clip.unbind(1), ("1", "3"))):
        out = student(clip[:, t])
        loss = F.cross_entropy(out, y[:, t]) + F.mse_loss(out, tout) if labels else kl(out, tout, 2.0)
        want.append(loss + sum(term(mine[m], tacts[m]) for m in ("1", "3")))
    (sum(want) / T).backward()  # every tick is in W, so the one stage counts all T
    assert_grads_close(grads_of(net), grads_of(student))
    assert torch.allclose(losses, torch.stack(want).detach(), atol=1e-6)


def _expected_terms(net, teacher, clip, nodes, p):
    """Per tick, {node: value -> its term} from the teacher on frame t - p (the tests' own hooks)."""
    modules = [net.plan.node(n).target for n in nodes]
    frames = taught(teacher, clip.unbind(1), modules)
    return frames, [{n: (lambda a, n=n, m=m, t=t: term(a, frames[t - p][1][m])) for n, m in zip(nodes, modules)}
                    for t in range(clip.shape[1])]


def test_bptt_equals_backpropagation_through_the_reference_interpreter():
    model = clocked()
    net = pipecomp.compile(copy.deepcopy(model), cuts=["_2", "_6"], clocks="halve", example_input=(1, 3, SIZE, SIZE))
    d = train.Distill(net, nodes=["1", "3", "6"], weight=WEIGHT, outputs="mse")
    perturbed(net)
    clip, y = episode(frames=7)
    W, p = [2, 3, 5, 6], 1
    net.zero_grad(set_to_none=True)
    losses = train.backward(net, clip, y, F.cross_entropy, rule="bptt", ticks=W, prediction_latency=p, distill=d)
    got = grads_of(net)
    net.zero_grad(set_to_none=True)
    parallel = train.backward(net, clip, y, F.cross_entropy, rule="bptt", ticks=W, prediction_latency=p,
                              distill=d, workers=2)
    assert_grads_close(grads_of(net), got)  # model-parallel BPTT reads the nodes' series through its copies
    net.zero_grad(set_to_none=True)
    frames, terms = _expected_terms(net, model, clip, ("_1", "_3", "_6"), p)
    history = {}
    outs = reference.run(net, list(clip.unbind(1)), history)
    fires = {n: [t % net.plan.period_of[n] == net.plan.phase_of[n] for t in range(7)] for n in ("_1", "_3", "_6")}
    assert not all(fires["_6"])  # a clocked node: no term at the ticks it holds its value
    per_tick = [F.cross_entropy(outs[t], y[:, t - p]) + F.mse_loss(outs[t], frames[t - p][0])
                + sum(terms[t][n](history[n][t]) for n in terms[t] if fires[n][t]) for t in W]
    torch.stack(per_tick).mean().backward()
    assert_grads_close(got, grads_of(net))
    assert torch.allclose(losses[W], torch.stack(per_tick).detach(), atol=1e-6)
    assert torch.allclose(losses, parallel, equal_nan=True)


def test_sideways_equals_the_reference_with_local_terms():
    model = clocked()
    net = pipecomp.compile(copy.deepcopy(model), cuts=["_2", "_6"], clocks="halve", example_input=(1, 3, SIZE, SIZE))
    d = train.Distill(net, nodes=["1", "3", "6"], weight=WEIGHT, outputs="kl")
    assert "_3" not in {n.name for n in net._stages[1].variant(1).graph.nodes}  # fires at 1, dead code there
    perturbed(net)
    clip, y = episode(frames=8)
    W, p = [2, 3, 4, 6, 7], 1
    net.zero_grad(set_to_none=True)
    losses = train.backward(net, clip, y, F.cross_entropy, ticks=W, prediction_latency=p, distill=d)
    got = grads_of(net)
    net.zero_grad(set_to_none=True)
    train.backward(net, clip, y, F.cross_entropy, ticks=W, prediction_latency=p, distill=d, workers=2)
    assert_grads_close(grads_of(net), got)  # the teacher runs in the caller

    frames, terms = _expected_terms(net, model, clip, ("_1", "_3", "_6"), p)
    fns = [(lambda o, t=t: F.cross_entropy(o, y[:, t - p]) + kl(o, frames[t - p][0])) if t in W else None
           for t in range(8)]
    ticks, want_losses, first, owner = reference.sideways(net, list(clip.unbind(1)), fns,
                                                          [terms[t] if t in W else None for t in range(8)])
    want = {n: sum(t[n] for t in ticks if n in t) / (8 - first[owner[n]]) for n in owner}
    assert_grads_close(got, want)
    assert first == [2, 2, 2]  # every stage has a term at the first tick of W: none waits (rule 5)
    assert torch.allclose(losses[W], torch.stack([want_losses[t] for t in W]), atol=1e-6)
    assert "pipecomp_train__activation(_3, teacher, '_3')" in train.code(net, d)


def test_a_local_term_does_not_wait():
    # With 3 stages the output's gradient reaches stage 0 two ticks after the loss: in a 3-frame clip
    # with W = {2}, stage 0 learns only from its own term, at tick 2, and exactly its gradient.
    model = chain()
    net = pipecomp.compile(copy.deepcopy(model), parallel=3, example_input=(1, 3, SIZE, SIZE))
    assert net.plan.stage_of["_1"] == 0 and net.plan.stage_of["_8"] == 2
    d = train.Distill(net, nodes=["1"], weight=WEIGHT)
    perturbed(net)
    conv = net.get_submodule("0")
    clip, y = episode(frames=3)
    train.backward(net, clip, y, F.cross_entropy, ticks=[2])
    assert conv.weight.grad is None  # without distillation nothing reached stage 0 in this clip
    train.backward(net, clip, y, F.cross_entropy, ticks=[2], distill=d)
    got = conv.weight.grad.clone()
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        target = model[:2](clip[:, 2])
    term(net.get_submodule("1")(conv(clip[:, 2])), target).backward()  # stage 0 counts 1 tick (tick 2)
    assert torch.allclose(got, conv.weight.grad, atol=1e-6)


def test_the_teacher_does_not_change_when_the_net_trains():
    model = chain()
    net = pipecomp.compile(copy.deepcopy(model), parallel=2, example_input=(1, 3, SIZE, SIZE))
    d = train.Distill(net, nodes=["3"], weight=WEIGHT)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    clip, _ = episode(frames=4)
    before = copy.deepcopy(net.state_dict())
    for rule in ("sideways", "bptt"):
        opt.zero_grad()
        train.backward(net, clip, None, None, rule=rule, distill=d)
        opt.step()
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    out, acts = d._run(clip[:, 0])
    with torch.no_grad():
        assert torch.allclose(out, model(clip[:, 0]), atol=1e-6)
        assert torch.allclose(acts["_3"][0], model[:4](clip[:, 0]), atol=1e-6)


def test_a_teacher_module_gives_its_outputs_and_activations():
    model = chain()
    net = pipecomp.compile(copy.deepcopy(model), parallel=2, example_input=(1, 3, SIZE, SIZE))
    own = train.Distill(net, nodes=["1", "3"], weight=WEIGHT, outputs="mse")
    perturbed(net)
    given = train.Distill(net, nodes=["1", "3"], weight=WEIGHT, outputs="mse", teacher=model)
    clip, y = episode(frames=5)
    grads = []
    for d in (own, given):
        net.zero_grad(set_to_none=True)
        train.backward(net, clip, y, F.cross_entropy, distill=d)
        grads.append(grads_of(net))
    assert_grads_close(grads[1], grads[0], atol=1e-7, rtol=1e-6)
    other = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    outputs_only = train.Distill(net, teacher=other)  # any teacher, for its outputs
    assert torch.isfinite(train.backward(net, clip, None, None, distill=outputs_only)[-1])
    with pytest.raises(ValueError, match="teacher's activation for node '_1' is"):
        train.backward(net, clip, None, None, distill=train.Distill(net, nodes=["1"], teacher=nn.Sequential(
            nn.Conv2d(3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))))


@pytest.mark.parametrize("rule", train.RULES)
def test_bad_input_is_refused_before_any_grad_changes(rule):
    net = pipecomp.compile(chain(), parallel=2, shift="online", shift_place="inplace", shift_fraction=0.25,
                           example_input=(1, 3, SIZE, SIZE))
    clip, y = episode(frames=5)
    d = train.Distill(net, nodes=["3"])
    train.backward(net, clip, y, F.cross_entropy, rule=rule, distill=d)
    before = grads_of(net)
    other = pipecomp.compile(chain(), parallel=2, example_input=(1, 3, SIZE, SIZE))
    wrong_teacher = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.ReLU())
    cases = [
        (dict(targets=None, loss_fn=None, distill=None), ValueError, "no loss_fn and no targets"),
        (dict(targets=None), ValueError, "loss_fn given but targets is None"),
        (dict(loss_fn=None), ValueError, "targets given but loss_fn is None"),
        (dict(distill=train.Distill(other, nodes=["3"])), ValueError, "made for another network"),
        (dict(distill="kl"), TypeError, "distill must be a train.Distill"),
        (dict(targets=None, loss_fn=None, distill=train.Distill(net, nodes=["3"], teacher=wrong_teacher)),
         ValueError, r"node '_3' is \[N, 2, 8, 8\], but the net's is \[N, 4, 8, 8\]"),
    ]
    for change, error, match in cases:
        kwargs = dict(net=net, clip=clip, targets=y, loss_fn=F.cross_entropy, rule=rule, distill=d) | change
        with pytest.raises(error, match=match):
            train.backward(**kwargs)
        assert_grads_close(grads_of(net), before, atol=0, rtol=0)
    made = [
        (dict(nodes=["layer9"]), ValueError, "no node or module 'layer9'"),
        (dict(nodes=["_33"]), ValueError, "close names: _3"),
        (dict(nodes=["input_1"]), ValueError, "does not make a feature tensor"),
        (dict(nodes=[net.plan.shift_nodes[0]]), ValueError, "added by compile"),
        (dict(nodes=["3"], weight=-1), ValueError, "weight=-1 must be a number >= 0"),
        (dict(outputs="l1"), ValueError, "outputs='l1' must be one of"),
        (dict(temperature=0), ValueError, "temperature=0 must be a number > 0"),
        (dict(outputs=None), ValueError, "distils nothing"),
        (dict(nodes=[net.plan.shift_nodes[0]], teacher=chain()), ValueError, "no module's output"),
        (dict(nodes=["3"], teacher=nn.Linear(2, 2)), ValueError, "has no module '3'"),
    ]
    for kwargs, error, match in made:
        with pytest.raises(error, match=match):
            train.Distill(net, **kwargs)


def test_the_default_teacher_is_the_image_model_without_added_connections_or_shifts():
    net = perturbed(pipecomp.compile(chain(), parallel=3, skips=2, temporal=2, feedback=1, shift="online",
                                     shift_place="inplace", shift_fraction=0.25, example_input=(1, 3, SIZE, SIZE)))
    assert net.plan.added_nodes and net.plan.shift_nodes
    d = train.Distill(net, nodes=["3"])
    model = chain()
    model.load_state_dict(net.state_dict(), strict=False)  # the image model's parameters, as the net holds them
    x = torch.randn(2, 3, SIZE, SIZE)
    out, acts = d._run(x)
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-6)
        assert torch.allclose(acts["_3"][0], model[:4](x), atol=1e-6)
        assert not torch.allclose(net(x[:, None].expand(2, 4, 3, SIZE, SIZE))[:, -1], model(x), atol=1e-3)


def test_a_stream_without_labels_equals_the_reference_tick_by_tick():
    model = clocked()
    net = pipecomp.compile(copy.deepcopy(model), cuts=["_2", "_6"], clocks="halve", example_input=(1, 3, SIZE, SIZE))
    d = train.Distill(net, nodes=["1", "3", "6"], weight=WEIGHT)  # no task loss: outputs="auto" is KL
    perturbed(net)
    clip, _ = episode(frames=7)
    p = 1
    got = []
    with train.Stream(net, None, prediction_latency=p, distill=d) as stream:
        for t in range(7):
            net.zero_grad(set_to_none=True)
            stream.step(clip[:, t])
            got.append({n: g for n, g in grads_of(net).items() if g is not None})
        with pytest.raises(ValueError, match="takes no target"):
            stream.step(clip[:, 0], torch.zeros(2))
    W = _streamed(net, 7, p)
    frames, terms = _expected_terms(net, model, clip, ("_1", "_3", "_6"), p)
    fns = [(lambda o, t=t: kl(o, frames[t - p][0])) if t in W else None for t in range(7)]
    want, _, _, _ = reference.sideways(net, list(clip.unbind(1)), fns, [terms[t] if t in W else None for t in range(7)])
    for g, w in zip(got, want):
        assert_grads_close(g, w)


def test_ticks_where_no_distilled_node_fires_count_as_zero():
    model = chain()
    net = pipecomp.compile(copy.deepcopy(model), clocks="halve", example_input=(1, 3, SIZE, SIZE))
    assert net.plan.period_of["_6"] == 2
    d = train.Distill(net, nodes=["6"], weight=WEIGHT, outputs=None)  # an activation term only
    perturbed(net)
    clip, _ = episode(frames=5)
    W = [1, 2, 3, 4]
    got = {}
    for rule in train.RULES:
        net.zero_grad(set_to_none=True)
        got[rule] = (train.backward(net, clip, None, None, rule=rule, ticks=W, distill=d), grads_of(net))
    assert torch.allclose(got["sideways"][0], got["bptt"][0], equal_nan=True)
    student = copy.deepcopy(model)
    student.load_state_dict(net.state_dict())
    teacher = [tacts["6"] for _, tacts in taught(model, clip.unbind(1), ["6"])]
    fired = [t for t in W if t % 2 == net.plan.phase_of["_6"]]
    per_tick = [term(student[:7](clip[:, t]), teacher[t]) for t in fired]
    (sum(per_tick) / len(W)).backward()  # with one stage every tick is its own frame; held ticks add 0
    assert_grads_close(got["bptt"][1], grads_of(student))
    assert [t for t in W if got["bptt"][0][t] == 0] == [t for t in W if t not in fired]


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compiled(), st.data())
def test_sideways_equals_the_reference_on_random_models(case, data):
    model, net = case
    teacher = copy.deepcopy(model)  # the net shares the model's modules: copied before they move
    eligible = [n.name for n in net.plan.graph.nodes if n.op == "call_module" and len(n.meta["pipecomp"].get(
        "shape", ())) == 4 and n.name not in net.plan.shift_nodes]
    nodes = data.draw(st.lists(st.sampled_from(eligible), min_size=1, max_size=3, unique=True))
    d = train.Distill(net, nodes=nodes, weight=WEIGHT, outputs="mse")
    perturbed(net)
    clip = torch.randn(2, 6, 3, 16, 16)
    y = torch.randn(2, 6, 3)

    def task(out, target):
        logits = out["logits"] if isinstance(out, dict) else out
        return (logits - target).pow(2).mean()
    W = list(range(1, 6))
    net.zero_grad(set_to_none=True)
    losses = train.backward(net, clip, y, task, ticks=W, distill=d)
    got = grads_of(net)
    frames = taught(teacher, clip.unbind(1), [net.plan.node(n).target for n in nodes])
    local = [{n: (lambda a, n=n, t=t: WEIGHT * (a - frames[t][1][net.plan.node(n).target]).pow(2).sum()
                  / a.shape[1] / a.shape[0]) for n in nodes} if t in W else None for t in range(6)]
    fns = [(lambda o, t=t: task(o, y[:, t]) + sum(F.mse_loss(a, b) for a, b in zip(
        tree_flatten(o)[0], tree_flatten(frames[t][0])[0]))) if t in W else None for t in range(6)]
    ticks, want_losses, first, owner = reference.sideways(net, list(clip.unbind(1)), fns, local)
    want = {n: sum(t[n] for t in ticks if n in t) / (6 - first[owner[n]]) for n in owner
            if any(n in t for t in ticks)}
    assert_grads_close({n: g for n, g in got.items() if g is not None}, want, atol=1e-5)
    assert torch.allclose(losses[W], torch.stack([want_losses[t] for t in W]), atol=1e-5, rtol=1e-4)


def test_feedback_nets_distil_with_sideways_as_the_reference_does():
    model = chain()
    net = pipecomp.compile(copy.deepcopy(model), parallel=2, feedback=1, example_input=(1, 3, SIZE, SIZE))
    d = train.Distill(net, nodes=["1", "3"], weight=WEIGHT, outputs="mse")
    perturbed(net)  # the feedback adapter too: the teacher (the image model) has none
    clip, y = episode(frames=6)
    W = [1, 2, 3, 4, 5]
    net.zero_grad(set_to_none=True)
    train.backward(net, clip, y, F.cross_entropy, ticks=W, distill=d)
    got = grads_of(net)
    frames, terms = _expected_terms(net, model, clip, ("_1", "_3"), 0)
    fns = [(lambda o, t=t: F.cross_entropy(o, y[:, t]) + F.mse_loss(o, frames[t][0])) if t in W else None
           for t in range(6)]
    ticks, _, first, owner = reference.sideways(net, list(clip.unbind(1)), fns,
                                                [terms[t] if t in W else None for t in range(6)])
    want = {n: sum(t[n] for t in ticks if n in t) / (6 - first[owner[n]]) for n in owner if any(n in t for t in ticks)}
    assert "feedback.conv.weight" in want
    assert_grads_close({n: g for n, g in got.items() if g is not None}, want)
    with pytest.raises(ValueError, match="distil outputs only"):
        train.backward(net, clip, y, F.cross_entropy, rule="bptt", distill=d)
    outputs_only = train.Distill(net, outputs="mse")
    assert torch.isfinite(train.backward(net, clip, y, F.cross_entropy, rule="bptt", distill=outputs_only)[1:]).all()
