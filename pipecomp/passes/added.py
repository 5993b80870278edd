"""What the passes of added connections (semantics §9) share: a new module for a new graph."""
from __future__ import annotations

import functools

import torch.fx as fx

from ..plan import Plan


def rebuild(plan: Plan, graph: fx.Graph, modules: dict, **changes) -> Plan:
    """The plan with `graph`, whose new call_module targets are the added `modules`.

    The new GraphModule is made from a table of targets, so the input plan's module is left as
    it was; the added modules sit under their own top-level names (``skips``, ``temporal``),
    which `VideoNet` registers next to the image model's children.
    """
    graph.lint()
    root = {n.target: modules[n.target] if n.target in modules else
            functools.reduce(getattr, n.target.split("."), plan.module)
            for n in graph.nodes if n.op in ("call_module", "get_attr")}
    module = fx.GraphModule(root, graph, type(plan.module).__name__)
    return plan.replace(graph=graph, module=module, **changes)
