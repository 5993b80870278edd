"""ONNX backend: every stage variant of a compiled network as an ONNX model (semantics §7).

`export(net, folder)` writes one ONNX model per distinct stage variant, with the state it
reads as inputs and the tensors it computes as outputs (`torch.onnx.export`, the dynamo
exporter), each stage's weights once in a file its models share as external data, and the
manifest of every pipecomp export (`manifest.json`, `manifest.schema.json`). `load(folder)`
runs it on ONNX Runtime (or OpenVINO) with `step` / `reset` / `run` on numpy arrays, like
`VideoNet.step`; so does `python3 folder/run.py folder`, which needs only onnxruntime and
numpy. TensorRT (`trtexec --onnx=...`) and OpenVINO read the models as they are.
Needs onnx, onnxscript and onnxruntime: pip install 'pipecomp[onnx]'.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..videonet import VideoNet
from .manifest import copy_beside
from .manifest_lower import lower
from . import onnx_run
from .onnx_run import Program, load

try:
    import onnx
    from onnx import external_data_helper, numpy_helper
    import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"the ONNX backend needs {e.name}: pip install 'pipecomp[onnx]' "
                      "(onnx, onnxscript, onnxruntime)") from e

__all__ = ["export", "load", "Program"]

# Initializers smaller than this stay inside their model (shapes, scalars): not worth sharing.
_INLINE_BYTES = 1024
_ALIGN = 64  # byte alignment of each tensor in a weights file, so that runners may map it as it is


def export(net: VideoNet, folder) -> Path:
    """Write `net` to `folder` as ONNX models and a manifest; `load(folder)` runs it.

    Every distinct stage variant becomes `stage<s>_v<i>.onnx`: inputs the frame and the
    state buffers it reads, outputs the tensors it computes, in the manifest's order. The
    weights of stage s are stored once in `stage<s>.weights` (ONNX external data), however
    many of its variants use them. `net` must be in eval mode, with no shift or online shift.
    """
    manifest, functions = lower(net, "onnx", ".onnx")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = {}  # weights file -> {tensor key: offset}, each file written as it grows
    opsets = set()
    for name, (flat, example) in functions.items():
        module = manifest["modules"][name]
        model = _export(flat, example, [a["name"] for a in module["inputs"]], len(module["outputs"]))
        opsets.add(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))
        weights = f"{name.rsplit('_v', 1)[0]}.weights"
        if weights not in stored:
            (folder / weights).write_bytes(b"")
            stored[weights] = {}
        module["weights"] = weights
        module["initializers"] = _externalize(model, folder / weights, stored[weights])
        onnx.save(model, folder / module["file"])
    if len(opsets) > 1:
        raise RuntimeError(f"torch.onnx exported the modules with different opsets {sorted(opsets)}")
    # A network whose every variant only moves values exports no model: any opset reads it.
    opset = opsets.pop() if opsets else onnx.defs.onnx_opset_version()
    manifest = {**manifest, "weights": "shared", "onnx_opset": opset,
                "torch_version": torch.__version__}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    copy_beside(folder, onnx_run.__file__)
    return folder


def _export(flat, example, inputs, n_outputs) -> "onnx.ModelProto":
    # optimize: onnxscript's rewrites, among them batch norms folded into the convolutions before them.
    program = torch.onnx.export(flat, example, dynamo=True, input_names=inputs,
                                output_names=[f"output{i}" for i in range(n_outputs)], optimize=True, verbose=False)
    return program.model_proto


def _externalize(model, path: Path, offsets: dict) -> list:
    """Move `model`'s large initializers into the weights file at `path`, each distinct tensor once.

    `offsets` maps the tensors already in the file (dtype, shape, content hash) to their
    offsets; returns the manifest's list of this model's initializers in the file.
    """
    listed = []
    with path.open("ab") as f:
        for tensor in model.graph.initializer:
            array = numpy_helper.to_array(tensor)
            if array.nbytes < _INLINE_BYTES:
                continue
            data = array.tobytes()
            key = (array.dtype.str, array.shape, hashlib.sha256(data).digest())
            if key not in offsets:
                f.write(b"\0" * (-f.tell() % _ALIGN))
                offsets[key] = f.tell()
                f.write(data)
            external_data_helper.set_external_data(tensor, path.name, offsets[key], len(data))
            tensor.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            listed.append({"name": tensor.name, "shape": list(array.shape), "dtype": array.dtype.name,
                           "offset": offsets[key]})
    return listed
