"""Placement: which worker runs which pipeline stages, chosen from a per-tick cost model.

All stages of one tick are independent (semantics §3), so a tick takes as long as its
most loaded worker: the run-time is max_j T(H_j), not the sum (Skip-Sideways supplementary
sec. 5; *Massively Parallel Video Networks* sec. 3, "the rate of its slowest layer"). With
multi-rate clocks (sec. 3.1) a stage's cost changes from tick to tick, so the cost model is
a table `cost[stage][tick]` over one hyperperiod, and a worker's cost at a tick is the sum
over its stages, which run one after another.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from .analysis import COMPUTE_OPS, info
from .lower import firing, zero_state

_PROFILE_CALLS = 5  # timed calls per stage variant after one warm-up; the median is kept


@dataclass(frozen=True)
class Placement:
    """Stages grouped onto workers; `costs[s][t]` is stage s's cost at tick t of a hyperperiod.

    `unit` is "FLOPs" (the FLOPs model) or "s" (measured by `schedule(..., profile=True)`).
    """

    groups: list
    devices: list
    threads_per_worker: int
    costs: list
    unit: str

    def worker_costs(self) -> list:
        """Per worker, its cost at every tick of the hyperperiod (its stages run in sequence)."""
        return [[sum(self.costs[s][t] for s in g) for t in range(len(self.costs[0]))] for g in self.groups]

    def tick_costs(self) -> list:
        """Per tick, the most loaded worker's cost: what the tick takes with one barrier per tick."""
        return [max(c) for c in zip(*self.worker_costs())]

    @property
    def average_tick(self) -> float:
        """Average over the hyperperiod of the most loaded worker's cost: one over the frame rate."""
        return statistics.fmean(self.tick_costs())

    @property
    def worst_tick(self) -> float:
        """The slowest tick of the hyperperiod: the longest wait for one output."""
        return max(self.tick_costs())

    @property
    def sequential_tick(self) -> float:
        """Average tick with every stage on one worker: the cost of the sequential `net.step`."""
        return statistics.fmean(sum(c) for c in zip(*self.costs))

    def table(self) -> str:
        fmt = _seconds if self.unit == "s" else _flops
        rows = [("worker", "device", "threads", "stages", "average tick", "worst tick", "busy")]
        for w, (g, cost) in enumerate(zip(self.groups, self.worker_costs())):
            stages = f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0])
            busy = statistics.fmean(cost) / self.average_tick if self.average_tick else 1.0
            rows.append((str(w), self.devices[w], str(self.threads_per_worker), stages,
                         fmt(statistics.fmean(cost)), fmt(max(cost)), f"{busy:.0%}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        speedup = self.sequential_tick / self.average_tick if self.average_tick else 1.0
        lines.insert(1, "-" * len(lines[0]))
        lines += [
            f"per tick (most loaded worker): average {fmt(self.average_tick)}, worst {fmt(self.worst_tick)} "
            f"over a hyperperiod of {len(self.costs[0])} ticks",
            f"all stages on one worker: {fmt(self.sequential_tick)} per tick ({speedup:.2f}x); "
            f"cost model: {'measured seconds' if self.unit == 's' else 'FLOPs per frame'}",
        ]
        return "\n".join(lines)


def schedule(net, workers, *, profile: bool = False) -> Placement:
    """Place the stages of `net` on `workers` (a count of CPU threads, or a list of devices).

    Contiguous stages share a worker when there are fewer workers than stages. The grouping
    minimises the average over a hyperperiod of the most loaded worker's tick cost (the
    frame rate with one barrier per tick), ties broken by the worst tick. Costs are FLOPs of
    the nodes firing at each tick, or with `profile=True` the stage functions' measured times.
    """
    devices = _devices(workers)
    k = net.plan.parallel
    devices = devices[:k]  # more workers than stages would leave some idle
    threads = max(1, _cores() // len(devices))
    costs = _profile(net, devices, threads) if profile else _flop_costs(net.plan)
    groups = _best_groups(costs, len(devices))
    return Placement(groups, devices, threads, costs, "s" if profile else "FLOPs")


def _devices(workers) -> list:
    if isinstance(workers, int) and not isinstance(workers, bool):
        if workers < 1:
            raise ValueError(f"workers={workers} must be at least 1")
        return ["cpu"] * workers
    if isinstance(workers, (list, tuple)) and workers and all(isinstance(d, (str, torch.device)) for d in workers):
        return [str(torch.device(d)) for d in workers]
    raise ValueError(f"workers={workers!r} must be a count of CPU threads or a list of devices such as "
                     f"['cpu', 'cuda:0']")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _flop_costs(plan) -> list:
    batch = plan.example_shape[0]
    costs = []
    for s in range(plan.parallel):
        nodes = [n for n in plan.nodes_of_stage(s) if n.op in COMPUTE_OPS]
        flops = {n.name: info(n)["flops"] / batch for n in nodes}
        costs.append([sum(flops[v] for v in firing(plan, nodes, t)) for t in range(plan.hyperperiod)])
    return costs


def _profile(net, devices, threads) -> list:
    if any(d != "cpu" for d in devices):
        raise NotImplementedError(f"profiling on {devices} is not supported yet: only CPU workers are")
    if net.plan.shift == "offline":
        raise RuntimeError("offline shift runs on clips only: there are no tick functions to profile")
    plan = net.plan
    frame = torch.randn(plan.example_shape, dtype=plan.example_dtype)
    state = zero_state(plan, frame.shape[0], frame.device)

    def measure():
        with torch.no_grad():
            return [[_time(gm, frame, state) for gm in stage.variants] for stage in net._stages]

    seconds = _in_thread(measure, threads)
    return [[seconds[s][stage.variant_of_tick[t % stage.hyperperiod]] for t in range(plan.hyperperiod)]
            for s, stage in enumerate(net._stages)]


def _in_thread(fn, threads: int):
    """`fn()` on a new thread with `threads` intra-op threads, as a runtime worker runs it.

    torch's intra-op thread count is per thread (an OpenMP setting of the calling thread),
    but `torch.set_num_threads` also sets the default that threads take on their first
    parallel op, so the caller's default is put back afterwards.
    """
    result = []

    def body():
        torch.set_num_threads(threads)
        try:
            result.append((True, fn()))
        except BaseException as e:  # handed to the caller, who raises it
            result.append((False, e))

    before = torch.get_num_threads()
    thread = threading.Thread(target=body, name="pipecomp-profile")
    thread.start()
    thread.join()
    torch.set_num_threads(before)
    ok, value = result[0]
    if not ok:
        raise value
    return value


def _time(gm, frame, state) -> float:
    gm(frame, state)
    times = []
    for _ in range(_PROFILE_CALLS):
        start = time.perf_counter()
        gm(frame, state)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _best_groups(costs, n) -> list:
    """The contiguous split of the stages into `n` groups with the lowest (average, worst) tick.

    Exact, by branch and bound over the split points. The bound: at every tick the groups still
    to form share the remaining cost, so their most loaded one carries at least its share.
    """
    k, hyper = len(costs), len(costs[0])
    prefix = [[0.0] * hyper]
    for row in costs:
        prefix.append([p + c for p, c in zip(prefix[-1], row)])
    best = [(float("inf"), float("inf")), None]

    def search(start, left, peak, cuts):
        rest = [prefix[k][t] - prefix[start][t] for t in range(hyper)]
        if left == 1:
            ticks = [max(p, r) for p, r in zip(peak, rest)]
            score = (statistics.fmean(ticks), max(ticks))
            if score < best[0]:
                best[:] = [score, cuts]
            return
        bound = statistics.fmean(max(p, r / left) for p, r in zip(peak, rest))
        if bound > best[0][0] * (1 + 1e-9):  # slack: an equal average may still win on the worst tick
            return
        for end in range(start + 1, k - left + 2):
            group = [prefix[end][t] - prefix[start][t] for t in range(hyper)]
            search(end, left - 1, [max(p, g) for p, g in zip(peak, group)], cuts + [end])

    search(0, min(n, k), [0.0] * hyper, [])
    bounds = [0, *best[1], k]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def _flops(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _seconds(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if x >= 1e-3 else f"{x * 1e6:.0f} us"


__all__ = ["Placement", "schedule"]
