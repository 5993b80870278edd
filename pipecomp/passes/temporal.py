"""Temporal filters: convolutions made causal filters over their past inputs (semantics §9).

A selected convolution `y = conv(x)` becomes `y_t = conv(x_t) + Σ_{i=1}^{k-1} conv_i(x_{t-i})`:
nodes ``<conv>_past<i>`` (modules ``temporal.<conv>.past<i>``: `conv`'s kernel, stride, padding,
dilation and groups, no bias, weight zero) read `x` with `i` firings of `conv` more delay than
`conv` reads it, in `conv`'s stage and on its clock, and a chain ``<conv>_sum<i>`` of adds takes
`y`'s place for its readers. "`i` firings ago" is `i · period(conv)` ticks: a slow convolution's
past taps are the inputs it computed on at its own earlier firings (phase-aligned), never values
between them. The pass runs after partition; the extra delays go into `plan.extra_delay`, which
the delays pass adds to the mode's own.
"""
from __future__ import annotations

import fnmatch
import operator

import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..analysis import info
from ..errors import CompileError
from ..plan import Plan
from .added import rebuild

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _selected(plan: Plan, temporal):
    """(conv node, k) for every convolution module `temporal` selects."""
    convs = [n for n in plan.graph.nodes if n.op == "call_module"
             and type(plan.module.get_submodule(n.target)) in _CONVS]
    if isinstance(temporal, int):
        return [(n, temporal) for n in convs
                if any(s > 1 for s in plan.module.get_submodule(n.target).kernel_size)]
    chosen = {}
    for pattern, k in temporal.items():
        hits = [n for n in convs if fnmatch.fnmatchcase(n.name, pattern) or fnmatch.fnmatchcase(info(n)["module"], pattern)]
        if not hits:
            examples = " or ".join(repr(e) for e in dict.fromkeys((convs[0].name, info(convs[0])["module"]))) \
                if convs else "none: the model has no convolution"
            raise ValueError(f"temporal pattern {pattern!r} matches no convolution (nn.Conv1d/2d/3d) of "
                             f"{type(plan.module).__name__}; patterns are fnmatch on fx node names or module "
                             f"names, e.g. {examples}")
        for n in hits:
            chosen.setdefault(n, k)
    return [(n, chosen[n]) for n in convs if n in chosen]


def _tap(conv: nn.Module, x_meta: dict, y_meta: dict, where: str):
    """A zero copy of `conv`'s geometry without bias, and its FLOPs on the example."""
    tap = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, bias=False, padding_mode=conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype)
    nn.init.zeros_(tap.weight)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = tap(torch.zeros(x_meta["shape"], dtype=x_meta["dtype"], device=conv.weight.device))
    if tuple(out.shape) != tuple(y_meta["shape"]):
        raise CompileError(f"convolution '{where}' gives shape {list(y_meta['shape'])} but a plain "
                           f"{type(conv).__name__} of its geometry gives {list(out.shape)}; leave it out of "
                           f"temporal= (select convolutions with a {{pattern: k}} mapping)")
    return tap, counter.get_total_flops()


def add_temporal(plan: Plan, temporal) -> Plan:
    """Make the convolutions `temporal` selects causal temporal filters (semantics §9).

    `temporal=k`: every convolution with a spatial kernel larger than 1×1, length `k`;
    `{pattern: k}`: the convolutions whose fx node or module name matches (the first pattern
    that matches a convolution gives its `k`). Every `k` is an integer >= 2.
    """
    if temporal is None:
        return plan
    lengths = [temporal] if isinstance(temporal, int) else list(temporal.values())
    for k in lengths:
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"temporal filter length {k!r} must be an integer >= 2 (the current input and "
                             f"at least one past one)")
    selected = dict(_selected(plan, temporal))
    if not selected:
        raise ValueError(f"temporal={temporal!r} selects no convolution of {type(plan.module).__name__}: it "
                         f"has no nn.Conv1d/2d/3d with a kernel larger than 1x1; select some with {{pattern: k}}")
    stage_of, period_of, phase_of = dict(plan.stage_of), dict(plan.period_of), dict(plan.phase_of)
    extra, added, modules = dict(plan.extra_delay), list(plan.added_nodes), {}
    graph, env = fx.Graph(), {}
    for n in plan.graph.nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n not in selected:
            continue
        x, conv = n.args[0], plan.module.get_submodule(n.target)
        total = env[n]
        for i in range(1, selected[n]):
            target = f"temporal.{n.name}.past{i}"
            modules[target], flops = _tap(conv, info(x), info(n), n.name)
            tap = graph.create_node("call_module", target, (env[x],), name=f"{n.name}_past{i}")
            tap.meta["pipecomp"] = {**info(n), "flops": flops, "module": target, "added": "temporal",
                                    "clock": (n.name, 0)}
            total = graph.create_node("call_function", operator.add, (total, tap), name=f"{n.name}_sum{i}")
            # FLOPs as the analyses count them (torch.utils.flop_counter counts no additions).
            total.meta["pipecomp"] = {**info(n), "flops": 0, "module": target, "added": "temporal",
                                      "clock": (n.name, 0)}
            for new in (tap, total):
                stage_of[new.name] = plan.stage_of[n.name]
                period_of[new.name], phase_of[new.name] = plan.period_of[n.name], plan.phase_of[n.name]
                added.append(new.name)
            extra[(x.name, tap.name)] = i * plan.period_of[n.name]
        env[n] = total
    return rebuild(plan, graph, modules, stage_of=stage_of, period_of=period_of, phase_of=phase_of,
                   extra_delay=extra, added_nodes=tuple(added))
