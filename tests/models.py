"""Image models for the tests: random DAGs for property tests (chains, residual adds, dense
concats, long skips) and a tiny ResNet that the backends' tests share."""
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torchvision.models.resnet import BasicBlock

import pipecomp


class RandomNet(nn.Module):
    """A model built from `spec`, a list of (op, a, b) over earlier values (0 is the stem)."""

    def __init__(self, spec, channels=4, classes=3, dict_output=False):
        super().__init__()
        self.spec, self.dict_output = spec, dict_output
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        layers = []
        for op, _, _ in spec:
            if op == "conv":
                layers.append(nn.Conv2d(channels, channels, 3, padding=1))
            elif op == "cat":
                layers.append(nn.Conv2d(2 * channels, channels, 1))
            elif op == "down":
                layers.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
            else:
                layers.append(nn.Identity())
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        values = [F.relu(self.bn(self.stem(x)))]
        for layer, (op, a, b) in zip(self.layers, self.spec):
            if op in ("conv", "down"):
                values.append(F.relu(layer(values[a])))
            elif op == "add":
                values.append(values[a] + values[b])
            elif op == "cat":
                values.append(layer(torch.cat([values[a], values[b]], 1)))
        logits = self.head(values[-1].mean((2, 3)))
        if self.dict_output:
            return {"logits": logits, "features": values[-1]}
        return logits


@st.composite
def specs(draw, max_layers=8):
    """Specs whose adds and concats only join values of the same resolution."""
    levels, spec = [0], []
    for _ in range(draw(st.integers(2, max_layers))):
        op = draw(st.sampled_from(["conv", "conv", "add", "cat", "down"]))
        a = draw(st.integers(0, len(levels) - 1))
        same = [i for i, lv in enumerate(levels) if lv == levels[a]]
        if op in ("add", "cat"):
            b = draw(st.sampled_from(same))
            levels.append(levels[a])
        elif op == "down" and levels[a] < 2:
            b = a
            levels.append(levels[a] + 1)
        else:
            op, b = "conv", a
            levels.append(levels[a])
        spec.append((op, a, b))
    return spec


class TinyResNet(nn.Module):
    """Three residual blocks at three resolutions: with online shift, shifts on every branch; with
    clocks="halve", periods 1, 2 and 4. Batch norms with statistics that are not the identity, and
    with `biases`, non-zero biases too (so that zero inputs give non-zero values)."""

    def __init__(self, biases=False, inplace=True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace))
        self.layers = nn.Sequential(
            BasicBlock(8, 8),
            BasicBlock(8, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))),
            BasicBlock(16, 16, stride=2, downsample=nn.Sequential(nn.Conv2d(16, 16, 1, stride=2), nn.BatchNorm2d(16))))
        self.fc = nn.Linear(16, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
                if biases:
                    m.bias.data.uniform_(-1, 1)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


# A random DAG with every kind of layer, its dict output as a backend must carry it.
TINY = [("conv", 0, 0), ("down", 1, 1), ("conv", 2, 2), ("add", 3, 2), ("cat", 4, 3), ("down", 5, 5), ("conv", 6, 6)]


def tiny_resnet(**options):
    """TinyResNet compiled for the backends' tests: 3 stages, clocks halved, online shift."""
    torch.manual_seed(0)
    options = {"parallel": 3, "clocks": "halve", "shift": "online", **options}
    return pipecomp.compile(TinyResNet().eval(), example_input=(1, 3, 16, 16), **options).eval()


def tiny_dict():
    torch.manual_seed(0)
    return pipecomp.compile(RandomNet(TINY, dict_output=True).eval(), parallel=4, clocks="halve",
                            example_input=(2, 3, 16, 16)).eval()
