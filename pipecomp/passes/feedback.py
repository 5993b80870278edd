"""Feedback: the model's output of tick `t−d` fed back to its first convolution (semantics §9).

The output's first tensor (for a dict, the first entry) of tick `t−d` is resized to the
first convolution `c`'s output — bilinear for a feature map `[B, K, h, w]`; a vector `[B, K]`
becomes a `[B, K, 1, 1]` map that the sum broadcasts over height and width — mapped by a 1×1
convolution whose weight and bias start at zero (module ``feedback.conv``), and added to `c`'s
output, which `c`'s readers then read. Nodes ``feedback_in``, ``feedback_resize``,
``feedback`` and ``feedback_sum`` sit in `c`'s stage, on `c`'s clock.

An fx graph is in topological order, so the back edge (from the output's tensor, late in the
graph, to ``feedback_in``) cannot be an fx argument: ``feedback_in`` has no inputs, and
`plan.feedback` records the edge. The delays pass gives it delay `d`, so the state pass keeps
`d` registers of the source as for any delayed edge, and the tick functions read the oldest in
``feedback_in``'s place. The pass runs after partition, before the other added connections,
so that a temporal filter on `c` (`temporal=`) filters `c` and the feedback is added to the
filter's result.
"""
from __future__ import annotations

import numbers
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..analysis import COMPUTE_OPS, info, is_conv
from ..errors import CompileError
from ..ops import feedback_in
from ..plan import Plan
from .added import rebuild

_NODES = ("feedback_in", "feedback_resize", "feedback", "feedback_sum")


def _leaves(value):
    """The fx nodes of the output's structure, in order (a dict's entries in its order)."""
    if isinstance(value, fx.Node):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)


def _source(plan: Plan) -> fx.Node:
    """The output's first tensor: the value fed back."""
    out = next(n for n in plan.graph.nodes if n.op == "output")
    name = type(plan.module).__name__
    for leaf in _leaves(out.args[0]):
        kind = info(leaf).get("kind")
        if kind == "tuple":
            raise CompileError(f"the first tensor of {name}'s output is inside the structure that node "
                               f"'{leaf.name}' returns; feedback= needs it as a value of its own: return its "
                               f"parts (e.g. `a, b = f(x); return a, b`)")
        if kind != "tensor":
            continue
        shape = list(info(leaf)["shape"])
        if leaf.op not in COMPUTE_OPS or len(shape) not in (2, 4) or info(leaf).get("batch_dim") != 0:
            raise CompileError(f"feedback= feeds back a feature map [B, K, H, W] or a vector [B, K], but the "
                               f"first tensor of {name}'s output, '{leaf.name}', has shape {shape}; return such "
                               f"a tensor first, or compile without feedback=")
        return leaf
    raise CompileError(f"{name}'s output holds no tensor (it returns {out.args[0]!r}), so feedback= has "
                       f"nothing to feed back; return a tensor, or compile without feedback=")


def _meta(fn, args, device) -> dict:
    """Shape and FLOPs of `fn(*args)` on zero tensors of the example's shapes."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = fn(*(torch.zeros(a["shape"], dtype=a["dtype"], device=device) for a in args))
    return {"kind": "tensor", "shape": tuple(out.shape), "dtype": out.dtype, "batch_dim": 0,
            "bytes": out.numel() * out.element_size(), "flops": counter.get_total_flops()}


def add_feedback(plan: Plan, d) -> Plan:
    """Feed the output's first tensor of tick `t - d` back into the first convolution (semantics §9)."""
    if d is None:
        return plan
    if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
        raise ValueError(f"feedback={d!r} must be an integer >= 1: the delay, in ticks, of the output fed back")
    if plan.shift == "offline":
        raise ValueError("feedback= runs tick by tick, and offline (bi-directional) shift reads future frames; "
                         "compile with shift='online'")
    source = _source(plan)
    c = next((n for n in plan.graph.nodes if is_conv(plan.module, n) and info(n).get("kind") == "tensor"
              and len(info(n)["shape"]) == 4), None)
    if c is None:
        raise CompileError(f"feedback= adds the output to the first convolution, but "
                           f"{type(plan.module).__name__} has no 2-d convolution; compile without feedback=")
    clash = [n.name for n in plan.graph.nodes if n.name in _NODES]
    if clash:
        raise CompileError(f"{type(plan.module).__name__} has a node named '{clash[0]}', a name feedback= gives "
                           f"its own nodes; rename the module or function that makes it")
    device = next(plan.module.parameters(), torch.zeros(())).device
    s, period, phase = plan.stage_of[c.name], plan.period_of[c.name], plan.phase_of[c.name]
    stage_of, period_of, phase_of = dict(plan.stage_of), dict(plan.period_of), dict(plan.phase_of)
    added, graph, env = list(plan.added_nodes), fx.Graph(), {}
    common = {"module": "feedback", "added": "feedback", "clock": (c.name, 0)}

    def node(op, target, args, name, meta):
        n = graph.create_node(op, target, args, name=name)
        n.meta["pipecomp"] = {**meta, **common}
        stage_of[name], period_of[name], phase_of[name] = s, period, phase
        added.append(name)
        return n

    src, y = info(source), info(c)
    x_meta = {k: src[k] for k in ("kind", "shape", "dtype", "batch_dim", "bytes")} | {"flops": 0}
    total = None
    for n in plan.graph.nodes:
        env[n] = graph.node_copy(n, lambda a: total if a is c else env[a])
        if n is not c:
            continue
        x = node("call_function", feedback_in, (), "feedback_in", x_meta)
        if len(src["shape"]) == 2:
            k = src["shape"][1]
            resized = _meta(lambda a: a.reshape(-1, k, 1, 1), [x_meta], device)
            x = node("call_method", "reshape", (x, -1, k, 1, 1), "feedback_resize", resized)
        elif tuple(src["shape"][2:]) != tuple(y["shape"][2:]):
            size = tuple(y["shape"][2:])
            resized = _meta(lambda a: F.interpolate(a, size, None, "bilinear", False), [x_meta], device)
            x = node("call_function", F.interpolate, (x, size, None, "bilinear", False), "feedback_resize", resized)
        conv = nn.Conv2d(src["shape"][1], y["shape"][1], 1).to(device=device, dtype=y["dtype"])
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        x = node("call_module", "feedback.conv", (x,), "feedback", _meta(conv, [info(x)], device))
        total = node("call_function", operator.add, (env[c], x), "feedback_sum",
                     {**_meta(operator.add, [y, info(x)], device), "flops": 0})
    # A model that returns its first convolution's output feeds back that output, the sum.
    fed = total if source is c else env[source]
    return rebuild(plan, graph, {"feedback.conv": conv}, stage_of=stage_of, period_of=period_of,
                   phase_of=phase_of, added_nodes=tuple(added), feedback=(fed.name, "feedback_in", int(d)))
