"""Multi-rate clocks: slower ticks where resolution is lower (semantics §5)."""
from __future__ import annotations

import fnmatch
import math

import torch.fx as fx

from ..analysis import COMPUTE_OPS, info, is_conv
from ..plan import Plan


def _height(node: fx.Node):
    """Height of a [B, C, H, W] feature map with H·W > 1, else None."""
    meta = info(node)
    shape = meta.get("shape")
    if meta.get("kind") != "tensor" or len(shape) != 4 or shape[2] * shape[3] <= 1:
        return None
    return shape[2]


def _halve(plan: Plan):
    nodes = [n for n in plan.graph.nodes if n.op == "placeholder" or n.op in COMPUTE_OPS]
    first_conv = next((n for n in nodes if is_conv(plan.module, n) and _height(n)), None)
    heights = [h for n in nodes if (h := _height(n))]
    top = _height(first_conv) if first_conv is not None else max(heights, default=1)
    periods = {}
    for n in nodes:
        h = _height(n)
        if n.op == "placeholder":
            periods[n.name] = 1
        elif h is not None:
            periods[n.name] = 2 ** max(0, round(math.log2(top / h)))
        else:
            ins = [periods[u.name] for u in n.all_input_nodes
                   if u.name in periods and info(u).get("kind") != "constant"]
            periods[n.name] = min(ins, default=1)
    return {k: (p, 0) for k, p in periods.items()}


def _normalise(value, where):
    period, phase = value if isinstance(value, tuple) else (value, 0)
    if not (isinstance(period, int) and period >= 1 and isinstance(phase, int) and 0 <= phase < period):
        raise ValueError(
            f"clock for {where} must be a period (int >= 1) or (period, phase) with "
            f"0 <= phase < period, got {value!r}")
    return period, phase


def assign_clocks(plan: Plan, clocks, max_period: int | None) -> Plan:
    """Period and phase of every compute node; the frame ticks every frame."""
    nodes = [n for n in plan.graph.nodes if n.op == "placeholder" or n.op in COMPUTE_OPS]
    if clocks is None:
        clock = {n.name: (1, 0) for n in nodes}
    elif clocks == "halve":
        clock = _halve(plan)
    elif isinstance(clocks, dict):
        clock = {}
        for n in nodes:
            hit = next((v for pat, v in clocks.items() if n.op != "placeholder" and (
                fnmatch.fnmatchcase(n.name, pat) or fnmatch.fnmatchcase(info(n)["module"], pat))), 1)
            clock[n.name] = _normalise(hit, f"pattern matching '{n.name}'")
    else:
        clock = {n.name: (1, 0) if n.op == "placeholder" else _normalise(clocks(n) or 1, f"node '{n.name}'")
                 for n in nodes}
    if max_period is not None:
        clock = {k: (p, ph) if p <= max_period else (max_period, ph % max_period) for k, (p, ph) in clock.items()}
    # A constant has no clock of its own: it is computed whenever a reader needs it (§3).
    # A structure of tensors (the tuple from torch.chunk, say) is never state, so the nodes
    # unpacking it must tick exactly when it does.
    # The output reads every tick, so a structure it reads directly ticks every frame.
    for n in nodes:
        if info(n).get("kind") == "constant":
            clock[n.name] = (1, 0)
        if info(n).get("kind") == "tuple":
            if any(user.op == "output" for user in n.users):
                clock[n.name] = (1, 0)
            for user in n.users:
                if user.op in COMPUTE_OPS:
                    clock[user.name] = clock[n.name]
    return plan.replace(period_of={k: p for k, (p, _) in clock.items()},
                        phase_of={k: ph for k, (_, ph) in clock.items()})
