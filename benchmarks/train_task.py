"""A small video task whose label needs motion, and the two small networks trained on it.

Clips `[N, T, 3, H, W]` of one shape (disc, square, triangle or cross, random size and colour,
black outline) moving at constant speed in one of `K` directions (the label) over a still crop
of a real photograph (the photographs scikit-image ships, read with PIL). The shape wraps
around the borders, and its starting point is uniform over the frame, so at every tick its
position is uniform whatever the direction: a single frame carries no information about the
label, and only motion does. Training and held-out clips come from different photographs and
different seeds. `stride` is the temporal stride: the shape moves `stride` times as far per
frame, as if only every `stride`-th frame of the clip were kept (*Sideways* sec. 4's frame-rate
sensitivity).

The networks: `SimpleCNN`, the Simple-CNN of *Sideways* sec. 4.2 (five 3×3 convolutions with
32, 64, 64, 128, 256 channels, stride 2 on the first, third and fifth, global average pooling,
a linear head), and `SmallResNet`, a stem and four torchvision BasicBlocks.

Used by `bench_train.py`; `python benchmarks/train_task.py` writes a few clips to out/ as GIFs.
"""
import functools
import importlib.util
import math
import pathlib

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torchvision.models.resnet import BasicBlock

TRAIN_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "grass.png",
                "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png", "rocket.jpg")
HELD_OUT_PHOTOS = ("coins.png", "gravel.png", "ihc.png", "retina.jpg", "cell.png")
SHAPES = ("disc", "square", "triangle", "cross")
SPLITS = {"train": (TRAIN_PHOTOS, 0), "held-out": (HELD_OUT_PHOTOS, 1)}


def photo_folder() -> pathlib.Path:
    """scikit-image's data folder, found without importing scikit-image (it is installed without its
    dependencies, only for these files)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the motion task needs scikit-image's photographs: "
                           "run `pip install --no-deps scikit-image` (make setup does)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"


@functools.cache
def photos(split: str) -> tuple:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {sorted(SPLITS)}")
    return tuple(Image.open(photo_folder() / name).convert("RGB") for name in SPLITS[split][0])


def _mask(kind, size, radius):
    """A centred shape on a size×size canvas, as a float mask."""
    canvas = Image.new("L", (size, size))
    draw = ImageDraw.Draw(canvas)
    c, r = size / 2, radius
    if kind == "disc":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif kind == "square":
        draw.rectangle([c - r, c - r, c + r, c + r], fill=255)
    elif kind == "triangle":
        draw.polygon([(c, c - r), (c + r, c + r), (c - r, c + r)], fill=255)
    else:
        w = max(r / 2.5, 1)
        draw.rectangle([c - r, c - w, c + r, c + w], fill=255)
        draw.rectangle([c - w, c - r, c + w, c + r], fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255


def clips(n: int, *, split: str = "train", frames: int = 8, size: int = 32, directions: int = 4,
          stride: int = 1, speed: float = 2.0, seed: int = 0):
    """`n` clips `[n, frames, 3, size, size]` (floats in [0, 1]) and their labels `[n]` (the
    direction, 0 = right, counter-clockwise in steps of 360°/directions). Deterministic in its
    arguments; every label occurs `n // directions` or one more times."""
    if directions < 2 or frames < 2 or stride < 1 or n < 1:
        raise ValueError(f"clips(n={n}, frames={frames}, directions={directions}, stride={stride}): "
                         "use n >= 1, frames >= 2, directions >= 2, stride >= 1")
    pictures = photos(split)
    rng = np.random.default_rng([seed, SPLITS[split][1]])
    labels = rng.permutation(np.arange(n) % directions)
    out = np.empty((n, frames, 3, size, size), dtype=np.float32)
    for i, label in enumerate(labels):
        picture = pictures[rng.integers(len(pictures))]
        side = rng.integers(min(2 * size, min(picture.size)), min(picture.size) + 1)
        left, top = rng.integers(picture.width - side + 1), rng.integers(picture.height - side + 1)
        background = np.asarray(picture.crop((left, top, left + side, top + side))
                                .resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
        kind = SHAPES[rng.integers(len(SHAPES))]
        radius = rng.uniform(size / 10, size / 5)
        inner, outer = _mask(kind, size, radius), _mask(kind, size, radius + 1.5)
        colour = rng.uniform(0.2, 1.0, 3).astype(np.float32)
        start = rng.uniform(0, size, 2)
        angle = 2 * math.pi * label / directions
        step = speed * stride * np.array([math.cos(angle), -math.sin(angle)])  # image rows grow downwards
        for t in range(frames):
            dx, dy = np.rint(start + t * step).astype(int) - size // 2
            o = np.roll(outer, (dy, dx), axis=(0, 1))[..., None]
            m = np.roll(inner, (dy, dx), axis=(0, 1))[..., None]
            frame = background * (1 - o) + colour * m  # black outline: outer minus inner
            out[i, t] = frame.transpose(2, 0, 1)
    return torch.from_numpy(out), torch.from_numpy(labels.astype(np.int64))


class SimpleCNN(nn.Module):
    """*Sideways* sec. 4.2's Simple-CNN: five 3×3 convolutions (32, 64, 64, 128, 256 channels,
    stride 2 on every second one starting from the first), global average pooling, a linear head.
    Each convolution is followed by batch norm and ReLU (the paper does not say; without batch
    norm it did not start learning the motion task here)."""

    def __init__(self, classes: int, channels=(32, 64, 64, 128, 256)):
        super().__init__()
        layers, c = [], 3
        for i, width in enumerate(channels):
            layers += [nn.Conv2d(c, width, 3, stride=2 if i % 2 == 0 else 1, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class SmallResNet(nn.Module):
    """A 3×3 stride-2 stem and four BasicBlocks (32, 64, 128, 256 channels, the last three of
    stride 2), global average pooling, a linear head: resnet18's design at a tenth of its depth."""

    def __init__(self, classes: int, channels=(32, 64, 128, 256)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        blocks, c = [], channels[0]
        for i, width in enumerate(channels):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and c == width else nn.Sequential(
                nn.Conv2d(c, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
            blocks.append(BasicBlock(c, width, stride, down))
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


MODELS = {"simple-cnn": SimpleCNN, "resnet": SmallResNet}


if __name__ == "__main__":
    folder = pathlib.Path("out")
    folder.mkdir(exist_ok=True)
    x, y = clips(8, size=64, frames=12)
    for i, (clip, label) in enumerate(zip(x, y)):
        images = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for f in clip]
        images[0].save(folder / f"motion-{i}-direction{label}.gif", save_all=True, append_images=images[1:],
                       duration=120, loop=0)
    print(f"wrote {len(x)} clips to {folder}/motion-*.gif")
