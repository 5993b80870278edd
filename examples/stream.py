"""Stream frames through a pipelined, multi-rate ResNet-18 and watch the output lag.

    python examples/stream.py [--size 112] [--frames 20]
"""
import argparse

import torch
from torchvision.models import resnet18

import pipecomp

parser = argparse.ArgumentParser()
parser.add_argument("--size", type=int, default=112)
parser.add_argument("--frames", type=int, default=20)
args = parser.parse_args()

model = resnet18().eval()
net = pipecomp.compile(model, parallel=4, clocks="halve", example_input=(1, 3, args.size, args.size))
print(net)

aligned = pipecomp.compile(model, parallel=4, delays="aligned", example_input=(1, 3, args.size, args.size))
frames = [torch.randn(1, 3, args.size, args.size) for _ in range(args.frames)]
with torch.no_grad():
    for t, frame in enumerate(frames):
        out = net.step(frame)
        exact = aligned.step(frame)
        if t >= aligned.latency:
            # classic pipelining: the output at t is the image model's on frame t - latency
            err = (exact - model(frames[t - aligned.latency])).abs().max().item()
            print(f"tick {t:2d}: diagonal+clocks top class {out.argmax().item():4d}; "
                  f"aligned == image model {aligned.latency} frames ago (max error {err:.1e})")
