"""`pipecomp run` on real footage: frames per second of EfficientNet-Lite0 streamed from bikes.mp4.

What `pipecomp.video.run` sustains end to end — decoding and preprocessing on their own thread,
the compiled network on the threaded runtime, labels into JSON lines — for the sequential
network and pipelines of aligned stages, and what drawing and encoding the output video adds.
Decoding alone is timed too: the ceiling for any network. Rounds are interleaved (the machine is
shared) and each configuration's median is reported; the runtime's construction (freezing the
tick functions) is not counted, its first ticks are.

Run: `python benchmarks/bench_video.py` (a few minutes); writes results/video.json and .md.
"""
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _results import machine, save
from pipecomp import compile, footage, models, video

FRAMES, SIZE, ROUNDS = 96, 224, 3
PRE = video.Preprocess((SIZE, SIZE), 224 / 256, (127 / 255,) * 3, (128 / 255,) * 3)  # models.normalize


def decode_only(path) -> float:
    start = time.perf_counter()
    with video.Frames(path, PRE, limit=FRAMES) as frames:
        n = sum(1 for _ in frames)
    return n / (time.perf_counter() - start)


def main():
    path = footage.footage("bikes")
    model = models.efficientnet_lite0()
    example = (1, 3, SIZE, SIZE)
    nets = {k: compile(model, parallel=k, delays="aligned", example_input=example).eval() for k in (1, 2, 4)}
    configs = [(f"parallel={k}, JSON lines", k, False) for k in nets] + [("parallel=2, JSON lines + video", 2, True)]
    fps = {name: [] for name, _, _ in configs}
    fps["decoding and preprocessing alone"] = []
    load_before = [round(x, 2) for x in __import__("os").getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(ROUNDS):
            fps["decoding and preprocessing alone"].append(decode_only(path))
            for name, k, draw in configs:
                out = Path(tmp) / "out.mp4" if draw else None
                summary = video.run(nets[k], video.Frames(path, PRE, limit=FRAMES), categories=models.categories(),
                                    jsonl=Path(tmp) / "p.jsonl", video=out, progress=False)
                assert summary.frames == FRAMES and not summary.interrupted
                fps[name].append(summary.fps)
    medians = {name: statistics.median(v) for name, v in fps.items()}
    workers = {name: min(k, 2) for name, k, _ in configs}
    rows = [f"| decoding and preprocessing alone (decode thread, {SIZE} px crop) | {medians[n]:.1f} |"
            for n in ["decoding and preprocessing alone"]]
    rows += [f"| EfficientNet-Lite0, {name}, {workers[name]} worker(s) | {medians[name]:.1f} |" for name, _, _ in configs]
    table = "\n".join([f"| pipecomp run, bikes.mp4 (640×272), first {FRAMES} frames, {SIZE} px | frames/s |",
                       "|---|---|", *rows, "",
                       f"_{machine()}, load average before {load_before}; medians of {ROUNDS} interleaved "
                       f"rounds; delays='aligned'._"])
    save("video", {"frames": FRAMES, "size": SIZE, "rounds": ROUNDS, "fps": fps, "median_fps": medians,
                   "load_before": load_before, "machine": machine(), "torch_threads": torch.get_num_threads()},
         table)


if __name__ == "__main__":
    main()
