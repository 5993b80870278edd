"""Run an exported ONNX program: the half of the ONNX backend that goes to the board.

It imports only numpy and the runtime that runs the models (onnxruntime, or openvino), so
that it runs where torch is not installed: `export` copies this file as `run.py`, with
`manifest.py` and `manifest.schema.json`, next to the models, and on the board

    python3 FOLDER/run.py FOLDER --frames clip.npy --out outputs.npz

runs the program (`python -m pipecomp.backends.onnx_run FOLDER` does the same where pipecomp
is installed). A tick is semantics §3: every stage calls the model of its variant for tick
`t` (its warm-up variant while the pipeline fills, then that of `t mod hyperperiod`) on the
frame and the previous tick's state, the written buffers together are the next state, and
the last stage gives the output. Stages of one tick are independent (*Massively Parallel
Video Networks* sec. 3), so each runs on a thread of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

try:
    from .manifest import leaves, resolve, tick_variants, validate
except ImportError:  # run as FOLDER/run.py on a board: export put manifest.py beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from manifest import leaves, resolve, tick_variants, validate

ENGINES = ("onnxruntime", "openvino")


class Program:
    """An exported ONNX program: `step`, `reset`, `run` on numpy arrays.

    `step(frame)` computes one tick on a numpy array `[B, C, H, W]` and returns the output
    in the image model's output structure (read-only arrays: they may be the program's
    state); it equals `VideoNet.step` of the exported network (semantics §7: float32 to
    1e-4 relative). `workers` stage threads run the stages of a tick at once (default: one
    per stage while cores last), each model with `threads // workers` threads of its own
    (`threads` default: all cores). `engine`: "onnxruntime" (one session per stage variant;
    the sessions of a stage share its weights in memory, `providers` as ONNX Runtime takes
    them) or "openvino" (its CPU plugin in float32, one stage at a time with all the threads).
    """

    def __init__(self, manifest: dict, folder, *, workers=None, threads=None, engine="onnxruntime",
                 providers=None):
        validate(manifest, folder, "onnx")
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
        if providers is not None and engine != "onnxruntime":
            raise ValueError("providers are ONNX Runtime's execution providers: use them with engine='onnxruntime'")
        self.manifest = manifest
        stages = manifest["stages"]
        cores = (os.cpu_count() or 1) if threads is None else threads
        self.workers = max(1, min(len(stages), cores) if workers is None else min(workers, len(stages)))
        if engine == "openvino":
            self.workers = 1  # two Python threads in OpenVINO's infer() at once deadlocked here, in its input copy
        self.threads = max(1, cores // self.workers)  # per model call
        self._of_tick = [tick_variants(s) for s in stages]
        make = _onnxruntime(Path(folder), self.threads, providers) if engine == "onnxruntime" else \
            _openvino(Path(folder), self.threads)
        self._models = {name: make(module) for name, module in manifest["modules"].items()}
        self._zeros = {b["name"]: _frozen(np.zeros(b["shape"], b["dtype"])) for b in manifest["state"]}
        # A frame that goes into the state must not change when the caller reuses its array.
        self._keeps_frame = any(r == {"input": "frame"} for s in stages for v in s["variants"]
                                for r in v["writes"].values())
        self._pool = None
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Back to the zero state: the next frame starts a new video."""
        self._state, self._tick = self._zeros, 0

    def step(self, frame):
        """One tick (semantics §3): feed frame `x_t`, get the output of tick `t`."""
        with self._lock:
            return self._step(self._frame(frame))

    def run(self, frames):
        """Outputs of `step` on each frame of `frames` ([T, B, C, H, W] or an iterable of frames), in order."""
        return [self.step(f) for f in frames]

    def close(self) -> None:
        """Stop the stage threads (a later `step` starts them again)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _frame(self, frame):
        spec = self.manifest["input"]
        frame = np.asarray(frame)
        if frame.shape != tuple(spec["shape"]) or frame.dtype.name != spec["dtype"]:
            raise ValueError(f"frame is {frame.dtype.name} {list(frame.shape)}, this program was compiled for "
                             f"{spec['dtype']} {spec['shape']} (the example_input given to compile)")
        return _frozen(np.array(frame)) if self._keeps_frame else np.ascontiguousarray(frame)

    def _step(self, frame):
        t, state = self._tick, self._state
        stages = range(len(self.manifest["stages"]))
        if self.workers > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, "pipecomp-onnx-stage")
            results = list(self._pool.map(lambda s: self._stage(s, t, frame, state), stages))
        else:
            results = [self._stage(s, t, frame, state) for s in stages]
        new_state = {}
        for written, _ in results:
            new_state.update(written)
        self._state, self._tick = new_state, t + 1
        return results[-1][1]

    def _stage(self, s, t, frame, state):
        variant = self.manifest["stages"][s]["variants"][self._of_tick[s](t)]
        outputs = ()
        if variant["module"] is not None:
            outputs = [_frozen(o) for o in self._models[variant["module"]](
                [frame if name == "frame" else state[name] for name in variant["inputs"]])]

        def ref(r):
            if "output" in r:
                return outputs[r["output"]]
            return state[r["state"]] if "state" in r else frame
        written = {name: ref(r) for name, r in variant["writes"].items()}
        return written, resolve(variant["output"], ref)


def load(folder, *, workers=None, threads=None, engine="onnxruntime", providers=None) -> Program:
    """The program `pipecomp.backends.onnx.export` wrote to `folder` (see `Program` for the options)."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    return Program(manifest, folder, workers=workers, threads=threads, engine=engine, providers=providers)


def _frozen(array):
    """Outputs and state are shared (a register is also an output, a held value stays): nobody writes them."""
    array.flags.writeable = False
    return array


def _onnxruntime(folder: Path, threads: int, providers):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("running an ONNX program needs onnxruntime: pip install onnxruntime "
                          "(or engine='openvino' with pip install openvino)") from e
    weights = {}  # (file, offset) -> OrtValue: each tensor of a stage in memory once, for all its sessions

    def value(file, tensor):
        key = file, tensor["offset"]
        if key not in weights:
            if file not in weights:
                weights[file] = np.fromfile(folder / file, dtype=np.uint8)
            count = int(np.prod(tensor["shape"], dtype=np.int64))
            array = np.frombuffer(weights[file], tensor["dtype"], count, tensor["offset"]).reshape(tensor["shape"])
            weights[key] = ort.OrtValue.ortvalue_from_numpy(array)
        return weights[key]

    def make(module):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        values = [value(module["weights"], tensor) for tensor in module["initializers"]]
        for tensor, v in zip(module["initializers"], values):
            options.add_initializer(tensor["name"], v)
        session = ort.InferenceSession(str(folder / module["file"]), options,
                                       providers=providers or ["CPUExecutionProvider"])
        return _Session(session, [a["name"] for a in module["inputs"]], (options, values))
    return make


class _Session:
    """An ONNX Runtime session called with a list of arrays. ONNX Runtime uses the weights
    given to its options by pointer: `keep` holds them (and the file's bytes) as long as the session."""

    def __init__(self, session, names, keep):
        self.session, self.names, self.keep = session, names, keep

    def __call__(self, arrays):
        return self.session.run(None, dict(zip(self.names, arrays)))


def _openvino(folder: Path, threads: int):
    try:
        import openvino as ov
    except ImportError as e:
        raise ImportError("engine='openvino' needs OpenVINO: pip install openvino") from e
    core = ov.Core()

    def make(module):
        compiled = core.compile_model(str(folder / module["file"]), "CPU",
                                      {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                       # not bfloat16, its default on CPUs that have it: semantics §7's 1e-4
                                       "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()

        def call(arrays):
            results = request.infer(arrays)  # copies of the outputs: the request reuses its buffers
            return [results[o] for o in compiled.outputs]
        return call
    return make


def main(argv=None):
    parser = argparse.ArgumentParser(prog="run.py", description="Run an exported pipecomp ONNX program on frames.")
    parser.add_argument("folder", help="the folder pipecomp.backends.onnx.export wrote")
    parser.add_argument("--frames", help=".npy of frames [T, B, C, H, W] (default: random frames)")
    parser.add_argument("--ticks", type=int, default=8, help="how many random frames without --frames")
    parser.add_argument("--out", help="write the outputs to this .npz (output i of tick t as t_i)")
    parser.add_argument("--engine", choices=ENGINES, default="onnxruntime")
    parser.add_argument("--workers", type=int, default=None, help="stage threads (default: one per stage)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    program = load(args.folder, workers=args.workers, threads=args.threads, engine=args.engine)
    spec = program.manifest["input"]
    if args.frames:
        frames = np.load(args.frames)
    else:
        frames = np.random.default_rng(args.seed).standard_normal((args.ticks, *spec["shape"])).astype(spec["dtype"])
    outputs, times = {}, []
    with program:
        for t, frame in enumerate(frames):
            start = time.perf_counter()
            out = program.step(frame)
            times.append(time.perf_counter() - start)
            for i, leaf in enumerate(leaves(out)):
                outputs[f"{t}_{i}"] = leaf
    if args.out:
        np.savez(args.out, **outputs)
    ms = 1000 * np.array(times)
    print(f"{len(frames)} ticks on {platform.machine()} with {args.engine}, {program.workers} stage threads: "
          f"median {np.median(ms):.2f} ms/tick, first {ms[0]:.2f} ms", file=sys.stderr)


if __name__ == "__main__":
    main()
