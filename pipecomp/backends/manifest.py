"""The manifest of an exported program: one format and one JSON schema for every backend.

A manifest (`manifest.json`, schema `manifest.schema.json`) says what a tick is (semantics
§3) in terms a runner can follow without torch: the state buffers and their zeros, each
stage's variants and the ticks they run at (while the pipeline fills, then periodically),
the module each variant calls with which inputs, and the wires that move values without a
call. Its `modules` hold TVM libraries or ONNX models (`backend`, and each module's
`format`). `manifest_lower.lower` writes it from a compiled network.

This file needs only the standard library: exports copy it, with the schema, next to their
runner, so that a board runs the program with nothing but its runtime (TVM or ONNX Runtime)
and numpy.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# pipecomp/2 added each stage's `warmup`: the variants of the ticks while the pipeline fills, in
# which shift memories stay zero (semantics §6). A pipecomp/1 program cannot say them, so it is refused.
FORMAT = "pipecomp/2"
SCHEMA = Path(__file__).with_name("manifest.schema.json")


def copy_beside(folder, runner) -> None:
    """Put the runner file `runner` (as `run.py`), this file and the schema into `folder`."""
    for source, name in ((SCHEMA, SCHEMA.name), (Path(__file__), "manifest.py"), (Path(runner), "run.py")):
        if source.resolve() != (Path(folder) / name).resolve():
            shutil.copyfile(source, Path(folder) / name)


def validate(manifest: dict, folder=None, backend=None) -> None:
    """Raise ValueError naming the first thing wrong with `manifest` (and the files in `folder`).

    Checks the JSON schema (with a small validator so that only the standard library is
    needed), that it is a `backend` program when one is asked for, and what a schema cannot
    say: every stage's ticks cover its hyperperiod once, its warm-up names its variants,
    every wire names a known buffer, module output or the frame.
    """
    if isinstance(manifest, dict) and manifest.get("format", FORMAT) != FORMAT:
        raise ValueError(f"manifest format {manifest['format']!r}; this runner reads {FORMAT!r}: export the "
                         f"program again with this pipecomp (since pipecomp/2 a manifest says the variants of "
                         f"the ticks while the pipeline fills, when shift memories stay zero)")
    schema = json.loads(SCHEMA.read_text())
    _check(manifest, schema, schema, "manifest")
    if backend is not None and manifest["backend"] != backend:
        raise ValueError(f"this is a {manifest['backend']} program; load it with "
                         f"pipecomp.backends.{manifest['backend']}.load, not the {backend} backend's")
    buffers = {b["name"] for b in manifest["state"]}
    modules = manifest["modules"]
    for s, stage in enumerate(manifest["stages"]):
        ticks = sorted(t for v in stage["variants"] for t in v["ticks"])
        if ticks != list(range(stage["hyperperiod"])):
            raise ValueError(f"stage {s}: the ticks of its variants are {ticks}, expected each of "
                             f"0..{stage['hyperperiod'] - 1} once")
        if any(i >= len(stage["variants"]) for i in stage["warmup"]):
            raise ValueError(f"stage {s}: its warmup {stage['warmup']} names variants it does not have "
                             f"({len(stage['variants'])})")
        for i, v in enumerate(stage["variants"]):
            where = f"stage {s} variant {i}"
            n_out = 0
            if v["module"] is not None:
                if v["module"] not in modules:
                    raise ValueError(f"{where}: module {v['module']!r} is not in 'modules'")
                n_out = len(modules[v["module"]]["outputs"])
                names = [a["name"] for a in modules[v["module"]]["inputs"]]
                if names != v["inputs"]:
                    raise ValueError(f"{where}: inputs {v['inputs']} differ from its module's {names}")
            for name in v["inputs"]:
                if name != "frame" and name not in buffers:
                    raise ValueError(f"{where}: input {name!r} is neither 'frame' nor a state buffer")
            wires = list(v["writes"].items()) + [("output", r) for r in refs(v["output"])]
            for name, r in wires:
                if name != "output" and name not in buffers:
                    raise ValueError(f"{where}: writes {name!r}, which is not a state buffer")
                if "output" in r and r["output"] >= n_out:
                    raise ValueError(f"{where}: {name} reads module output {r['output']}, it has {n_out}")
                if "state" in r and r["state"] not in buffers:
                    raise ValueError(f"{where}: {name} reads unknown state buffer {r['state']!r}")
        written = {name for v in stage["variants"] for name in v["writes"]}
        mine = {b["name"] for b in manifest["state"] if b["stage"] == s}
        if any(set(v["writes"]) != mine for v in stage["variants"]):
            raise ValueError(f"stage {s}: every variant must write exactly the buffers of the stage, "
                             f"{sorted(mine)}; they write {sorted(written)}")
    if folder is not None:
        for name, module in modules.items():
            for file in (module["file"], module.get("weights")):
                if file is not None and not (Path(folder) / file).is_file():
                    raise ValueError(f"module {name}: file {file} is missing from {folder}")


def _check(x, schema, root, where):
    """The part of JSON Schema (2020-12) that manifest.schema.json uses."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    if "oneOf" in schema:
        ok = []
        for option in schema["oneOf"]:
            try:
                _check(x, option, root, where)
                ok.append(option)
            except ValueError:
                pass
        if len(ok) != 1:
            raise ValueError(f"{where}: {json.dumps(x)[:80]} matches {len(ok)} of the allowed forms, not one")
        return
    for part in schema.get("allOf", ()):
        _check(x, part, root, where)
    if "if" in schema:
        try:
            _check(x, schema["if"], root, where)
        except ValueError:
            pass
        else:
            _check(x, schema.get("then", {}), root, where)
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(x, k) for k in kinds):
            raise ValueError(f"{where}: expected {' or '.join(kinds)}, got {json.dumps(x)[:80]}")
    if "const" in schema and x != schema["const"]:
        raise ValueError(f"{where}: {x!r} must be {schema['const']!r}")
    if "enum" in schema and x not in schema["enum"]:
        raise ValueError(f"{where}: {x!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is(x, "number") and x < schema["minimum"]:
        raise ValueError(f"{where}: {x} is below {schema['minimum']}")
    if isinstance(x, dict):
        for key in schema.get("required", ()):
            if key not in x:
                raise ValueError(f"{where}: missing {key!r}")
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for key, value in x.items():
            if key in props:
                _check(value, props[key], root, f"{where}.{key}")
            elif extra is False:
                raise ValueError(f"{where}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                _check(value, extra, root, f"{where}.{key}")
    if isinstance(x, list):
        if len(x) < schema.get("minItems", 0):
            raise ValueError(f"{where}: needs at least {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(x):
                _check(item, schema["items"], root, f"{where}[{i}]")


def _is(x, kind):
    if kind == "integer":
        return isinstance(x, int) and not isinstance(x, bool)
    if kind == "number":
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    return isinstance(x, {"object": dict, "array": list, "string": str, "boolean": bool,
                          "null": type(None)}[kind])


# -- what a runner follows ------------------------------------------------------------------
def refs(tree):
    """The wires in an output tree."""
    if tree is None or "value" in tree:
        return []
    if "tensor" in tree:
        return [tree["tensor"]]
    items = tree.get("tuple") or tree.get("list") or [v for _, v in tree.get("dict", [])]
    return [r for t in items for r in refs(t)]


def resolve(tree, ref):
    """The output structure of a manifest tree, its tensor leaves resolved by `ref`."""
    if tree is None:
        return None
    if "tensor" in tree:
        return ref(tree["tensor"])
    if "value" in tree:
        return tree["value"]
    if "tuple" in tree:
        return tuple(resolve(t, ref) for t in tree["tuple"])
    if "list" in tree:
        return [resolve(t, ref) for t in tree["list"]]
    return {k: resolve(t, ref) for k, t in tree["dict"]}


def variant_of_tick(stage) -> list:
    """`[t mod hyperperiod] -> index of the variant` of one stage of the manifest, once it has filled."""
    of = [0] * stage["hyperperiod"]
    for i, v in enumerate(stage["variants"]):
        for t in v["ticks"]:
            of[t] = i
    return of


def tick_variants(stage):
    """`tick -> index of the variant` of one stage of the manifest, the tick counted since the reset:
    its `warmup` while the pipeline fills (semantics §6), then `variant_of_tick` periodically."""
    warmup, periodic = stage["warmup"], variant_of_tick(stage)
    return lambda tick: warmup[tick] if tick < len(warmup) else periodic[tick % len(periodic)]


def leaves(x) -> list:
    """The arrays of an output structure, in order (how runners write outputs to a .npz)."""
    if isinstance(x, (tuple, list)):
        return [leaf for v in x for leaf in leaves(v)]
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in leaves(v)]
    return [x] if hasattr(x, "shape") else []
