"""The reference interpreter: semantics.md §3, §6 and §9's feedback, tick by tick, straight from the text.

It reads only the plan (graph, stages' delays, clocks, shift nodes) and runs every node
itself; nothing of pipecomp's lowering is used, so the generated code is checked against
the contract, not against itself. Beside every value it tracks whether the value depends on
a frame, so that a shift memory records only inputs that do (§6).
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


def _back_edge(plan, v):
    """(source, d) when `v` is where feedback's back edge enters (§9: the source's value of tick t−d), else None."""
    if plan.feedback and v.name == plan.feedback[1]:
        return plan.feedback[0], plan.feedback[2]
    return None


class _Fed:
    """Which values depend on a frame, tick by tick (semantics §6): the frame does; a computed
    value does when a tensor input it read does (feedback's reader when its source's value of
    tick t−d did); a held value keeps its flag; zero registers, shape values and constants do not."""

    def __init__(self, plan):
        self.plan, self.history, self.now = plan, {}, {}

    def read(self, u, v, t):
        if u.op == "get_attr" or info(u).get("kind") in ("value", "constant"):
            return False
        d = self.plan.delay_of[(u.name, v.name)] if info(u).get("kind") == "tensor" else 0
        return self.now[u.name] if d == 0 else t - d >= 0 and self.history[u.name][t - d]

    def tick(self, t):
        """The flags of tick `t`."""
        self.now = {}
        for v in self.plan.graph.nodes:
            if v.op in ("get_attr", "output"):
                continue
            if v.op == "placeholder":
                self.now[v.name] = True
            elif _fires(self.plan, v, t) and _back_edge(self.plan, v):
                source, d = _back_edge(self.plan, v)
                self.now[v.name] = t - d >= 0 and self.history[source][t - d]
            elif _fires(self.plan, v, t):
                self.now[v.name] = any(self.read(u, v, t) for u in v.all_input_nodes)
            else:
                self.now[v.name] = t > 0 and self.history[v.name][t - 1]
            self.history.setdefault(v.name, []).append(self.now[v.name])

    def records(self, shift, t):
        """Does the memory of `shift`, firing at `t`, record its input?"""
        return self.read(shift.args[0], shift, t)


def _fires(plan, v, t):
    return info(v).get("kind") in ("value", "constant") or t % plan.period_of[v.name] == plan.phase_of[v.name]


def run(net, frames, history=None):
    """Outputs of ticks 0..T-1 for `frames` (a list of [B, C, H, W]) after a reset.

    `history`, a dict if given, gets every node's values, a list with one per tick."""
    plan, root = net.plan, net
    history = {} if history is None else history  # node name -> list of its values, one per tick
    memory = {}   # shift node name -> its input at its previous firing
    fed = _Fed(plan)
    outputs = []
    for t, x in enumerate(frames):
        now = {}
        fed.tick(t)
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
            elif _fires(plan, v, t):
                args, kwargs = fx.map_arg((v.args, v.kwargs), read)
                if _back_edge(plan, v):
                    source, d = _back_edge(plan, v)
                    now[v.name] = history[source][t - d] if t - d >= 0 else _zeros(v, x.shape[0], x.device)
                elif is_shift(v):
                    inp, fold = args[0], info(v)["fold"]
                    prev = memory.get(v.name, torch.zeros_like(inp))
                    now[v.name] = torch.cat([prev[:, :fold], inp[:, fold:]], 1)
                    if fed.records(v, t):
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


def _stage_of_params(net):
    """Parameter name -> the stage of the node that uses it."""
    plan, owner = net.plan, {}
    names = {id(p): n for n, p in net.named_parameters()}
    for v in plan.graph.nodes:
        if v.op == "call_module":
            tensors = net.get_submodule(v.target).parameters()
        elif v.op == "get_attr":
            obj = functools.reduce(getattr, v.target.split("."), net)
            tensors = [obj] if isinstance(obj, torch.nn.Parameter) else []
        else:
            continue
        for p in tensors:
            owner.setdefault(names[id(p)], plan.stage_of[v.name])
    return owner


def sideways(net, frames, loss_fns, local=None):
    """Sideways pseudo-gradients of semantics §8, node by node, straight from the text.

    `loss_fns[t]` is None (tick not in W) or `output -> ℓ_t`. `local[t]`, if given, maps node
    names to `value -> term`: loss terms on those nodes at `t` where they fire (rule 3: they seed
    their own stage's VJP of that tick, and reach it, rule 5). Every firing node computes on
    its inputs: values of the same tick through delay-0 edges (the stage's own graph), and
    leaves for delayed reads, held values and shift memories, whose gradients are routed by
    the rules: a delayed read's gradient reaches the producer `delay` ticks later (rule 2),
    a held value's and a non-firing node's arrivals wait for its next firing (rule 4), a
    shift memory's gradient seeds the memory's channels of the shift's input value one tick
    later (rule 2). Returns per tick {parameter name: gradient}, the losses (with the local
    terms), and per stage the first tick a gradient reached it (rule 5).
    """
    plan, root = net.plan, net
    params = dict(net.named_parameters())
    owner = _stage_of_params(net)
    history, memory, kept = {}, {}, {}
    fed = _Fed(plan)
    arrive = {}  # tick -> {node name: [gradients]}
    taps = {}  # tick -> {shift name: gradient for the memory's channels of its input value}
    first = [None] * plan.parallel
    per_tick, losses = [], []

    def reach(stage, t):
        if first[stage] is None:
            first[stage] = t

    for t, x in enumerate(frames):
        now, leaves, edge = {}, [], {}
        fed.tick(t)
        for v in plan.graph.nodes:
            def read(u, v=v):
                if u.op == "get_attr":
                    return functools.reduce(getattr, u.target.split("."), root)
                if info(u).get("kind") != "tensor":
                    return now[u.name]
                d = plan.delay_of[(u.name, v.name)]
                if d == 0:
                    return now[u.name]
                value = history[u.name][t - d] if t - d >= 0 else torch.zeros_like(now[u.name])
                leaf = value.detach().requires_grad_()
                leaves.append((leaf, ("arrive", u.name, t + d)))
                return leaf
            if v.op == "placeholder":
                now[v.name] = x
            elif v.op == "get_attr":
                continue
            elif v.op == "output":
                output = fx.map_arg(v.args[0], read)
            elif _fires(plan, v, t):
                args, kwargs = fx.map_arg((v.args, v.kwargs), read)
                if _back_edge(plan, v):  # a delayed read like any other: its gradient reaches the source at t + d
                    source, d = _back_edge(plan, v)
                    value = history[source][t - d] if t - d >= 0 else _zeros(v, x.shape[0], x.device)
                    now[v.name] = value.detach().requires_grad_()
                    leaves.append((now[v.name], ("arrive", source, t + d)))
                elif is_shift(v):
                    inp, fold = args[0], info(v)["fold"]
                    prev = memory.get(v.name, torch.zeros_like(inp)).detach().requires_grad_()
                    leaves.append((prev, ("tap", v.name, t + 1)))
                    now[v.name] = torch.cat([prev[:, :fold], inp[:, fold:]], 1)
                    if fed.records(v, t):
                        memory[v.name] = inp.detach()
                    edge[v.name] = inp
                else:
                    now[v.name] = _run(root, v, args, kwargs)
            elif info(v).get("kind") == "tuple":
                now[v.name] = None
            else:
                held = history[v.name][t - 1] if t > 0 else _zeros(v, x.shape[0], x.device)
                now[v.name] = held.detach().requires_grad_()
                leaves.append((now[v.name], ("kept", v.name, t)))
                if is_shift(v):
                    edge[v.name] = read(v.args[0])
            if v.op not in ("output", "get_attr"):
                value = now[v.name]
                history.setdefault(v.name, []).append(value.detach() if isinstance(value, torch.Tensor) else value)
        roots, seeds = [], []
        fires = {v.name for v in plan.graph.nodes if v.op in ("call_module", "call_function", "call_method")
                 and t % plan.period_of[v.name] == plan.phase_of[v.name]}
        for name, grads in arrive.pop(t, {}).items():
            node = plan.node(name)
            reach(plan.stage_of[name], t)
            if node.op == "placeholder":
                continue
            kept[name] = sum(grads) + kept[name] if name in kept else sum(grads)
        for name in list(kept):
            if name in fires and info(plan.node(name)).get("kind") == "tensor":
                roots.append(now[name])
                seeds.append(kept.pop(name))
        for name, g in taps.pop(t, {}).items():
            reach(plan.stage_of[name], t)
            fold = info(plan.node(name))["fold"]
            roots.append(edge[name][:, :fold])
            seeds.append(g)
        loss = loss_fns[t](output) if loss_fns[t] is not None else None
        if loss is not None:
            reach(plan.parallel - 1, t)
            roots.append(loss)
            seeds.append(torch.ones_like(loss))
        for name, term in (local[t] if local is not None and local[t] else {}).items():
            if name in fires:
                reach(plan.stage_of[name], t)
                value = term(now[name])
                roots.append(value)
                seeds.append(torch.ones_like(value))
                loss = value if loss is None else loss + value
        losses.append(None if loss is None else loss.detach())
        pairs = [(r, s) for r, s in zip(roots, seeds) if r.requires_grad]
        grads = {}
        if pairs:
            inputs = [leaf for leaf, _ in leaves] + list(params.values())
            found = torch.autograd.grad([r for r, _ in pairs], inputs, [s for _, s in pairs], allow_unused=True)
            for (leaf, (how, name, when)), g in zip(leaves, found):
                if g is None:
                    continue
                if how == "arrive":
                    arrive.setdefault(when, {}).setdefault(name, []).append(g)
                elif how == "tap":
                    slot = taps.setdefault(when, {})
                    fold = info(plan.node(name))["fold"]
                    slot[name] = g[:, :fold] + slot[name] if name in slot else g[:, :fold]
                else:
                    reach(plan.stage_of[name], t)
                    kept[name] = g + kept[name] if name in kept else g
            grads = {n: g for n, g in zip(params, found[len(leaves):]) if g is not None}
        per_tick.append(grads)
    return per_tick, losses, first, owner
