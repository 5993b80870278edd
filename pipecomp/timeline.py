"""The time-space table: which input frame each stage's work comes from, tick by tick.

This is fig. 1 of *Massively Parallel Video Networks*: depth (stages) on one axis, time
(ticks) on the other. It is computed from the plan alone, by the tick rule of
semantics §3: a node that fires reads each input as it was `delay` ticks ago, a node that
does not fire holds its value, and shape values carry no frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .analysis import COMPUTE_OPS, info
from .plan import Plan


@dataclass(frozen=True)
class Cell:
    """One stage at one tick: the newest frame in its output, and whether it works."""

    frame: int | None
    fires: bool


@dataclass(frozen=True)
class Timeline:
    """`stages[j][t]`: stage `j` at tick `t`; `output[t]`: the frame the output reflects."""

    stages: list
    output: list
    periods: list  # per stage: the sorted clock periods of its nodes
    latency: int

    @property
    def ticks(self) -> int:
        return len(self.output)

    def table(self) -> str:
        """Plain-text table: frame numbers, '-' before any frame arrives, '.' where a stage idles."""
        def show(frame, fires=True):
            return "." if not fires else "-" if frame is None else str(frame)

        heads = [f"stage {j}" + (f" (period {','.join(map(str, p))})" if p != [1] else "")
                 for j, p in enumerate(self.periods)]
        rows = [("tick", [str(t) for t in range(self.ticks)]), ("frame", [str(t) for t in range(self.ticks)])]
        rows += [(h, [show(c.frame, c.fires) for c in row]) for h, row in zip(heads, self.stages)]
        rows.append(("output", [show(f) for f in self.output]))
        left = max(len(h) for h, _ in rows)
        width = max(len(c) for _, cells in rows for c in cells)
        lines = [h.ljust(left) + "  " + " ".join(c.rjust(width) for c in cells) for h, cells in rows]
        lines.append("; ".join([*self.summary(), "'-': no frame yet, '.': does not fire (holds its value)"]))
        return "\n".join(lines)

    def summary(self) -> list:
        """What the output reflects: the latency, or with clocks the first tick a frame reaches it."""
        lines = [f"information latency {self.latency} frames (the smallest total delay from the frame to the output)"]
        first = next((t for t, f in enumerate(self.output) if f is not None), None)
        if all(p == [1] for p in self.periods):
            lines.append(f"the output at tick t reflects frame t-{self.latency}")
        elif first is None:
            lines.append(f"no frame reaches the output in {self.ticks} ticks: the clocks repeat every "
                         f"{math.lcm(*(q for p in self.periods for q in p))} ticks, draw more ticks")
        else:
            lines.append(f"clocked stages hold their value between firings; a frame first reaches the output "
                         f"at tick {first} (frame {self.output[first]})")
        return lines


def _fires(plan: Plan, name: str, t: int) -> bool:
    # Nodes without a clock (the output) work every tick.
    return t % plan.period_of.get(name, 1) == plan.phase_of.get(name, 0)


def _carries_frame(node) -> bool:
    return node.op != "get_attr" and info(node).get("kind") in ("tensor", "tuple")


def timeline(plan: Plan, ticks: int) -> Timeline:
    """Fresh-frame table of `plan` for ticks `0 .. ticks-1` after a reset (semantics §3).

    fresh(v, t) is the newest input frame whose information is in `v`'s value at tick `t`
    (None before any has arrived): `t` for the frame; for a node firing at `t`, the newest
    of fresh(u, t - delay(u→v)) over its tensor inputs; otherwise fresh(v, t - 1).
    """
    if not isinstance(ticks, int) or ticks < 1:
        raise ValueError(f"ticks={ticks!r} must be an integer >= 1")
    nodes = [n for n in plan.graph.nodes if n.op != "get_attr"]
    fresh = []  # fresh[t][name]
    for t in range(ticks):
        now = {}
        for v in nodes:
            if v.op == "placeholder":
                now[v.name] = t
            elif not _carries_frame(v):
                now[v.name] = None
            elif _fires(plan, v.name, t):
                seen = []
                for u in v.all_input_nodes:
                    d = plan.delay_of[(u.name, v.name)] if _carries_frame(u) else None
                    if d is not None and t - d >= 0:
                        seen.append(fresh[t - d][u.name] if d else now[u.name])
                now[v.name] = max((f for f in seen if f is not None), default=None)
            else:
                now[v.name] = fresh[t - 1][v.name] if t else None
        fresh.append(now)
    stages, periods = [], []
    for j in range(plan.parallel):
        mine = [n for n in plan.nodes_of_stage(j) if n.op in COMPUTE_OPS]
        last = [n for n in mine if _carries_frame(n)][-1]
        stages.append([Cell(fresh[t][last.name], any(_fires(plan, n.name, t) for n in mine))
                       for t in range(ticks)])
        periods.append(sorted({plan.period_of[n.name] for n in mine}))
    out = next(n for n in plan.graph.nodes if n.op == "output")
    return Timeline(stages, [fresh[t][out.name] for t in range(ticks)], periods, plan.latency)
