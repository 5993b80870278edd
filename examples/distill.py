"""Distil a depth-parallel video network from its sequential image model (Massively Parallel
Video Networks, sec. 3.3): the pipelined student sees stale, partly fresher features through
its temporal skips, and learns on whole clips by backpropagation through time.

    python examples/distill.py [--size 64] [--steps 20]
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from torchvision.models import resnet18

import pipecomp

parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=64)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--frames", type=int, default=8)
args = parser.parse_args()

torch.manual_seed(0)
teacher = resnet18(num_classes=10).eval()
student = pipecomp.compile(copy.deepcopy(teacher), parallel=4, clocks="halve",
                           example_input=(1, 3, args.size, args.size))
optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)

# A slowly drifting clip: consecutive frames are alike, as in video.
base = torch.randn(2, 1, 3, args.size, args.size)
for step in range(args.steps):
    clip = base + 0.1 * torch.randn(2, args.frames, 3, args.size, args.size).cumsum(1)
    with torch.no_grad():
        target = teacher(clip.flatten(0, 1)).view(2, args.frames, -1)
    out = student(clip)  # [B, T, 10], one call, no loop over ticks
    loss = F.mse_loss(out[:, student.latency:], target[:, student.latency:])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 5 == 0 or step == args.steps - 1:
        print(f"step {step:3d}  distillation loss {loss.item():.4f}")
