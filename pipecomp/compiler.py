"""`pipecomp.compile`: trace → analyses → passes → plan → lowering."""
from __future__ import annotations

import functools
import numbers

import torch
from torch import nn

from . import passes
from .analysis import COMPUTE_OPS, annotate, info
from .errors import CompileError
from .lower import tick_flops
from .passes.delays import MODES
from .plan import Plan
from .trace import trace
from .videonet import VideoNet


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _check_options(parallel, delays, clocks, max_period, shift, shift_fraction, shift_place, cuts):
    if cuts is None and (isinstance(parallel, bool) or not isinstance(parallel, numbers.Integral) or parallel < 1):
        raise ValueError(f"parallel={parallel!r} must be an integer >= 1 (the number of pipeline stages)")
    _choice("delays", delays, MODES)
    if not (clocks is None or clocks == "halve" or isinstance(clocks, dict) or callable(clocks)):
        raise ValueError(f"clocks={clocks!r} must be None, 'halve', a mapping from node or module name "
                         f"patterns to periods, or a callable (node) -> period")
    if max_period is not None and (not isinstance(max_period, int) or max_period < 1):
        raise ValueError(f"max_period={max_period!r} must be None or an integer >= 1")
    _choice("shift", shift, (None, "online", "offline"))
    if not isinstance(shift_fraction, numbers.Real) or not 0 < shift_fraction <= 0.5:
        raise ValueError(f"shift_fraction={shift_fraction!r} must be in (0, 1/2]")
    _choice("shift_place", shift_place, ("residual", "inplace"))
    if cuts is not None and (isinstance(cuts, str) or not all(isinstance(c, str) for c in cuts)):
        raise ValueError(f"cuts={cuts!r} must be a list of fx node names or module qualified names")


def _check_added(skips, temporal):
    if not (skips is None or isinstance(skips, int) or isinstance(skips, (list, tuple))):
        raise ValueError(f"skips={skips!r} must be None, a jump (an integer >= 2) or a list of jumps")
    if not (temporal is None or isinstance(temporal, int) or isinstance(temporal, dict)):
        raise ValueError(f"temporal={temporal!r} must be None, a filter length k (an integer >= 2) or a "
                         f"mapping from convolution name patterns to lengths")


def _example(example_input):
    if isinstance(example_input, torch.Tensor):
        example = example_input.detach()
    elif isinstance(example_input, (tuple, list, torch.Size)) and all(isinstance(d, int) and d > 0 for d in example_input):
        example = torch.randn(tuple(example_input))
    else:
        raise ValueError(f"example_input={example_input!r} must be a tensor or a shape such as (1, 3, 224, 224)")
    if example.dim() != 4:
        raise ValueError(f"example_input has shape {list(example.shape)}; a frame is [B, C, H, W]")
    return example


def _costs(plan: Plan, stages) -> Plan:
    """FLOPs per frame without clocks and as executed with them (averaged over the hyperperiod,
    firings nobody reads left out), and parameters, per stage."""
    batch = plan.example_shape[0]
    flops, params = [0.0] * plan.parallel, [0] * plan.parallel
    clocked = [sum(ticks) / len(ticks) for ticks in tick_flops(plan, stages)]
    seen = set()
    for n in plan.graph.nodes:
        if n.op not in COMPUTE_OPS + ("get_attr",):
            continue
        s = plan.stage_of[n.name]
        if n.op in COMPUTE_OPS:
            flops[s] += info(n)["flops"] / batch
        tensors = []
        if n.op == "call_module":
            tensors = list(plan.module.get_submodule(n.target).parameters())
        elif n.op == "get_attr":
            obj = functools.reduce(getattr, n.target.split("."), plan.module)  # nested: convnext's layer_scale
            tensors = [obj] if isinstance(obj, nn.Parameter) else []
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                params[s] += t.numel()
    return plan.replace(stage_flops=tuple(flops), stage_flops_clocked=tuple(clocked), stage_params=tuple(params))


def _check_batch_axes(plan: Plan):
    for n in plan.graph.nodes:
        meta = info(n)
        if meta.get("kind") == "tensor" and n.op in COMPUTE_OPS and meta.get("batch_dim") != 0:
            raise CompileError(
                f"node '{n.name}' ({meta.get('module') or n.target}) makes a tensor whose first axis is not "
                f"the batch (shape {list(meta['shape'])}); pipecomp keeps one value per frame and needs the "
                f"batch first; pass its module in leaf_modules so it stays inside one node")


def compile(model: nn.Module, *, parallel: int = 1, delays: str = "diagonal", clocks=None,
            max_period: int | None = None, phases: str = "zero", shift: str | None = None, shift_fraction: float = 1 / 8,
            shift_place: str = "residual", cuts=None, skips=None, temporal=None,
            example_input=(1, 3, 224, 224), leaf_modules=()) -> VideoNet:
    """Compile an image model into a pipelined, causal video network.

    `parallel` stages (or explicit `cuts`), `delays` ("diagonal": depth-parallel with
    temporal skips, *Massively Parallel Video Networks* fig. 1; "aligned": classic
    pipelining), `clocks` (multi-rate, sec. 3.1; "halve" doubles the period every time the
    resolution halves; `phases="align"` fires each slow node when its inputs' new values reach
    it: fresher outputs, and the slow work spread over the ticks), `shift` (TSM, online or
    offline). Added connections that start at zero (sec. 3.2, §9): `skips` (a jump `j`
    or a list: temporal skips into every stage `s >= j` from `j` stages below) and `temporal`
    (`k`, or `{pattern: k}`: convolutions become causal temporal filters of length `k`).
    The contract is semantics.md.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile() takes an nn.Module, got {type(model).__name__}")
    _check_options(parallel, delays, clocks, max_period, shift, shift_fraction, shift_place, cuts)
    _choice("phases", phases, passes.PHASES)
    _check_added(skips, temporal)
    example = _example(example_input)
    gm = trace(model, leaf_modules)
    annotate(gm, example)
    plan = Plan(graph=gm.graph, module=gm, example_shape=tuple(example.shape), example_dtype=example.dtype)
    _check_batch_axes(plan)
    plan = passes.insert_shifts(plan, shift, shift_fraction, shift_place)
    plan = passes.assign_clocks(plan, clocks, max_period)
    plan = passes.partition(plan, parallel, cuts)
    plan = passes.add_temporal(plan, temporal)
    plan = passes.add_skips(plan, skips)
    plan = passes.assign_delays(plan, delays)
    plan = passes.assign_phases(plan, phases)
    plan = passes.allocate_state(plan)
    net = VideoNet(model, plan)
    # Costs are those of the lowered tick functions, which leave out firings nobody reads.
    net.plan = _costs(plan, net._stages)
    return net


__all__ = ["compile"]
