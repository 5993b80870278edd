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


from .lower import tick_flops, zero_state
from .plan import _si
from .prepare import _stage_runs

_PROFILE_CALLS = 5  # timed calls per stage variant after one warm-up; the median is kept


@dataclass(frozen=True)
class Placement:
    """Stages grouped onto workers; `costs[s][t]` is stage s's cost at tick t of a hyperperiod.

    `unit` is "FLOPs" (the FLOPs model) or "s" (measured by `schedule(..., profile=True)`);
    `prepare` is how the measured tick functions were prepared ("freeze", or None: as generated).
    """

    groups: list
    devices: list
    threads_per_worker: int
    costs: list
    unit: str
    prepare: str | None = None

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
        fmt = _seconds if self.unit == "s" else _si
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
            f"cost model: {self._model()}",
        ]
        return "\n".join(lines)


    def _model(self) -> str:
        if self.unit != "s":
            return "FLOPs per frame"
        return f"measured seconds ({'frozen' if self.prepare == 'freeze' else 'generated'} tick functions)"


def schedule(net, workers, *, profile: bool = False, prepare: str | None = "freeze") -> Placement:
    """Place the stages of `net` on `workers` (a count of CPU threads, or a list of devices).

    Contiguous stages share a worker when there are fewer workers than stages. The grouping
    minimises the average over a hyperperiod of the most loaded worker's tick cost (the
    frame rate with one barrier per tick), ties broken by the worst tick. Costs are FLOPs of
    what the generated tick functions compute at each tick (the firing nodes whose values are
    used), or with `profile=True` the tick functions' measured times
    on a thread with the workers' intra-op thread count (CPU) or on the first device (CUDA).
    Profiling times the tick functions as the threaded runtime with the same `prepare` runs
    them without grad: frozen (the default, when every module is in eval mode) or as generated.
    """
    devices = _devices(workers)
    k = net.plan.parallel
    devices = devices[:k]  # more workers than stages would leave some idle
    threads = max(1, _cores() // len(devices))
    if not profile:
        costs = _flop_costs(net)
        return Placement(_best_groups(costs, len(devices)), devices, threads, costs, "FLOPs")
    costs, prepared = _profile(net, devices, threads, prepare)
    return Placement(_best_groups(costs, len(devices)), devices, threads, costs, "s", prepared)


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


def _flop_costs(net) -> list:
    """FLOPs per frame of what each stage's tick functions compute at each tick (`lower.tick_flops`)."""
    return tick_flops(net.plan, net._stages)


def _profile(net, devices, threads, prepare):
    """Measured seconds per stage and tick, and the preparation measured (None where modules train)."""

    kinds = {torch.device(d).type for d in devices}
    if len(kinds) > 1 or not kinds <= {"cpu", "cuda"}:
        raise NotImplementedError(f"profile=True measures the stages on one kind of worker (CPU or CUDA), "
                                  f"not on {devices}; give a placement of your own")
    net._check_streamable()
    cuda = kinds == {"cuda"}
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"cannot profile on {devices}: CUDA is not available here")
    plan, device = net.plan, devices[0]
    runs = _stage_runs(net, [device] * plan.parallel, prepare)
    frame = torch.randn(plan.example_shape).to(dtype=plan.example_dtype, device=device)
    state = zero_state(plan, frame.shape[0], device)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def measure():
        with torch.no_grad():
            return [[_time(fn, frame, state, sync) for fn in (run.fast or run.eager)] for run in runs]

    seconds = _in_thread(measure, threads) if not cuda else measure()
    # The cost of the pipeline once filled: the periodic variants (warm-up ones cost the same).
    costs = [[seconds[s][stage.variant_of_tick[t % stage.hyperperiod]] for t in range(plan.hyperperiod)]
             for s, stage in enumerate(net._stages)]
    return costs, prepare if all(run.fast is not None for run in runs) else None


def _in_thread(fn, threads: int):
    """`fn()` on a new thread with `threads` intra-op threads, as a runtime worker runs it.

    torch's intra-op thread count is per thread (an OpenMP setting of the calling thread),
    but `torch.set_num_threads` also sets the default that a thread copies into its own setting
    on its first parallel op (here, at once: still `threads`), so the caller's default is put
    back afterwards.
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


def _time(fn, frame, state, sync) -> float:
    for _ in range(2):  # warm-up; TorchScript's profiling executor optimises on the second call
        fn(frame, state)
    times = []
    for _ in range(_PROFILE_CALLS):
        sync()
        start = time.perf_counter()
        fn(frame, state)
        sync()
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


def _seconds(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if x >= 1e-3 else f"{x * 1e6:.0f} us"


__all__ = ["Placement", "schedule"]
