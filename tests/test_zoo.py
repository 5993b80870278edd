"""What timm's zoo needs (issue 12), each on a small model of its kind: constants (semantics §3),
tensors whose batch is not first, untraceable submodules, optional forward arguments, tensors
made while tracing, pickling. Every network is checked against the reference interpreter, its
own clips and, with aligned delays, the image model."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipecomp
from pipecomp.analysis import info
from pipecomp.lower import zero_state

from . import reference

SIZE = 16


class LayerScaleBlock(nn.Module):
    """ConvNeXt's block: the residual branch scaled by `gamma.reshape(1, -1, 1, 1)`, a constant."""

    def __init__(self, dim):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pw = nn.Conv2d(dim, dim, 1)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x + self.pw(F.gelu(self.dw(x))) * self.gamma.reshape(1, -1, 1, 1)


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.block1 = LayerScaleBlock(8)
        self.down = nn.Conv2d(8, 16, 2, stride=2)
        self.block2 = LayerScaleBlock(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.head(x.mean((2, 3)))


class Qkv(nn.Module):
    """Returns `[3, B, heads, N, d]`: its output does not have the batch first either."""

    def __init__(self, dim, heads):
        super().__init__()
        self.fc, self.heads = nn.Linear(dim, 3 * dim), heads

    def forward(self, x):
        B, N, C = x.shape
        return self.fc(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)


class Attention(nn.Module):
    """timm's attention: batch-first in and out, `[3, B, heads, N, d]` inside."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.qkv, self.proj = Qkv(dim, heads), nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class TinyViT(nn.Module):
    """Patches, a class token expanded to the batch and position embeddings (constants), two blocks,
    and optional forward arguments as timm has them."""

    def __init__(self, dim=16, depth=2, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + (SIZE // 4) ** 2, dim) * 0.1)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(Attention(dim) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x, attn_mask=None, pre_logits=False):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for norm, attn, mlp in zip(self.norms, self.attns, self.mlps):
            x = x + attn(norm(x), attn_mask=attn_mask)
            x = x + mlp(x)
        return x[:, 0] if pre_logits else self.head(x[:, 0])


class RelPosAttention(nn.Module):
    """BoTNet's and HaloNet's kind: a relative-position table gathered by an index buffer, and an
    `arange` position encoding from the frame's size, both constants."""

    def __init__(self, dim, size, heads=2):
        super().__init__()
        self.qkv, self.heads = nn.Conv2d(dim, 3 * dim, 1), heads
        self.table = nn.Parameter(torch.randn((2 * size - 1) ** 2, heads) * 0.1)
        coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :] + size - 1
        self.register_buffer("index", rel[0] * (2 * size - 1) + rel[1])

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        bias = self.table[self.index].permute(2, 0, 1)
        pos = torch.arange(H * W, device=x.device, dtype=x.dtype) / (H * W)
        attn = (q.transpose(-1, -2) @ k * (C // self.heads) ** -0.5 + bias + pos).softmax(-1)
        return (v @ attn.transpose(-1, -2)).reshape(B, C, H, W)


class BoTNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.attn1 = RelPosAttention(8, SIZE // 2)
        self.down = nn.Conv2d(8, 8, 2, stride=2)
        self.attn2 = RelPosAttention(8, SIZE // 4)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.attn1(x)
        x = self.down(x)
        x = x + self.attn2(x)
        return self.head(x.mean((2, 3)))


class SamePad(nn.Module):
    """timm's "same" padding: control flow on the frame's size, which fx cannot trace."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        if x.shape[-1] % 2 == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Gate(nn.Module):
    """Control flow on the frame's content (NFNet-like scaling): kept whole, computed every firing."""

    def forward(self, x):
        if x.abs().mean() > 1:
            return x / x.abs().mean()
        return x


class Controlled(nn.Module):
    """Untraceable submodules, a tensor made while tracing (`torch.tensor` in forward) and a residual block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.down = SamePad(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x, scale: float = 1.0):
        x = self.gate(self.stem(x))
        x = x + self.body(x) * scale
        x = self.down(x) * torch.tensor([0.5, 1.0, 1.5, 2.0, 0.5, 1.0, 1.5, 2.0]).view(1, 8, 1, 1)
        return self.head(x.mean((2, 3)))


class SkipInit(nn.Module):
    """NFNet's block: `out.mul_(gain)` has no reader of its own, yet the add after it reads its effect."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.tensor(0.5))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        out = self.conv2(F.relu(self.conv1(x)))
        out.mul_(self.gain)
        return self.head((out + x).mean((2, 3)))


MODELS = {"layer scale": ConvNeXtish, "tiny ViT": TinyViT, "relative position": BoTNetish,
          "control flow": Controlled, "unused in-place": SkipInit}
HAS_RESIDUAL_CONVS = {"layer scale", "relative position", "control flow", "unused in-place"}


def frames(n, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, SIZE, SIZE, generator=g) * 2 for _ in range(n)]


def compiled(kind, **options):
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    return model, pipecomp.compile(model, example_input=(1, 3, SIZE, SIZE), **options)


def stream(net, xs):
    net.reset()
    with torch.no_grad():
        return [net.step(x) for x in xs]


def option_sets(kind):
    """Both delay modes, clocks, and shift where there are residual blocks; kept few for CI's time."""
    sets = [dict(parallel=3, delays="diagonal", clocks="halve"), dict(parallel=3, delays="aligned", clocks=None)]
    if kind in HAS_RESIDUAL_CONVS:
        sets.append(dict(parallel=3, delays="aligned", clocks="halve", shift="online"))
    return sets


CASES = [(k, o) for k in MODELS for o in option_sets(k)]


@pytest.mark.parametrize("kind, options", CASES, ids=[f"{k}-{'-'.join(map(str, o.values()))}" for k, o in CASES])
def test_step_equals_the_reference_and_the_clip(kind, options):
    _, net = compiled(kind, **options)
    xs = frames(9)
    got = stream(net, xs)
    with torch.no_grad():
        want = reference.run(net, xs)
        clip = net(torch.stack(xs, 1))
    for t, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, msg=f"tick {t}")
        torch.testing.assert_close(clip[:, t], g, msg=f"clip, tick {t}")


@pytest.mark.parametrize("kind", MODELS)
def test_aligned_equals_the_image_model(kind):
    model, net = compiled(kind, parallel=3, delays="aligned")
    xs = frames(6)
    got = stream(net, xs)
    with torch.no_grad():
        for t in range(len(xs) - net.latency):
            torch.testing.assert_close(got[t + net.latency], model(xs[t]))


@pytest.mark.parametrize("kind", MODELS)
def test_constants_are_never_state(kind):
    """Constants have no registers and no zero state, whatever stages they cross (semantics §3)."""
    _, net = compiled(kind, parallel=3, clocks="halve")
    constants = [n for n in net.plan.graph.nodes if info(n).get("kind") == "constant"]
    if kind not in ("control flow", "unused in-place"):  # no constant but get_attrs
        assert constants
    state = zero_state(net.plan, 2, "cpu")
    for n in constants:
        assert n.name not in net.plan.registers and not any(k.startswith(f"{n.name}_d") for k in state)
    assert all(info(net.plan.node(r)).get("kind") == "tensor" for r in net.plan.registers)


def test_a_constant_crossing_stages_is_recomputed_by_its_reader():
    _, whole = compiled("layer scale")
    reshape = next(n for n in whole.plan.graph.nodes if info(n).get("kind") == "constant")
    reader = next(iter(reshape.users)).name
    _, net = compiled("layer scale", cuts=[reader], clocks="halve")  # the cut lies between the two
    assert net.plan.stage_of[reshape.name] == 0 and net.plan.stage_of[reader] == 1
    assert f"{reshape.name} = " in net._stages[1].code() and f"{reshape.name}_d" not in net.step_code()


def test_modules_without_the_batch_first_are_kept_whole_and_reported():
    _, net = compiled("tiny ViT", parallel=2)
    kept = net.plan.kept_whole
    # Qkv's output is [3, B, ...], so it is not enough: its Attention is kept whole.
    assert set(kept) == {"Qkv", "Attention"} and "first axis is not the batch" in kept["Attention"]
    assert "kept whole: Attention" in net.report()
    calls = {type(net.get_submodule(n.target)).__name__ for n in net.plan.graph.nodes if n.op == "call_module"}
    assert "Attention" in calls and "Qkv" not in calls
    for n in net.plan.graph.nodes:
        if n.op in ("placeholder", "call_module", "call_function", "call_method") \
                and info(n).get("kind") in ("tensor", "tuple"):
            assert info(n)["batch_dim"] == 0, n.name


class SeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)

    def forward(self, x):
        return self.conv(x).flatten(2).permute(2, 0, 1).mean(0)  # [N, B, C] in the model's own forward


def test_batch_not_first_in_the_models_own_forward_says_what_to_do():
    with pytest.raises(pipecomp.CompileError, match=r"'permute'.*first axis is not the batch.*own forward.*submodule"):
        pipecomp.compile(SeqFirst(), example_input=(1, 3, SIZE, SIZE))


def test_untraceable_modules_are_kept_whole_and_reported():
    model, net = compiled("control flow", parallel=2)
    assert set(net.plan.kept_whole) == {"Gate", "SamePad"}
    assert all(why.startswith("cannot be traced") for why in net.plan.kept_whole.values())
    assert "kept whole: SamePad: cannot be traced" in net.report()
    assert not pipecomp.compile(model, leaf_modules=(Gate, SamePad), example_input=(1, 3, SIZE, SIZE)).plan.kept_whole


def test_optional_forward_arguments_take_their_defaults():
    model, net = compiled("tiny ViT", parallel=1)
    assert [n.name for n in net.plan.graph.nodes if n.op == "placeholder"] == ["x"]
    x = frames(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(net.step(x), model(x))


class Required(nn.Module):
    def forward(self, x, mask):
        return x * mask


def test_a_required_forward_argument_says_what_to_do():
    with pytest.raises(pipecomp.CompileError, match=r"Required.forward takes arguments besides the frame.*mask.*wrap"):
        pipecomp.compile(Required(), example_input=(1, 3, SIZE, SIZE))


def test_tensors_made_while_tracing_are_carried_and_the_model_is_left_alone():
    model, net = compiled("control flow", parallel=2, delays="aligned")
    assert not [k for k in vars(model) if k.startswith("_tensor_constant")]
    assert "_tensor_constant0" in dict(net.named_buffers())
    assert "_tensor_constant0" not in net.state_dict()  # not the image model's: the state dict stays its own
    net.load_state_dict(model.state_dict())
    xs = frames(4)
    got = stream(net, xs)
    with torch.no_grad():
        torch.testing.assert_close(got[1], model(xs[0]))


@pytest.mark.parametrize("kind", ["tiny ViT", "control flow"])
def test_pickling_and_deepcopy_keep_the_network_and_its_stream(kind):
    _, net = compiled(kind, parallel=3, clocks="halve")
    xs = frames(6)
    with torch.no_grad():
        first = [net.step(x) for x in xs[:3]]
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copied = copy.deepcopy(net)
    with torch.no_grad():
        rest = [net.step(x) for x in xs[3:]]
        for other in (loaded, copied):
            for x, want in zip(xs[3:], rest):
                torch.testing.assert_close(other.step(x), want)
    assert loaded.step_code() == net.step_code()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    _, fresh = compiled(kind, parallel=3, clocks="halve")
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(stream(fresh, xs[:3]), first))


def test_the_picture_draws_constants_apart():
    pytest.importorskip("graphviz")
    _, net = compiled("layer scale", parallel=2)
    source = net.to_dot().source
    constant = next(n.name for n in net.plan.graph.nodes if info(n).get("kind") == "constant")
    line = next(ln for ln in source.splitlines() if ln.strip().startswith(f"{constant} ["))
    assert "note" in line and "pc-constant" in line
    assert "recomputed by each reader" in source


def test_threaded_runtime_equals_step():
    from pipecomp.backends.threaded import Runtime
    for kind in ("tiny ViT", "relative position"):
        _, net = compiled(kind, parallel=3, clocks="halve")
        xs = frames(6)
        want = stream(net, xs)
        with Runtime(net, 2, prepare=None) as rt:  # TorchScript cannot freeze timm's attention: eager
            for x, w in zip(xs, want):
                torch.testing.assert_close(rt.step(x), w)


def test_processes_equal_step():
    from pipecomp.backends import distributed
    _, net = compiled("tiny ViT", parallel=2, clocks="halve")
    xs = frames(4)
    got = distributed.launch(net, xs, nprocs=2, timeout=120)
    for g, w in zip(got, stream(net, xs)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["tiny ViT", "relative position"])
def test_tvm_equals_step(kind):
    pytest.importorskip("tvm")
    from pipecomp.backends import tvm as backend
    _, net = compiled(kind, parallel=2, clocks="halve")
    xs = frames(5, batch=1)  # a program is built for the example's batch
    want = stream(net, xs)
    with backend.build(net, "host", workers=2) as program:
        for x, w in zip(xs, want):
            g = torch.from_numpy(program.step(x.numpy()))
            torch.testing.assert_close(g, w, rtol=0, atol=1e-4 * float(w.abs().max()))


TIMM = [("convnext_atto", {}, 32), ("vit_tiny_patch16_224", dict(img_size=32, depth=2), 32),
        ("eva02_tiny_patch14_224", dict(img_size=28, depth=2), 28), ("mobilevit_xxs", {}, 64)]


@pytest.mark.parametrize("name, options, size", TIMM, ids=[t[0] for t in TIMM])
def test_timm_models(name, options, size):
    """timm's own code: layer scales, attention, EVA-02's rotary embeddings, MobileViT's control flow."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **options).eval()
    xs = [torch.randn(1, 3, size, size) for _ in range(4)]
    net = pipecomp.compile(model, parallel=3, delays="aligned", example_input=(1, 3, size, size))
    got = stream(net, xs)
    with torch.no_grad():
        for t in range(len(xs) - net.latency):
            torch.testing.assert_close(got[t + net.latency], model(xs[t]))
    net = pipecomp.compile(model, parallel=3, clocks="halve", example_input=(1, 3, size, size))
    got = stream(net, xs)
    with torch.no_grad():
        clip = net(torch.stack(xs, 1))
    for t in range(len(xs)):
        torch.testing.assert_close(clip[:, t], got[t])


def same_size(x, size):
    if x.shape[-1] != size:  # control flow on the size, in a plain function (timm's CrossViT has one)
        x = F.interpolate(x, size=(size, size))
    return x


class ResizesInItsOwnForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(same_size(x, SIZE // 2))


def test_a_function_of_the_models_own_forward_that_cannot_be_traced_is_kept_whole():
    model = ResizesInItsOwnForward().eval()
    net = pipecomp.compile(model, parallel=2, delays="aligned", example_input=(1, 3, SIZE, SIZE))
    assert set(net.plan.kept_whole) == {"same_size()"}
    xs = frames(3)
    got = stream(net, xs)
    with torch.no_grad():
        torch.testing.assert_close(got[1], model(xs[0]))
