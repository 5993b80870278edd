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
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, fx.proxy.TraceError):  # fx's own: a tensor used as a bool or iterated
            reason = f"data-dependent control flow: {reason}"
        if tracer.failed_in:
            where, cls = tracer.failed_in
            fix = f"pass leaf_modules=({cls},) to keep this module whole as one node"
            at = f"module '{where}' ({cls})"
        else:  # the model's own forward: it cannot be a leaf of itself
            fix = ("make the model's own forward traceable (move that code into a submodule, and pass its "
                   "class in leaf_modules)")
            at = f"model {type(model).__name__}"
        raise CompileError(
            f"cannot trace {at}: {reason}. torch.fx must see the same graph for every input; {fix}") from e
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)
