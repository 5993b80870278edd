"""TSM: pipecomp's shifts equal a hand-written TSM ResNet on the same weights.

The hand-written model follows the TSM paper (sec. 3): a shift on each residual block's
branch, before its first convolution, over a batch of `B·T` frames for clips (offline,
bi-directional) and with a cache of the previous frame's shifted channels for streams
(online, uni-directional).
"""
import copy

import torch
import torchvision.models as tvm
from torch import nn

import pipecomp

SIZE, T = 64, 5


class OfflineShift(nn.Module):
    def __init__(self, conv, frames, fold):
        super().__init__()
        self.conv, self.frames, self.fold = conv, frames, fold

    def forward(self, x):
        nt, c, h, w = x.shape
        x = x.view(nt // self.frames, self.frames, c, h, w)
        f = self.fold(c)
        out = torch.zeros_like(x)
        out[:, :-1, :f] = x[:, 1:, :f]            # from the future
        out[:, 1:, f:2 * f] = x[:, :-1, f:2 * f]  # from the past
        out[:, :, 2 * f:] = x[:, :, 2 * f:]
        return self.conv(out.view(nt, c, h, w))


class OnlineShift(nn.Module):
    def __init__(self, conv, fold):
        super().__init__()
        self.conv, self.fold, self.cache = conv, fold, None

    def forward(self, x):
        f = self.fold(x.shape[1])
        cached = self.cache if self.cache is not None else torch.zeros_like(x[:, :f])
        self.cache = x[:, :f].clone()
        return self.conv(torch.cat([cached, x[:, f:]], 1))


def _tsm_resnet(model, wrap):
    tsm = copy.deepcopy(model)
    for layer in (tsm.layer1, tsm.layer2, tsm.layer3, tsm.layer4):
        for block in layer:
            block.conv1 = wrap(block.conv1)
    return tsm


def test_offline_shift_equals_hand_written_tsm():
    model = tvm.resnet18(num_classes=10).eval()
    fold = lambda c: c // 8  # noqa: E731
    tsm = _tsm_resnet(model, lambda conv: OfflineShift(conv, T, fold))
    clip = torch.randn(2, T, 3, SIZE, SIZE)
    net = pipecomp.compile(model, shift="offline", example_input=(1, 3, SIZE, SIZE))
    with torch.no_grad():
        want = tsm(clip.flatten(0, 1)).view(2, T, -1)
        got = net(clip)
    assert torch.allclose(got, want, atol=1e-5)


def test_online_shift_equals_hand_written_tsm_stream_and_clip():
    model = tvm.resnet18(num_classes=10).eval()
    fold = lambda c: c // 4  # noqa: E731
    tsm = _tsm_resnet(model, lambda conv: OnlineShift(conv, fold))
    clip = torch.randn(2, T, 3, SIZE, SIZE)
    net = pipecomp.compile(model, shift="online", shift_fraction=0.25, example_input=(1, 3, SIZE, SIZE))
    with torch.no_grad():
        want = torch.stack([tsm(clip[:, t]) for t in range(T)], 1)
        stream = torch.stack([net.step(clip[:, t]) for t in range(T)], 1)
        assert torch.allclose(stream, want, atol=1e-5)
        assert torch.allclose(net(clip), want, atol=1e-5)


def test_online_shift_memory_is_the_shifted_channels_only():
    net = pipecomp.compile(tvm.resnet50(), shift="online")
    # Block inputs of ResNet-50 at 224 px, channels × pixels, an eighth of each cached:
    blocks = [(64, 56)] + [(256, 56)] * 3 + [(512, 28)] * 4 + [(1024, 14)] * 6 + [(2048, 7)] * 2
    values = sum(c * s * s // 8 for c, s in blocks)
    assert values == 702_464  # the TSM paper quotes "0.9MB" for this cache
    assert sum(net.plan.stage_state_bytes) == 4 * values
