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

import math
import numbers
import operator
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map, tree_map_only

from .lower import StageStep, zero_state
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
    """A stage's training tick functions: the forward of `StageStep`, its loss, one VJP."""

    def __init__(self, step: StageStep, root, last: bool):
        self.step, self.last = step, last
        self.variants = [_train_module(gm, root, last) for gm in step.training_variants]
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

    def __call__(self, tick: int, frame, state: dict, grads: dict, loss_fn):
        leaves = {k: state[k].detach().requires_grad_(state[k].is_floating_point()) for k in self.step.reads}
        gm = self.variants[self.step.index(tick)]
        output, written, loss, (back, param_grads) = gm(frame, leaves, grads, self.params, loss_fn)
        reached = loss is not None or any(grads.get(g) is not None for g in self.reaching)
        written = {k: v.detach() for k, v in written.items()}
        if output is not None:
            output = tree_map_only(torch.Tensor, torch.Tensor.detach, output)
        return output, written, None if loss is None else loss.detach(), back, param_grads, reached

    def code(self) -> str:
        return "\n".join(f"# stage {self.step.stage}, {self.step.when(i)}: forward, then one vector-Jacobian "
                         f"product (Sideways, semantics §8)\n{gm.code.strip()}\n"
                         for i, gm in enumerate(self.variants))


def _train_module(forward: fx.GraphModule, root, last: bool) -> fx.GraphModule:
    """`forward` (a tick function with taps) followed by the loss (last stage) and `_vjp`."""
    g = fx.Graph()
    frame, state, grads, params, loss_fn = (g.placeholder(n) for n in ("frame", "state", "grads", "params",
                                                                          "loss_fn"))
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
    loss = None
    if last:
        loss = g.call_function(_loss, (loss_fn, output))
        loss._rename("loss")
        roots["loss"] = loss
    vjp = g.call_function(_vjp, (roots, grads, reads, params))
    vjp._rename("vjp")
    g.output((output, new_state, loss, vjp))
    gm = fx.GraphModule(root, g, type(forward).__name__)
    gm.recompile()
    return gm


def code(net: VideoNet) -> str:
    """The generated Sideways training tick functions of every stage, as Python."""
    _check_sideways(net)
    return "\n".join(s.code() for s in _steps(net))


def _steps(net: VideoNet) -> list:
    steps = getattr(net, "_train_steps", None)
    if steps is None or steps[0] is not net._stages:
        steps = (net._stages, [_TrainStep(s, net, s.stage == net.plan.parallel - 1) for s in net._stages])
        object.__setattr__(net, "_train_steps", steps)  # not a submodule: nn.Module must not register it
    return steps[1]


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

    def __init__(self, net: VideoNet, workers=None, stages=None):
        _check_sideways(net)
        self.net, self.steps = net, _steps(net)
        self.mine = list(range(len(self.steps)) if stages is None else stages)  # the stages this one runs
        self.pool = None
        if workers is not None:
            placement = _placement(net, workers)
            self.pool = _Pool(placement.groups, placement.threads_per_worker)
        self.reset()

    def reset(self):
        self.state, self.grads, self.tick = None, {}, 0
        self.first = [None] * len(self.steps)

    def step(self, frame, loss_fn):
        """One tick of the stages this one runs; returns (output, loss, their parameter gradients).

        The new state and gradient registers are what those stages wrote and computed; where
        other processes run the other stages, they exchange them before the next tick."""
        state = self.state if self.state is not None else zero_state(self.net.plan, frame.shape[0], frame.device)

        def run(group):
            return [self.steps[s](self.tick, frame, state, self.grads, loss_fn if self.steps[s].last else None)
                    for s in group]
        groups = self.pool.map(run) if self.pool is not None else [run(self.mine)]
        new_state, grads, output, loss, per_stage = {}, {}, None, None, []
        for results in groups:
            for out, written, l, back, param_grads, reached in results:
                new_state.update(written)
                for name, g in back.items():
                    grads[name] = g if name not in grads else grads[name] + g
                per_stage.append((param_grads, reached))
                output, loss = (out, l) if out is not None or l is not None else (output, loss)
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


def _check_episode(net, clip, targets, loss_fn, rule, ticks, prediction_latency):
    """Everything about an episode's arguments, checked before any state or `.grad` changes."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {', '.join(map(repr, RULES))}")
    if not isinstance(net, VideoNet):
        raise TypeError(f"training takes the VideoNet that pipecomp.compile returns, got {type(net).__name__}")
    net._check_clip(clip)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (output_t, target_t) -> scalar, got {type(loss_fn).__name__}")
    B, T = clip.shape[:2]
    leaves = [t for t in tree_flatten(targets)[0]]
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError("targets must be a tensor [B, T, ...] (or a structure of them), one target per frame")
    for t in leaves:
        if t.dim() < 2 or tuple(t.shape[:2]) != (B, T):
            raise ValueError(f"targets have shape {list(t.shape)}, but the clip is [B={B}, T={T}, ...]: give one "
                             f"target per frame, [B, T, ...]")
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
             prediction_latency: int = 0, workers=None) -> torch.Tensor:
    """One training episode (semantics §8): adds its gradient to every parameter's `.grad`.

    `clip` `[B, T, C, H, W]`, `targets` `[B, T, ...]` (or a structure of them), `loss_fn(output_t,
    target) -> scalar`. The output of tick `t` is trained towards the target of frame
    `t - prediction_latency`, over the ticks `ticks` (W; default: those whose output depends on
    a frame). `rule="bptt"`: the exact gradient of the mean loss over W through `net(clip)`;
    `rule="sideways"`: depth-parallel pseudo-gradients, each stage's summed over its ticks and
    divided by how many it counted. `workers` (a count or a `Placement`) runs the stages of a
    tick on that many threads at once. Returns the per-tick losses `[T]`, NaN outside W.
    Leaves the streaming state of `step` alone; a rejected call changes no `.grad`.
    """
    W = _check_episode(net, clip, targets, loss_fn, rule, ticks, prediction_latency)
    B, T = clip.shape[:2]
    p = prediction_latency

    def target(t):
        return tree_map(lambda y: y[:, t - p], targets)
    losses = torch.full((T,), math.nan)
    def mean_loss(outputs):
        terms = []
        for t in W:
            out = tree_map_only(torch.Tensor, lambda y: y[:, t], outputs)
            terms.append(_loss(lambda o: loss_fn(o, target(t)), out))
            losses[t] = terms[-1].detach()
        return torch.stack(terms).mean()
    if rule == "bptt":
        if workers is None:
            mean_loss(net(clip)).backward()
        else:
            _model_parallel_bptt(net, clip, mean_loss, workers)
        return losses
    trainer = _Sideways(net, workers)
    try:
        episode(trainer, clip, targets, loss_fn, W, p, losses)
    finally:
        trainer.close()
    return losses


def _model_parallel_bptt(net, clip, mean_loss, workers) -> None:
    """BPTT with the stage groups on workers, each waiting for the others (the papers' BP baseline).

    Group by group, each on a worker thread, computes its nodes over the whole clip (`run_clip`)
    on detached copies of what earlier groups computed; then, in reverse order, each propagates
    back from its own results, seeded with the gradients the later groups left on those copies.
    """
    from .lower import run_clip
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
            out = pool.submit(run_clip, plan, net, clip, env, set(group))
            outputs = out if out is not None else outputs
        roots = {len(groups) - 1: [(pool.submit(mean_loss, outputs), None)]}
        for g in reversed(range(len(groups))):
            mine = [(v, torch.ones_like(v) if s is None else s) for v, s in roots.get(g, [])]
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


def episode(trainer: _Sideways, clip, targets, loss_fn, W, p: int, losses, exchange=None) -> None:
    """A Sideways episode on `trainer`'s stages from a fresh state: the episode gradient added to `.grad`.

    `exchange()`, if given, runs after every tick (the multi-process backend's swap of registers
    and gradient registers with the other ranks)."""
    T, inside = clip.shape[1], set(W)
    trainer.reset()
    sums = {s: [None] * len(trainer.steps[s].params) for s in trainer.mine}
    for t in range(T):
        fn = (lambda o, t=t: loss_fn(o, tree_map(lambda y: y[:, t - p], targets))) if t in inside else None
        _, loss, grads = trainer.step(clip[:, t], fn)
        if exchange is not None:
            exchange()
        if loss is not None:
            losses[t] = loss
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


class Stream:
    """Learning on a stream (semantics §8 rule 6): every `step` adds that tick's pseudo-gradient to `.grad`.

    The output of tick `t` is trained towards the target given with frame `t - prediction_latency`,
    from the first tick whose output depends on a frame; gradient state carries over ticks until
    `reset()`. The caller's optimizer steps whenever it likes. `workers` as for `backward`.
    Leaves the streaming state of `net.step` alone. Close it, or use it as a context manager.
    """

    def __init__(self, net: VideoNet, loss_fn, *, prediction_latency: int = 0, workers=None):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable (output_t, target_t) -> scalar, got {type(loss_fn).__name__}")
        p = prediction_latency
        if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 0:
            raise ValueError(f"prediction_latency={p!r} must be an integer >= 0")
        self.net, self.loss_fn, self.prediction_latency = net, loss_fn, p
        self._first = _first_output_tick(net)
        self._sideways = _Sideways(net, workers)
        self._targets = []
        self._batch = None

    def reset(self) -> None:
        """A new video: values, gradient registers and pending targets back to empty."""
        self._sideways.reset()
        self._targets, self._batch = [], None

    def step(self, frame: torch.Tensor, target):
        """One tick on `frame`; adds its pseudo-gradient to `.grad` and returns the output."""
        net = self.net
        net._check_input(frame)
        if self._batch is not None and frame.shape[0] != self._batch:
            raise ValueError(f"frame has batch size {frame.shape[0]}, but this stream started with {self._batch}; "
                             f"call reset() to start a stream of another batch size")
        for t in tree_flatten(target)[0]:
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != frame.shape[0]:
                raise ValueError(f"target must be a tensor [B, ...] for the frame's batch of {frame.shape[0]}, got "
                                 f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        tick, p = self._sideways.tick, self.prediction_latency
        pending = (self._targets + [target])[-(p + 1):]
        fn = None
        if tick >= max(p, self._first):
            goal = pending[0]
            fn = lambda o: self.loss_fn(o, goal)  # noqa: E731
        output, _, grads = self._sideways.step(frame, fn)
        self._targets, self._batch = pending, frame.shape[0]
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


__all__ = ["backward", "Stream", "code", "RULES"]
