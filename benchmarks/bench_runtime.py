"""Speed of the threaded runtime: tick overhead, and a pipelined resnet50 against sequential `net.step`.

Targets (issue: threaded runtime): per-tick overhead of a 7-stage pipeline of trivial stages
< 100 µs. resnet50 at 112 px, parallel=2: 2 workers of 1 thread each against `net.step` with
2 threads, in frames per second, and the pipeline efficiency: the ideal tick (the most loaded
worker's compute, measured by `schedule(..., profile=True)`; Skip-Sideways supplementary sec.
5: max_j T(H_j)) over the measured tick. Each network is timed as compiled ("eager") and with
every stage frozen to TorchScript and optimised for inference (batch norm folded, oneDNN).
Run: `python benchmarks/bench_runtime.py` (about 2 minutes); writes results/runtime.json.
"""
import copy
import json
import os
import time
import warnings
from typing import Dict

import torch
import torchvision.models as tvm
from torch import nn

import pipecomp
from _results import RESULTS, machine
from pipecomp.backends.threaded import Runtime
from pipecomp.lower import zero_state
from pipecomp.schedule import schedule


def timed(fns, repeats):
    """Median time of each function, measured interleaved so that machine noise hits all alike."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [sorted(ts)[len(ts) // 2] for ts in times]


class Chain(nn.Module):
    def forward(self, x):
        for _ in range(7):
            x = x + 1
        return x


def tick_overhead(ticks=1000):
    """Seconds per tick of a 7-stage pipeline whose stages do one tiny add each."""
    net = pipecomp.compile(Chain(), parallel=7, example_input=(1, 1, 4, 4))
    xs = [torch.zeros(1, 1, 4, 4)] * ticks
    state = zero_state(net.plan, 1, "cpu")
    stages = [s.variants[0] for s in net._stages]
    runtimes = {w: Runtime(net, w) for w in (1, 2, 7)}
    fns = [lambda: [[gm.forward(x, state) for gm in stages] for x in xs]]
    for rt in runtimes.values():
        fns += [lambda rt=rt: list(rt.run(xs)), lambda rt=rt: [rt.step(x) for x in xs]]
    compute, *times = [t / ticks for t in timed(fns, 5)]
    for rt in runtimes.values():
        rt.close()
    rows = {"stages_alone_s": compute}
    for i, w in enumerate(runtimes):
        rows[f"{w}_workers"] = dict(run_tick_s=times[2 * i], step_tick_s=times[2 * i + 1],
                                    run_overhead_s=times[2 * i] - compute, step_overhead_s=times[2 * i + 1] - compute)
    return rows


def frozen(net):
    """`net` with every stage's generated GraphModule frozen to TorchScript and optimised for inference."""
    net = copy.deepcopy(net)
    for stage in net._stages:
        for i, gm in enumerate(stage.variants):
            for n in gm.graph.nodes:
                if n.op == "placeholder":  # TorchScript needs the types fx leaves out
                    n.type = torch.Tensor if n.name == "frame" else Dict[str, torch.Tensor]
            gm.recompile()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                stage.variants[i] = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(gm.eval())))
    return net


def resnet50(net, frames, repeats=5):
    """Frames per second of net.step (2 threads, 1 thread) and of the runtime on 2 workers."""
    def sequential(threads):
        def go():
            torch.set_num_threads(threads)
            net.reset()
            for x in frames:
                net.step(x)
            torch.set_num_threads(2)
        return go

    placement = schedule(net, 2, profile=True)
    with Runtime(net, placement) as rt:
        def pipelined():
            rt.reset()
            for _ in rt.run(frames):
                pass
        seq2, seq1, pipe = (t / len(frames) for t in timed([sequential(2), sequential(1), pipelined], repeats))
    return dict(groups=placement.groups, threads_per_worker=placement.threads_per_worker,
                worker_compute_s=[sum(c) / len(c) for c in placement.worker_costs()],
                step_2_threads_fps=1 / seq2, step_1_thread_fps=1 / seq1, runtime_fps=1 / pipe,
                speedup_over_step_2_threads=seq2 / pipe, ideal_tick_s=placement.average_tick, tick_s=pipe,
                efficiency=placement.average_tick / pipe)


def table(data):
    us = lambda s: f"{s * 1e6:.0f} µs"  # noqa: E731
    ov = data["tick_overhead"]
    rows = ["| measurement | value | target |", "| --- | --- | --- |",
            f"| 7 trivial stages called in one thread, per tick | {us(ov['stages_alone_s'])} | |"]
    for w in (1, 2, 7):
        r = ov[f"{w}_workers"]
        rows.append(f"| runtime tick, 7 trivial stages, {w} workers: run() / step() | {us(r['run_tick_s'])} / "
                    f"{us(r['step_tick_s'])} (overhead {us(r['run_overhead_s'])} / {us(r['step_overhead_s'])}) "
                    f"| < 100 µs |")
    for name in ("eager", "frozen"):
        r = data[f"resnet50_{name}"]
        rows.append(f"| resnet50 112 px parallel=2 ({name}): net.step 2 threads / 1 thread / runtime 2×1 "
                    f"| {r['step_2_threads_fps']:.1f} / {r['step_1_thread_fps']:.1f} / {r['runtime_fps']:.1f} fps "
                    f"({r['speedup_over_step_2_threads']:.2f}×, efficiency {r['efficiency']:.0%}) | runtime faster |")
    rows.append(f"| load average before / after (2 cores, shared) | {data['load_before']} / {data['load_after']} | |")
    return "\n".join(rows)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = {"machine": machine(), "load_before": [round(x, 2) for x in os.getloadavg()]}
    with torch.no_grad():
        data["tick_overhead"] = tick_overhead()
        net = pipecomp.compile(tvm.resnet50().eval(), parallel=2, example_input=(1, 3, 112, 112))
        frames = [torch.randn(1, 3, 112, 112) for _ in range(12)]
        data["resnet50_eager"] = resnet50(net, frames)
        fast = frozen(net)
        net.reset()
        fast.reset()
        data["frozen_max_abs_diff"] = max(float((net.step(x) - fast.step(x)).abs().max()) for x in frames[:3])
        data["resnet50_frozen"] = resnet50(fast, frames)
    data["load_after"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runtime.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "runtime.md").write_text(table(data) + "\n")
    print(table(data))


if __name__ == "__main__":
    main()
