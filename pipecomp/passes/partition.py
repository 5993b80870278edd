"""Partition: contiguous pipeline stages of one topological order (semantics §2).

Minimises the most expensive stage (per-frame FLOPs averaged over clock periods); among
partitions within `TOLERANCE` of that optimum, takes the one with the fewest bytes
crossing stage boundaries.
"""
from __future__ import annotations

import difflib
from collections import deque

from ..analysis import COMPUTE_OPS, info
from ..errors import CompileError
from ..plan import Plan

TOLERANCE = 0.02


def _units(plan: Plan):
    return [n for n in plan.graph.nodes if n.op in COMPUTE_OPS]


def _cut_table(plan: Plan, units):
    """For each position i (a cut before units[i]): may we cut there, and bytes crossing it."""
    pos = {n: i for i, n in enumerate(units)}
    n = len(units)
    for node in plan.graph.nodes:
        if node.op == "placeholder":
            pos[node] = -1
        elif node.op == "output":
            pos[node] = n
    crossing = [0] * (n + 1)
    allowed = [True] * (n + 1)
    allowed[0] = False
    # A size taken out of a structure of tensors (a kept-whole attention returning (x, size), say)
    # could only be recomputed by calling its producer again, and a structure is never state:
    # like the structure itself, it must not cross a cut.
    pinned = set()
    for u in plan.graph.nodes:
        if info(u).get("kind") == "value" and any(
                info(a).get("kind") == "tuple" and a.op != "placeholder" or a in pinned for a in u.all_input_nodes):
            pinned.add(u)
    for u in list(pos):
        if u.op == "output" or not u.users:
            continue
        last = max(pos.get(v, n) for v in u.users)
        first = pos[u] + 1
        kind = info(u).get("kind")
        for i in range(max(first, 1), min(last, n) + 1):
            if kind == "tensor":
                crossing[i] += info(u)["bytes"]
            elif kind == "tuple" or u in pinned:
                allowed[i] = False
    return allowed, crossing


def _blocks(costs, allowed):
    """Merge units between allowed cuts into atomic blocks: (start index, cost)."""
    blocks = []
    for i, c in enumerate(costs):
        if i == 0 or allowed[i]:
            blocks.append([i, 0.0])
        blocks[-1][1] += c
    return blocks


def _fits(costs, cap, k):
    count, run = 1, 0.0
    for c in costs:
        if c > cap:
            return False
        if run + c > cap:
            count, run = count + 1, 0.0
        run += c
    return count <= k


def _best(blocks, crossing, k):
    costs = [c for _, c in blocks]
    lo, hi = max(costs), sum(costs)
    for _ in range(60):
        if hi - lo <= 1e-9 * max(hi, 1):
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _fits(costs, mid, k) else (mid, hi)
    cap = hi * (1 + TOLERANCE) + 1e-9
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    m = len(blocks)
    inf = float("inf")
    # best[j][e]: fewest crossing bytes splitting blocks[:e] into j stages, each within cap.
    best = [[inf] * (m + 1) for _ in range(k + 1)]
    back = [[-1] * (m + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        window, start = deque(), 0
        for e in range(1, m + 1):
            b = e - 1  # newest candidate start of stage j: blocks[b:e]
            if best[j - 1][b] < inf:
                cost_b = best[j - 1][b] + (crossing[blocks[b][0]] if b > 0 else 0)
                while window and window[-1][0] >= cost_b:
                    window.pop()
                window.append((cost_b, b))
            while start < e and prefix[e] - prefix[start] > cap:
                start += 1
            while window and window[0][1] < start:
                window.popleft()
            if window:
                best[j][e], back[j][e] = window[0]
    if best[k][m] == inf:
        return None
    starts, e = [], m
    for j in range(k, 0, -1):
        e = back[j][e]
        starts.append(blocks[e][0])
    return sorted(starts)


def _explicit(plan: Plan, units, cuts, allowed):
    starts = [0]
    for c in cuts:
        at = next((i for i, u in enumerate(units) if u.name == c or info(u)["module"] == c
                   or info(u)["module"].startswith(c + ".")), None)
        if at is None:
            close = difflib.get_close_matches(c, [u.name for u in units] + [info(u)["module"] for u in units], 5)
            raise ValueError(f"cut '{c}' is neither an fx node name nor a module of the model; "
                             f"close matches: {close}")
        if at <= starts[-1]:
            raise ValueError(f"cuts must name distinct points in topological order, each after the "
                             f"previous and after the first node; '{c}' does not")
        if not allowed[at]:
            raise CompileError(f"cannot cut before '{units[at].name}': a tuple of tensors crosses there; "
                               f"cut before or after the nodes that unpack it")
        starts.append(at)
    return starts


def partition(plan: Plan, parallel: int, cuts=None) -> Plan:
    """Assign every node a stage: `parallel` stages, or one more stage per name in `cuts`."""
    units = _units(plan)
    allowed, crossing = _cut_table(plan, units)
    largest = 1 + sum(allowed[1:len(units)])
    if cuts is not None:
        starts = _explicit(plan, units, cuts, allowed)
    else:
        if parallel > largest:
            raise ValueError(f"parallel={parallel} is too large for {type(plan.module).__name__}: "
                             f"the largest possible value is {largest}")
        costs = [info(u)["flops"] / plan.period_of[u.name] for u in units]
        starts = _best(_blocks(costs, allowed), crossing, parallel)
    k = len(starts)
    stage_of, s = {}, 0
    for i, u in enumerate(units):
        while s + 1 < k and starts[s + 1] <= i:
            s += 1
        stage_of[u.name] = s
    for n in plan.graph.nodes:
        if n.op == "placeholder":
            stage_of[n.name] = 0
        elif n.op == "output":
            stage_of[n.name] = k - 1
        elif n.op == "get_attr":
            users = [stage_of[u.name] for u in n.users if u.name in stage_of]
            stage_of[n.name] = min(users, default=0)
    return plan.replace(parallel=k, stage_of=stage_of)
