"""Lowering: the plan becomes code.

`lower_steps` generates, for every stage and every distinct set of firing nodes of its
clock phases, a pure tick function ``(frame, state) -> (output, new_state)`` as fx code
(semantics §3). A stage reads only the frame, its own current values and the state of the
previous tick, so stages of one tick are independent and may run in any order or at once.

`run_clip` computes a whole clip node by node (semantics §4): every node computes its time
series in one call on a ``[B·T]`` batch, or on the frames of its firing ticks only. With
feedback (§9) a node's series depends on the output's, so `run_ticks` runs the clip tick by
tick with the tick functions instead.
"""
from __future__ import annotations

import functools
import math
import operator

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map, tree_map_only

from .analysis import COMPUTE_OPS, info
from .ops import shift_online
from .passes.shift import is_shift
from .plan import Plan

# Kinds of values that carry no frame content: never state, recomputed by each reader (semantics §3).
_RECOMPUTED = ("value", "constant")


def _is_inplace(root, v: fx.Node) -> bool:
    if v.op == "call_module":
        return bool(getattr(root.get_submodule(v.target), "inplace", False))
    if v.op == "call_method":
        return v.target.endswith("_") and not v.target.endswith("__")
    if v.op == "call_function":
        name = getattr(v.target, "__name__", "")
        return bool(v.kwargs.get("inplace")) or v.target in (operator.iadd, operator.imul, operator.isub) or (
            name.endswith("_") and not name.endswith("__"))
    return False


def firing(plan: Plan, nodes, tick: int) -> frozenset:
    """The nodes among `nodes` that fire at `tick`. Shape values and constants are left out: a
    tick function recomputes them where they are needed, so their clocks do not make it a
    different one."""
    return frozenset(n.name for n in nodes if info(n).get("kind") not in _RECOMPUTED
                     and tick % plan.period_of[n.name] == plan.phase_of[n.name])


def stage_graph(plan: Plan, root, stage: int, fires: frozenset, taps: bool = False,
                filling: frozenset = frozenset()) -> fx.Graph:
    """The tick function of `stage` when exactly the nodes in `fires` fire.

    The online shift nodes in `filling` fire without recording: no frame has reached their
    input yet, so their memory stays zero (semantics §6).

    With `taps`, it also returns, per online shift memory of the stage, the memory's channels
    of the value the shift node reads at this tick, fired or not: where training seeds the
    gradient of the memory (semantics §8 rule 2), as a third result `(output, new_state, taps)`.
    """
    g = fx.Graph()
    frame, state = g.placeholder("frame"), g.placeholder("state")
    tapped = {}
    local, reads, attrs, shapes = {}, {}, {}, {}
    out_node = next(n for n in plan.graph.nodes if n.op == "output")

    def read(key):
        if key not in reads:
            reads[key] = g.call_function(operator.getitem, (state, key))
            reads[key]._rename(key)
        return reads[key]

    def current(u):
        return frame if u.op == "placeholder" else local[u]

    def attr(u):
        if u not in attrs:
            attrs[u] = g.node_copy(u)
        return attrs[u]

    def shape_value(u):
        # Shape values are recomputed where needed from any tensor of the right shape,
        # constants from parameters and buffers (semantics §3: neither is ever state).
        if u not in shapes:
            def src(w):
                if w.op == "get_attr":
                    return attr(w)
                if info(w).get("kind") in _RECOMPUTED and w.op in COMPUTE_OPS:
                    return shape_value(w)
                if w.op == "placeholder" or plan.stage_of[w.name] == stage:
                    return current(w)
                return read(f"{w.name}_d1")
            shapes[u] = g.node_copy(u, src)
        return shapes[u]

    def arg(u, v):
        if u.op == "get_attr":
            return attr(u)
        if info(u).get("kind") in _RECOMPUTED and u.op in COMPUTE_OPS:
            return shape_value(u)
        d = plan.delay_of[(u.name, v.name)]
        return current(u) if d == 0 else read(f"{u.name}_d{d}")

    new_state = {}
    mine = [n for n in plan.nodes_of_stage(stage) if n.op in COMPUTE_OPS]
    for v in mine:
        kind = info(v).get("kind")
        if kind in _RECOMPUTED:
            continue
        memory = f"{v.name}_mem" if is_shift(v) and plan.shift == "online" else None
        if memory and taps:
            u = v.args[0]
            if u.op != "placeholder" and plan.delay_of[(u.name, v.name)] == 0 and u not in local:
                tapped[memory] = None  # the input neither fired nor holds a register: it keeps the gradient
            else:
                fold = info(v)["fold"]
                tapped[memory] = g.call_function(operator.getitem, (arg(u, v), (slice(None), slice(None, fold))))
                tapped[memory]._rename(f"tap_{memory}")
        if v.name not in fires:
            if kind == "tensor" and v.name in plan.registers:
                local[v] = read(f"{v.name}_d1")
            if memory:
                new_state[memory] = read(memory)
            continue
        if plan.feedback and v.name == plan.feedback[1]:  # the back edge (§9): its source comes later
            source, _, d = plan.feedback
            local[v] = read(f"{source}_d{d}")
            continue
        if is_shift(v):
            both = g.call_function(shift_online, (arg(v.args[0], v), read(memory), info(v)["fold"]))
            local[v] = g.call_function(operator.getitem, (both, 0))
            local[v]._rename(v.name)
            if v.name in filling:
                new_state[memory] = read(memory)
            else:
                new_state[memory] = g.call_function(operator.getitem, (both, 1))
                new_state[memory]._rename(f"new_{memory}")
            continue
        inplace = _is_inplace(root, v)

        def mapped(u, v=v, inplace=inplace):
            a = arg(u, v)
            if inplace and a in reads.values() and u is v.args[0]:
                a = g.call_method("clone", (a,))
            return a
        local[v] = g.node_copy(v, mapped)
    for name, depth in plan.registers.items():
        u = plan.node(name)
        if plan.stage_of[name] != stage:
            continue
        new_state[f"{name}_d1"] = current(u)
        for i in range(2, depth + 1):
            new_state[f"{name}_d{i}"] = read(f"{name}_d{i - 1}")
    output = None
    if stage == plan.parallel - 1:
        output = fx.map_arg(out_node.args[0], lambda u: arg(u, out_node))
    g.output((output, new_state, tapped) if taps else (output, new_state))
    return g


class StageStep:
    """The tick functions of one stage: one generated GraphModule per distinct firing set.

    This is the unit every backend and training rule runs: `variant(tick)` is the tick function
    of a tick, `reads` / `writes` the state keys it reads and writes over all its variants,
    `reads_frame` whether it needs the frame. Training tick functions (`training_variants`)
    are the same code with the shift-memory taps of `stage_graph`.

    Ticks repeat every `hyperperiod` (`variant_of_tick`) once the stage's shift memories all
    record; before that, while the pipeline fills, `warmup[t]` is the variant of tick `t`: a
    shift that fires before a frame reaches its input leaves its memory zero (semantics §6).
    Variant `i` runs when the nodes `fires[i]` fire, the shifts `filling[i]` among them
    without recording.
    """

    def __init__(self, plan: Plan, root, stage: int):
        nodes = [n for n in plan.nodes_of_stage(stage) if n.op in COMPUTE_OPS]
        self.stage, self._plan, self._root = stage, plan, root
        self.hyperperiod = math.lcm(1, *(plan.period_of[n.name] for n in nodes))
        records = {n.name: plan.shift_records_from[n.name] for n in nodes if n.name in plan.shift_records_from}

        def key(t):
            fires = firing(plan, nodes, t)
            return fires, frozenset(n for n, first in records.items() if n in fires and t < first)
        periodic = [(firing(plan, nodes, t), frozenset()) for t in range(self.hyperperiod)]
        filling = [key(t) for t in range(max(records.values(), default=0))]
        while filling and filling[-1] == periodic[(len(filling) - 1) % self.hyperperiod]:
            filling.pop()  # ticks whose filling shifts do not fire run the periodic variant anyway
        keys = list(dict.fromkeys(periodic + filling))
        self.fires, self.filling = [f for f, _ in keys], [s for _, s in keys]
        self.variant_of_tick = [keys.index(k) for k in periodic]
        self.warmup = [keys.index(k) for k in filling]
        self.variants = [self._generate(i, False) for i in range(len(keys))]
        self.reads, self.writes, self.reads_frame = set(), set(), False
        for gm in self.variants:
            frame, state = [n for n in gm.graph.nodes if n.op == "placeholder"]
            self.reads_frame = self.reads_frame or bool(frame.users)
            self.reads |= {n.args[1] for n in state.users if n.op == "call_function" and n.target is operator.getitem}
            self.writes |= set(next(n for n in gm.graph.nodes if n.op == "output").args[0][1])
        self._training = None

    def _generate(self, i, taps) -> fx.GraphModule:
        graph = stage_graph(self._plan, self._root, self.stage, self.fires[i], taps, self.filling[i])
        gm = fx.GraphModule(self._root, graph,
                            f"Stage{self.stage}{'Train' if taps else ''}Tick")
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm

    def index(self, tick: int) -> int:
        """Which variant runs at `tick` (counted since the reset)."""
        if tick < len(self.warmup):
            return self.warmup[tick]
        return self.variant_of_tick[tick % self.hyperperiod]

    def variant(self, tick: int) -> fx.GraphModule:
        return self.variants[self.index(tick)]

    @property
    def training_variants(self) -> list:
        """Per variant, the tick function that also returns the shift-memory taps (made on first use)."""
        if self._training is None:
            self._training = [self._generate(i, True) for i in range(len(self.variants))]
        return self._training

    def __call__(self, tick: int, frame, state):
        return self.variant(tick)(frame, state)

    def code(self) -> str:
        parts = []
        for i, gm in enumerate(self.variants):
            parts.append(f"# stage {self.stage}, {self.when(i)}\n{gm.code.strip()}\n")
        return "\n".join(parts)

    def when(self, i: int) -> str:
        """The ticks variant `i` runs at, in words."""
        ticks = [t for t, v in enumerate(self.variant_of_tick) if v == i]
        filling = [t for t, v in enumerate(self.warmup) if v == i]
        parts = []
        if ticks:
            every = "every tick" if len(ticks) == self.hyperperiod else \
                f"ticks t with t % {self.hyperperiod} in {ticks}"
            parts.append(f"{every} from tick {len(self.warmup)} on" if self.warmup else every)
        if filling:
            runs = len(filling) > 1 and filling == list(range(filling[0], filling[-1] + 1))
            named = f"{filling[0]}-{filling[-1]}" if runs else ", ".join(map(str, filling))
            parts.append(f"tick{'s' if len(filling) > 1 else ''} {named} (the pipeline filling)")
        return " and ".join(parts)


def lower_steps(plan: Plan, root) -> list:
    if plan.shift == "offline":
        return []  # offline shift reads future frames: clips only (semantics §6)
    return [StageStep(plan, root, s) for s in range(plan.parallel)]


def tick_flops(plan: Plan, stages) -> list:
    """FLOPs per frame that each stage computes at each tick of the hyperperiod: `[stage][tick]`.

    That is what the generated tick functions contain once the pipeline has filled: nodes
    that fire and whose value is used in the stage, by the output or through a register. A
    firing nobody reads is dead code and costs nothing. Without tick functions (offline shift:
    clips only) it is every firing node.
    """
    batch = plan.example_shape[0]
    costs = []
    for s in range(plan.parallel):
        if stages:
            per_variant = [sum(info(n).get("flops", 0) for n in gm.graph.nodes if n.op in COMPUTE_OPS) / batch
                           for gm in stages[s].variants]
            costs.append([per_variant[stages[s].variant_of_tick[t % stages[s].hyperperiod]]
                          for t in range(plan.hyperperiod)])
        else:
            nodes = [n for n in plan.nodes_of_stage(s) if n.op in COMPUTE_OPS]
            costs.append([sum(info(n)["flops"] / batch for n in nodes if n.name in fires)
                          for fires in (firing(plan, nodes, t) for t in range(plan.hyperperiod))])
    return costs


def zero_state(plan: Plan, batch: int, device) -> dict:
    """The state after `reset()` for frames of batch size `batch` (semantics §3)."""
    state = {}
    for name, depth in plan.registers.items():
        meta = info(plan.node(name))
        shape = list(meta["shape"])
        shape[meta["batch_dim"]] = batch
        for i in range(1, depth + 1):
            state[f"{name}_d{i}"] = torch.zeros(shape, dtype=meta["dtype"], device=device)
    if plan.shift == "online":
        for name in plan.shift_nodes:
            meta = info(plan.node(name))
            shape = [batch, meta["fold"], *meta["shape"][2:]]
            state[f"{name}_mem"] = torch.zeros(shape, dtype=meta["dtype"], device=device)
    return state


def _fetch(root, target: str):
    return functools.reduce(getattr, target.split("."), root)


def _call(root, v: fx.Node, args, kwargs):
    if v.op == "call_module":
        return root.get_submodule(v.target)(*args, **kwargs)
    if v.op == "call_function":
        return v.target(*args, **kwargs)
    return getattr(args[0], v.target)(*args[1:], **kwargs)


def _shift_clip(x, fold: int, direction: str, unfed: int = 0):
    """TSM's shift on a series [B, n, C, ...] of one node's firings; an online shift's memory
    does not record its first `unfed` firings (no frame had reached its input, semantics §6)."""
    zero = x.new_zeros((x.shape[0], 1, fold, *x.shape[3:]))
    recorded = x[:, :-1, :fold]
    if unfed:
        recorded = torch.cat([torch.zeros_like(recorded[:, :unfed]), recorded[:, unfed:]], 1)
    back = torch.cat([zero, recorded], 1)
    if direction == "online":
        return torch.cat([back, x[:, :, fold:]], 2)
    ahead = torch.cat([x[:, 1:, :fold], zero], 1)
    back = torch.cat([zero, x[:, :-1, fold:2 * fold]], 1)
    return torch.cat([ahead, back, x[:, :, 2 * fold:]], 2)


def run_clip(plan: Plan, root, clip: torch.Tensor, env=None, stages=None, probes=None):
    """Outputs of ticks 0..T-1 after a reset, computed node by node on whole time series.

    With `stages`, only the nodes of those stages run, reading and writing `env` (node ->
    (value, clock)); the output comes back only from the group holding the last stage (else
    None). Model-parallel BPTT runs a clip so, one stage group after another. `probes`, a dict
    keyed by node names, gets those nodes' values at every tick, `[B, T, ...]` (held between
    firings), with the output (distillation's activation terms read them).
    """
    if plan.feedback:
        raise ValueError("a network with feedback= is recurrent: its clip runs tick by tick (VideoNet.forward, "
                         "run_ticks), not node by node; for BPTT with feedback, leave workers= unset")
    B, T = clip.shape[:2]
    env = {} if env is None else env

    def ticks(clock):
        return range(clock[1], T, clock[0])

    def retime(u, d, clock):
        val, have = env[u]
        if d == 0 and have == clock:
            return val
        rest = val.shape[1:]
        if have == (1, 0) and clock == (1, 0):
            series = val.view(B, T, *rest)
            if d >= T:
                return val.new_zeros(val.shape)
            return torch.cat([series.new_zeros((B, d, *rest)), series[:, :T - d]], 1).flatten(0, 1)
        p, ph = have
        idx = [((s - d - ph) // p if s - d >= ph else -1) + 1 for s in ticks(clock)]
        series = val.view(B, -1, *rest)
        padded = torch.cat([series.new_zeros((B, 1, *rest)), series], 1)
        picked = padded.index_select(1, torch.tensor(idx, dtype=torch.long, device=val.device))
        return picked.flatten(0, 1)

    derived = {}
    # On the whole clip, a node's series goes once its last reader has run: a long clip holds
    # the series that are still to be read, not every node's (autograd keeps what it saves).
    done_after = _last_readers(plan) if stages is None else {}

    def derived_value(u, clock):
        # A size or constant for a reader of `clock`: a size such as x.shape[0] counts that
        # reader's frames, so it is computed from its sources as that reader sees them.
        if (u, clock) not in derived:
            def src(w):
                if w.op in COMPUTE_OPS and info(w).get("kind") in _RECOMPUTED:
                    return derived_value(w, clock)
                if w.op == "get_attr" or info(w).get("kind") != "tensor" or env[w][1] is None:
                    return env[w][0]
                return retime(w, 0, clock)
            args, kwargs = fx.map_arg((u.args, u.kwargs), src)
            derived[(u, clock)] = _call(root, u, args, kwargs)
        return derived[(u, clock)]

    for v in plan.graph.nodes:
        if stages is not None and v.op != "get_attr" and plan.stage_of[v.name] not in stages:
            continue
        if v.op == "placeholder":
            env[v] = (clip.flatten(0, 1), (1, 0))
        elif v.op == "get_attr":
            env[v] = (_fetch(root, v.target), None)
        elif v.op in COMPUTE_OPS:
            clock = (plan.period_of[v.name], plan.phase_of[v.name])
            kind = info(v).get("kind")

            def value(u, v=v, clock=clock):
                if u.op in COMPUTE_OPS and info(u).get("kind") in _RECOMPUTED:
                    return derived_value(u, clock)
                if u.op == "get_attr" or info(u).get("kind") != "tensor" or env[u][1] is None:
                    return env[u][0]
                return retime(u, plan.delay_of[(u.name, v.name)], clock)
            if kind in _RECOMPUTED:  # computed for each clock that reads it (derived_value)
                continue
            args, kwargs = fx.map_arg((v.args, v.kwargs), value)
            n = len(ticks(clock))
            if n == 0:
                shape = list(info(v)["shape"])
                shape[0] = 0
                env[v] = (torch.zeros(shape, dtype=info(v)["dtype"], device=clip.device), clock)
            elif is_shift(v):
                x = args[0]
                unfed = len(range(clock[1], min(T, plan.shift_records_from.get(v.name, 0)), clock[0]))
                y = _shift_clip(x.view(B, n, *x.shape[1:]), info(v)["fold"], info(v)["direction"], unfed)
                env[v] = (y.flatten(0, 1), clock)
            else:
                env[v] = (_call(root, v, args, kwargs), clock)
            for u in done_after.get(v, ()):
                if u.name not in (probes or ()):
                    del env[u]
        elif v.op == "output":
            for name in probes or ():
                y = retime(plan.node(name), 0, (1, 0))
                probes[name] = y.view(B, T, *y.shape[1:])

            def leaf(u, v=v):
                if info(u).get("kind") == "tuple":  # ticks every frame (clocks pass)
                    return tree_map_only(torch.Tensor, lambda y: y.view(B, T, *y.shape[1:]), env[u][0])
                if u.op in COMPUTE_OPS and info(u).get("kind") in _RECOMPUTED:
                    return derived_value(u, (1, 0))
                if u.op == "get_attr" or info(u).get("kind") != "tensor":
                    return env[u][0]
                y = retime(u, plan.delay_of[(u.name, v.name)], (1, 0))
                return y.view(B, T, *y.shape[1:])
            return fx.map_arg(v.args[0], leaf)


def _last_readers(plan: Plan) -> dict:
    """compute node -> the tensor nodes whose last reader it is. A size or constant computed
    again for each reader (`_RECOMPUTED`) reads its sources where its readers run; the output
    (and the probes it returns) keeps what it reads."""
    order = {v: i for i, v in enumerate(plan.graph.nodes)}
    last = {}

    def read(u, at):
        last[u] = max(last.get(u, at), at)
        if u.op in COMPUTE_OPS and info(u).get("kind") in _RECOMPUTED:
            for w in u.all_input_nodes:
                read(w, at)
    for v in plan.graph.nodes:
        for u in v.all_input_nodes:
            read(u, order[v])
    nodes = list(plan.graph.nodes)
    done_after = {}
    for u, at in last.items():
        reader = nodes[at]
        if (reader.op in COMPUTE_OPS and info(reader).get("kind") not in _RECOMPUTED
                and u.op in (*COMPUTE_OPS, "placeholder") and info(u).get("kind") not in _RECOMPUTED):
            done_after.setdefault(reader, []).append(u)
    return done_after


def run_ticks(plan: Plan, stages, clip: torch.Tensor):
    """Outputs `[B, T, ...]` of ticks 0..T-1 after a reset, tick by tick through `stages`.

    The clip mode of a recurrent network (feedback, semantics §9): the tick functions from a
    zero state of their own, differentiable; outputs are stacked along time, values that are
    not tensors (sizes) taken once.
    """
    state = zero_state(plan, clip.shape[0], clip.device)
    outputs = []
    for t in range(clip.shape[1]):
        new_state, output = {}, None
        for stage in stages:
            out, written = stage(t, clip[:, t], state)
            new_state.update(written)
            if stage.stage == plan.parallel - 1:
                output = out
        state = new_state
        outputs.append(output)
    return tree_map(lambda *ys: torch.stack(ys, 1) if isinstance(ys[0], torch.Tensor) else ys[0], *outputs)
