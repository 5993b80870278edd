"""Training compiled video networks (semantics §8): exact BPTT, and Sideways depth-parallel.

`backward(net, clip, targets, loss_fn, rule=...)` adds one episode's gradient to every
parameter's `.grad`, as `Tensor.backward` does; `Stream` learns on a stream, one update per
tick (§8 rule 6).

Sideways (*Sideways* sec. 3.4; *Skip-Sideways*): at every tick each stage runs its tick
function forward and, at once, one vector–Jacobian product through what it just computed,
seeded with the gradients that reached it. Those gradients are state like the registers:
the gradient a stage computes at tick `t` for a register it read, `u_dk`, is the gradient
register `u_gk` of tick `t + 1`, which seeds what wrote `u_dk` then — `u` itself for `k = 1`,
the register chain's previous link `u_d(k-1)` otherwise. So a gradient crosses a delayed edge
forward in time by its delay (rule 2), a node that does not fire passes what reaches it on
to its next firing through its held register (rule 4), and an online shift's memory
gradient `s_gmem` seeds the memory's channels of the value the shift reads at the next tick.
Every stage's tick reads only the previous tick's values and gradients, so the stages of a
tick are independent and no activation outlives its tick: memory does not grow with the clip.

`code(net)` prints the generated training tick functions.
"""
from __future__ import annotations

import copy
import difflib
import functools
import math
import numbers
import operator
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map, tree_map_only

from .analysis import COMPUTE_OPS, info
from .lower import StageStep, run_clip, stage_graph, zero_state
from .passes.shift import is_shift
from .videonet import VideoNet

RULES = ("sideways", "bptt")


def grad_name(key: str) -> str:
    """The gradient register of a state key: `u_dk` -> `u_gk`, `s_mem` -> `s_gmem`."""
    if key.endswith("_mem"):
        return key[:-4] + "_gmem"
    node, _, depth = key.rpartition("_d")
    return f"{node}_g{depth}"


def _loss(loss_fn, output):
    """ℓ_t of this tick, or None when the tick is not in W (no loss function given)."""
    if loss_fn is None:
        return None
    loss = loss_fn(output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        what = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn returned {what}; it must return a floating-point scalar tensor "
                         f"(reduce it, e.g. with .mean())")
    return loss.reshape(())


def _activation(value, teacher, name: str):
    """A node's distillation term at this tick: weight/n_i · ‖â − a‖² per frame, averaged over the
    batch; None when the tick has no term (`teacher` is None outside W)."""
    if teacher is None:
        return None
    target, scale = teacher[name]
    return scale * (value - target).pow(2).sum() / value.shape[0]


def _total(*terms):
    """The sum of a stage's loss terms at this tick that exist (None if none does)."""
    terms = [t for t in terms if t is not None]
    return functools.reduce(operator.add, terms) if terms else None


def _vjp(roots: dict, seeds: dict, reads: dict, params: list):
    """One vector–Jacobian product of a stage's tick (semantics §8 rule 3).

    `roots` maps gradient-register names (and "loss") to the values they seed, `seeds` holds
    the gradient registers that reached the stage (a missing or None one is no gradient:
    rule 5), `reads` maps gradient-register names to the state the tick read. Returns the
    gradients for `reads` (None where nothing reached them) and for `params`.
    """
    outputs, grads, kept = [], [], {}
    for name, value in roots.items():
        seed = (None if value is None else torch.ones_like(value)) if name == "loss" else seeds.get(name)
        if seed is None:
            continue
        if value is None:  # a shift's input that has not fired since: its memory gradient waits (rule 4)
            kept[name] = seed
        elif value.requires_grad:
            outputs.append(value)
            grads.append(seed)
    wrt = [(name, t) for name, t in reads.items() if t.requires_grad]
    if not outputs:
        return kept, [None] * len(params)
    found = torch.autograd.grad(outputs, [t for _, t in wrt] + list(params), grads, allow_unused=True)
    back = {name: g for (name, _), g in zip(wrt, found) if g is not None}
    for name, g in kept.items():
        back[name] = g + back[name] if name in back else g
    return back, list(found[len(wrt):])


class _TrainStep:
    """A stage's training tick functions: the forward of `StageStep`, its loss terms, one VJP.

    `nodes`: the stage's nodes distilled (`Distill`), each with a local loss term at the ticks it fires."""

    def __init__(self, step: StageStep, root, last: bool, nodes=frozenset()):
        self.step, self.last = step, last
        self.variants = [_train_module(_keeping(step, root, i, gm, nodes), root, last, nodes)
                         for i, gm in enumerate(step.training_variants)]
        params = {}
        for gm in self.variants:
            for n in gm.graph.nodes:
                tensors = []
                if n.op == "call_module":
                    tensors = gm.get_submodule(n.target).parameters()
                elif n.op == "get_attr":
                    obj = gm
                    for part in n.target.split("."):
                        obj = getattr(obj, part)
                    tensors = [obj] if isinstance(obj, torch.nn.Parameter) else []
                for p in tensors:
                    if p.requires_grad:
                        params.setdefault(id(p), p)
        self.params = list(params.values())
        # Seeds that land on a node of this stage (its own registers `u_d1` and shift taps), as
        # opposed to register-chain links: the first such gradient starts the stage's count (rule 5).
        self.reaching = {grad_name(k) for k in step.writes if k.endswith("_d1") or k.endswith("_mem")}
        # A variant generated again for a distilled node (`_keeping`) may read state no other one reads.
        self.reads = step.reads | {n.args[1] for gm in self.variants for n in gm.graph.nodes
                                   if n.op == "call_function" and n.target is operator.getitem
                                   and n.args[0].op == "placeholder" and n.args[0].target == "state"}

    def __call__(self, tick: int, frame, state: dict, grads: dict, loss_fn, teacher=None):
        leaves = {k: state[k].detach().requires_grad_(state[k].is_floating_point()) for k in self.reads}
        gm = self.variants[self.step.index(tick)]
        output, written, loss, (back, param_grads) = gm(frame, leaves, grads, self.params, loss_fn, teacher)
        reached = loss is not None or any(grads.get(g) is not None for g in self.reaching)
        written = {k: v.detach() for k, v in written.items()}
        if output is not None:
            output = tree_map_only(torch.Tensor, torch.Tensor.detach, output)
        return output, written, None if loss is None else loss.detach(), back, param_grads, reached

    def code(self) -> str:
        return "\n".join(f"# stage {self.step.stage}, {self.step.when(i)}: forward, then one vector-Jacobian "
                         f"product (Sideways, semantics §8)\n{gm.code.strip()}\n"
                         for i, gm in enumerate(self.variants))


def _keeping(step: StageStep, root, i: int, forward: fx.GraphModule, nodes) -> fx.GraphModule:
    """Variant `i`'s training forward, computing every distilled node that fires in it.

    A firing whose value nobody reads at that tick is dead code in the tick function, but it
    still has a distillation term (the node fired, §3); that variant is generated again with
    those nodes kept."""
    if not nodes:
        return forward
    plan = root.plan
    fires = frozenset(nodes) & step.fires[i]
    missing = fires - {n.name for n in forward.graph.nodes}
    if not missing:
        return forward
    graph = stage_graph(plan, root, step.stage, step.fires[i], taps=True, filling=step.filling[i])
    gm = fx.GraphModule(root, graph, f"Stage{step.stage}TrainTick")
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.name in missing or n.is_impure())
    gm.recompile()
    return gm


def _train_module(forward: fx.GraphModule, root, last: bool, nodes=frozenset()) -> fx.GraphModule:
    """`forward` (a tick function with taps) followed by the loss terms and `_vjp`.

    The stage's loss is the task and output terms (last stage) plus the distillation terms of
    its own nodes that fire in this variant: one root of the tick's one VJP (§8 rule 3)."""
    g = fx.Graph()
    frame, state, grads, params, loss_fn, teacher = (
        g.placeholder(n) for n in ("frame", "state", "grads", "params", "loss_fn", "teacher"))
    env, reads = {}, {}
    for n in forward.graph.nodes:
        if n.op == "placeholder":
            env[n] = frame if n.target == "frame" else state
        elif n.op == "output":
            output, new_state, taps = fx.map_arg(n.args[0], env.__getitem__)
        else:
            env[n] = g.node_copy(n, env.__getitem__)
            if n.op == "call_function" and n.target is operator.getitem and n.args[0].op == "placeholder" \
                    and n.args[0].target == "state":
                reads[grad_name(n.args[1])] = env[n]
    roots = {grad_name(k): v for k, v in new_state.items() if k not in taps}
    roots |= {grad_name(k): v for k, v in taps.items()}
    terms = []
    if last:
        terms.append(g.call_function(_loss, (loss_fn, output)))
        terms[-1]._rename("task")
    fired = {n.name: env[n] for n in forward.graph.nodes if n.name in nodes and n.op != "placeholder"}
    for name in sorted(fired):
        terms.append(g.call_function(_activation, (fired[name], teacher, name)))
        terms[-1]._rename(f"distill_{name}")
    loss = None
    if len(terms) == 1 and last:
        loss = terms[0]
        loss._rename("loss")
    elif terms:
        loss = g.call_function(_total, tuple(terms))
        loss._rename("loss")
    if loss is not None:
        roots["loss"] = loss
    vjp = g.call_function(_vjp, (roots, grads, reads, params))
    vjp._rename("vjp")
    g.output((output, new_state, loss, vjp))
    gm = fx.GraphModule(root, g, type(forward).__name__)
    gm.recompile()
    return gm


def code(net: VideoNet, distill=None) -> str:
    """The generated Sideways training tick functions of every stage, as Python (with `distill`,
    the distilled nodes' local loss terms in them)."""
    _check_sideways(net)
    _check_distill(net, distill)
    return "\n".join(s.code() for s in _steps(net, () if distill is None else distill.nodes))


def _steps(net: VideoNet, nodes=()) -> list:
    """The training steps of `net` for a set of distilled nodes, made once per set."""
    cache = getattr(net, "_train_steps", None)
    if cache is None or cache[0] is not net._stages:
        cache = (net._stages, {})
        object.__setattr__(net, "_train_steps", cache)  # not a submodule: nn.Module must not register it
    key = frozenset(nodes)
    if key not in cache[1]:
        last, stage_of = net.plan.parallel - 1, net.plan.stage_of
        cache[1][key] = [_TrainStep(s, net, s.stage == last, frozenset(n for n in key if stage_of[n] == s.stage))
                         for s in net._stages]
    return cache[1][key]


class _Pool:
    """Worker threads that run groups of stages at once, `threads` intra-op threads each.

    torch's intra-op thread count is per thread, but `torch.set_num_threads` also sets the
    process default that a thread copies on its first parallel op; each worker sets its own
    and reads it back while the default is still its count, then the caller's is put back.
    """

    def __init__(self, groups, threads: int):
        self.groups = groups
        self._pool = ThreadPoolExecutor(len(groups), "pipecomp-train")
        started = threading.Barrier(len(groups) + 1)

        def init():
            torch.set_num_threads(threads)
            torch.get_num_threads()
            started.wait()
        default = torch.get_num_threads()
        waits = [self._pool.submit(init) for _ in groups]
        started.wait()
        for w in waits:
            w.result()
        torch.set_num_threads(default)

    def submit(self, fn, *args):
        """`fn(*args)` on a worker, waited for: the other workers wait meanwhile."""
        return self._pool.submit(fn, *args).result()

    def map(self, fn):
        """`fn(group)` for every group at once; the first failure is raised once all have ended."""
        futures = [self._pool.submit(fn, g) for g in self.groups]
        results, error = [], None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:  # wait for the others: none may still run when the caller goes on
                error = error or e
        if error is not None:
            raise error
        return results

    def close(self):
        self._pool.shutdown(wait=True)


class _Sideways:
    """The Sideways state of one stream: values, gradient registers, tick, per-stage sums."""

    def __init__(self, net: VideoNet, workers=None, stages=None, nodes=()):
        _check_sideways(net)
        self.net, self.steps = net, _steps(net, nodes)
        self.mine = list(range(len(self.steps)) if stages is None else stages)  # the stages this one runs
        self.pool = None
        if workers is not None:
            placement = _placement(net, workers)
            self.pool = _Pool(placement.groups, placement.threads_per_worker)
        self.reset()

    def reset(self):
        self.state, self.grads, self.tick = None, {}, 0
        self.first = [None] * len(self.steps)

    def step(self, frame, loss_fn, teacher=None):
        """One tick of the stages this one runs; returns (output, loss, their parameter gradients).

        `teacher` maps distilled nodes to (the teacher's activation, weight / n_i) at this tick
        (None: no distillation term). The loss is the sum of those stages' terms. The new state
        and gradient registers are what those stages wrote and computed; where other processes
        run the other stages, they exchange them before the next tick."""
        state = self.state if self.state is not None else zero_state(self.net.plan, frame.shape[0], frame.device)

        def run(group):
            return [self.steps[s](self.tick, frame, state, self.grads, loss_fn if self.steps[s].last else None,
                                  teacher) for s in group]
        groups = self.pool.map(run) if self.pool is not None else [run(self.mine)]
        new_state, grads, output, loss, per_stage = {}, {}, None, None, []
        for results in groups:
            for out, written, l, back, param_grads, reached in results:
                new_state.update(written)
                for name, g in back.items():
                    grads[name] = g if name not in grads else grads[name] + g
                per_stage.append((param_grads, reached))
                output = out if out is not None else output
                loss = _total(loss, l)
        for s, (_, reached) in zip(self.mine, per_stage):
            if reached and self.first[s] is None:
                self.first[s] = self.tick
        self.state, self.grads, self.tick = new_state, grads, self.tick + 1
        return output, loss, [g for g, _ in per_stage]

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def _check_sideways(net):
    if not isinstance(net, VideoNet):
        raise TypeError(f"training takes the VideoNet that pipecomp.compile returns, got {type(net).__name__}")
    if net.plan.shift == "offline":
        raise ValueError("offline (bi-directional) shift reads future frames, so it has no tick functions to train "
                         "depth-parallel: use rule='bptt', or compile with shift='online'")


def _check_distill(net, distill):
    if distill is not None and not isinstance(distill, Distill):
        raise TypeError(f"distill must be a train.Distill, got {type(distill).__name__}")
    if distill is not None and distill.net is not net:
        raise ValueError("this Distill was made for another network: make one with Distill(net, ...) for this net")


def _check_episode(net, clip, targets, loss_fn, rule, ticks, prediction_latency, distill=None):
    """Everything about an episode's arguments, checked before any state or `.grad` changes."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {', '.join(map(repr, RULES))}")
    if not isinstance(net, VideoNet):
        raise TypeError(f"training takes the VideoNet that pipecomp.compile returns, got {type(net).__name__}")
    net._check_clip(clip)
    _check_distill(net, distill)
    B, T = clip.shape[:2]
    if loss_fn is None and targets is None:
        if distill is None:
            raise ValueError("no loss_fn and no targets: give a loss_fn (output_t, target_t) -> scalar with "
                             "targets, or distill=train.Distill(net, ...) to learn from the teacher alone")
    elif loss_fn is None or targets is None:
        given, missing = ("targets", "loss_fn") if loss_fn is None else ("loss_fn", "targets")
        raise ValueError(f"{given} given but {missing} is None: the task loss needs both (or neither, with distill=)")
    else:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable (output_t, target_t) -> scalar, got "
                            f"{type(loss_fn).__name__}")
        leaves = [t for t in tree_flatten(targets)[0]]
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise TypeError("targets must be a tensor [B, T, ...] (or a structure of them), one target per frame")
        for t in leaves:
            if t.dim() < 2 or tuple(t.shape[:2]) != (B, T):
                raise ValueError(f"targets have shape {list(t.shape)}, but the clip is [B={B}, T={T}, ...]: give "
                                 f"one target per frame, [B, T, ...]")
    if rule == "bptt" and distill is not None and distill.nodes and net.plan.feedback:
        raise ValueError("with feedback= a clip runs tick by tick through the tick functions, which hand back no "
                         "inner node: with rule='bptt' distil outputs only (nodes=()), or use rule='sideways'")
    p = prediction_latency
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or not 0 <= p < T:
        raise ValueError(f"prediction_latency={p!r} must be an integer in 0..{T - 1} (the clip has {T} frames)")
    if rule == "sideways":
        _check_sideways(net)
    if ticks is None:
        reached = net.timeline(T).output
        ticks = [t for t in range(p, T) if reached[t] is not None]
        if not ticks:
            raise ValueError(f"no output of this {T}-frame clip depends on a frame after the prediction latency "
                             f"{p} (the first that does is later): use a longer clip")
    else:
        ticks = sorted(set(ticks))
        bad = [t for t in ticks if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not p <= t < T]
        if bad or not ticks:
            raise ValueError(f"ticks {bad or '[]'} are not ticks of this clip: W must be a non-empty set of ticks "
                             f"in {p}..{T - 1} (the clip has {T} frames; ticks before the prediction latency "
                             f"{p} have no target)")
    return ticks


def backward(net: VideoNet, clip: torch.Tensor, targets, loss_fn, *, rule: str = "sideways", ticks=None,
             prediction_latency: int = 0, workers=None, distill=None) -> torch.Tensor:
    """One training episode (semantics §8): adds its gradient to every parameter's `.grad`.

    `clip` `[B, T, C, H, W]`, `targets` `[B, T, ...]` (or a structure of them), `loss_fn(output_t,
    target) -> scalar`. The output of tick `t` is trained towards the target of frame
    `t - prediction_latency`, over the ticks `ticks` (W; default: those whose output depends on
    a frame). `rule="bptt"`: the exact gradient of the mean loss over W through `net(clip)`;
    `rule="sideways"`: depth-parallel pseudo-gradients, each stage's summed over its ticks and
    divided by how many it counted. `workers` (a count or a `Placement`) runs the stages of a
    tick on that many threads at once. `distill` (a `Distill`) adds its terms to every tick's
    loss, the teacher on frame `t - prediction_latency` too; with it, `targets` and `loss_fn`
    may both be None (no labels). Returns the per-tick total losses `[T]`, NaN outside W.
    Leaves the streaming state of `step` alone; a rejected call changes no `.grad`.
    """
    W = _check_episode(net, clip, targets, loss_fn, rule, ticks, prediction_latency, distill)
    B, T = clip.shape[:2]
    p = prediction_latency
    losses = torch.full((T,), math.nan)
    if rule == "bptt":
        teacher = None
        if distill is not None:
            teacher = tree_map_only(torch.Tensor, lambda y: y.view(B, T, *y.shape[1:]),
                                    distill._run(clip.flatten(0, 1)))
        nodes = () if distill is None else distill.nodes
        fires = {n: {t for t in W if t % net.plan.period_of[n] == net.plan.phase_of[n]} for n in nodes}

        def mean_loss(outputs, probes):
            terms = []
            for t in W:
                frame = (lambda y, t=t: y[:, t - p])
                out = tree_map_only(torch.Tensor, lambda y: y[:, t], outputs)
                fn = _tick_loss(loss_fn, None if targets is None else tree_map(frame, targets), distill,
                                None if teacher is None else tree_map_only(torch.Tensor, frame, teacher[0]))
                acts = {n: (a[:, t - p], w) for n, (a, w) in teacher[1].items()} if teacher is not None else None
                total = _total(_loss(fn, out), *(_activation(probes[n][:, t], acts, n) for n in nodes
                                                 if t in fires[n]))
                terms.append(clip.new_zeros(()) if total is None else total)  # no term fired: 0
                losses[t] = terms[-1].detach()
            return torch.stack(terms).mean()
        probes = dict.fromkeys(nodes)
        if workers is None:
            outputs = run_clip(net.plan, net, clip, probes=probes) if probes else net(clip)
            loss = mean_loss(outputs, probes)
            if loss.requires_grad:  # else no term of W reached a parameter: nothing to add
                loss.backward()
        else:
            _model_parallel_bptt(net, clip, mean_loss, workers, probes)
        return losses
    trainer = _Sideways(net, workers, nodes=() if distill is None else distill.nodes)
    try:
        episode(trainer, clip, targets, loss_fn, W, p, losses, distill=distill)
    finally:
        trainer.close()
    return losses


def _tick_loss(loss_fn, target, distill, teacher_output):
    """The last stage's loss function of a tick in W: the task term plus the output term."""
    out = None if distill is None else distill._output_term(loss_fn is not None)

    def fn(output):
        task = None if loss_fn is None else _loss(lambda o: loss_fn(o, target), output)
        return _total(task, None if out is None else _loss(lambda o: out(o, teacher_output), output))
    return fn if loss_fn is not None or out is not None else None


def _model_parallel_bptt(net, clip, mean_loss, workers, probes) -> None:
    """BPTT with the stage groups on workers, each waiting for the others (the papers' BP baseline).

    Group by group, each on a worker thread, computes its nodes over the whole clip (`run_clip`)
    on detached copies of what earlier groups computed; then, in reverse order, each propagates
    back from its own results, seeded with the gradients the later groups left on those copies
    (distilled nodes' series in `probes` are read in the last group, through those copies too).
    """
    placement = _placement(net, workers)
    groups = placement.groups
    pool = _Pool(groups, placement.threads_per_worker)
    plan, env, copies = net.plan, {}, []  # copies: (group of the producer, its value, the detached copy)
    try:
        outputs = None
        for group in groups:
            for u, (value, clock) in list(env.items()):
                if isinstance(value, torch.Tensor) and value.requires_grad and not value.is_leaf:
                    leaf = value.detach().requires_grad_()
                    env[u] = (leaf, clock)
                    copies.append((_group_of(groups, plan.stage_of[u.name]), value, leaf))
            out = pool.submit(run_clip, plan, net, clip, env, set(group), probes)
            outputs = out if out is not None else outputs
        roots = {len(groups) - 1: [(pool.submit(mean_loss, outputs, probes), None)]}
        for g in reversed(range(len(groups))):
            mine = [(v, torch.ones_like(v) if s is None else s) for v, s in roots.get(g, []) if v.requires_grad]
            if mine:
                pool.submit(torch.autograd.backward, [v for v, _ in mine], [s for _, s in mine])
            for owner, value, leaf in copies:  # the later groups are done: their gradients are all on the copies
                if owner == g - 1 and leaf.grad is not None:
                    roots.setdefault(owner, []).append((value, leaf.grad))
    finally:
        pool.close()


def _group_of(groups, stage: int) -> int:
    return next(i for i, g in enumerate(groups) if stage in g)


def _placement(net, workers):
    from .schedule import Placement, schedule
    placement = workers if isinstance(workers, Placement) else schedule(net, workers)
    if any(torch.device(d).type != "cpu" for d in placement.devices):
        raise ValueError(f"training runs every stage on the net's own device, so workers must be CPU threads, "
                         f"not {placement.devices}")
    return placement


def episode(trainer: _Sideways, clip, targets, loss_fn, W, p: int, losses, exchange=None, distill=None) -> None:
    """A Sideways episode on `trainer`'s stages from a fresh state: the episode gradient added to `.grad`.

    `exchange()`, if given, runs after every tick (the multi-process backend's swap of registers
    and gradient registers with the other ranks). With `distill`, the teacher runs on each frame
    before the stages, when a tick of W will use it (`p` ticks later)."""
    T, inside = clip.shape[1], set(W)
    trainer.reset()
    sums = {s: [None] * len(trainer.steps[s].params) for s in trainer.mine}
    taught = {}  # frame -> the teacher's (output, activations) on it, until its tick uses it
    for t in range(T):
        if distill is not None and t + p in inside:
            taught[t] = distill._run(clip[:, t])
        fn, acts = None, None
        if t in inside:
            target = None if targets is None else tree_map(lambda y: y[:, t - p], targets)
            output, acts = taught.pop(t - p) if distill is not None else (None, None)
            fn = _tick_loss(loss_fn, target, distill, output)
        _, loss, grads = trainer.step(clip[:, t], fn, acts)
        if exchange is not None:
            exchange()
        if loss is not None or t in inside:
            losses[t] = 0.0 if loss is None else loss  # a tick of W where no term fired (distillation only) has 0
        for s, gs in zip(trainer.mine, grads):
            for i, g in enumerate(gs):
                if g is not None:
                    sums[s][i] = g if sums[s][i] is None else sums[s][i] + g
    for s, acc in sums.items():
        if trainer.first[s] is None:
            continue
        counted = T - trainer.first[s]
        for param, g in zip(trainer.steps[s].params, acc):
            if g is not None:
                _add_grad(param, g / counted)


def _add_grad(param, g):
    if param.grad is None:
        param.grad = g.clone()
    else:
        param.grad += g


OUTPUTS = ("auto", "kl", "mse")


class Distill:
    """Sequential-to-parallel distillation (*Massively Parallel Video Networks* sec. 3.3).

    Given to `backward(..., distill=d)`, the loss of tick `t` in W becomes

        task(output_t, target of frame t-p) + out(output_t, teacher's output on frame t-p)
            + weight · Σ_i ‖â_i − a_i‖² / n_i

    over the distilled `nodes` i that fire at `t` (a clocked node that holds its value does no
    computation, so has no term then): `a_i` is the node's value at tick `t`, `â_i` the
    teacher's on frame `t - p` (p = `prediction_latency`), `n_i` its channel count (dim 1), and
    ‖·‖² the sum of squares over one frame's values, averaged over the batch (a tick of W with
    no term at all counts with loss 0). The task term needs `loss_fn` and targets; without them
    only the teacher trains the net.

    `nodes`: fx node names of the compiled net, or module qualified names (a module stands for
    its output: the last node traced inside it). `outputs`: the output term — "kl" (Hinton's
    temperature-scaled KL divergence from the teacher's softmax over dim 1, for logits), "mse",
    a callable `(output_t, teacher_output) -> scalar`, None (no term), or "auto" (the default:
    "kl" when `backward` has no task loss, none otherwise).

    `teacher`: None (default) is a frozen snapshot of the image model as `net` holds it now
    (its own graph, without delays, clocks, shifts or added connections), so training the net
    leaves it as it is. A module (say the pretrained sequential model) is snapshotted too and
    called on frames; its activations are those of its submodules with the names of the
    distilled nodes' modules (give module names then). Either runs in eval mode, once per
    frame, without gradients, on the device it is on when `Distill` is made (move the net
    first). With Sideways each node's term is a local loss of its own stage at that tick: no
    stage waits for it (semantics §8 rules 3 and 5).
    """

    def __init__(self, net: VideoNet, nodes=(), *, weight: float = 1.0, outputs="auto", temperature: float = 1.0,
                 teacher=None):
        if not isinstance(net, VideoNet):
            raise TypeError(f"Distill takes the VideoNet that pipecomp.compile returns, got {type(net).__name__}")
        if isinstance(nodes, str):
            nodes = [nodes]
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not weight >= 0:
            raise ValueError(f"weight={weight!r} must be a number >= 0 (λ, the weight of the activation terms)")
        if not (outputs is None or callable(outputs) or outputs in OUTPUTS):
            raise ValueError(f"outputs={outputs!r} must be one of {', '.join(map(repr, OUTPUTS))}, None, or a "
                             f"callable (output_t, teacher_output) -> scalar")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be a number > 0")
        if teacher is not None and not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"teacher must be an nn.Module or None (the image model itself), got "
                            f"{type(teacher).__name__}")
        self.net, self.weight, self.outputs, self.temperature = net, float(weight), outputs, float(temperature)
        self.nodes = tuple(dict.fromkeys(_node_named(net, n, teacher is None) for n in nodes))
        if not self.nodes and outputs is None:
            raise ValueError("Distill with no nodes and outputs=None distils nothing: name nodes to match, or "
                             "give an output term (outputs='kl' or 'mse')")
        self._scale = {n: self.weight / info(net.plan.node(n))["shape"][1] for n in self.nodes}
        self._teacher = _snapshot(net, self.nodes) if teacher is None else _Hooked(net, teacher, self.nodes)

    def _output_term(self, task: bool):
        """The output term's function (student, teacher) -> scalar, or None."""
        how = ("kl" if not task else None) if self.outputs == "auto" else self.outputs
        if how is None or callable(how):
            return how
        return functools.partial(_kl, temperature=self.temperature) if how == "kl" else _mse

    def _run(self, frames):
        """The teacher on `frames` [N, C, H, W]: (its output, {node: (activation, weight / n_i)})."""
        with torch.no_grad():
            output, acts = self._teacher(frames)
        for name, a in acts.items():
            want = list(info(self.net.plan.node(name))["shape"][1:])
            if not isinstance(a, torch.Tensor) or list(a.shape[1:]) != want:
                got = f"[N, {', '.join(map(str, a.shape[1:]))}]" if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"the teacher's activation for node '{name}' is {got}, but the net's is "
                                 f"[N, {', '.join(map(str, want))}]: give a teacher of the same architecture")
        return output, {n: (a, self._scale[n]) for n, a in acts.items()}


def _node_named(net, name, own: bool) -> str:
    """The fx node of the net that `name` (an fx node name or a module qualified name) stands for."""
    plan = net.plan
    if not isinstance(name, str):
        raise TypeError(f"nodes must be fx node names or module qualified names, got {type(name).__name__}")
    foreign = set(plan.added_nodes) | set(plan.shift_nodes)
    node = next((n for n in plan.graph.nodes if n.name == name), None)
    if node is None:
        inside = [n for n in plan.graph.nodes if n.name not in foreign and (
            n.op == "call_module" and n.target == name
            or any(q == name for q, _ in (n.meta.get("nn_module_stack") or {}).values()))]
        node = inside[-1] if inside else None
    if node is None:
        known = [n.name for n in plan.graph.nodes] + [n.target for n in plan.graph.nodes if n.op == "call_module"]
        close = difflib.get_close_matches(name, known, 5, 0.5)
        raise ValueError(f"the compiled net has no node or module '{name}'"
                         + (f"; close names: {', '.join(close)}" if close else "; see net.plan.graph for names"))
    meta = info(node)
    if node.op not in COMPUTE_OPS or meta.get("kind") != "tensor" or len(meta.get("shape", ())) < 2:
        raise ValueError(f"node '{node.name}' does not make a feature tensor [B, C, ...] (it makes "
                         f"{meta.get('kind', node.op)}); distil a node whose value has channels on dim 1")
    if own and node.name in foreign:
        raise ValueError(f"node '{node.name}' was added by compile (a shift or an added connection), so the image "
                         f"model, the teacher, has no such node; distil the node it reads, '{node.args[0].name}'")
    if not own and node.op != "call_module":
        raise ValueError(f"node '{node.name}' is no module's output, so a teacher module cannot give it; "
                         f"name modules, or leave teacher=None (the image model itself)")
    return node.name


def _snapshot(net, nodes) -> fx.GraphModule:
    """The image model as `net` holds it, frozen: its graph with every shift and added connection
    taken out (an added sum stands for the value it adds to), returning (output, {node: value})."""
    plan, g, env = net.plan, fx.Graph(), {}
    added = set(plan.added_nodes)
    for n in plan.graph.nodes:
        if n.op == "output":
            g.output((fx.map_arg(n.args[0], env.__getitem__), {name: env[plan.node(name)] for name in nodes}))
        elif is_shift(n) or n.name in added and n.op == "call_function" and n.target is operator.add:
            env[n] = env[n.args[0]]
        elif n.name not in added:
            env[n] = g.node_copy(n, env.__getitem__)
    targets = {n.target for n in g.nodes if n.op in ("call_module", "get_attr")}
    root = copy.deepcopy({t: functools.reduce(getattr, t.split("."), net) for t in targets})
    teacher = fx.GraphModule(root, g, "Teacher")
    teacher.graph.eliminate_dead_code()
    teacher.recompile()
    return teacher.eval().requires_grad_(False)


class _Hooked:
    """A teacher module, frozen, with its activations read at the modules of the distilled nodes."""

    def __init__(self, net, teacher, nodes):
        self.module = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.seen = {}
        for name in nodes:
            target = net.plan.node(name).target
            try:
                sub = self.module.get_submodule(target)
            except AttributeError:
                raise ValueError(f"the teacher ({type(teacher).__name__}) has no module '{target}' for node "
                                 f"'{name}'; give a teacher of the net's architecture, or distil outputs only "
                                 f"(nodes=())") from None
            sub.register_forward_hook(lambda m, args, out, name=name: self.seen.__setitem__(name, out))

    def __call__(self, frames):
        self.seen = {}
        output = self.module(frames)
        return output, dict(self.seen)


def _kl(student, teacher, temperature):
    """Hinton's distillation term: τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ)) over dim 1, per frame."""
    total = 0
    for s, t in zip(*(_leaves(o, "outputs='kl'") for o in (student, teacher))):
        if s.dim() < 2:
            raise ValueError(f"outputs='kl' needs logits [B, K, ...], got a tensor of shape {list(s.shape)}; "
                             f"use outputs='mse' or a callable")
        s, t = F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1)
        total = total + F.kl_div(s, t, reduction="sum", log_target=True) * temperature ** 2 / s.shape[0]
    return total


def _mse(student, teacher):
    """The mean squared difference of every output tensor from the teacher's, summed over tensors."""
    pairs = zip(*(_leaves(o, "outputs='mse'") for o in (student, teacher)))
    return sum(F.mse_loss(s, t) for s, t in pairs)


def _leaves(output, what):
    leaves = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError(f"{what} needs floating-point tensor outputs; give outputs a callable")
    return leaves


class Stream:
    """Learning on a stream (semantics §8 rule 6): every `step` adds that tick's pseudo-gradient to `.grad`.

    The output of tick `t` is trained towards the target given with frame `t - prediction_latency`,
    from the first tick whose output depends on a frame; gradient state carries over ticks until
    `reset()`. The caller's optimizer steps whenever it likes. `workers` as for `backward`;
    `distill` (a `Distill`) as for `backward`, the teacher on frame `t - prediction_latency` too
    (then `loss_fn` may be None, and `step` takes no target). Leaves the streaming state of
    `net.step` alone. Close it, or use it as a context manager.
    """

    def __init__(self, net: VideoNet, loss_fn, *, prediction_latency: int = 0, workers=None, distill=None):
        if loss_fn is None and distill is None:
            raise ValueError("loss_fn is None: give a loss_fn (output_t, target_t) -> scalar, or "
                             "distill=train.Distill(net, ...) to learn from the teacher alone")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable (output_t, target_t) -> scalar, got {type(loss_fn).__name__}")
        p = prediction_latency
        if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 0:
            raise ValueError(f"prediction_latency={p!r} must be an integer >= 0")
        _check_sideways(net)
        _check_distill(net, distill)
        self.net, self.loss_fn, self.prediction_latency, self.distill = net, loss_fn, p, distill
        self._first = _first_output_tick(net)
        self._sideways = _Sideways(net, workers, nodes=() if distill is None else distill.nodes)
        self._targets, self._taught = [], []
        self._batch = None

    def reset(self) -> None:
        """A new video: values, gradient registers and pending targets back to empty."""
        self._sideways.reset()
        self._targets, self._taught, self._batch = [], [], None

    def step(self, frame: torch.Tensor, target=None):
        """One tick on `frame`; adds its pseudo-gradient to `.grad` and returns the output."""
        net = self.net
        net._check_input(frame)
        if self._batch is not None and frame.shape[0] != self._batch:
            raise ValueError(f"frame has batch size {frame.shape[0]}, but this stream started with {self._batch}; "
                             f"call reset() to start a stream of another batch size")
        if (target is None) != (self.loss_fn is None):
            raise ValueError("this stream has a loss_fn, so step() needs the frame's target" if target is None else
                             "this stream has no loss_fn (it learns from its teacher), so step() takes no target")
        for t in tree_flatten(target)[0] if target is not None else ():
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != frame.shape[0]:
                raise ValueError(f"target must be a tensor [B, ...] for the frame's batch of {frame.shape[0]}, got "
                                 f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        tick, p = self._sideways.tick, self.prediction_latency
        pending = (self._targets + [target])[-(p + 1):]
        taught = (self._taught + [self.distill._run(frame)])[-(p + 1):] if self.distill is not None else []
        fn, acts = None, None
        if tick >= max(p, self._first):
            output, acts = taught[0] if taught else (None, None)
            fn = _tick_loss(self.loss_fn, pending[0], self.distill, output)
        output, _, grads = self._sideways.step(frame, fn, acts)
        self._targets, self._taught, self._batch = pending, taught, frame.shape[0]
        for step, gs in zip(self._sideways.steps, grads):
            for param, g in zip(step.params, gs):
                if g is not None:
                    _add_grad(param, g)
        return output

    def close(self) -> None:
        self._sideways.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _first_output_tick(net) -> int:
    """The first tick whose output depends on a frame (outputs hold their value after it)."""
    ticks = net.latency + 1
    while True:
        output = net.timeline(ticks).output
        first = next((t for t, f in enumerate(output) if f is not None), None)
        if first is not None:
            return first
        if ticks > 4 * (net.plan.hyperperiod + net.plan.parallel + net.latency):
            raise ValueError("no output of this network ever depends on a frame; there is nothing to train")
        ticks *= 2


__all__ = ["backward", "Distill", "Stream", "code", "RULES", "OUTPUTS"]
