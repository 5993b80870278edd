"""Run a compiled video network with TVM: the half of the TVM backend that goes to the board.

It imports only tvm and numpy, so that it runs where torch is not installed: `export`
copies this file (as run.py), `manifest.py` and `manifest.schema.json` next to the libraries,
and on the board

    python3 FOLDER/run.py FOLDER --frames clip.npy --out outputs.npy

runs the exported program (`python -m pipecomp.backends.tvm.run FOLDER` does the same where
pipecomp is installed). A tick is semantics §3: every stage calls the module of its variant
for tick `t` (its warm-up variant while the pipeline fills, then that of `t mod
hyperperiod`) on the frame and the previous tick's state, the written buffers together are
the next state, and the last stage gives the output. Stages of one tick are independent
(*Massively Parallel Video Networks* sec. 3), so each may run on a thread of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

try:
    from ..manifest import copy_beside, leaves, resolve, tick_variants, validate
except ImportError:  # run as FOLDER/run.py on a board: export put manifest.py beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from manifest import copy_beside, leaves, resolve, tick_variants, validate

try:
    import tvm
    from tvm.runtime.vm import VirtualMachine
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the TVM backend needs Apache TVM 0.27: pip install 'pipecomp[tvm]' "
                      "(on a board without torch: pip install 'apache-tvm==0.27.*' numpy)") from e

SHORT_DEVICES = ("cpu", "cuda", "opencl", "vulkan", "metal", "rocm")


class Program:
    """A compiled video network as TVM modules: `step`, `reset`, `run`, `export`.

    `step(frame)` computes one tick on a numpy array (or TVM tensor) `[B, C, H, W]` and
    returns the output as numpy arrays, in the image model's output structure; it equals
    `VideoNet.step` of the network it was built from (semantics §7: float32 to 1e-4
    relative). `workers` stage threads run the stages of a tick at once (default: one per
    stage while cores last); each gets an equal share of the cores for TVM's thread pool.
    """

    def __init__(self, manifest: dict, libraries: dict, device="cpu", *, session=None, workers=None,
                 files: dict | None = None):
        self.manifest = manifest
        self._libraries = libraries  # module name -> tvm Executable (just built) or runtime Module (loaded)
        self._files = files or {}  # module name -> path of its shared library, for a loaded program
        self._session = session
        self.device = _device(device, session)
        stages = manifest["stages"]
        cores = os.cpu_count() or 1
        self.workers = max(1, min(len(stages), cores) if workers is None else min(workers, len(stages)))
        if session is not None:
            self.workers = 1  # an RPC session carries one call at a time
        self._of_tick = [tick_variants(s) for s in stages]
        self._vms = None
        self._pool = None
        self._lock = threading.Lock()
        self.reset()

    # -- streaming ----------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the zero state: the next frame starts a new video."""
        self._state, self._tick = None, 0

    def step(self, frame):
        """One tick (semantics §3): feed frame `x_t`, get the output of tick `t` as numpy."""
        with self._lock:
            return _numpy(self._step(self._frame(frame)))

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
        shape, dtype = tuple(frame.shape), str(frame.dtype)
        if shape != tuple(spec["shape"]) or dtype != spec["dtype"]:
            raise ValueError(f"frame is {dtype} {list(shape)}, this program was compiled for "
                             f"{spec['dtype']} {spec['shape']} (the example_input given to compile)")
        if isinstance(frame, np.ndarray):
            return tvm.runtime.tensor(np.ascontiguousarray(frame), self.device)
        if frame.device != self.device:
            return tvm.runtime.tensor(frame.numpy(), self.device)
        return frame

    def _step(self, frame):
        vms = self._ready()
        state = self._state if self._state is not None else self._zeros()
        t = self._tick
        calls = [(s, vms, t, frame, state) for s in range(len(self.manifest["stages"]))]
        if self.workers > 1:
            if self._pool is None:
                share = max(1, (os.cpu_count() or 1) // self.workers)
                self._pool = ThreadPoolExecutor(self.workers, "pipecomp-tvm-stage", _pin, (share,))
            results = list(self._pool.map(lambda c: self._stage(*c), calls))
        else:
            results = [self._stage(*c) for c in calls]
        new_state = {}
        for written, _ in results:
            new_state.update(written)
        self._state, self._tick = new_state, t + 1
        return results[-1][1]

    def _stage(self, s, vms, t, frame, state):
        variant = self.manifest["stages"][s]["variants"][self._of_tick[s](t)]
        outputs = ()
        if variant["module"] is not None:
            vm = vms[s, variant["module"]]
            # The stateful calls, unlike vm["main"](...), also work over RPC: there the
            # returned tuple would be a remote object that cannot be indexed from here.
            vm.set_input("main", *[frame if name == "frame" else state[name] for name in variant["inputs"]])
            vm.invoke_stateful("main")
            outputs = vm.get_outputs("main")

        def ref(r):
            if "output" in r:
                return outputs[r["output"]]
            return state[r["state"]] if "state" in r else frame
        written = {name: ref(r) for name, r in variant["writes"].items()}
        return written, resolve(variant["output"], ref)

    def _zeros(self):
        return {b["name"]: tvm.runtime.tensor(np.zeros(b["shape"], b["dtype"]), self.device)
                for b in self.manifest["state"]}

    def _ready(self):
        if self._vms is None:
            arch = self.manifest["arch"]
            if self._session is None and self.device.dlpack_device_type() == tvm.cpu().dlpack_device_type() \
                    and arch != _host_arch():
                raise RuntimeError(
                    f"this program was compiled for {arch} ({self.manifest['target_name']}), not for this "
                    f"{_host_arch()} machine: export() it and run `python3 FOLDER/run.py FOLDER` on the board, "
                    f"or load(folder, session=tvm.rpc.connect(...)) to run it there from here")
            # One VM per stage and module: a VM is not thread-safe, and stages run at once.
            self._vms = {(s, v["module"]): VirtualMachine(self._libraries[v["module"]], self.device)
                         for s, stage in enumerate(self.manifest["stages"]) for v in stage["variants"]
                         if v["module"] is not None}
        return self._vms

    # -- export -------------------------------------------------------------------------
    def export(self, folder) -> Path:
        """Write the program to `folder`: one shared library per module, `manifest.json`, its
        schema and reader, and this runner; `load(folder)` or `python3 folder/run.py folder` runs it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fcompile = _linker(self.manifest)
        for name, lib in self._libraries.items():
            path = folder / self.manifest["modules"][name]["file"]
            if name in self._files:
                if Path(self._files[name]).resolve() != path.resolve():
                    shutil.copyfile(self._files[name], path)
            else:
                lib.export_library(str(path), fcompile=fcompile)
        (folder / "manifest.json").write_text(json.dumps(self.manifest, indent=1) + "\n")
        copy_beside(folder, __file__)
        return folder


def load(folder, device="cpu", *, session=None, workers=None) -> Program:
    """The program `Program.export` wrote to `folder`, on `device` ("cpu", "cuda", a TVM device).

    With `session` (from `tvm.rpc.connect`) the libraries are uploaded to the remote end and
    run there; frames and outputs travel over the connection.
    """
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    validate(manifest, folder, "tvm")
    if manifest["target"].get("kind") == "cuda" and session is None:
        _cuda_compiler()
    libraries, files = {}, {}
    for name, module in manifest["modules"].items():
        path = folder / module["file"]
        files[name] = path
        if session is None:
            libraries[name] = tvm.runtime.load_module(str(path))
        else:
            session.upload(str(path))
            libraries[name] = session.load_module(module["file"])
    return Program(manifest, libraries, device, session=session, workers=workers, files=files)


def _cuda_compiler():
    """TVM keeps GPU kernels as CUDA C and compiles them at load, through a callback that
    `tvm.support.nvcc` registers (NVRTC through cuda-bindings)."""
    try:
        import tvm.support.nvcc  # noqa: F401
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"this program's GPU kernels are CUDA C that TVM compiles with NVRTC when it loads them, "
                           f"and {e.name} is missing: pip install cuda-bindings (and a CUDA toolkit's headers, "
                           f"or set CUDA_PATH)") from e


def _numpy(x):
    if isinstance(x, tuple):
        return tuple(_numpy(v) for v in x)
    if isinstance(x, list):
        return [_numpy(v) for v in x]
    if isinstance(x, dict):
        return {k: _numpy(v) for k, v in x.items()}
    return x.numpy() if hasattr(x, "numpy") else x


def _device(device, session):
    if not isinstance(device, str):
        return device
    kind, _, index = device.partition(":")
    if kind not in SHORT_DEVICES:
        raise ValueError(f"device {device!r}: expected one of {', '.join(SHORT_DEVICES)} (with :N), or a TVM device")
    return (session.device(kind, int(index or 0)) if session is not None
            else tvm.runtime.device(kind, int(index or 0)))


def _host_arch():
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _pin(share):
    """Each stage thread leads a TVM thread pool of its own (the pool is thread-local) on `share` cores."""
    index = int(threading.current_thread().name.rsplit("_", 1)[-1])
    cores = os.cpu_count() or 1
    cpus = [str((index * share + i) % cores) for i in range(share)]
    tvm.get_global_func("runtime.config_threadpool")(-3, share, cpus)  # -3: threads share these cores


def _linker(manifest):
    """How export links a library: the system compiler, or a cross compiler for another arch."""
    gxx = _cross_gxx(manifest["arch"], f"exporting for {manifest['arch']} ({manifest['target_name']})")
    if gxx is None:
        return None
    from tvm.support import cc
    return cc.cross_compiler(gxx)


def _cross_gxx(arch: str, doing: str):
    """The C++ compiler that links shared libraries for `arch`: None for this machine's own."""
    if arch == _host_arch():
        return None
    gxx = f"{arch}-linux-gnu-g++"
    if shutil.which(gxx) is None:
        raise RuntimeError(f"{doing} links with the cross compiler {gxx}, which is not on PATH: "
                           f"apt-get install g++-{arch.replace('_', '-')}-linux-gnu")
    return gxx


def main(argv=None):
    parser = argparse.ArgumentParser(prog="run.py", description="Run an exported pipecomp TVM program on frames.")
    parser.add_argument("folder", help="the folder Program.export wrote")
    parser.add_argument("--frames", help=".npy of frames [T, B, C, H, W] (default: random frames)")
    parser.add_argument("--ticks", type=int, default=8, help="how many random frames without --frames")
    parser.add_argument("--out", help="write the outputs to this .npz (output i of tick t as t_i)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None, help="stage threads (default: one per stage)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    program = load(args.folder, args.device, workers=args.workers)
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
    print(f"{len(frames)} ticks on {platform.machine()}, {program.workers} stage threads: "
          f"median {np.median(ms):.2f} ms/tick, first {ms[0]:.2f} ms", file=sys.stderr)


if __name__ == "__main__":
    main()
