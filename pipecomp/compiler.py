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
from .trace import KEPT, key_name, leaf_key, trace
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


def _without_batch_first(gm):
    """The first per-frame tensor (or tuple) whose first axis is not the batch, or None."""
    return next((n for n in gm.graph.nodes if n.op in COMPUTE_OPS and info(n).get("kind") in ("tensor", "tuple")
                 and info(n).get("batch_dim") != 0), None)


def _enclosing(model, node):
    """(qualified name, module) of the innermost module that holds `node` (not the one it calls)."""
    stack = [q for q, _ in (node.meta.get("nn_module_stack") or {}).values()
             if not (node.op == "call_module" and q == node.target)]
    return (stack[-1], model.get_submodule(stack[-1])) if stack else None


def _trace(model, leaf_modules, example):
    """Trace and annotate. Per-frame tensors need the batch first (semantics §3's registers,
    zero state and clips are per frame): the smallest module that holds one that does not is
    kept whole (its own input and output have the batch first), and the trace is retried."""
    kept = {}
    while True:
        gm = trace(model, leaf_modules, kept)
        annotate(gm, example)
        kept = gm.meta[KEPT]
        n = _without_batch_first(gm)
        if n is None:
            return gm
        meta = info(n)
        shape = list(meta["shape"]) if "shape" in meta else "a tuple"
        where = _enclosing(model, n)
        key = leaf_key(*where) if where else None
        if key is None or key in kept or key in leaf_modules:
            at = "the model's own forward" if where is None else f"module '{where[0]}', kept whole already"
            raise CompileError(
                f"node '{n.name}' makes a tensor whose first axis is not the batch (shape {shape} at batch "
                f"{example.shape[0]}) in {at}; pipecomp keeps one value per frame with the batch first: move that "
                f"code into a submodule whose input and output have the batch first, which pipecomp then keeps whole")
        kept = {**kept, key: f"its node '{n.name}' makes a tensor whose first axis is not the batch ({shape})"}


def compile(model: nn.Module, *, parallel: int = 1, delays: str = "diagonal", clocks=None,
            max_period: int | None = None, phases: str = "align", shift: str | None = None, shift_fraction: float = 1 / 8,
            shift_place: str = "residual", cuts=None, skips=None, temporal=None, feedback=None,
            example_input=(1, 3, 224, 224), leaf_modules=()) -> VideoNet:
    """Compile an image model into a pipelined, causal video network.

    `parallel` stages (or explicit `cuts`), `delays` ("diagonal": depth-parallel with
    temporal skips, *Massively Parallel Video Networks* fig. 1; "aligned": classic
    pipelining), `clocks` (multi-rate, sec. 3.1; "halve" doubles the period every time the
    resolution halves; by default, `phases="align"`, each slow node fires when its inputs' new
    values reach it: fresher outputs, and the slow work spread over the ticks; `phases="zero"`
    keeps every phase 0), `shift` (TSM, online or offline). Added connections that start at zero
    (sec. 3.2, §9): `skips` (a jump `j` or a list: temporal skips into every stage `s >= j` from
    `j` stages below), `temporal` (`k`, or `{pattern: k}`: convolutions become causal temporal
    filters of length `k`) and `feedback` (`d`: the output of tick `t - d` is added to the first
    convolution's output; `forward(clip)` then runs tick by tick). The contract is semantics.md.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile() takes an nn.Module, got {type(model).__name__}")
    _check_options(parallel, delays, clocks, max_period, shift, shift_fraction, shift_place, cuts)
    _choice("phases", phases, passes.PHASES)
    _check_added(skips, temporal)
    example = _example(example_input)
    gm = _trace(model, leaf_modules, example)
    plan = Plan(graph=gm.graph, module=gm, example_shape=tuple(example.shape), example_dtype=example.dtype,
                kept_whole={key_name(k): why for k, why in gm.meta[KEPT].items()})
    plan = passes.insert_shifts(plan, shift, shift_fraction, shift_place)
    plan = passes.assign_clocks(plan, clocks, max_period)
    plan = passes.partition(plan, parallel, cuts)
    plan = passes.add_feedback(plan, feedback)
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
