"""Speed of the compiler and of VideoNet against the image model, side by side in one run.

Targets (issue: the compiler): clip forward ≤ 1.3× the image model on B·T frames; step
≤ 1.15× the image model on one frame; clocks="halve" streaming resnet50 faster than without
clocks by ≥ 80% of the theoretical saving; compile(resnet50, parallel=7, clocks="halve") < 3 s.
Run: `make bench` or `python benchmarks/bench_compiler.py`.
"""
import time

import torch
import torchvision.models as tvm

import pipecomp
from _results import machine, save, timed


def stream(net, frames):
    def run():
        net.reset()
        for x in frames:
            net.step(x)
    return run


def main():
    torch.manual_seed(0)
    rows, data = [], {"machine": machine()}
    with torch.no_grad():
        r18 = tvm.resnet18().eval()
        net = pipecomp.compile(r18, parallel=4, example_input=(1, 3, 112, 112))
        clip = torch.randn(2, 16, 3, 112, 112)
        image, video = timed([lambda: r18(clip.flatten(0, 1)), lambda: net(clip)], 7)
        data["clip"] = dict(image_s=image, video_s=video, ratio=video / image)
        rows.append(("forward(clip) / image model on B·T frames (resnet18, 112 px, B=2, T=16, parallel=4)",
                     f"{video / image:.2f}×", "≤ 1.30×"))

        frame = torch.randn(1, 3, 112, 112)
        net.reset()
        image, video = timed([lambda: r18(frame), lambda: net.step(frame)], 60)
        data["step"] = dict(image_s=image, video_s=video, ratio=video / image)
        rows.append(("step(frame) / image model on one frame (resnet18, 112 px, parallel=4)",
                     f"{video / image:.2f}×", "≤ 1.15×"))

        r50 = tvm.resnet50().eval()
        t = time.perf_counter()
        clocked = pipecomp.compile(r50, parallel=7, clocks="halve")
        compile_s = time.perf_counter() - t
        data["compile_resnet50_s"] = compile_s
        rows.append(("compile(resnet50(), parallel=7, clocks=\"halve\")", f"{compile_s:.2f} s", "< 3 s"))

        plain = pipecomp.compile(r50, parallel=7)
        frames = [torch.randn(1, 3, 224, 224) for _ in range(clocked.plan.hyperperiod)]
        slow, fast = timed([stream(plain, frames), stream(clocked, frames)], 3)
        theory = clocked.plan.clock_speedup
        achieved = (slow / fast - 1) / (theory - 1)
        data["clocks"] = dict(no_clocks_s=slow, clocks_s=fast, speedup=slow / fast, theoretical=theory,
                              share_of_saving=achieved)
        rows.append(("streaming resnet50 224 px: speed-up of clocks=\"halve\" (theoretical "
                     f"{theory:.2f}×)", f"{slow / fast:.2f}× ({achieved:.0%} of the saving)", "≥ 80% of the saving"))
    table = "| measure | result | target |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    table += f"\n\n_{data['machine']}; medians of interleaved runs._"
    save("compiler", data, table)


if __name__ == "__main__":
    main()
