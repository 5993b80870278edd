"""Distil a depth-parallel video network from its sequential image model (Massively Parallel
Video Networks, sec. 3.3): the pipelined student sees stale, partly fresher features through
its temporal skips, and learns on whole clips by backpropagation through time.

    python examples/distill.py [--size 64] [--steps 20]
"""
import argparse

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
# Halving clocks capped at period 2, phases aligned: the output depends on the frames from
# tick 3 on. (Uncapped, the head ticks every 16 frames, and no output of a short clip would.)
student = pipecomp.compile(resnet18(num_classes=10), parallel=4, clocks="halve", max_period=2, phases="align",
                           example_input=(1, 3, args.size, args.size))  # a fresh student
# Learn only from ticks whose output depends on some frame: before, it is the zero state's.
ticks = [t for t, frame in enumerate(student.timeline(args.frames).output) if frame is not None]
if not ticks:
    raise SystemExit(f"no output of a {args.frames}-frame clip depends on a frame yet; use more --frames")
optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)

# A slowly drifting clip: consecutive frames are alike, as in video.
base = torch.randn(2, 1, 3, args.size, args.size)
for step in range(args.steps):
    clip = base + 0.1 * torch.randn(2, args.frames, 3, args.size, args.size).cumsum(1)
    with torch.no_grad():
        target = teacher(clip.flatten(0, 1)).view(2, args.frames, -1)
    out = student(clip)  # [B, T, 10], one call, no loop over ticks
    loss = F.mse_loss(out[:, ticks], target[:, ticks])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 5 == 0 or step == args.steps - 1:
        print(f"step {step:3d}  distillation loss {loss.item():.4f}")
