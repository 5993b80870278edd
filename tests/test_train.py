"""Training (semantics §8): each property of the contract, against independent expectations."""
import copy
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from torch import nn

import pipecomp
from pipecomp import train

from . import reference
from .test_properties import compiled

SIZE = 8


def chain(channels=4, classes=3, bn=False):
    layers = [nn.Conv2d(3, channels, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(channels))
    layers += [nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
               nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def episode(batch=2, frames=6, classes=3, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, size, size, generator=g), torch.randint(0, classes, (batch, frames), generator=g)


def grads_of(module):
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def assert_grads_close(got, want, atol=1e-6, rtol=1e-4):
    assert got.keys() == want.keys()
    for name in want:
        g, w = got[name], want[name]
        if w is None or g is None:
            assert g is None and w is None or torch.count_nonzero(g if w is None else w) == 0, name
            continue
        assert torch.allclose(g, w, atol=atol, rtol=rtol), (name, (g - w).abs().max().item())


def test_one_stage_equals_exact_per_frame_gradients():
    model = chain()
    net = pipecomp.compile(copy.deepcopy(model), example_input=(1, 3, SIZE, SIZE))
    clip, y = episode()
    T = clip.shape[1]
    losses = train.backward(net, clip, y, F.cross_entropy)
    total = sum(F.cross_entropy(model(clip[:, t]), y[:, t]) for t in range(T))
    (total / T).backward()  # every tick is in W, so the stage counts all T
    assert_grads_close(grads_of(net), grads_of(model))
    want = torch.stack([F.cross_entropy(model(clip[:, t]), y[:, t]) for t in range(T)])
    assert torch.allclose(losses, want.detach(), atol=1e-6)


def _per_tick(net, clip, y, loss_fn=F.cross_entropy, workers=None, p=0):
    """Per-tick pseudo-gradients from train.Stream (rule 6), one dict per tick."""
    out = []
    with train.Stream(net, loss_fn, prediction_latency=p, workers=workers) as stream:
        for t in range(clip.shape[1]):
            net.zero_grad(set_to_none=True)
            stream.step(clip[:, t], y[:, t])
            out.append(grads_of(net))
    return out


def _streamed(net, T, p=0):
    """The ticks `train.Stream` learns on: from the first whose output depends on a frame (and p)."""
    first = next(t for t, f in enumerate(net.timeline(T).output) if f is not None)
    return set(range(max(first, p), T))


def _reference_episode(net, clip, y, W, loss_fn=F.cross_entropy, p=0):
    T = clip.shape[1]
    fns = [(lambda o, t=t: loss_fn(o, y[:, t - p])) if t in W else None for t in range(T)]
    return reference.sideways(net, list(clip.unbind(1)), fns)


@pytest.mark.parametrize("delays", ["diagonal", "aligned"])
def test_sideways_equals_the_reference_on_a_chain(delays):
    net = pipecomp.compile(chain(), parallel=4, delays=delays, example_input=(1, 3, SIZE, SIZE))
    clip, y = episode(frames=9)
    ticks, _, first, owner = _reference_episode(net, clip, y, W=_streamed(net, 9))
    got = _per_tick(net, clip, y)
    for t, (g, w) in enumerate(zip(got, ticks)):
        assert_grads_close({n: v for n, v in g.items() if v is not None}, w)
    # the episode: per-stage sums over its counted ticks (rule 5)
    net.zero_grad(set_to_none=True)
    train.backward(net, clip, y, F.cross_entropy)
    want = {n: sum(t[n] for t in ticks if n in t) / (9 - first[owner[n]]) for n in owner if any(n in t for t in ticks)}
    assert_grads_close({n: p.grad for n, p in net.named_parameters() if p.grad is not None}, want)
    # the gradients climb one stage per tick: stage s is first reached at latency + (k - 1 - s)
    assert first == [net.latency + (3 - s) * (1 if delays == "diagonal" else 1) for s in range(4)]


@pytest.mark.parametrize("parallel", [1, 3])
def test_sideways_equals_the_reference_with_clocked_shifts(parallel):
    # A shift behind the stride-2 convolution ticks every other frame, and so does its input; between
    # firings the memory's gradient waits for the input's next firing (rules 2 and 4).
    model = chain()
    model.insert(6, nn.Conv2d(4, 4, 3, padding=1))
    net = pipecomp.compile(model, parallel=parallel, clocks="halve", shift="online", shift_place="inplace",
                           shift_fraction=0.25, example_input=(1, 3, SIZE, SIZE))
    assert any(net.plan.period_of[s] == 2 for s in net.plan.shift_nodes)
    clip, y = episode(frames=8)
    ticks, _, first, owner = _reference_episode(net, clip, y, _streamed(net, 8))
    for g, w in zip(_per_tick(net, clip, y), ticks):
        assert_grads_close({n: v for n, v in g.items() if v is not None}, w)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compiled())
def test_sideways_equals_the_reference_interpreter(case):
    _, net = case
    clip = torch.randn(2, 6, 3, 16, 16)

    def loss_fn(out, target):
        logits = out["logits"] if isinstance(out, dict) else out
        return (logits - target).pow(2).mean()
    y = torch.randn(2, 6, 3)
    W = set(range(1, 6))
    ticks, _, _, _ = _reference_episode(net, clip, y, W, loss_fn)
    fns_W = sorted(W)
    net.zero_grad(set_to_none=True)
    got = []
    trainer = train._Sideways(net)
    for t in range(6):
        fn = (lambda o, t=t: loss_fn(o, y[:, t])) if t in W else None
        _, _, per_stage = trainer.step(clip[:, t], fn)
        tick = {}
        for step, gs in zip(trainer.steps, per_stage):
            for p_, g in zip(step.params, gs):
                if g is not None:
                    name = next(n for n, q in net.named_parameters() if q is p_)
                    tick[name] = g + tick[name] if name in tick else g
        got.append(tick)
    assert fns_W
    for g, w in zip(got, ticks):
        assert_grads_close(g, w, atol=1e-5)


@pytest.mark.parametrize("delays", ["diagonal", "aligned"])
@pytest.mark.parametrize("clocks", [None, "halve"])
def test_a_constant_clip_gives_the_image_models_gradient_once_filled(delays, clocks):
    model = chain(bn=True).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    net = pipecomp.compile(copy.deepcopy(model), parallel=3, delays=delays, clocks=clocks,
                           example_input=(1, 3, SIZE, SIZE)).eval()
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.tensor([0, 2])
    T = 24
    clip = x[:, None].expand(2, T, 3, SIZE, SIZE).contiguous()
    ticks = _per_tick(net, clip, y[:, None].expand(2, T))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    want = grads_of(model)
    H = net.plan.hyperperiod
    filled = ticks[T - 2 * H:]  # long filled: values and gradients have crossed every stage both ways
    for start in (0, H):
        window = filled[start:start + H]
        mean = {n: sum(t[n] for t in window if t[n] is not None) / H for n in want}
        assert_grads_close(mean, want, atol=1e-6)


def test_threads_give_the_gradients_of_one_thread():
    net = pipecomp.compile(chain(), parallel=4, clocks="halve", example_input=(1, 3, SIZE, SIZE))
    clip, y = episode(frames=8)
    net.zero_grad(set_to_none=True)
    one = train.backward(net, clip, y, F.cross_entropy)
    want = grads_of(net)
    net.zero_grad(set_to_none=True)
    two = train.backward(net, clip, y, F.cross_entropy, workers=2)
    assert torch.allclose(one, two, equal_nan=True)
    assert_grads_close(grads_of(net), want, atol=1e-7, rtol=1e-6)


def test_bptt_equals_backpropagation_through_the_reference_interpreter():
    net = pipecomp.compile(chain(bn=True), parallel=3, clocks="halve", shift="online", shift_place="inplace",
                           shift_fraction=0.25, example_input=(1, 3, SIZE, SIZE)).eval()
    clip, y = episode(frames=7)
    W = [3, 4, 6]
    net.zero_grad(set_to_none=True)
    losses = train.backward(net, clip, y, F.cross_entropy, rule="bptt", ticks=W, prediction_latency=1)
    got = grads_of(net)
    net.zero_grad(set_to_none=True)
    outs = reference.run(net, list(clip.unbind(1)))
    terms = [F.cross_entropy(outs[t], y[:, t - 1]) for t in W]
    torch.stack(terms).mean().backward()
    assert_grads_close(got, grads_of(net))
    assert torch.isnan(losses[[0, 1, 2, 5]]).all()
    assert torch.allclose(losses[W], torch.stack(terms).detach())


def test_prediction_latency_trains_towards_older_targets():
    net = pipecomp.compile(chain(), parallel=2, example_input=(1, 3, SIZE, SIZE))
    clip, y = episode(frames=7)
    p = 2
    W = set(range(max(p, net.latency), 7))
    ticks, losses, first, owner = _reference_episode(net, clip, y, W, p=p)
    net.zero_grad(set_to_none=True)
    got = train.backward(net, clip, y, F.cross_entropy, prediction_latency=p)
    want = {n: sum(t[n] for t in ticks if n in t) / (7 - first[owner[n]]) for n in owner}
    assert_grads_close({n: q.grad for n, q in net.named_parameters()}, want)
    assert torch.isnan(got[:p]).all()
    assert torch.allclose(got[p:], torch.stack([losses[t] for t in range(p, 7)]))


def test_training_code_is_printable():
    net = pipecomp.compile(chain(), parallel=2, clocks="halve", example_input=(1, 3, SIZE, SIZE))
    text = train.code(net)
    assert "pipecomp_train__vjp" in text and "# stage 1" in text and "loss = pipecomp_train__loss" in text
    reg = next(iter(net.plan.registers))
    assert f"'{reg}_g1'" in text  # the gradient register of a register


@pytest.mark.parametrize("rule", ["sideways", "bptt"])
def test_bad_input_is_refused_before_any_grad_changes(rule):
    net = pipecomp.compile(chain(), parallel=2, example_input=(1, 3, SIZE, SIZE))
    clip, y = episode(frames=5)
    train.backward(net, clip, y, F.cross_entropy, rule=rule)
    before = grads_of(net)
    cases = [
        (dict(targets=y[:, :4]), ValueError, "one target per frame"),
        (dict(targets=y[:1]), ValueError, r"B=2, T=5"),
        (dict(rule="rtrl"), ValueError, "not one of 'sideways', 'bptt'"),
        (dict(ticks=[1, 9]), ValueError, r"ticks \[9\] are not ticks of this clip"),
        (dict(ticks=[0], prediction_latency=1), ValueError, "before the prediction latency"),
        (dict(prediction_latency=5), ValueError, "prediction_latency=5"),
        (dict(loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none")), ValueError, "scalar"),
        (dict(clip=clip[:, :, :, :4]), ValueError, "clip has shape"),
        (dict(loss_fn=3), TypeError, "loss_fn must be a callable"),
    ]
    for change, error, match in cases:
        kwargs = dict(net=net, clip=clip, targets=y, loss_fn=F.cross_entropy, rule=rule) | change
        with pytest.raises(error, match=match):
            train.backward(**kwargs)
        assert_grads_close(grads_of(net), before, atol=0, rtol=0)


def test_sideways_on_offline_shift_is_refused_but_bptt_trains():
    net = pipecomp.compile(chain(), shift="offline", shift_place="inplace", shift_fraction=0.25,
                           example_input=(1, 3, SIZE, SIZE))
    clip, y = episode(frames=4)
    with pytest.raises(ValueError, match="offline .* use rule='bptt'"):
        train.backward(net, clip, y, F.cross_entropy)
    assert all(p.grad is None for p in net.parameters())
    train.backward(net, clip, y, F.cross_entropy, rule="bptt")
    assert all(p.grad is not None for p in net.parameters())


def test_a_failing_stage_in_a_worker_raises_in_the_caller_and_changes_no_grad():
    net = pipecomp.compile(chain(), parallel=2, example_input=(1, 3, SIZE, SIZE))
    clip, y = episode(frames=5)
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return F.cross_entropy(out, target)
    with pytest.raises(RuntimeError, match="boom"):
        train.backward(net, clip, y, loss_fn, workers=2)
    assert all(p.grad is None for p in net.parameters())


def test_stream_leaves_the_step_state_alone_and_resets():
    net = pipecomp.compile(chain(), parallel=2, example_input=(1, 3, SIZE, SIZE))
    clip, y = episode(frames=6)
    with torch.no_grad():
        net.reset()
        first = net.step(clip[:, 0])
    with train.Stream(net, F.cross_entropy) as stream:
        outs = [stream.step(clip[:, t], y[:, t]) for t in range(3)]
        stream.reset()
        again = stream.step(clip[:, 0], y[:, 0])
        with pytest.raises(ValueError, match="batch size 1"):
            stream.step(clip[:1, 1], y[:1, 1])
    with torch.no_grad():
        second = net.step(clip[:, 1])
        net.reset()
        want = [net.step(clip[:, t]) for t in range(2)]
    assert torch.allclose(second, want[1]) and torch.allclose(first, want[0])
    assert torch.allclose(outs[0], again)


MEMORY = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    from torch import nn
    import pipecomp
    from pipecomp import train

    def peak():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

    torch.manual_seed(0)
    torch.set_num_threads(1)
    rule = sys.argv[1]
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 3))
    net = pipecomp.compile(model, parallel=3, example_input=(1, 3, 48, 48))
    sizes = []
    for T in (6, 6, 40):
        clip, y = torch.randn(2, T, 3, 48, 48), torch.randint(0, 3, (2, T))
        train.backward(net, clip, y, F.cross_entropy, rule=rule)
        sizes.append(peak())
    print(sizes[1], sizes[2])
""")


def test_sideways_memory_does_not_grow_with_the_clip():
    grow = {}
    for rule in ("sideways", "bptt"):
        out = subprocess.run([sys.executable, "-c", MEMORY, rule], capture_output=True, text=True, check=True)
        short, long = map(int, out.stdout.split())
        grow[rule] = long - short
    assert grow["bptt"] > 40e6  # 34 more frames of activations: ~1.5 MB each
    assert grow["sideways"] < 0.1 * grow["bptt"], grow


PROCESSES = textwrap.dedent("""
    import copy, torch, torch.nn.functional as F
    import pipecomp
    from pipecomp import train
    from pipecomp.backends import distributed
    from tests.test_train import chain, episode, SIZE

    def sgd(params):
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)

    if __name__ == "__main__":
        torch.manual_seed(0)
        net = pipecomp.compile(chain(bn=True), parallel=3, clocks="halve", example_input=(1, 3, SIZE, SIZE))
        twin, untrained = copy.deepcopy(net), copy.deepcopy(net.state_dict())
        episodes = [episode(frames=6, seed=s) for s in range(2)]
        got = distributed.launch_train(net, episodes, F.cross_entropy, sgd, nprocs=2, timeout=120)
        opt, want = sgd(twin.parameters()), []
        for clip, y in episodes:
            opt.zero_grad()
            want.append(train.backward(twin, clip, y, F.cross_entropy))
            opt.step()
        theirs = twin.state_dict()
        print("losses", (got - torch.stack(want)).nan_to_num().abs().max().item())
        print("state", max((v.float() - theirs[k].float()).abs().max().item() for k, v in net.state_dict().items()))
        print("changed", sum(not torch.equal(v, untrained[k]) for k, v in net.state_dict().items()), len(untrained))
""")


def test_processes_train_like_one_thread():
    # In a fresh interpreter, as a training script runs it: the ranks are forked from a process
    # that has done nothing else (the test suite's process holds other libraries' threads).
    root = pathlib.Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", PROCESSES], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert float(out["losses"]) < 1e-6 and float(out["state"]) < 1e-6
    changed, total = map(int, out["changed"].split())
    assert changed == total  # every parameter and batch-norm statistic was trained in its process


@pytest.mark.parametrize("delays", ["diagonal", "aligned"])
def test_model_parallel_bptt_equals_bptt(delays):
    net = pipecomp.compile(chain(bn=True), parallel=4, delays=delays, clocks="halve", shift="online",
                           shift_place="inplace", shift_fraction=0.25, example_input=(1, 3, SIZE, SIZE))
    clip, y = episode(frames=6)
    net.zero_grad(set_to_none=True)
    want_losses = train.backward(net, clip, y, F.cross_entropy, rule="bptt")
    want = grads_of(net)
    net.zero_grad(set_to_none=True)
    losses = train.backward(net, clip, y, F.cross_entropy, rule="bptt", workers=3)
    assert torch.allclose(losses, want_losses, equal_nan=True)
    assert_grads_close(grads_of(net), want)


@pytest.mark.parametrize("kind", ["layer scale", "tiny ViT", "relative position", "control flow"])
def test_sideways_equals_the_reference_on_constants_and_kept_whole_modules(kind):
    from . import test_zoo
    _, net = test_zoo.compiled(kind, parallel=3, clocks="halve")
    clip = torch.stack(test_zoo.frames(6), 1)
    y = torch.randn(2, 6, 5)

    def loss_fn(out, target):
        return (out - target).pow(2).mean()
    ticks, _, _, _ = _reference_episode(net, clip, y, _streamed(net, 6), loss_fn)
    got = _per_tick(net, clip, y, loss_fn)
    assert any(ticks)
    for g, w in zip(got, ticks):
        assert_grads_close({n: v for n, v in g.items() if v is not None}, w, atol=1e-5)
