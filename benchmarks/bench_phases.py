"""What aligned clock phases change: how fresh the output is, and how uneven the ticks are.

resnet50, parallel=7, clocks="halve", phases "zero" and "align" (semantics §5's default),
side by side:

1. freshness, measured by perturbing frames and watching `net.step`'s output (64 px): the
   first tick whose output depends on the frames at all (before it, the output is that of
   the zero state), and at steady-state ticks the age of the newest frame that changes the
   output (t − s for the largest such frame s);
2. tick times of `net.step` streaming 224 px frames (torch's default thread count): average and worst tick over
   two hyperperiods (the worst tick is the longest wait for one output), medians of
   interleaved rounds per tick; and the same from the scheduler's FLOP cost model.

Run: `python benchmarks/bench_phases.py` (about 2 minutes); writes results/phases.json, .md.
"""
import statistics
import time

import torch
import torchvision.models as tvm

import pipecomp
from _results import machine, save

ROUNDS = 3
PHASES = ("zero", "align")


def compiled(phases, size):
    torch.manual_seed(0)
    return pipecomp.compile(tvm.resnet50().eval(), parallel=7, clocks="halve", phases=phases,
                            example_input=(1, 3, size, size)).eval()


def outputs(net, frames):
    net.reset()
    return [net.step(x) for x in frames]


def freshness(net, ticks=48, probes=(44, 47)):
    torch.manual_seed(1)
    frames = [torch.randn(1, 3, 64, 64) for _ in range(ticks)]
    base = outputs(net, frames)
    changed = outputs(net, [x + 1 for x in frames])
    first = next((t for t, (a, b) in enumerate(zip(base, changed)) if not torch.allclose(a, b)), None)
    ages = {}
    for t in probes:  # newest frame first: the first one that changes output t gives its age
        for s in range(t, -1, -1):
            out = outputs(net, [*frames[:s], frames[s] + 1, *frames[s + 1:t + 1]])[t]
            if not torch.allclose(out, base[t]):
                ages[t] = t - s
                break
    return {"first_tick_with_a_frame": first, "age_by_tick": ages}


def tick_times(nets):
    """Per net, the median over rounds of every tick's time, rounds interleaved across nets."""
    torch.manual_seed(2)
    ticks = 2 * max(n.plan.hyperperiod for n in nets)
    frames = [torch.randn(1, 3, 224, 224) for _ in range(ticks)]
    times = [[[] for _ in range(ticks)] for _ in nets]
    for r in range(ROUNDS + 1):
        for i, net in enumerate(nets):
            net.reset()
            for t, x in enumerate(frames):
                start = time.perf_counter()
                net.step(x)
                if r:  # the first round warms up
                    times[i][t].append(time.perf_counter() - start)
    return [[statistics.median(ts) for ts in per_tick] for per_tick in times]


def main():
    data = {"machine": machine(), "model": "resnet50, parallel=7, clocks='halve'"}
    with torch.no_grad():
        for phases in PHASES:
            data[phases] = freshness(compiled(phases, 64))
        nets = [compiled(phases, 224) for phases in PHASES]
        for phases, net, per_tick in zip(PHASES, nets, tick_times(nets)):
            placement = pipecomp.schedule(net, 1)
            data[phases].update(average_tick_s=statistics.fmean(per_tick), worst_tick_s=max(per_tick),
                                flops_average_tick=placement.average_tick, flops_worst_tick=placement.worst_tick)
    save("phases", data, table(data))


def table(d):
    rows = ["| resnet50, parallel=7, clocks=\"halve\" | phases=\"zero\" | phases=\"align\" |", "|---|---|---|"]

    def row(label, f):
        rows.append(f"| {label} | {f(d['zero'])} | {f(d['align'])} |")
    row("first tick whose output depends on the frames (64 px)", lambda m: m["first_tick_with_a_frame"])
    row("age of the newest frame in the output at ticks 44 and 47 (64 px)",
        lambda m: " and ".join(f"{a} frames" for a in m["age_by_tick"].values()))
    row("net.step, 224 px: average tick", lambda m: f"{1000 * m['average_tick_s']:.1f} ms")
    row("net.step, 224 px: worst tick", lambda m: f"{1000 * m['worst_tick_s']:.1f} ms "
        f"({m['worst_tick_s'] / m['average_tick_s']:.1f}× the average)")
    row("FLOP model: worst tick / average tick",
        lambda m: f"{m['flops_worst_tick'] / m['flops_average_tick']:.2f}×")
    rows.append(f"\n_{d['machine']}; per-tick medians of {ROUNDS} interleaved rounds._")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
