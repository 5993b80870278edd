"""`build`: the tick functions of a compiled network, each made a TVM module (semantics §7).

Every stage variant that `lowering` generated (one pure function ``(frame, state) ->
(output, new_state)`` per stage and firing set) is split in two: the tensors it computes
become one Relax function ``main(inputs...) -> (outputs...)``, imported through
`torch.export` and compiled for the target; the values it only moves (a held register
passed on, a register chain shifting by one, the frame) become wires in the manifest that
the runner follows without calling anything. State is a fixed, named list of buffers.
"""
from __future__ import annotations

import json
import operator
import os
import warnings

import torch
import torch.fx as fx

from ...analysis import COMPUTE_OPS
from ...lower import firing, zero_state
from ...videonet import VideoNet
from . import cuda, schedule
from .run import FORMAT, Program, _refs, tvm

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
    manifest = {"format": FORMAT, "tvm_version": tvm.__version__, "target_name": name,
                "target": json.loads(str(tgt)), "arch": schedule.arch(tgt), **manifest}
    return Program(manifest, libraries, workers=workers)


def lower(net: VideoNet):
    """The target-free half of `build`: (manifest without the target, {module name: Relax IRModule})."""
    if not isinstance(net, VideoNet):
        raise TypeError(f"build() takes the VideoNet that pipecomp.compile returns, got {type(net).__name__}")
    plan = net.plan
    if plan.shift == "offline":
        raise ValueError("offline (bi-directional) shift reads future frames and has no tick function; "
                         "TVM programs stream frames: compile with shift='online'")
    if net.training:
        raise ValueError("the network is in training mode; a TVM program is for inference: call net.eval() "
                         "first (batch norm then uses its running statistics, as step() does in eval mode)")
    frame = torch.zeros(plan.example_shape, dtype=plan.example_dtype)
    state = zero_state(plan, plan.example_shape[0], "cpu")
    modules, irmods, sources, stages, readers = {}, {}, {}, [], {}
    with torch.no_grad():
        for step in net._stages:
            nodes = [n for n in plan.nodes_of_stage(step.stage) if n.op in COMPUTE_OPS]
            variants = []
            for i, gm in enumerate(step.variants):
                ticks = [t for t, v in enumerate(step.variant_of_tick) if v == i]
                flat, variant, example = _split(gm, frame, state)
                variant = {"ticks": ticks, "fires": sorted(firing(plan, nodes, ticks[0])), **variant}
                if flat is not None:
                    # Identical tick functions (same code on the same shapes) share one module.
                    key = (flat.code, tuple(tuple(a.shape) for a in example))
                    if key not in sources:
                        name = sources[key] = f"stage{step.stage}_v{i}"
                        modules[name] = {"file": f"{name}.so", **_signature(variant["inputs"], example, flat(*example))}
                        irmods[name] = _import(flat, example)
                    variant["module"] = sources[key]
                # A stage reads a buffer into its module, or passes it on as a wire (a held value,
                # a register chain shifting by one, an output).
                wires = [*variant["writes"].values(), *_refs(variant["output"])]
                for b in [*variant["inputs"], *(w["state"] for w in wires if w and "state" in w)]:
                    readers.setdefault(b, set()).add(step.stage)
                variants.append(variant)
            stages.append({"stage": step.stage, "hyperperiod": step.hyperperiod, "variants": variants})
        structure = _structure(net._stages[-1].variants[0](frame, state)[0])
    manifest = {
        "input": {"shape": list(plan.example_shape), "dtype": _dtype(plan.example_dtype)},
        "output": structure,
        "latency": plan.latency,
        "parallel": plan.parallel,
        "hyperperiod": plan.hyperperiod,
        "clocks": {n: {"stage": plan.stage_of[n], "period": p, "phase": plan.phase_of[n]}
                   for n, p in plan.period_of.items() if n in plan.stage_of},
        "state": [_buffer(plan, b, t, readers.get(b, set())) for b, t in state.items()],
        "stages": stages,
        "modules": modules,
        "weights": "baked",
    }
    return manifest, irmods


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


def _split(gm: fx.GraphModule, frame, state):
    """One tick function as (tensor function or None, wires, example inputs).

    The tensor function takes the frame and the state buffers it reads, as flat
    arguments, and returns each tensor the tick computes once.
    """
    graph = gm.graph
    frame_node, state_node = [n for n in graph.nodes if n.op == "placeholder"]
    reads = {}
    for n in state_node.users:
        if not (n.op == "call_function" and n.target is operator.getitem):
            raise NotImplementedError(f"tick function uses the state dict in {n.format_node()}; "
                                      f"expected only state[name] reads")
        reads[n] = n.args[1]
    out_node = next(n for n in graph.nodes if n.op == "output")
    output, written = gm(frame, state)
    computed = {}

    def ref(a, value):
        if a in reads:
            return {"state": reads[a]}
        if a is frame_node:
            return {"input": "frame"}
        if isinstance(a, fx.Node) and isinstance(value, torch.Tensor):
            return {"output": computed.setdefault(a, len(computed))}
        return None

    writes = {k: ref(a, written[k]) for k, a in out_node.args[0][1].items()}
    tree = None if out_node.args[0][0] is None else _tree(out_node.args[0][0], output, ref)
    variant = {"module": None, "inputs": [], "writes": writes, "output": tree}
    if not computed:
        return None, variant, ()

    flat = fx.Graph()
    env = {frame_node: flat.placeholder("frame")}
    buffers = {key: flat.placeholder(key) for key in dict.fromkeys(reads.values())}
    for n in graph.nodes:
        if n in reads:
            env[n] = buffers[reads[n]]
        elif n.op not in ("placeholder", "output"):
            env[n] = flat.node_copy(n, env.__getitem__)
    flat.output(tuple(env[n] for n in computed))
    flat.owning_module = gm  # the purity check of dead-code elimination looks modules up there
    flat.eliminate_dead_code()
    inputs = []
    for p in [n for n in flat.nodes if n.op == "placeholder"]:
        if p.users:
            inputs.append(p.target)
        else:
            flat.erase_node(p)
    variant["inputs"] = inputs
    example = tuple(frame if name == "frame" else state[name] for name in inputs)
    return fx.GraphModule(gm, flat, "TickTensors"), variant, example


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


def _tree(a, value, ref):
    """The manifest form of an output structure: containers as they are, tensors as wires."""
    if isinstance(a, tuple):
        return {"tuple": [_tree(x, v, ref) for x, v in zip(a, value)]}
    if isinstance(a, list):
        return {"list": [_tree(x, v, ref) for x, v in zip(a, value)]}
    if isinstance(a, dict):
        return {"dict": [[k, _tree(a[k], value[k], ref)] for k in a]}
    r = ref(a, value)
    return {"tensor": r} if r is not None else {"value": _json(value)}


def _structure(value):
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [_structure(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[k, _structure(v)] for k, v in value.items()]}
    if isinstance(value, torch.Tensor):
        return {"tensor": {"shape": list(value.shape), "dtype": _dtype(value.dtype)}}
    return {"value": _json(value)}


def _json(value):
    if isinstance(value, torch.Size):
        return list(value)
    try:
        json.dumps(value)
    except TypeError:
        raise TypeError(f"the output holds {value!r} ({type(value).__name__}), which is neither a tensor nor "
                        f"a JSON value; a TVM program can return only tensors, numbers, strings and None") from None
    return value


def _signature(inputs, example, outputs):
    return {
        "inputs": [{"name": n, "shape": list(a.shape), "dtype": _dtype(a.dtype)} for n, a in zip(inputs, example)],
        "outputs": [{"shape": list(o.shape), "dtype": _dtype(o.dtype)} for o in outputs],
    }


def _import(flat: fx.GraphModule, example):
    from tvm.relax.frontend.torch import from_exported_program
    program = torch.export.export(_fold_batch_norms(flat), example)
    return from_exported_program(program)


def _buffer(plan, name, zeros, readers):
    memory = name.endswith("_mem") and name[:-4] in plan.shift_nodes
    node = name[:-4] if memory else name.rsplit("_d", 1)[0]
    return {"name": name, "shape": list(zeros.shape), "dtype": _dtype(zeros.dtype), "init": "zeros",
            "kind": "memory" if memory else "register", "node": node, "stage": plan.stage_of[node],
            "readers": sorted(readers)}


def _dtype(dtype) -> str:
    return str(dtype).removeprefix("torch.")
