"""Analyses: shapes, FLOPs, module paths and residual blocks, cached in `node.meta["pipecomp"]`.

Every analysis writes into one dict per node, `node.meta["pipecomp"]`, with keys:

- ``kind``: ``"tensor"`` (the node's value is a tensor), ``"tuple"`` (a structure holding
  tensors), ``"value"`` (no tensor: sizes, ints) or ``"constant"`` (tensors computed only
  from parameters, buffers and values, with no frame content); semantics §3 never delays
  values and constants;
- ``shape``, ``dtype``, ``batch_dim``: of a tensor value at the example's batch size;
  ``batch_dim`` is the one axis whose size is the batch (None if no axis is exactly the
  batch, e.g. Swin's windows ``[B·nW, N, C]``); a tuple's is 0 when every tensor in it
  has the batch first;
- ``bytes``: size of a tensor value at the example's batch size;
- ``flops``: FLOPs of one call at the example's batch size (`torch.utils.flop_counter`);
- ``module``: qualified name of the innermost module the node belongs to ('' for the root).
"""
from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .errors import CompileError

KEY = "pipecomp"
COMPUTE_OPS = ("call_module", "call_function", "call_method")


def info(node: fx.Node) -> dict:
    return node.meta.setdefault(KEY, {})


class _Annotate(ShapeProp):
    def run_node(self, n):
        try:
            with FlopCounterMode(display=False) as counter:
                result = super().run_node(n)
        except Exception as e:
            cls = type(self.module.get_submodule(n.target)).__name__ if n.op == "call_module" else n.op
            raise CompileError(
                f"node '{n.name}' ({cls}) failed on the example input: {e}. "
                f"Check example_input= (a tensor or a shape [B, C, H, W])"
            ) from e
        meta = info(n)
        meta["flops"] = counter.get_total_flops()
        if isinstance(result, torch.Tensor):
            meta.update(kind="tensor", shape=tuple(result.shape), dtype=result.dtype,
                        bytes=result.numel() * result.element_size())
        elif any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(result)):
            meta.update(kind="tuple", leaf_shapes=[tuple(t.shape) for t in tree_leaves(result)
                                                   if isinstance(t, torch.Tensor)])
        else:
            meta["kind"] = "value"
        return result


def _batch_dim(before, after, batch):
    """The axis that is the batch: of size `batch` before and `batch + 1` after, the only one
    that changed (an axis of `k·batch` frames' worth of rows does not count)."""
    moved = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    if len(before) != len(after) or len(moved) != 1 or (before[moved[0]], after[moved[0]]) != (batch, batch + 1):
        return None
    return moved[0]


class _BatchShapes(fx.Interpreter):
    """Runs the graph at one more frame per batch to see which axis is the batch.

    Real tensors, not fake ones: leaf modules may hold data-dependent code."""

    def __init__(self, gm, batch):
        super().__init__(gm)
        self.batch = batch

    def run_node(self, n):
        result = super().run_node(n)
        meta = info(n)
        if meta.get("kind") == "tensor" and isinstance(result, torch.Tensor):
            meta["batch_dim"] = _batch_dim(meta["shape"], tuple(result.shape), self.batch)
        elif meta.get("kind") == "tuple":
            leaves = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
            meta["batch_dim"] = 0 if all(d == 0 for d in (
                _batch_dim(s, tuple(t.shape), self.batch) for s, t in zip(meta["leaf_shapes"], leaves))) else None
        return result


def _mark_constants(graph: fx.Graph) -> None:
    """Tensors with no frame content become kind ``"constant"`` (semantics §3): they read only
    parameters, buffers, values (sizes) and other constants, never a tensor of the frame."""
    framed = set()
    for n in graph.nodes:
        kind = info(n).get("kind")
        if n.op == "placeholder" or any(u in framed and info(u).get("kind") in ("tensor", "tuple")
                                        for u in n.all_input_nodes):
            framed.add(n)
        elif n.op in COMPUTE_OPS and kind in ("tensor", "tuple"):
            info(n)["kind"] = "constant"


def module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def annotate(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Shapes, kinds, bytes, FLOPs and module paths of every node, at `example`'s batch.

    Runs in eval mode, so that compiling never updates the model's batch-norm statistics."""
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            _Annotate(gm).propagate(example)
            _BatchShapes(gm, example.shape[0]).run(torch.cat([example, example[:1]]))
    finally:
        for m, training in modes.items():
            m.training = training
    _mark_constants(gm.graph)
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)  # ShapeProp's; torch.save cannot pickle it, and ours has the same
        meta = info(n)
        meta["module"] = module_path(n)
        meta.setdefault("flops", 0)


def is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.modules.conv._ConvNd)
    return node.op == "call_function" and node.target in (
        torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv2d)


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        for u in n.all_input_nodes:
            g.add_edge(u, n)
    return g


def residual_blocks(gm: fx.GraphModule, graph: fx.Graph):
    """Residual blocks as (add node, block input, first convolution of the residual branch).

    The block input is the add's immediate dominator; of the two branches from it to the
    add, the identity path is the one with fewer convolutions (none, or a downsample) and
    the residual branch is the other (TSM: *residual shift*, sec. 3.3).
    """
    g = to_networkx(graph)
    root = next(n for n in graph.nodes if n.op == "placeholder")
    idom = nx.immediate_dominators(g, root)
    blocks = []
    for add in graph.nodes:
        if not _is_add(add) or info(add).get("kind") != "tensor":
            continue
        operands = [a for a in add.args[:2] if isinstance(a, fx.Node) and info(a).get("kind") == "tensor"]
        if len(operands) != 2:
            continue
        start = idom[add]
        below = nx.descendants(g, start)
        branches = [(nx.ancestors(g, a) | {a}) & below for a in operands]
        convs = [[n for n in b if is_conv(gm, n)] for b in branches]
        identity, residual = sorted(range(2), key=lambda i: len(convs[i]))
        if len(convs[identity]) > 1 or len(convs[residual]) <= len(convs[identity]):
            continue
        branch = branches[residual] - branches[identity]
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min((c for c in convs[residual] if c in branch), key=order.__getitem__, default=None)
        if first is not None:
            blocks.append((add, start, first))
    return blocks
