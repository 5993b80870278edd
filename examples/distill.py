"""Distil a depth-parallel video network from its sequential image model (Massively Parallel
Video Networks, sec. 3.3), with Sideways and no labels.

The pipelined student (here freshly initialised) sees stale features: its stages lag one
frame each. `train.Distill` asks its output (KL divergence from the teacher's
softmax) and three inner activations (layer1..layer3, each a local loss of its own stage) to
match what the sequential model computes on the current frame.

    python examples/distill.py [--size 64] [--steps 20] [--frames 8] [--rule sideways]
"""
import argparse
from collections import OrderedDict

import torch
from torch import nn

import pipecomp
from pipecomp import train

parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=64)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--frames", type=int, default=8)
parser.add_argument("--rule", choices=train.RULES, default="sideways")
args = parser.parse_args()


def block(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU())


def image_model():
    return nn.Sequential(OrderedDict(
        stem=block(3, 16, 1), layer1=block(16, 32, 2), layer2=block(32, 64, 2), layer3=block(64, 64, 2),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(64, 10)))


torch.manual_seed(0)
teacher = image_model().eval()  # stands for the trained sequential model (torchvision's resnet18 has layer1..3 too)
net = pipecomp.compile(image_model(), parallel=4, example_input=(1, 3, args.size, args.size)).eval()  # fresh
# The teacher is frozen (a copy): training the net leaves it alone. Without `teacher=`, it is
# a snapshot of the image model as the net holds it. λ weighs the activation terms (the paper
# used 1 and 100).
distill = train.Distill(net, nodes=["layer1", "layer2", "layer3"], weight=1.0, outputs="kl", teacher=teacher)
optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

# A slowly drifting clip: consecutive frames are alike, as in video.
base = torch.randn(2, 1, 3, args.size, args.size)
for step in range(args.steps):
    clip = base + 0.1 * torch.randn(2, args.frames, 3, args.size, args.size).cumsum(1)
    optimizer.zero_grad()
    losses = train.backward(net, clip, None, None, rule=args.rule, distill=distill)  # per tick, NaN outside W
    optimizer.step()
    if step % 5 == 0 or step == args.steps - 1:
        print(f"step {step:3d}  distillation loss {losses.nanmean().item():.4f}")
