"""`lower`: a compiled network as a manifest and the tensor functions its modules hold (semantics §7).

Every stage variant that `lowering` generated (one pure function ``(frame, state) ->
(output, new_state)`` per stage and firing set) is split in two: the tensors it computes
become one flat function ``(inputs...) -> (outputs...)``, which a backend turns into a
module (a TVM library, an ONNX model); the values it only moves (a held register passed on,
a register chain shifting by one, the frame) become wires in the manifest that the runner
follows without calling anything. State is a fixed, named list of buffers.
"""
from __future__ import annotations

import json
import operator

import torch
import torch.fx as fx

from ..lower import zero_state
from ..videonet import VideoNet
from .manifest import FORMAT, refs


def lower(net: VideoNet, backend: str, extension: str):
    """(manifest without the backend's own keys, {module name: (flat GraphModule, example inputs)}).

    `backend` ("tvm", "onnx") names the program; each module's file is `<name><extension>`.
    """
    if not isinstance(net, VideoNet):
        raise TypeError(f"expected the VideoNet that pipecomp.compile returns, got {type(net).__name__}")
    plan = net.plan
    if plan.shift == "offline":
        raise ValueError("offline (bi-directional) shift reads future frames and has no tick function; "
                         f"{backend} programs stream frames: compile with shift='online'")
    if net.training:
        raise ValueError(f"the network is in training mode; a {backend} program is for inference: call net.eval() "
                         "first (batch norm then uses its running statistics, as step() does in eval mode)")
    frame = torch.zeros(plan.example_shape, dtype=plan.example_dtype)
    state = zero_state(plan, plan.example_shape[0], "cpu")
    modules, functions, sources, stages, readers = {}, {}, {}, [], {}
    with torch.no_grad():
        for step in net._stages:
            variants = []
            for i, gm in enumerate(step.variants):
                ticks = [t for t, v in enumerate(step.variant_of_tick) if v == i]
                flat, variant, example = _split(gm, frame, state)
                variant = {"ticks": ticks, "fires": sorted(step.fires[i]), "filling": sorted(step.filling[i]),
                           **variant}
                if flat is not None:
                    # Identical tick functions (same code on the same shapes) share one module.
                    key = (flat.code, tuple(tuple(a.shape) for a in example))
                    if key not in sources:
                        name = sources[key] = f"stage{step.stage}_v{i}"
                        modules[name] = {"file": f"{name}{extension}", "format": backend,
                                         **_signature(variant["inputs"], example, flat(*example))}
                        functions[name] = flat, example
                    variant["module"] = sources[key]
                # A stage reads a buffer into its module, or passes it on as a wire (a held value,
                # a register chain shifting by one, an output).
                wires = [*variant["writes"].values(), *refs(variant["output"])]
                for b in [*variant["inputs"], *(w["state"] for w in wires if w and "state" in w)]:
                    readers.setdefault(b, set()).add(step.stage)
                variants.append(variant)
            stages.append({"stage": step.stage, "hyperperiod": step.hyperperiod, "warmup": step.warmup,
                           "variants": variants})
        structure = _structure(net._stages[-1].variants[0](frame, state)[0])
    manifest = {
        "format": FORMAT,
        "backend": backend,
        "input": {"shape": list(plan.example_shape), "dtype": dtype_name(plan.example_dtype)},
        "output": structure,
        "latency": plan.latency,
        "parallel": plan.parallel,
        "hyperperiod": plan.hyperperiod,
        "clocks": {n: {"stage": plan.stage_of[n], "period": p, "phase": plan.phase_of[n]}
                   for n, p in plan.period_of.items() if n in plan.stage_of},
        "state": [_buffer(plan, b, t, readers.get(b, set())) for b, t in state.items()],
        "stages": stages,
        "modules": modules,
    }
    return manifest, functions


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
    tensors = fx.GraphModule(gm, flat, "TickTensors")
    tensors.training = False  # a new module starts in training mode; lower() takes only nets in eval mode
    return tensors, variant, example


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
        return {"tensor": {"shape": list(value.shape), "dtype": dtype_name(value.dtype)}}
    return {"value": _json(value)}


def _json(value):
    if isinstance(value, torch.Size):
        return list(value)
    try:
        json.dumps(value)
    except TypeError:
        raise TypeError(f"the output holds {value!r} ({type(value).__name__}), which is neither a tensor nor "
                        f"a JSON value; an exported program can return only tensors, numbers, strings and None"
                        ) from None
    return value


def _signature(inputs, example, outputs):
    return {
        "inputs": [{"name": n, "shape": list(a.shape), "dtype": dtype_name(a.dtype)} for n, a in zip(inputs, example)],
        "outputs": [{"shape": list(o.shape), "dtype": dtype_name(o.dtype)} for o in outputs],
    }


def _buffer(plan, name, zeros, readers):
    memory = name.endswith("_mem") and name[:-4] in plan.shift_nodes
    node = name[:-4] if memory else name.rsplit("_d", 1)[0]
    return {"name": name, "shape": list(zeros.shape), "dtype": dtype_name(zeros.dtype), "init": "zeros",
            "kind": "memory" if memory else "register", "node": node, "stage": plan.stage_of[node],
            "readers": sorted(readers)}


def dtype_name(dtype) -> str:
    """A torch dtype as manifests write it (numpy's name): float32, int64, ..."""
    return str(dtype).removeprefix("torch.")
