"""Speed of the threaded runtime: tick overhead, and a pipelined resnet50 against sequential `net.step`.

Targets (issue: threaded runtime): per-tick overhead of a 7-stage pipeline of trivial stages
< 100 µs (measured with the generated stage functions, `prepare=None`, against calling them in
one thread). resnet50 at 112 px, parallel=2: 2 workers of 1 thread each against `net.step` with
2 threads and against the runtime on 1 worker of 2 threads, in frames per second, and the
pipeline efficiency: the ideal tick (the most loaded worker's compute, measured by
`schedule(..., profile=True)`; Skip-Sideways supplementary sec. 5: max_j T(H_j)) over the
measured tick. The runtime runs the generated stage functions ("eager", `prepare=None`) and
frozen ones (`prepare="freeze"`, the default: TorchScript, batch norm folded, no GIL).
Run: `python benchmarks/bench_runtime.py` (about 1-2 minutes); writes results/runtime.json, .md.
"""
import os
import statistics
import threading
import time

import torch
import torchvision.models as tvm
from torch import nn

import pipecomp
from _results import machine, save, timed
from pipecomp.backends.threaded import Runtime
from pipecomp.lower import zero_state
from pipecomp.schedule import schedule


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
    runtimes = {w: Runtime(net, w, prepare=None) for w in (1, 2, 7)}
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


def handoff_floor(rounds=2000):
    """Seconds for two Python threads to hand control to each other and back through locks:
    the least any two-thread tick can cost here (a woken thread must also take the GIL)."""
    there, back = threading.Lock(), threading.Lock()
    there.acquire()
    back.acquire()

    def echo():
        for _ in range(rounds):
            there.acquire()
            back.release()
    thread = threading.Thread(target=echo)
    thread.start()
    start = time.perf_counter()
    for _ in range(rounds):
        there.release()
        back.acquire()
    seconds = (time.perf_counter() - start) / rounds
    thread.join()
    return seconds


def resnet50(net, frames, repeats=5):
    """Frames per second of net.step (2 threads, 1 thread) and of the runtime, eager and frozen."""
    def sequential(threads):
        def go():
            torch.set_num_threads(threads)
            net.reset()
            for x in frames:
                net.step(x)
            torch.set_num_threads(2)
        return go

    counters = {}

    def pipelined(rt):
        def go():
            rt.reset()
            for _ in rt.run(frames):
                pass
            counters.setdefault(rt, []).append(rt.counters())  # the first is the warm-up's
        return go

    out = {}
    placements = {(w, prepare): schedule(net, w, profile=True, prepare=prepare)
                  for prepare in (None, "freeze") for w in (1, 2)}
    runtimes = {key: Runtime(net, p, prepare=key[1]) for key, p in placements.items()}
    median = []
    try:
        seq2, seq1, *pipes = (t / len(frames) for t in timed(
            [sequential(2), sequential(1)] + [pipelined(rt) for rt in runtimes.values()], repeats, which=median))
    finally:
        for rt in runtimes.values():
            rt.close()
    out.update(step_2_threads_fps=1 / seq2, step_1_thread_fps=1 / seq1)
    for ((w, prepare), rt), tick, m in zip(runtimes.items(), pipes, median[2:]):
        p, c = placements[(w, prepare)], counters[rt][1 + m]  # the median round's
        out[f"{prepare or 'eager'}_{w}_workers"] = dict(
            groups=p.groups, threads_per_worker=p.threads_per_worker,
            worker_compute_s=[sum(c) / len(c) for c in p.worker_costs()], fps=1 / tick,
            speedup_over_step_2_threads=seq2 / tick, ideal_tick_s=p.average_tick, tick_s=tick,
            efficiency=p.average_tick / tick,
            in_run_worker_s=[s / c["ticks"] for s in c["worker_s"]],
            efficiency_in_run=c["slowest_worker_s"] / c["ticks"] / tick)
    return out


def table(data):
    us = lambda s: f"{s * 1e6:.0f} µs"  # noqa: E731
    ov = data["tick_overhead"]
    rows = ["| measurement | value | target |", "| --- | --- | --- |",
            f"| 7 trivial stages called in one thread, per tick | {us(ov['stages_alone_s'])} | |",
            f"| two Python threads handing control there and back through locks (the floor of a tick with "
            f"a worker) | {us(ov['handoff_round_trip_s'])} | |"]
    for w in (1, 2, 7):
        r = ov[f"{w}_workers"]
        rows.append(f"| runtime tick, 7 trivial stages, {w} workers: run() / step() | {us(r['run_tick_s'])} / "
                    f"{us(r['step_tick_s'])} (overhead {us(r['run_overhead_s'])} / {us(r['step_overhead_s'])}) "
                    f"| < 100 µs |")
    r = data["resnet50"]
    rows.append(f"| resnet50 112 px parallel=2: net.step 2 threads / 1 thread | {r['step_2_threads_fps']:.1f} / "
                f"{r['step_1_thread_fps']:.1f} fps | |")
    for prepare in ("eager", "freeze"):
        one, two = r[f"{prepare}_1_workers"], r[f"{prepare}_2_workers"]
        ms = " / ".join(f"{s * 1e3:.1f}" for s in two["worker_compute_s"])
        rows.append(f"| same, runtime ({prepare}): 1 worker × 2 threads / 2 workers × 1 thread | {one['fps']:.1f} / "
                    f"{two['fps']:.1f} fps (2 workers: {two['speedup_over_step_2_threads']:.2f}× net.step, "
                    f"efficiency {two['efficiency']:.0%} profiled / {two['efficiency_in_run']:.0%} in run, "
                    f"stages {ms} ms alone) | 2 workers fastest |")
    rows.append(f"| load average before / after (2 cores, shared) | {data['load_before']} / {data['load_after']} | |")
    return "\n".join(rows)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = {"machine": machine(), "load_before": [round(x, 2) for x in os.getloadavg()]}
    with torch.no_grad():
        data["tick_overhead"] = tick_overhead()
        data["tick_overhead"]["handoff_round_trip_s"] = statistics.median(handoff_floor() for _ in range(5))
        net = pipecomp.compile(tvm.resnet50().eval(), parallel=2, example_input=(1, 3, 112, 112))
        frames = [torch.randn(1, 3, 112, 112) for _ in range(12)]
        data["resnet50"] = resnet50(net, frames)
    data["load_after"] = [round(x, 2) for x in os.getloadavg()]
    save("runtime", data, table(data))


if __name__ == "__main__":
    main()
