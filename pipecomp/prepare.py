"""Preparing stages to run: tick functions on a worker's device, frozen for inference.

What the threaded runtime runs and what `schedule(..., profile=True)` measures are the same
prepared stages, so both take them from here (the layering: lowering, preparation, then
placement and runtimes).

Inference-ready kernels (`prepare="freeze"`): each stage's tick functions are scripted and
frozen with TorchScript (`torch.jit.freeze`: weights become constants, batch norm is folded
into the convolutions) and run without the GIL. They serve the ticks that run without grad
while the net is in eval mode; other ticks run the generated fx code on the net's own
modules. Measured on this machine (2 cores, resnet50 / densenet121 at 112 px, 1 thread):
eager 35.0 / 25.2 ms, frozen 31.3 / 20.3 ms, frozen + `torch.jit.optimize_for_inference`
(oneDNN layouts, prepacked weights) 33.2 / 26.1 ms, fx batch-norm folding 32.8 / 24.6 ms,
fx oneDNN prepacking 35.0 ms, `torch.compile` 37.7 ms after a 36 s compile.

Devices: a stage on another device than the net's runs copies of its modules made here (one
copy per device of each module).
"""
from __future__ import annotations

import copy
import operator
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .lower import zero_state

#: What `Runtime(..., prepare=)` and `schedule(..., prepare=)` accept.
PREPARE = ("freeze", None)
#: A prepared tick function must give its eager outputs within this, relative to their largest magnitude.
TOLERANCE = 1e-4


@dataclass(eq=False)
class _StageRun:
    """One stage as its worker runs it: its tick functions on its device, as written and prepared.

    `fast` holds the prepared tick functions (`eager` ones where preparing failed), or is None.
    `snapshot` lists the net's tensors that frozen kernels or device copies were made from and
    their versions then; `copies` pairs each copy with the net's tensor it copies.
    """

    stage: int
    device: str
    index: object  # tick -> variant: the stage step's own lookup
    modules: list  # the GraphModules: the net's own, or copies on `device`
    eager: list  # their generated forwards
    fast: list | None
    how: str
    reads: frozenset
    watch: list  # (net's module, the module the stage calls) for every module it calls: their training flags
    snapshot: list = field(default_factory=list)
    versions: list | None = None
    copies: list = field(default_factory=list)

    def __post_init__(self):
        self.called = [theirs for theirs, _ in self.watch]

    def training(self) -> bool:
        """Whether a module the stage calls is in training mode now; copies take the net's flags."""
        if not self.copies:
            return any(map(_TRAINING, self.called))
        training = False
        for theirs, mine in self.watch:
            if mine.training != theirs.training:
                mine.training = theirs.training
            training = training or theirs.training
        return training

    def stale(self) -> bool:
        return self.versions is not None and _versions(self.snapshot) != self.versions

    def refresh(self) -> None:
        """The net's weights changed in place since the snapshot: copies follow, frozen kernels go."""
        with torch.no_grad():
            for mine, theirs in self.copies:
                mine.copy_(theirs)
        if self.fast is not None:
            self.fast = None
            self.how = "eager (the net's weights changed after preparing)"
            warnings.warn(f"stage {self.stage}: the net's weights changed after the Runtime froze its kernels; "
                          f"it runs the eager tick functions from now on (make a new Runtime to prepare again)",
                          RuntimeWarning, stacklevel=2)
        self.versions = _versions(self.snapshot) if self.copies else None  # nothing left to refresh


def _canonical(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return str(device)


def _home(net) -> str:
    """The device of the net's weights, where frames come from and outputs go."""
    tensor = next(iter(net.parameters()), None)
    if tensor is None:
        tensor = next(iter(net.buffers()), None)
    return "cpu" if tensor is None else _canonical(tensor.device)


_TRAINING, _VERSION = operator.attrgetter("training"), operator.attrgetter("_version")


def _versions(tensors):
    try:
        return list(map(_VERSION, tensors))
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _tensors(modules) -> list:
    seen = {}
    for gm in modules:
        for t in (*gm.parameters(), *gm.buffers()):
            seen.setdefault(id(t), t)
    return list(seen.values())


def _called(gm) -> list:
    return [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def _copy_to(variants, device: str, memo: dict):
    """Copies of a stage's GraphModules on `device`, and (copy, original) pairs of their tensors.

    One deepcopy with the device's memo: the variants of a stage (and the stages on one device)
    keep sharing each module they share in the net, and copy only the modules they call.
    """
    copies = copy.deepcopy(list(variants), memo)
    for gm in copies:
        gm.to(device)
    pairs = {}
    for original, mine in zip(variants, copies):
        theirs = dict(original.named_parameters(remove_duplicate=False)) | dict(original.named_buffers(
            remove_duplicate=False))
        ours = dict(mine.named_parameters(remove_duplicate=False)) | dict(mine.named_buffers(remove_duplicate=False))
        for name, t in theirs.items():
            pairs.setdefault(id(ours[name]), (ours[name], t))
    return copies, list(pairs.values())


_PREPARED = weakref.WeakKeyDictionary()  # GraphModule -> (how, versions of its tensors, prepared module)
_PREPARED_LOCK = threading.Lock()


def _prepared(gm, how: str, example):
    """`gm` prepared for inference (cached while its weights are unchanged), checked against `gm` on `example`."""
    tensors = _tensors([gm])
    with _PREPARED_LOCK:
        hit = _PREPARED.get(gm)
    if hit is not None and hit[0] == how and hit[1] is not None and hit[1] == _versions(tensors):
        return hit[2]
    versions = _versions(tensors)
    prepared = _freeze(gm)
    with torch.no_grad():
        want = gm.forward(*example)
        for _ in range(2):  # TorchScript's profiling executor optimises the graph on the second call
            got = prepared.forward(*example)
    _check_close(got, want)
    with _PREPARED_LOCK:
        _PREPARED[gm] = (how, versions, prepared)
    return prepared


def _freeze(gm):
    graph = copy.deepcopy(gm.graph)
    for n in graph.nodes:
        if n.op == "placeholder":  # TorchScript needs the types that fx leaves out
            n.type = torch.Tensor if n.target == "frame" else Dict[str, torch.Tensor]
    typed = fx.GraphModule(gm, graph, type(gm).__name__)  # shares gm's modules, copies nothing
    typed.training = False  # only the wrapper: its modules are in eval mode already
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.x; see the module doc
        warnings.filterwarnings("ignore", "The TorchScript type system", UserWarning)  # about fx's own attributes
        return torch.jit.freeze(torch.jit.script(typed))


def _check_close(got, want):
    got_leaves, got_spec = tree_flatten(got)
    want_leaves, want_spec = tree_flatten(want)
    if got_spec != want_spec:
        raise ValueError(f"the prepared function returns {got_spec}, the generated one {want_spec}")
    for g, w in zip(got_leaves, want_leaves):
        if not isinstance(w, torch.Tensor):
            if g != w:
                raise ValueError(f"the prepared function returns {g!r} where the generated one returns {w!r}")
            continue
        if g.shape != w.shape or g.dtype != w.dtype:
            raise ValueError(f"the prepared function returns a {g.dtype} {list(g.shape)} tensor where the "
                             f"generated one returns {w.dtype} {list(w.shape)}")
        if not w.is_floating_point():
            if not torch.equal(g, w):
                raise ValueError("the prepared function returns other values than the generated one")
            continue
        scale = float(w.abs().max()) if w.numel() else 0.0
        error = float((g - w).abs().max()) if w.numel() else 0.0
        if not error <= TOLERANCE * scale + 1e-12:
            raise ValueError(f"the prepared function differs from the generated one by {error:.3g} "
                             f"(largest magnitude {scale:.3g})")


def _example(plan, device: str, generator: torch.Generator):
    """A random frame and a random state: registers of zeros would hide errors in the stages that read them."""
    frame = torch.randn(plan.example_shape, generator=generator).to(dtype=plan.example_dtype, device=device)
    state = {}
    for key, zero in zero_state(plan, plan.example_shape[0], "cpu").items():
        value = torch.randn(zero.shape, generator=generator) if zero.is_floating_point() else zero
        state[key] = value.to(dtype=zero.dtype, device=device)
    return frame, state


def _stage_runs(net, devices, prepare) -> list:
    """Each stage's tick functions on its device `devices[s]`, prepared with `prepare` for ticks without grad.

    Stages on the net's own device call its modules; stages on another device call copies
    (one per module and device). Preparing happens only when every module is in eval mode;
    a tick function that fails to prepare, or whose prepared outputs differ from its own by
    more than `TOLERANCE`, stays eager, with a warning.
    """
    if prepare not in PREPARE:
        raise ValueError(f"prepare={prepare!r} is not one of {', '.join(map(repr, PREPARE))}")
    home, plan = _home(net), net.plan
    memos, examples, runs = {}, {}, []
    generator = torch.Generator().manual_seed(0)
    for stage, device in zip(net._stages, devices):
        device = _canonical(device)
        if device == home:
            modules, pairs = list(stage.variants), []
        else:
            modules, pairs = _copy_to(stage.variants, device, memos.setdefault(device, {}))
        watch = list({id(m): (m, c) for gm, mine in zip(stage.variants, modules)
                      for m, c in zip(_called(gm), _called(mine))}.values())
        fast, how = None, "eager"
        if prepare is not None and any(m.training for m, _ in watch):
            how = "eager (modules in training mode)"
        elif prepare is not None:
            if device not in examples:
                examples[device] = _example(plan, device, generator)
            fast, failures = [], []
            for i, gm in enumerate(modules):
                try:
                    fast.append(_prepared(gm, prepare, examples[device]).forward)
                except Exception as e:  # not scriptable, or not close enough: this tick function stays eager
                    failures.append(f"variant {i}: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
                    fast.append(gm.forward)
            how = prepare
            if failures:
                how = f"{prepare} ({len(modules) - len(failures)} of {len(modules)} tick functions; eager: " \
                      f"{'; '.join(failures)})"
                warnings.warn(f"stage {stage.stage}: could not {prepare} every tick function, these run eager: "
                              f"{'; '.join(failures)}", RuntimeWarning, stacklevel=3)
        snapshot = [t for _, t in pairs] if pairs else (_tensors(modules) if fast is not None else [])
        runs.append(_StageRun(
            stage.stage, device, stage.index, modules,
            [gm.forward for gm in modules], fast, how, frozenset(stage.reads), watch,
            snapshot, _versions(snapshot) if snapshot else None, pairs))
    return runs
