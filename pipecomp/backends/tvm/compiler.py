"""`build`: the tick functions of a compiled network, each made a TVM module (semantics §7).

`manifest_lower.lower` splits every stage variant into a tensor function and wires; here
each tensor function is imported through `torch.export` as one Relax function
``main(inputs...) -> (outputs...)`` and compiled for the target.
"""
from __future__ import annotations

import json
import os
import warnings

import torch
import torch.fx as fx

from ...videonet import VideoNet
from ..manifest_lower import lower as lower_manifest
from . import cuda, schedule
from .run import Program, tvm

#: Short names for boards, and the TVM tags they stand for.
TARGETS = {
    "rpi4": "raspberry-pi/4b-aarch64",
    "jetson-nano": "nvidia/jetson-nano",
    "jetson-orin-nano": "nvidia/jetson-orin-nano",
}
# The jetson-nano tag has no host target; its CPU is a 4-core Cortex-A57.
_HOSTS = {"jetson-nano": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a57", "num-cores": 4}}
#: The Jetsons' ARM cores alone: what runs on a board when its GPU code cannot be built.
CPU_TARGETS = {
    "jetson-nano-cpu": _HOSTS["jetson-nano"],
    "jetson-orin-nano-cpu": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "num-cores": 6},
}


def build(net: VideoNet, target="host", *, tuning=None, workers=None) -> Program:
    """Compile every stage variant of `net` with TVM for `target`; the result steps like `net`.

    `target`: "host" (this CPU), "llvm" (generic CPU code for this machine's triple), a short
    name (rpi4, jetson-nano, jetson-orin-nano; jetson-nano-cpu and jetson-orin-nano-cpu for
    their ARM cores alone), a TVM tag or a `tvm.target.Target`. A CUDA target warns that
    its GPU kernels are compiled only on the board, unchecked here.
    `tuning=dict(trials=N, database=PATH)` runs MetaSchedule on this machine for at most N
    measurements and keeps the records in the folder PATH; a later build with the same
    database applies them and tunes only kernels it has never seen. Without it, kernels
    keep TVM's default schedules (see `schedule`). `workers`: stage threads of the
    returned `Program` (default: one per stage while cores last).
    """
    tgt, name = resolve_target(target)
    manifest, irmods = lower(net)
    libraries = schedule.compile_all(irmods, tgt, tuning)
    if tgt.kind.name == "cuda":
        try:
            compiled = cuda.compile_check(libraries, tgt)
            checked = (f"here their CUDA C compiled ({compiled}), but pipecomp has not run them" if compiled
                       else "this program has none")
        except cuda.CudaUnchecked as e:
            checked = f"that could not be checked here: {e}"
        warnings.warn(
            f"{name}: the GPU kernels are exported as CUDA C source, which TVM compiles with NVRTC when the "
            f"board loads them (the board needs pip install cuda-bindings and the CUDA headers); {checked}. "
            f"For code built and run here (under qemu), use target='{name}-cpu' (the board's ARM cores)",
            stacklevel=2)
    manifest = {**manifest, "tvm_version": tvm.__version__, "target_name": name,
                "target": json.loads(str(tgt)), "arch": schedule.arch(tgt)}
    return Program(manifest, libraries, workers=workers)


def lower(net: VideoNet):
    """The target-free half of `build`: (manifest without the target, {module name: Relax IRModule})."""
    manifest, functions = lower_manifest(net, "tvm", ".so")
    return {**manifest, "weights": "baked"}, {name: _import(*f) for name, f in functions.items()}


def resolve_target(target):
    """`(tvm.target.Target, name)` for a target as `build` takes it."""
    if isinstance(target, tvm.target.Target):
        return target, target.attrs.get("tag") or target.kind.name
    if not isinstance(target, str):
        raise TypeError(f"target={target!r} must be a string or a tvm.target.Target")
    if target == "host":
        # num-cores: MetaSchedule needs it, and the Target of a build and of its tuning must agree.
        here = json.loads(str(tvm.target.Target.from_device("cpu")))
        return tvm.target.Target({**here, "num-cores": os.cpu_count() or 1}), "host"
    try:
        if target in CPU_TARGETS:
            return tvm.target.Target(CPU_TARGETS[target]), target
        if target in TARGETS:
            host = _HOSTS.get(target)
            return tvm.target.Target(TARGETS[target], host), target
        return tvm.target.Target(target), target
    except Exception as e:  # TVM raises ValueError or its own errors for unknown kinds and tags
        raise ValueError(f"unknown target {target!r}: use a short name ({', '.join([*TARGETS, *CPU_TARGETS])}), "
                         f"'host', 'llvm', "
                         f"a TVM tag (tvm.target.list_tags()) or a tvm.target.Target") from e


def _fold_batch_norms(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with each batch norm that alone reads a convolution folded into its weights (eval mode).

    TVM imports a batch norm as an op of its own that does not fuse with the convolution
    before it: one more kernel, and one more pass over the tensor, per convolution. A pair is
    folded only where the convolution's output goes nowhere else (not into a register, say)
    and each module is called once; the folded convolutions are copies, the net is untouched.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    graph = fx.Graph()
    env = graph.graph_copy(gm.graph, {})
    graph.output(env)
    calls = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    root = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            root[n.target] = gm.get_submodule(n.target) if n.op == "call_module" else _attr(gm, n.target)
    for bn in list(graph.nodes):
        conv = bn.args[0] if bn.op == "call_module" and bn.args else None
        if not (isinstance(conv, fx.Node) and conv.op == "call_module" and len(conv.users) == 1
                and len(bn.args) == 1 and not bn.kwargs and calls[bn.target] == calls[conv.target] == 1):
            continue
        norm, convolution = root[bn.target], root[conv.target]
        if not (type(convolution) in _CONV_BN and isinstance(norm, _CONV_BN[type(convolution)])
                and norm.running_mean is not None and not norm.training and not convolution.training):
            continue
        root[conv.target] = fuse_conv_bn_eval(convolution, norm)
        bn.replace_all_uses_with(conv)
        graph.erase_node(bn)
        del root[bn.target]
    return fx.GraphModule(root, graph, type(gm).__name__)


_CONV_BN = {torch.nn.Conv1d: torch.nn.BatchNorm1d, torch.nn.Conv2d: torch.nn.BatchNorm2d,
            torch.nn.Conv3d: torch.nn.BatchNorm3d}


def _attr(module, target: str):
    for name in target.split("."):
        module = getattr(module, name)
    return module


def _import(flat: fx.GraphModule, example):
    from tvm.relax.frontend.torch import from_exported_program
    program = torch.export.export(_fold_batch_norms(flat), example)
    return from_exported_program(program)
