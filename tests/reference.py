"""The reference interpreter: semantics.md §3 and §6, tick by tick, straight from the text.

It reads only the plan (graph, stages' delays, clocks, shift nodes) and runs every node
itself; nothing of pipecomp's lowering is used, so the generated code is checked against
the contract, not against itself.
"""
import functools

import torch
import torch.fx as fx

from pipecomp.analysis import info
from pipecomp.passes.shift import is_shift


def _zeros(node, batch, device):
    shape = list(info(node)["shape"])
    shape[0] = batch
    return torch.zeros(shape, dtype=info(node)["dtype"], device=device)


def _run(root, v, args, kwargs):
    if v.op == "call_module":
        return root.get_submodule(v.target)(*args, **kwargs)
    if v.op == "call_function":
        return v.target(*args, **kwargs)
    return getattr(args[0], v.target)(*args[1:], **kwargs)


def run(net, frames):
    """Outputs of ticks 0..T-1 for `frames` (a list of [B, C, H, W]) after a reset."""
    plan, root = net.plan, net
    history = {}  # node name -> list of its values, one per tick
    memory = {}   # shift node name -> its input at its previous firing
    outputs = []
    for t, x in enumerate(frames):
        now = {}
        for v in plan.graph.nodes:
            def read(u, v=v):
                if u.op == "get_attr":
                    return functools.reduce(getattr, u.target.split("."), root)
                if info(u).get("kind") != "tensor":
                    return now[u.name]  # shape values, constants and tuples are never delayed
                d = plan.delay_of[(u.name, v.name)]
                if d == 0:
                    return now[u.name]
                return history[u.name][t - d] if t - d >= 0 else torch.zeros_like(now[u.name])
            if v.op == "placeholder":
                now[v.name] = x
            elif v.op == "get_attr":
                continue
            elif v.op == "output":
                outputs.append(fx.map_arg(v.args[0], read))
            elif info(v).get("kind") in ("value", "constant") or t % plan.period_of[v.name] == plan.phase_of[v.name]:
                args, kwargs = fx.map_arg((v.args, v.kwargs), read)
                if is_shift(v):
                    inp, fold = args[0], info(v)["fold"]
                    prev = memory.get(v.name, torch.zeros_like(inp))
                    now[v.name] = torch.cat([prev[:, :fold], inp[:, fold:]], 1)
                    memory[v.name] = inp
                else:
                    now[v.name] = _run(root, v, args, kwargs)
            elif info(v).get("kind") == "tuple":
                now[v.name] = None  # its readers tick with it, so nobody reads it now
            else:
                held = history[v.name][t - 1] if t > 0 else None
                now[v.name] = held if held is not None else _zeros(v, x.shape[0], x.device)
            if v.op not in ("output", "get_attr"):
                history.setdefault(v.name, []).append(now[v.name])
    return outputs
