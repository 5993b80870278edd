"""VideoNet's public surface: streaming, clips, state, sharing, errors that lose nothing."""
import pytest
import torch
import torchvision.models as tvm
from torch import nn

import pipecomp

SIZE = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tvm.resnet18(num_classes=10).eval()


@pytest.fixture
def net(model):
    return pipecomp.compile(model, parallel=3, clocks="halve", shift="online", example_input=(1, 3, SIZE, SIZE))


def _frames(n, batch=2):
    return [torch.randn(batch, 3, SIZE, SIZE) for _ in range(n)]


def _with_interruption(net, frames, at, interrupt):
    """Outputs of a stream that runs `interrupt()` before frame `at`, and of one that does not."""
    with torch.no_grad():
        want = [net.step(x) for x in frames]
        net.reset()
        got = [net.step(x) for x in frames[:at]]
        interrupt()
        got += [net.step(x) for x in frames[at:]]
    return got, want


def test_rejected_frames_change_no_state(net):
    frames = _frames(6)

    def reject():
        with pytest.raises(ValueError, match=r"expected \[B, 3, 64, 64\]"):
            net.step(torch.randn(2, 3, 32, 32))
        with pytest.raises(ValueError, match="batch size 1.*started with 2"):
            net.step(torch.randn(1, 3, SIZE, SIZE))
        with pytest.raises(ValueError, match="dtype"):
            net.step(frames[3].double())
        with pytest.raises(TypeError):
            net.step(frames[3].numpy())
    got, want = _with_interruption(net, frames, 3, reject)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_a_failing_computation_changes_no_state(net, monkeypatch):
    def fail():
        monkeypatch.setattr(net.layer1[0].conv1, "forward", lambda x: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            net.step(torch.randn(2, 3, SIZE, SIZE))  # layer1 ticks every 2 frames: tick 2 fires it
        monkeypatch.undo()
    got, want = _with_interruption(net, _frames(5), 2, fail)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_clip_leaves_the_stream_alone(net):
    frames = _frames(4)
    got, want = _with_interruption(net, frames, 2, lambda: net(torch.stack(frames, 1)))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_reset_starts_a_new_video(net):
    frames = _frames(3)
    with torch.no_grad():
        first = [net.step(x) for x in frames]
        net.reset()
        second = [net.step(x) for x in frames]
        net.reset()
        assert net.step(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 10)  # new batch size after reset
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gradients_reach_every_parameter(net):
    net.train()
    out = net(torch.randn(2, 6, 3, SIZE, SIZE))
    out.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    net.eval()


def test_parameters_are_the_image_models_own(model, net):
    assert net.conv1.weight is model.conv1.weight
    assert list(net.state_dict()) == list(model.state_dict())
    other = tvm.resnet18(num_classes=10).eval()
    aligned = pipecomp.compile(model, parallel=2, delays="aligned", example_input=(1, 3, SIZE, SIZE))
    aligned.load_state_dict(other.state_dict())
    frames = _frames(3)
    with torch.no_grad():
        outs = [aligned.step(x) for x in frames]
        assert torch.allclose(outs[1], other(frames[0]), atol=1e-5)
    model.load_state_dict(aligned.state_dict())


def test_report_and_code_are_readable(net):
    text = net.report()
    assert text == str(net).split("\n", 1)[1].rsplit("\n", 1)[0]
    lines = text.splitlines()
    assert [ln.split()[0] for ln in lines[2:5]] == ["0", "1", "2"]
    assert "latency: 2 frames" in text and "clock speed-up" in text and "balance" in text
    code = net.step_code()
    assert "def forward(self, frame, state)" in code and "_d1" in code and "shift_online" in code


def test_offline_shift_refuses_to_stream(model):
    net = pipecomp.compile(model, shift="offline", example_input=(1, 3, SIZE, SIZE))
    with pytest.raises(RuntimeError, match="future frames"):
        net.step(torch.randn(1, 3, SIZE, SIZE))
    assert net(torch.randn(1, 3, 3, SIZE, SIZE)).shape == (1, 3, 10)


def test_bad_clip_shape(net):
    with pytest.raises(ValueError, match=r"expected \[B, T, 3, 64, 64\]"):
        net(torch.randn(2, 3, SIZE, SIZE))


@pytest.mark.parametrize("option, allowed", [
    (dict(parallel=0), "integer >= 1"), (dict(delays="skewed"), "'diagonal', 'aligned'"),
    (dict(clocks="double"), "'halve'"), (dict(shift="both"), "'online', 'offline'"),
    (dict(shift_fraction=0.75), r"\(0, 1/2\]"), (dict(shift_place="outside"), "'residual', 'inplace'"),
    (dict(max_period=0), "max_period"), (dict(example_input="frame"), "tensor or a shape"),
    (dict(cuts="layer2"), "list"),
])
def test_bad_options_name_the_allowed_values(model, option, allowed):
    with pytest.raises(ValueError, match=allowed):
        pipecomp.compile(model, **option)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        pipecomp.compile(lambda x: x)


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent: fx cannot trace it
            return x
        return -x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_control_flow_is_kept_whole_and_reported():
    auto = pipecomp.compile(Gated(), example_input=(1, 3, 8, 8))
    assert "kept whole: Gate: cannot be traced: data-dependent control flow" in auto.report()
    net = pipecomp.compile(Gated(), leaf_modules=(Gate,), example_input=(1, 3, 8, 8))
    assert "kept whole" not in net.report()  # asked for, so not news
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(net.step(x), net.gate(net.conv(x)))
        assert torch.equal(auto.step(x), auto.gate(auto.conv(x)))


def test_control_flow_in_the_models_own_forward_is_not_sent_to_leaf_modules():
    with pytest.raises(pipecomp.CompileError, match="model Gate: data-dependent control flow") as e:
        pipecomp.compile(Gate(), example_input=(1, 3, 8, 8))
    assert "leaf_modules=(Gate,)" not in str(e.value) and "model's own forward" in str(e.value)


class Halves(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.chunk(self.conv(x), 2, 1)


def test_tuple_outputs_keep_their_structure_and_tick_every_frame():
    from . import reference
    net = pipecomp.compile(Halves(), clocks={"*": 2}, example_input=(1, 3, 8, 8))
    frames = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    with torch.no_grad():
        want = reference.run(net, frames)
        steps = [net.step(x) for x in frames]
        clip = net(torch.stack(frames, 1))
    for t in range(3):
        assert isinstance(steps[t], tuple) and len(steps[t]) == 2
        for i in range(2):
            assert torch.equal(steps[t][i], want[t][i]) and torch.equal(clip[i][:, t], steps[t][i])


def test_compiling_leaves_the_model_untouched():
    model = tvm.resnet18()  # train mode: running the example must not update batch-norm statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipecomp.compile(model, parallel=2, example_input=(1, 3, 32, 32))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_report_counts_every_parameter_once():
    model = tvm.convnext_tiny()  # its layer scales are parameters read by get_attr nodes
    net = pipecomp.compile(model, parallel=3, example_input=(1, 3, 64, 64))
    assert sum(net.plan.stage_params) == sum(p.numel() for p in model.parameters())
