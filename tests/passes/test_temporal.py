"""Temporal filters (semantics §9): convolutions made causal filters over their past inputs."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipecomp
from pipecomp import train
from tests import reference
from tests.test_train import chain

SIZE = 8


def clip(frames=7, batch=2, seed=0):
    return torch.randn(batch, frames, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def stream(net, x):
    net.reset()
    with torch.no_grad():
        return torch.stack([net.step(x[:, t]) for t in range(x.shape[1])], 1)


def steps(net, xs):
    """`step` over a list of frames after a reset."""
    net.reset()
    with torch.no_grad():
        return [net.step(x) for x in xs]


def assert_stream_equals(net, x, y, ticks):
    """`train.Stream` tick by tick gives the reference's per-tick Sideways gradients `ticks`."""
    with train.Stream(net, F.cross_entropy) as s:
        for t in range(x.shape[1]):
            net.zero_grad(set_to_none=True)
            s.step(x[:, t], y[:, t])
            got = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
            assert all(not g.any() for n, g in got.items() if n not in ticks[t])
            for n, g in ticks[t].items():
                torch.testing.assert_close(got[n], g, atol=1e-6, rtol=1e-4)


def added_params(net):
    return {n: p for n, p in net.named_parameters() if n.startswith(("temporal.", "skips."))}


def randomise_added(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in added_params(net).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


OPTIONS = [dict(parallel=1), dict(parallel=3), dict(parallel=3, delays="aligned"),
           dict(parallel=3, clocks="halve"), dict(parallel=4, clocks="halve", phases="align", shift="online",
                                                  shift_place="inplace")]


@pytest.mark.parametrize("options", OPTIONS)
def test_a_fresh_filter_computes_the_image_models_network(options):
    model = chain().eval()
    plain = pipecomp.compile(copy.deepcopy(model), example_input=(1, 3, SIZE, SIZE), **options)
    net = pipecomp.compile(model, temporal=3, example_input=(1, 3, SIZE, SIZE), **options)
    assert net.plan.added_nodes
    x = clip()
    with torch.no_grad():
        want = plain(x)
        assert torch.equal(net(x), want)
    assert torch.equal(stream(net, x), want)


@pytest.mark.parametrize("options", OPTIONS)
def test_with_its_taps_set_step_equals_clip_and_the_reference(options):
    net = pipecomp.compile(chain().eval(), temporal=3, example_input=(1, 3, SIZE, SIZE), **options)
    randomise_added(net)
    x = clip()
    with torch.no_grad():
        got = net(x)
        want = torch.stack(reference.run(net, list(x.unbind(1))), 1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(stream(net, x), want)
    plain = pipecomp.compile(chain().eval(), example_input=(1, 3, SIZE, SIZE), **options)
    plain.load_state_dict(net.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(plain(x), got)  # the taps do something


def one_conv():
    return nn.Sequential(nn.Conv2d(3, 2, 3, padding=1))


@pytest.mark.parametrize("period", [1, 2])
def test_one_convolution_by_hand(period):
    conv = one_conv()
    net = pipecomp.compile(copy.deepcopy(conv), temporal=3, clocks={"*": period}, example_input=(1, 3, SIZE, SIZE))
    randomise_added(net)
    w1, w2 = net.temporal._0.past1.weight, net.temporal._0.past2.weight
    x = clip(frames=9)
    T = x.shape[1]

    def frame(t):  # zero before the first frame
        return x[:, t] if t >= 0 else torch.zeros_like(x[:, 0])
    want = []
    with torch.no_grad():
        for t in range(T):
            f = t - t % period  # the last firing; "i firings ago" is i * period ticks before it
            want.append(conv(frame(f)) + F.conv2d(frame(f - period), w1, padding=1)
                        + F.conv2d(frame(f - 2 * period), w2, padding=1))
        want = torch.stack(want, 1)
        torch.testing.assert_close(net(x), want)
    torch.testing.assert_close(stream(net, x), want)


def test_the_plan_lists_the_taps_their_stages_clocks_delays_and_state():
    net = pipecomp.compile(chain().eval(), parallel=2, clocks="halve", temporal={"4": 3},
                           example_input=(1, 3, SIZE, SIZE))
    plan = net.plan
    conv = plan.node("_4")  # the stride-2 convolution: period 2
    x = conv.args[0].name
    assert plan.added_nodes == ("_4_past1", "_4_sum1", "_4_past2", "_4_sum2")
    for name in plan.added_nodes:
        assert plan.stage_of[name] == plan.stage_of["_4"]
        assert plan.period_of[name] == plan.period_of["_4"] == 2
    base = plan.delay_of[(x, "_4")]
    assert [plan.delay_of[(x, f"_4_past{i}")] for i in (1, 2)] == [base + 2, base + 4]
    assert plan.registers[x] == base + 4
    # the sum takes the convolution's place for its readers
    assert [u.name for u in plan.node("_4_sum2").users] == ["_5"]
    assert "added temporal connections: 4 nodes, 288 params" in net.report()
    assert "self.temporal._4.past2(" in net.step_code()


@pytest.mark.parametrize("options", [dict(), dict(clocks="halve", delays="aligned"), dict(skips=2, clocks="halve")])
def test_every_tap_reads_its_convolutions_input_i_firings_earlier(options):
    from tests.passes.test_skips import deep
    plan = pipecomp.compile(deep(), parallel=4, temporal=3, example_input=(1, 3, SIZE, SIZE), **options).plan
    taps = [plan.node(n) for n in plan.added_nodes if "_past" in n]
    assert len(taps) == 2 * 5
    for tap in taps:
        conv, i = plan.node(tap.name.rsplit("_past", 1)[0]), int(tap.name.rsplit("_past", 1)[1])
        (x,) = tap.args
        assert x is conv.args[0]  # the convolution's input, whatever the skips made of it
        want = plan.delay_of[(x.name, conv.name)] + i * plan.period_of[conv.name]
        assert plan.delay_of[(x.name, tap.name)] == want


def test_an_integer_selects_every_spatial_convolution_and_a_pattern_some():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1))
    net = pipecomp.compile(model, temporal=2, example_input=(1, 3, SIZE, SIZE))
    assert [n for n in net.plan.added_nodes if "past" in n] == ["_0_past1", "_2_past1"]
    net = pipecomp.compile(model, temporal={"1": 3}, example_input=(1, 3, SIZE, SIZE))
    assert [n for n in net.plan.added_nodes if "past" in n] == ["_1_past1", "_1_past2"]


def test_load_state_dict_of_the_image_model_misses_exactly_the_taps():
    model = chain()
    net = pipecomp.compile(copy.deepcopy(model), parallel=2, temporal=2, example_input=(1, 3, SIZE, SIZE))
    result = net.load_state_dict(model.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(added_params(net)) == [f"temporal._{i}.past1.weight"
                                                                         for i in (0, 2, 4)]
    assert result.unexpected_keys == []


@pytest.mark.parametrize("rule", ["sideways", "bptt"])
def test_gradients_reach_every_tap(rule):
    net = pipecomp.compile(chain(), parallel=3, temporal=3, example_input=(1, 3, SIZE, SIZE))
    x, y = clip(frames=8), torch.randint(0, 3, (2, 8))
    train.backward(net, x, y, F.cross_entropy, rule=rule)
    for name, p in added_params(net).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bptt_through_the_taps_equals_autograd_through_the_reference():
    net = pipecomp.compile(chain(), parallel=3, clocks="halve", temporal=3, example_input=(1, 3, SIZE, SIZE))
    randomise_added(net)
    x, y = clip(frames=7), torch.randint(0, 3, (2, 7))
    train.backward(net, x, y, F.cross_entropy, rule="bptt", ticks=[4, 5, 6])
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    outs = reference.run(net, list(x.unbind(1)))
    torch.stack([F.cross_entropy(outs[t], y[:, t]) for t in (4, 5, 6)]).mean().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4)


def test_sideways_through_the_taps_equals_the_reference():
    net = pipecomp.compile(chain(), parallel=3, clocks="halve", temporal=3, example_input=(1, 3, SIZE, SIZE))
    randomise_added(net)
    x, y = clip(frames=8), torch.randint(0, 3, (2, 8))
    first = next(t for t, f in enumerate(net.timeline(8).output) if f is not None)  # Stream's W
    W = set(range(first, 8))
    fns = [(lambda o, t=t: F.cross_entropy(o, y[:, t])) if t in W else None for t in range(8)]
    ticks, _, _, _ = reference.sideways(net, list(x.unbind(1)), fns)
    assert_stream_equals(net, x, y, ticks)


def test_bad_values_are_refused_with_the_fix():
    model = chain()
    with pytest.raises(ValueError, match="integer >= 2"):
        pipecomp.compile(model, temporal=1, example_input=(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="integer >= 2"):
        pipecomp.compile(model, temporal={"0": 0}, example_input=(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="'layer9' matches no convolution.*e.g. '_0'"):
        pipecomp.compile(model, temporal={"layer9": 2}, example_input=(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="selects no convolution"):
        pipecomp.compile(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 2)), temporal=2,
                         example_input=(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="temporal='all' must be"):
        pipecomp.compile(model, temporal="all", example_input=(1, 3, SIZE, SIZE))
