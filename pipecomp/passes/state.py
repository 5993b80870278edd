"""State: the registers, held values and shift memories a stream keeps (semantics §3).

A tensor node `u` keeps registers ``u_d1 .. u_dD`` with its values of the last `D` ticks,
where `D` is the largest delay on its out-edges, and at least 1 when `u` ticks slower than
every frame and some reader may need its value on a tick when it does not fire (its held
value is ``u_d1``). An online shift node also keeps ``s_mem``, the
first `fold` channels of its input at its previous firing, recorded only from the first
firing at which that input depends on a frame (semantics §6: while the pipeline fills, the
memory stays zero). Registers belong to the stage of the node that writes them.
"""
from __future__ import annotations

import torch.fx as fx

from ..analysis import COMPUTE_OPS, info
from ..plan import Plan
from .shift import is_shift


def value_sources(plan: Plan, node: fx.Node, stage: int, seen=None):
    """Tensors that `stage` reads to recompute the shape value `node` locally.

    Shape values and constants are never state; a stage recomputes those it needs from
    tensors of the same shape (its own values, the frame, or a register of another stage's
    tensor), from parameters and buffers.
    """
    seen = set() if seen is None else seen
    for u in node.all_input_nodes:
        if u in seen or u.op == "get_attr":
            continue
        seen.add(u)
        kind = info(u).get("kind")
        if kind in ("value", "constant") and u.op in COMPUTE_OPS:
            yield from value_sources(plan, u, stage, seen)
        elif u.op != "placeholder" and plan.stage_of[u.name] != stage:
            yield u


def _fires_within(plan: Plan, reader: fx.Node, node: fx.Node) -> bool:
    """Does `reader` fire only on ticks when `node` fires?"""
    if reader.op == "output" or info(reader).get("kind") in ("value", "constant"):
        return False
    p, ph = plan.period_of[node.name], plan.phase_of[node.name]
    return plan.period_of[reader.name] % p == 0 and plan.phase_of[reader.name] % p == ph


def _first_fed(plan: Plan) -> dict:
    """Per node that carries frames, the first tick at which its value depends on a frame.

    The frame does from tick 0; a node from its first firing at which one of its tensor
    inputs, read with its delay, does, and it keeps that (a held value holds it). The same
    reasoning as `pipecomp.timeline`, in closed form: such ticks only grow along a path.
    Feedback's reader (§9) has no inputs and is left out: it is only added to a value that a
    frame reaches first along the main path.
    """
    first = {}
    for v in plan.graph.nodes:
        if v.op == "placeholder":
            first[v.name] = 0
        elif v.op in COMPUTE_OPS and info(v).get("kind") in ("tensor", "tuple"):
            fed = [first[u.name] + plan.delay_of[(u.name, v.name)] for u in v.all_input_nodes if u.name in first]
            if fed:
                p, ph = plan.period_of[v.name], plan.phase_of[v.name]
                first[v.name] = min(fed) + (ph - min(fed)) % p
    return first


def allocate_state(plan: Plan) -> Plan:
    depth = {}
    for (u, v), d in plan.delay_of.items():
        if d:
            depth[u] = max(depth.get(u, 0), d)
    nodes = {n.name: n for n in plan.graph.nodes}
    for v in plan.graph.nodes:
        if v.op in COMPUTE_OPS and info(v).get("kind") == "tensor" and plan.period_of[v.name] > 1 and any(
                plan.delay_of[(v.name, r.name)] == 0 and not _fires_within(plan, r, v) for r in v.users):
            depth[v.name] = max(depth.get(v.name, 0), 1)
        for u in v.all_input_nodes:
            if info(u).get("kind") in ("value", "constant") and u.op in COMPUTE_OPS \
                    and plan.stage_of[u.name] != plan.stage_of[v.name]:
                for src in value_sources(plan, u, plan.stage_of[v.name]):
                    depth[src.name] = max(depth.get(src.name, 0), 1)
    state_bytes = [0] * plan.parallel
    for name, d in depth.items():
        state_bytes[plan.stage_of[name]] += d * info(nodes[name])["bytes"]
    for n in plan.graph.nodes:
        if is_shift(n) and plan.shift == "online":
            state_bytes[plan.stage_of[n.name]] += info(n)["bytes"] * info(n)["fold"] // info(n)["shape"][1]
    first = _first_fed(plan)
    records = {n: first[n] for n in plan.shift_nodes} if plan.shift == "online" else {}
    return plan.replace(registers=depth, stage_state_bytes=tuple(state_bytes), shift_records_from=records)
