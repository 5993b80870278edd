"""*Massively Parallel Video Networks* table 2 on this machine: throughput improvement factors.

Each row is one compiled network (resnet50 or densenet121 at 112 px, `parallel` stages,
with or without `clocks="halve"`, and with it `phases="align"` for more than one stage); the columns are the threaded runtime on 1 worker (all
cores: the sequential order of the stages) and on 2 workers (one core each). A factor is
frames per second over the sequential network without clocks: `parallel=1`, no clocks, all
cores, with the same inference-ready kernels as the runtime (frozen tick functions; the
eager `net.step` is reported next to it). The 2-worker pipeline efficiency is the ideal tick
(the average over ticks of the slowest worker's compute, max_j T(H_j), Skip-Sideways
supplementary sec. 5) over the measured tick: "profiled" takes each stage's time measured alone
(`schedule(..., profile=True)`), "in run" the workers' own compute times during the run. The
tick overhead comes from `bench_runtime.tick_overhead`.

Run: `python benchmarks/bench_table2.py` (5-8 minutes on 2 shared cores; `--quick` for a
smoke run); writes results/table2.json and .md. The machine is shared: the load average
at each row is recorded, and timings are the best of interleaved rounds.
"""
import argparse
import os
import statistics
import time
import warnings
from dataclasses import replace

import torch
import torchvision.models as tvm

import pipecomp
from _results import machine, save, timed
from bench_runtime import tick_overhead
from pipecomp.backends.threaded import Runtime
from pipecomp.schedule import schedule

SIZE = 112
PARALLEL = {"resnet50": (1, 2, 4, 7), "densenet121": (1, 2, 4, 7, 14)}


def load() -> list:
    return [round(x, 2) for x in os.getloadavg()]


def compiled(name, parallel, clocks):
    """`clocks`: None, "halve", or "halve+align" (halving clocks with aligned phases)."""
    torch.manual_seed(0)
    model = getattr(tvm, name)().eval()
    phases = "align" if clocks == "halve+align" else "zero"
    return pipecomp.compile(model, parallel=parallel, clocks=clocks and "halve", phases=phases,
                            example_input=(1, 3, SIZE, SIZE))


class Sequential:
    """The sequential network without clocks (`parallel=1`): the reference every row is timed against.

    `frozen` (the denominator of the factors) runs the frozen tick function on one worker with
    all cores; `frozen_1_thread` on one core; `step` is the eager `net.step` with all cores. Each
    row times them again, interleaved with its own runs, so that both see the same machine load.
    """

    def __init__(self, name):
        self.net = compiled(name, 1, None)
        self.runtimes = {"frozen": Runtime(self.net, 1),
                         "frozen_1_thread": Runtime(self.net, replace(schedule(self.net, 1), threads_per_worker=1))}

    def fns(self, frames):
        def step():
            self.net.reset()
            for x in frames:
                self.net.step(x)
        return {"step": step, **{key: run_all(rt, frames) for key, rt in self.runtimes.items()}}

    def close(self):
        for rt in self.runtimes.values():
            rt.close()


def run_all(rt, frames, counters=None):
    def go():
        rt.reset()
        for _ in rt.run(frames):
            pass
        if counters is not None:
            counters.setdefault(rt, []).append(rt.counters())  # the first is the warm-up's
    return go


def row(name, parallel, clocks, ticks, rounds, sequential):
    """Frames per second of the runtime on 1 and 2 workers and of the sequential references, interleaved."""
    start = time.perf_counter()
    net = compiled(name, parallel, clocks)
    frames = [torch.randn(1, 3, SIZE, SIZE) for _ in range(max(ticks, 2 * net.plan.hyperperiod))]
    placements = {w: schedule(net, w, profile=True) for w in (1, 2)}
    runtimes = {w: Runtime(net, p) for w, p in placements.items()}
    counters = {}
    try:
        refs = sequential.fns(frames[:ticks])
        fns = list(refs.values()) + [run_all(rt, frames, counters) for rt in runtimes.values()]
        best = []
        times = timed(fns, rounds, best=True, which=best)
    finally:
        for rt in runtimes.values():
            rt.close()
    ref_fps = {key: ticks / t for key, t in zip(refs, times)}
    out = {"model": name, "parallel": parallel, "clocks": clocks, "hyperperiod": net.plan.hyperperiod,
           "ticks": len(frames), "clock_flop_speedup": net.plan.clock_speedup, "load": load(),
           "preparation": sorted(set(runtimes[1].preparation) | set(runtimes[2].preparation)),
           "sequential_fps": ref_fps}
    for (w, p), t, b in zip(placements.items(), times[len(refs):], best[len(refs):]):
        tick = t / len(frames)
        c = counters[runtimes[w]][1 + b]  # of the best round
        in_run = c["slowest_worker_s"] / c["ticks"]
        out[f"{w}_workers"] = {
            "groups": p.groups, "threads_per_worker": p.threads_per_worker, "fps": 1 / tick, "tick_s": tick,
            "factor": (1 / tick) / ref_fps["frozen"],
            "over_best_sequential": (1 / tick) / max(ref_fps.values()),
            "profiled_ideal_tick_s": p.average_tick, "profiled_worst_tick_s": p.worst_tick,
            "profiled_worker_s": [statistics.fmean(cost) for cost in p.worker_costs()],
            "in_run_ideal_tick_s": in_run, "in_run_worker_s": [s / c["ticks"] for s in c["worker_s"]],
            "efficiency_profiled": p.average_tick / tick, "efficiency_in_run": in_run / tick,
        }
    out["seconds"] = time.perf_counter() - start
    return out


def table(data) -> str:
    lines = [
        "| model | parallel | clocks | 1 worker × 2 threads | 2 workers × 1 thread | 2 workers over best sequential "
        "| 2-worker efficiency (in run / profiled) | 2-worker groups (ms per tick, in run) | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["rows"]:
        one, two = r["1_workers"], r["2_workers"]
        split = " / ".join(f"{s * 1e3:.1f}" for s in two["in_run_worker_s"])
        best = max(r["sequential_fps"], key=r["sequential_fps"].get)
        lines.append(
            f"| {r['model']} | {r['parallel']} | {r['clocks'] or '-'} | {one['factor']:.2f}× ({one['fps']:.1f} fps) "
            f"| {two['factor']:.2f}× ({two['fps']:.1f} fps) | {two['over_best_sequential']:.2f}× ({best} "
            f"{r['sequential_fps'][best]:.1f} fps) | {two['efficiency_in_run']:.0%} / "
            f"{two['efficiency_profiled']:.0%} | {two['groups']} ({split}) | {r['load'][0]} |")
    lines.append("")
    lines.append("Factors: frames per second over the sequential network without clocks (parallel=1, frozen "
                 "stages, 1 worker with all cores), timed in the same row. Best sequential: the fastest of that, "
                 "the same on one thread, and eager `net.step` on all cores. With parallel=1 both columns run one "
                 "worker (one stage). Efficiency: average over ticks of the slowest worker's compute over the tick, "
                 "compute measured during the run / measured alone by `schedule(..., profile=True)`.")
    ov = data["tick_overhead"]
    lines.append("Tick overhead (7 trivial stages, run(); above calling the stages in one thread): "
                 + ", ".join(f"{w} worker{'s' * (w > 1)} {ov[f'{w}_workers']['run_overhead_s'] * 1e6:.0f} µs"
                             for w in (1, 2, 7)) + ".")
    lines.append(f"Load average (1, 5, 15 min) at start {data['load_start']}, at end {data['load_end']} on "
                 f"{os.cpu_count()} cores; {data['machine']}; {data['seconds']:.0f} s in all.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet50 parallel 1-2 only, one round")
    parser.add_argument("--ticks", type=int, default=8, help="ticks per run without clocks (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per configuration (default 2)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    start = time.perf_counter()
    data = {"machine": machine(), "load_start": load(), "size": SIZE, "ticks": args.ticks, "rounds": args.rounds}
    grid = {"resnet50": (1, 2)} if args.quick else PARALLEL
    rounds = 1 if args.quick else args.rounds
    with torch.no_grad():
        data["tick_overhead"] = tick_overhead(ticks=300 if args.quick else 1000)
        data["rows"] = []
        for name, parallels in grid.items():
            sequential = Sequential(name)
            try:
                for clocks in (None, "halve", "halve+align"):
                    for parallel in parallels if clocks != "halve+align" else parallels[1:]:
                        r = row(name, parallel, clocks, args.ticks, rounds, sequential)
                        data["rows"].append(r)
                        one, two = r["1_workers"], r["2_workers"]
                        print(f"{name} parallel={parallel} clocks={clocks}: 1 worker {one['factor']:.2f}x, "
                              f"2 workers {two['factor']:.2f}x ({two['over_best_sequential']:.2f}x best sequential; "
                              f"efficiency {two['efficiency_in_run']:.0%} in run, {two['efficiency_profiled']:.0%} "
                              f"profiled) load {r['load'][0]} [{r['seconds']:.0f} s]", flush=True)
            finally:
                sequential.close()
    data["load_end"] = load()
    data["seconds"] = time.perf_counter() - start
    save("table2", data, table(data))


if __name__ == "__main__":
    main()
