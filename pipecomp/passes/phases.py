"""Clock phases that meet the data: each slow node fires when its inputs' new values arrive.

With every phase 0 (semantics §5's default), a node of period 16 fires at ticks 0, 16, ...
whatever the registers in front of it: in resnet50 with 7 stages its inputs' updates reach
it a few ticks later, so it computes on values up to 15 ticks old, and every slow node
fires on the same tick (the worst tick does the work of several). `phases="align"` is the
schedule that §5 allows to stagger them: in topological order, a node of period `p` takes
the phase in `0..p-1` at which the newest values of its inputs have waited the least
(an input `u` of period `p_u` delivers at ticks `phase(u) + delay(u, v) mod p_u`; the
choice minimises the longest wait, then the total, then the phase).
"""
from __future__ import annotations

from ..analysis import COMPUTE_OPS, info
from ..plan import Plan

PHASES = ("zero", "align")


def assign_phases(plan: Plan, phases: str) -> Plan:
    """Phases by `phases`: "zero" keeps the clocks' own, "align" meets the data (needs delays)."""
    if phases == "zero":
        return plan
    period, phase = plan.period_of, dict(plan.phase_of)
    for v in plan.graph.nodes:
        if v.op not in COMPUTE_OPS or v.name not in period:
            continue
        inputs = [u for u in v.all_input_nodes if u.name in period and info(u).get("kind") != "constant"]
        # The nodes unpacking a structure of tensors tick exactly when it does (clocks.py).
        packed = next((u for u in inputs if info(u).get("kind") == "tuple" and u.op in COMPUTE_OPS), None)
        if packed is not None:
            phase[v.name] = phase[packed.name]
            continue
        if period[v.name] == 1 or not inputs:
            continue
        arrivals = [(period[u.name], (phase[u.name] + plan.delay_of.get((u.name, v.name), 0)) % period[u.name])
                    for u in inputs]

        def waits(ph):
            w = [(ph - at) % p for p, at in arrivals]
            return max(w), sum(w), ph
        phase[v.name] = min(range(period[v.name]), key=waits)
    return plan.replace(phase_of=phase, phases=phases)
