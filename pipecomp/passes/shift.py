"""Temporal shift (TSM): insert shift nodes before convolutions (semantics §6)."""
from __future__ import annotations

import math

import torch.fx as fx
from torch import nn

from ..analysis import info, is_conv, residual_blocks
from ..errors import CompileError
from ..ops import temporal_shift
from ..plan import Plan


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _block_of(node: fx.Node) -> str:
    """The block a node belongs to: its outermost enclosing module that is not a container
    but sits in one (a BasicBlock, an InvertedResidual, a DenseLayer, a VGG convolution)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    for (_, parent), (path, cls) in zip(stack, stack[1:]):
        if issubclass(parent, _CONTAINERS) and not issubclass(cls, _CONTAINERS):
            return path
    return info(node)["module"]


def _reads_block_input(gm, conv: fx.Node) -> bool:
    """Does `conv` read a value from outside its block through no other convolution?"""
    block = _block_of(conv)
    inside = lambda n: n.op != "placeholder" and (info(n)["module"] + ".").startswith(block + ".")  # noqa: E731
    todo, seen = [conv.args[0]], set()
    while todo:
        n = todo.pop()
        if n in seen or n.op == "get_attr":
            continue
        seen.add(n)
        if not inside(n):
            return True
        if not is_conv(gm, n):
            todo.extend(n.all_input_nodes)
    return False


def insert_shifts(plan: Plan, mode: str | None, fraction: float, place: str) -> Plan:
    """Insert `mode` shift nodes shifting `fraction` of the channels, at `place`.

    `"residual"`: before the first convolution of every residual branch (TSM sec. 3.3,
    residual shift); `"inplace"`: before every convolution whose input is a block input,
    that is, a value from outside the convolution's block reached through no other
    convolution (so ResNet's conv1 and downsample, every DenseLayer's conv1 after its
    concatenation, every VGG convolution).
    """
    if mode is None:
        return plan
    if place == "residual":
        blocks = residual_blocks(plan.module, plan.graph)
        if not blocks:
            raise CompileError(
                f"{type(plan.module).__name__} has no residual blocks, so shift_place='residual' "
                f"has nowhere to put a shift; use shift_place='inplace' to shift before the "
                f"convolutions that read a block input"
            )
        targets = {conv for _, _, conv in blocks}
    else:
        targets = {c for c in plan.graph.nodes if is_conv(plan.module, c) and _reads_block_input(plan.module, c)}

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


