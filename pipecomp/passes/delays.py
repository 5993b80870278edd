"""Delays: how stale each edge's value is (semantics §2), and the information latency (§3)."""
from __future__ import annotations

from ..analysis import info
from ..plan import Plan

MODES = ("diagonal", "aligned")


def assign_delays(plan: Plan, mode: str) -> Plan:
    """`"diagonal"`: 1 on every crossing edge, so long edges are temporal skips;
    `"aligned"`: the number of stages crossed, so every node sees a single frame.
    The added connections' `plan.extra_delay` (semantics §9) comes on top of either; feedback's
    back edge has its own delay `d` in both modes. Latency counts paths along fx edges: the back
    edge only makes paths longer."""
    delay_of = {}
    for v in plan.graph.nodes:
        for u in v.all_input_nodes:
            if u.op == "get_attr":
                continue
            span = plan.stage_of[v.name] - plan.stage_of[u.name]
            if info(u).get("kind") != "tensor" or span == 0:
                d = 0
            else:
                d = 1 if mode == "diagonal" else span
            delay_of[(u.name, v.name)] = d + plan.extra_delay.get((u.name, v.name), 0)
    if plan.feedback:  # the back edge (semantics §9) is no fx edge, and its delay is the feedback's own
        source, reader, d = plan.feedback
        delay_of[(source, reader)] = d
    # Latency: the smallest total delay on a path that carries the frame's content,
    # i.e. through tensors; shape values reach the output with no delay but no content.
    dist = {}
    for v in plan.graph.nodes:
        if v.op == "placeholder":
            dist[v.name] = 0
            continue
        ins = [dist[u.name] + delay_of[(u.name, v.name)] for u in v.all_input_nodes
               if u.name in dist and info(u).get("kind") in ("tensor", "tuple")]
        if ins:
            dist[v.name] = min(ins)
    out = next(n for n in plan.graph.nodes if n.op == "output")
    return plan.replace(delays=mode, delay_of=delay_of, latency=dist.get(out.name, 0))
