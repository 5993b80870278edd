"""Tracing an image model with torch.fx, with errors a person can act on.

A submodule that fx cannot trace (data-dependent control flow, say) is kept whole as one
node and the trace is retried, as long as that helps; so is a plain function of the model's
own source file that its forward calls (fx's `autowrap_functions`). What was kept whole and
why is in ``gm.meta["kept_whole"]`` (class, qualified name or function -> reason).
"""
from __future__ import annotations

import inspect

import torch.fx as fx
from torch import nn

from .errors import CompileError

KEPT = "kept_whole"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Each retry keeps one more class or function whole; timm's models need at most a few.
_MAX_RETRIES = 64


class _Tracer(fx.Tracer):
    """fx's tracer plus leaf modules and a record of which module a trace failed in."""

    def __init__(self, leaves=()):  # fx re-creates the tracer without arguments to unpickle a GraphModule
        super().__init__(autowrap_functions=tuple(f for f in leaves if inspect.isfunction(f)))
        self._leaf_types = tuple(m for m in leaves if isinstance(m, type))
        self._leaf_names = {m for m in leaves if isinstance(m, str)}
        self.failed_in = None  # (qualified name, module) of the innermost module

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), m)
            raise


def leaf_key(qualname: str, module: nn.Module):
    """What to keep whole for `module`: its class, so that every instance is kept whole at once,
    or its qualified name for a container (keeping every nn.Sequential whole would keep too much)."""
    return qualname if isinstance(module, _CONTAINERS) else type(module)


def key_name(key) -> str:
    if isinstance(key, str):
        return key
    return f"{key.__name__}()" if inspect.isfunction(key) else key.__name__


def _failing_function(model, e):
    """The innermost plain function of the model's own source file that the failed trace ran in:
    fx can keep it whole there (it patches forward's globals, and only public names)."""
    scope = type(model).forward.__globals__
    found, tb = None, e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        fn = scope.get(code.co_name)
        if inspect.isfunction(fn) and fn.__code__ is code and not code.co_name.startswith("_"):
            found = fn
        tb = tb.tb_next
    return found


def _bound_defaults(model: nn.Module) -> dict:
    """The optional arguments of `model.forward` after the frame, bound to their defaults
    (fx would make each one an input of the graph, semantics §1 has one: the frame)."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise CompileError(
            f"{type(model).__name__}.forward takes arguments besides the frame with no default ({', '.join(required)}); "
            f"wrap the model in a module whose forward(x) takes only the frame and passes the rest")
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _drop_bound_placeholders(graph: fx.Graph) -> None:
    """fx keeps a placeholder for each bound argument, read only by checks of its value; drop them."""
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        dead, todo = [], [ph]
        while todo:
            n = todo.pop()
            if n not in dead:
                dead.append(n)
                todo.extend(n.users)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for n in sorted(dead, key=order.__getitem__, reverse=True):
            graph.erase_node(n)


def _mutates_first_arg(n: fx.Node) -> bool:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "") if n.op == "call_function" else ""
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__") \
        and bool(n.args) and isinstance(n.args[0], fx.Node)


def _explicit_inplace(graph: fx.Graph) -> None:
    """After `y.mul_(g)`, later readers of `y` read the mul_ node instead: the same tensor, but now
    the graph says they come after it (NFNet's `out.mul_(self.skipinit_gain)` has no reader of its
    own, so stages, registers and dead-code elimination would not see it otherwise)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in list(graph.nodes):
        if n.op in ("call_method", "call_function") and _mutates_first_arg(n):
            target = n.args[0]
            for user in list(target.users):
                if order[user] > order[n]:
                    user.replace_input_with(target, n)


def _trace_once(model, tracer):
    before = set(vars(model))
    # Caches that modules fill in forward (LeViT's attention biases) would keep this trace's
    # proxies, and a later trace would read them: each trace starts from, and leaves, them as they were.
    caches = [(d, dict(d)) for m in model.modules() for k, d in vars(m).items()
              if type(d) is dict and not k.startswith("_")]
    try:
        return tracer.trace(model, concrete_args=_bound_defaults(model) or None), set(vars(model)) - before
    except Exception:
        _forget(model, set(vars(model)) - before)
        raise
    finally:
        for d, saved in caches:
            d.clear()
            d.update(saved)


def _forget(model, names):
    # fx stores the tensors it makes while tracing on the model itself; they belong to the trace.
    for k in names:
        delattr(model, k)


def _reason(e: Exception) -> str:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, fx.proxy.TraceError):  # fx's own: a tensor used as a bool or iterated
        reason = f"data-dependent control flow: {reason}"
    return reason


def trace(model: nn.Module, leaf_modules=(), kept=None) -> fx.GraphModule:
    """`torch.fx.symbolic_trace(model)` with `leaf_modules` and `kept` kept whole (semantics §1).

    `kept` maps more leaves (classes or qualified names) to why they are kept whole. A
    submodule that fails to trace joins them and the trace is retried, while that helps.
    Optional arguments of the model's forward take their defaults.
    """
    for m in leaf_modules:
        if not (isinstance(m, str) or (isinstance(m, type) and issubclass(m, nn.Module))):
            raise TypeError(f"leaf_modules takes nn.Module classes or qualified names, got {m!r}")
    kept = dict(kept or {})
    for _ in range(_MAX_RETRIES):
        tracer = _Tracer(tuple(leaf_modules) + tuple(kept))
        try:
            graph, made = _trace_once(model, tracer)
            break
        except CompileError:
            raise
        except Exception as e:
            key = leaf_key(*tracer.failed_in) if tracer.failed_in else _failing_function(model, e)
            if key is None or key in kept or key in leaf_modules:
                raise _error(model, tracer, e, kept) from e
            kept[key] = f"cannot be traced: {_reason(e)}"
    else:
        raise CompileError(f"cannot trace {type(model).__name__}: still failing after keeping "
                           f"{len(kept)} module classes whole ({', '.join(map(key_name, kept))})")
    _drop_bound_placeholders(graph)
    _explicit_inplace(graph)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _forget(model, made)
    gm.meta[KEPT] = kept
    return gm


def _error(model, tracer, e, kept) -> CompileError:
    if tracer.failed_in:
        where, m = tracer.failed_in
        at = f"module '{where}' ({type(m).__name__}), kept whole and still failing"
        fix = "make that module traceable, or give example_input= a size it accepts"
    else:  # the model's own forward: it cannot be a leaf of itself
        at = f"model {type(model).__name__}"
        fix = ("make the model's own forward traceable (move that code into a submodule, which pipecomp "
               "then keeps whole)")
    also = f" (kept whole already: {', '.join(map(key_name, kept))})" if kept else ""
    return CompileError(f"cannot trace {at}: {_reason(e)}{also}. torch.fx must see the same graph for every "
                        f"input; {fix}")
