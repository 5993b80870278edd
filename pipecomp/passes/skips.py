"""Temporal skips: connections that jump stages, with fresher features (semantics §9).

For a jump `j` and every stage `s >= j`, an adapter in stage `s` reads `v_{s-j+1}` (the value
entering stage `s-j+1`, made in stage `s-j`), resizes it to `v_s`'s height and width (average
pooling down, bilinear up; a global mean onto a vector `[B, C]`) and maps its channels with a
1×1 convolution (a linear layer for vectors) whose weight and bias start at zero; its result is
added to `v_s` before stage `s` reads it. The edge into the adapter crosses `j` stages, so the
delays pass gives it 1 with `delays="diagonal"` and `j` with `"aligned"`, as for any edge.
Nodes ``skip_s<s>_j<j>`` (module ``skips.s<s>_j<j>``), its ``_resize`` and ``_sum``, run on
`v_s`'s period, one tick after it. The pass runs after partition: it needs the stages.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..analysis import COMPUTE_OPS, info
from ..errors import CompileError
from ..plan import Plan
from .added import rebuild


def _entering(plan: Plan) -> dict:
    """v_s for every stage s >= 1: the last tensor of stage s-1, in topological order, that stage s reads."""
    order = {n: i for i, n in enumerate(plan.graph.nodes)}
    entering = {}
    for s in range(1, plan.parallel):
        read = [u for r in plan.nodes_of_stage(s) for u in r.all_input_nodes
                if u.op != "get_attr" and plan.stage_of[u.name] == s - 1 and info(u).get("kind") == "tensor"]
        if read:
            entering[s] = max(read, key=order.__getitem__)
    return entering


def _check(skips, parallel: int) -> list:
    jumps = [skips] if isinstance(skips, int) else list(skips)
    for j in jumps:
        if isinstance(j, bool) or not isinstance(j, int) or not 2 <= j <= parallel - 1:
            raise ValueError(f"skip jump {j!r} must be an integer from 2 to parallel-1 = {parallel - 1}: a skip "
                             f"into stage s reads the value made j stages below, so it needs a stage s >= j "
                             f"of the {parallel}; use fewer jumps or more stages")
    if len(set(jumps)) != len(jumps):
        raise ValueError(f"skips={skips!r} lists a jump twice; list each jump once")
    return jumps


def _meta(fn, args, source: dict, module: str, device) -> dict:
    """Shape and FLOPs of `fn(*args)` on zero tensors of the example's shapes."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = fn(*(torch.zeros(a["shape"], dtype=a["dtype"], device=device) for a in args))
    return {**source, "kind": "tensor", "shape": tuple(out.shape), "dtype": out.dtype, "batch_dim": 0,
            "bytes": out.numel() * out.element_size(), "flops": counter.get_total_flops(), "module": module,
            "added": "skip"}


def _resize(src: dict, dst: dict):
    """The function (and its args after the input) taking `src`'s value to `dst`'s spatial shape."""
    if len(dst["shape"]) == 2:
        return torch.mean, ((2, 3),)
    size = tuple(dst["shape"][2:])
    if tuple(src["shape"][2:]) == size:
        return None, ()
    if all(a >= b for a, b in zip(src["shape"][2:], size)):
        return F.adaptive_avg_pool2d, (size,)
    return F.interpolate, (size, None, "bilinear", False)


def add_skips(plan: Plan, skips) -> Plan:
    """Temporal skips jumping `skips` stages (an integer, or a list of them), semantics §9."""
    if skips is None:
        return plan
    jumps = _check(skips, plan.parallel)
    entering = _entering(plan)
    device = next(plan.module.parameters(), torch.zeros(())).device
    adapters = {}  # stage -> [(jump, source)]
    for j in jumps:
        for s in range(j, plan.parallel):
            for t in (s, s - j + 1):
                if t not in entering:
                    raise CompileError(f"stage {t} reads no tensor from stage {t - 1}, so there is no value "
                                       f"entering it for skips={skips!r} to join; choose other cuts=")
            v, src = entering[s], entering[s - j + 1]
            for node in (v, src):
                if len(info(node)["shape"]) not in (2, 4):
                    raise CompileError(f"skips join feature maps [B, C, H, W] or vectors [B, C], but '{node.name}' "
                                       f"(entering a stage) has shape {list(info(node)['shape'])}; choose cuts= "
                                       f"where the model carries such values")
            if len(info(src)["shape"]) == 2 and len(info(v)["shape"]) == 4:
                raise CompileError(f"a skip from the vector '{src.name}' to the feature map '{v.name}' has no "
                                   f"spatial layout to resize to; choose cuts= or jumps that join maps")
            adapters.setdefault(s, []).append((j, src))
    stage_of, period_of, phase_of = dict(plan.stage_of), dict(plan.period_of), dict(plan.phase_of)
    added, modules, graph, env, joined = list(plan.added_nodes), {}, fx.Graph(), {}, {}
    extra = dict(plan.extra_delay)

    def node(op, target, args, name, meta, s, v):
        # The sum reads v_s one tick late (it crosses one stage), so it fires one tick after v_s:
        # then it holds v_s's newest value plus the adapter's whenever stage s reads it, as stage s
        # read v_s itself before.
        n = graph.create_node(op, target, args, name=name)
        n.meta["pipecomp"] = {**meta, "clock": (v.name, 1)}
        period = plan.period_of[v.name]
        stage_of[n.name], period_of[n.name], phase_of[n.name] = s, period, (plan.phase_of[v.name] + 1) % period
        added.append(n.name)
        return n

    for n in plan.graph.nodes:
        s = plan.stage_of.get(n.name)
        if (n.op in COMPUTE_OPS or n.op == "output") and s in adapters and s not in joined:
            v = entering[s]
            total = env[v]
            for j, src in adapters.pop(s):
                name, target = f"skip_s{s}_j{j}", f"skips.s{s}_j{j}"
                x, x_meta = env[src], info(src)
                fn, rest = _resize(x_meta, info(v))
                if fn is not None:
                    meta = _meta(lambda a, fn=fn, rest=rest: fn(a, *rest), [x_meta], x_meta, target, device)
                    x = node("call_function", fn, (x, *rest), f"{name}_resize", meta, s, v)
                    x_meta = meta
                c_in, c_out = x_meta["shape"][1], info(v)["shape"][1]
                layer = (nn.Conv2d(c_in, c_out, 1) if len(info(v)["shape"]) == 4 else nn.Linear(c_in, c_out))
                layer = layer.to(device=device, dtype=x_meta["dtype"])
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
                modules[target] = layer
                mapped = node("call_module", target, (x,), name, _meta(layer, [x_meta], x_meta, target, device), s, v)
                total = node("call_function", operator.add, (total, mapped), f"{name}_sum",
                             _meta(operator.add, [info(v), info(v)], info(v), target, device), s, v)
            joined[s] = (v, total)
        if s in joined:
            v, total = joined[s]
            env[n] = graph.node_copy(n, lambda a: total if a is v else env[a])
            if (v.name, n.name) in extra:  # a temporal filter's tap now reads the sum in v's place
                extra[(total.name, n.name)] = extra.pop((v.name, n.name))
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    return rebuild(plan, graph, modules, stage_of=stage_of, period_of=period_of, phase_of=phase_of,
                   extra_delay=extra, added_nodes=tuple(added))
