"""Tracing an image model with torch.fx, with errors a person can act on."""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from .errors import CompileError


class _Tracer(fx.Tracer):
    """fx's tracer plus user leaf modules and a record of which module a trace failed in."""

    def __init__(self, leaf_modules):
        super().__init__()
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.failed_in = None  # (qualified name, class name) of the innermost module

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def trace(model: nn.Module, leaf_modules=()) -> fx.GraphModule:
    """`torch.fx.symbolic_trace(model)` with `leaf_modules` kept whole (semantics §1)."""
    for m in leaf_modules:
        if not (isinstance(m, str) or (isinstance(m, type) and issubclass(m, nn.Module))):
            raise TypeError(f"leaf_modules takes nn.Module classes or qualified names, got {m!r}")
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where, cls = tracer.failed_in or ("", type(model).__name__)
        at = f"module '{where}' ({cls})" if where else f"model {cls}"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "control flow" in reason or "iterate" in reason or "bool" in reason:
            reason = f"data-dependent control flow: {reason}"
        raise CompileError(
            f"cannot trace {at}: {reason}. torch.fx must see the same graph for every input; "
            f"pass leaf_modules=({cls},) to keep this module whole as one node"
        ) from e
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)
