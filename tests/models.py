"""Random DAG image models for property tests: chains, residual adds, dense concats, long skips."""
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn


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
