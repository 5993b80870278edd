"""Temporal shift (TSM): insert shift nodes before convolutions (semantics §6)."""
from __future__ import annotations

import math

import torch.fx as fx

from ..analysis import COMPUTE_OPS, info, is_conv, residual_blocks
from ..errors import CompileError
from ..ops import temporal_shift
from ..plan import Plan


def _block_inputs(plan: Plan, blocks):
    """Values that enter a block: residual block inputs, the frame, and values crossing into a module."""
    inputs = {start for _, start, _ in blocks}
    for c in plan.graph.nodes:
        if not is_conv(plan.module, c):
            continue
        a = c.args[0]
        parent = info(c)["module"].rpartition(".")[0]
        if a.op == "placeholder" or (parent and not info(a).get("module", "").startswith(parent + ".")):
            inputs.add(a)
    return inputs


def insert_shifts(plan: Plan, mode: str | None, fraction: float, place: str) -> Plan:
    """Insert `mode` shift nodes shifting `fraction` of the channels, at `place`.

    `"residual"`: before the first convolution of every residual branch (TSM sec. 3.3,
    residual shift); `"inplace"`: before every convolution whose input is a block input.
    """
    if mode is None:
        return plan
    blocks = residual_blocks(plan.module, plan.graph)
    if place == "residual":
        if not blocks:
            raise CompileError(
                f"{type(plan.module).__name__} has no residual blocks, so shift_place='residual' "
                f"has nowhere to put a shift; use shift_place='inplace' to shift before the "
                f"convolutions that read a block input"
            )
        targets = {conv for _, _, conv in blocks}
    else:
        entering = _block_inputs(plan, blocks)
        targets = {c for c in plan.graph.nodes if is_conv(plan.module, c) and c.args[0] in entering}

    graph = fx.Graph()
    env, names = {}, []
    for n in plan.graph.nodes:
        if n in targets and info(n.args[0]).get("kind") == "tensor":
            a = n.args[0]
            fold = math.floor(info(a)["shape"][1] * fraction)
            if fold > 0:
                s = graph.call_function(temporal_shift, (env[a], fold, mode))
                s.name = f"{n.name}_shift"
                s.meta["pipecomp"] = {**info(a), "flops": 0, "module": info(n)["module"],
                                      "fold": fold, "direction": mode}
                names.append(s.name)
                env[n] = graph.node_copy(n, lambda x: s if x is a else env[x])
                continue
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.lint()
    module = fx.GraphModule(plan.module, graph, type(plan.module).__name__)
    return plan.replace(graph=graph, module=module, shift=mode, shift_nodes=tuple(names))


def is_shift(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is temporal_shift


__all__ = ["insert_shifts", "is_shift", "COMPUTE_OPS"]
