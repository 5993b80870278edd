"""The demo: ResNet-50 as a 7-stage, multi-rate video network on a synthetic clip.

7 stages with clocks that halve with resolution is the Par-ResNet setting of *Massively
Parallel Video Networks* (sec. 3, 3.1); the clip is coloured squares and circles moving
across a dark background, so no data set is needed.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import torchvision

from .compiler import compile


def moving_shapes(frames: int, size: int, shapes: int = 5, seed: int = 0) -> torch.Tensor:
    """A clip `[frames, 3, size, size]` in [0, 1]: squares and circles bouncing off the borders."""
    g = torch.Generator().manual_seed(seed)
    radius = size * (0.06 + 0.08 * torch.rand(shapes, 1, generator=g))
    pos = radius + (size - 2 * radius) * torch.rand(shapes, 2, generator=g)
    vel = size * 0.05 * (2 * torch.rand(shapes, 2, generator=g) - 1)
    colour = 0.3 + 0.7 * torch.rand(shapes, 3, generator=g)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    clip = torch.full((frames, 3, size, size), 0.1)
    for t in range(frames):
        for i in range(shapes):
            dy, dx = (ys - pos[i, 0]).abs(), (xs - pos[i, 1]).abs()
            inside = torch.maximum(dy, dx) <= radius[i] if i % 2 == 0 else dy ** 2 + dx ** 2 <= radius[i] ** 2
            clip[t][:, inside] = colour[i][:, None]
        pos = pos + vel
        vel = torch.where((pos < radius) | (pos > size - radius), -vel, vel)
        pos = pos.clamp(radius, size - radius)
    return clip


def _fps(run, clip) -> float:
    run(clip[:1])  # warm-up: first calls allocate
    start = time.perf_counter()
    for t in range(clip.shape[0]):
        run(clip[t:t + 1])
    return clip.shape[0] / (time.perf_counter() - start)


def run(out: Path, frames: int, size: int, say) -> None:
    """Compile, print the report, stream the clip, time both networks, draw the pictures into `out`."""
    say("building torchvision resnet50 (untrained, weights=None)")
    model = torchvision.models.resnet50(weights=None).eval()
    say(f"compiling: parallel=7, clocks='halve', input 1x3x{size}x{size}")
    net = compile(model, parallel=7, clocks="halve", example_input=(1, 3, size, size)).eval()
    print(net.report())
    say(f"streaming {frames} frames of moving shapes through net.step and through the image model")
    clip = moving_shapes(frames, size)
    with torch.no_grad():
        net.reset()
        video = _fps(net.step, clip)
        image = _fps(model, clip)
    print(f"video network (net.step, one tick per frame): {video:8.1f} frames/s")
    print(f"image model (frame by frame):                 {image:8.1f} frames/s")
    hyper = net.plan.hyperperiod
    if frames % hyper:
        print(f"(the clocks repeat every {hyper} ticks: time a multiple of {hyper} frames for a fair average)")
    print(f"the clocks skip work: {net.plan.clock_speedup:.2f}x fewer FLOPs per frame; here the 7 stages run "
          f"one after another, on 7 devices a tick costs only the slowest stage")
    out.mkdir(parents=True, exist_ok=True)
    suffix = "svg"
    if shutil.which("dot") is None:
        say("Graphviz's 'dot' program is not installed (apt-get install graphviz): writing .dot sources instead")
        suffix = "dot"
    say(f"drawing pictures into {out}")
    ticks = min(48, net.latency + 2 * net.plan.hyperperiod)
    from .viz import visualize  # pictures need the optional graphviz package; the clip does not
    graph = visualize(net, out / f"resnet50_graph.{suffix}")
    table = visualize(net, out / f"resnet50_timeline.{suffix}", view="timeline", ticks=ticks)
    print(f"pictures: {graph} (graph, one cluster per stage) and {table} (time-space table, {ticks} ticks)")
