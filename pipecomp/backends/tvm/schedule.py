"""How the Relax modules of a program become machine code: TVM's pipelines and MetaSchedule.

CPU modules go through TVM's CPU pipeline (dispatch, legalize, fuse, lower), with the
records of a MetaSchedule database applied to the kernels it knows. TVM 0.27 has no CPU
schedule for convolutions that works without measuring: `dlight.cpu` holds only GEMV and
reduction rules, and the x86/ARM TOPI schedules left with Relay; untuned kernels keep the
naive loop nests of legalization (see benchmarks/bench_tvm.py for what that costs).
GPU targets get TVM's default pipeline for the target (its dlight GPU rules).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os

import tvm_ffi

from .run import _cross_gxx, _host_arch, tvm

#: Below this many trials per kernel, MetaSchedule measures random samples of the design
#: space (replay-trace): evolutionary search needs a population and a cost model that a
#: handful of measurements cannot feed, and costs tens of seconds per kernel to start.
EVOLUTIONARY_FROM = 64


def compile_all(irmods: dict, target, tuning=None) -> dict:
    """Compile each Relax IRModule of `irmods` for `target`: name -> tvm Executable.

    `tuning=dict(trials=N, database=PATH[, tracker="HOST:PORT", key=KEY])` first tunes the
    kernels PATH has never seen (see `tune`).
    """
    database = tune(irmods, target, **_tuning(tuning)) if tuning is not None else None
    return {name: tvm.compile(mod, target=target, relax_pipeline=pipeline(target, database))
            for name, mod in irmods.items()}


def pipeline(target, database=None, schedules=()) -> tvm.transform.Pass:
    """The Relax pipeline for `target`: TVM's own, plus `database`'s records (CPU targets).

    `schedules` are passes run on the fused kernels after the records (e.g. dlight rules);
    a kernel that a record or an earlier pass scheduled is marked and left alone.
    """
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    if target.kind.name != "llvm":
        if database is not None or schedules:
            raise ValueError(f"tuning and schedules are for CPU targets; {target.kind.name} targets use TVM's "
                             f"default pipeline (dlight GPU rules)")
        return relax.get_default_pipeline(target)

    @tvm.transform.module_pass(opt_level=0, name="pipecomp.CPUPipeline")
    def run(mod, _ctx):
        with target, database if database is not None else contextlib.nullcontext():
            applied = [relax.transform.MetaScheduleApplyDatabase()] if database is not None else []
            passes = (cpu.library_dispatch_passes(target) + cpu.legalize_passes(target) + applied
                      + list(schedules) + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            return tvm.transform.Sequential(passes)(mod)
    return run


def kernels(irmods: dict, target) -> list:
    """The distinct fused kernels (MetaSchedule tasks) of all modules, each weighted by its uses."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import meta_schedule as ms

    found = []
    for mod in irmods.values():
        with target:
            fused = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + cpu.legalize_passes(target))(mod)
        for task in ms.relax_integration.extract_tasks(fused, target):
            i = next((i for i, t in enumerate(found)
                      if tvm_ffi.structural_equal(t.dispatched[0], task.dispatched[0])), None)
            if i is None:
                found.append(task)
            else:
                t = found[i]
                found[i] = ms.ExtractedTask(t.task_name, t.mod, t.target, t.dispatched, t.weight + task.weight)
    return found


def tune(irmods: dict, target, trials: int, database: str, tracker: str | None = None, key: str | None = None):
    """MetaSchedule on the kernels that `database` (a folder) has never seen, `trials` measurements in all.

    Kernels are measured on this machine, or, given `tracker` ("HOST:PORT" of a TVM RPC
    tracker) and `key`, on a device that a `python -m tvm.exec.rpc_server --tracker HOST:PORT
    --key KEY` registered there (a board): candidates are compiled here, for another CPU
    architecture with its cross compiler, and uploaded as shared libraries. Every kernel of a
    tuning run is recorded in the database, measured or not, so a later build with the same
    database tunes nothing it was already offered: a bigger budget for the same kernels needs
    a new database.
    """
    from tvm.s_tir import meta_schedule as ms

    os.makedirs(database, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=database)
    if trials == 0:  # only apply what the database has
        return db
    if target.kind.name != "llvm":
        raise ValueError(f"tuning is for CPU targets; {target} keeps TVM's default GPU schedules")
    todo = [t for t in kernels(irmods, target) if not db.has_workload(t.dispatched[0])]
    if not todo:
        return db
    if tracker is None and arch(target) != _host_arch():
        raise ValueError(f"tuning without a tracker measures kernels on this {_host_arch()} CPU, so it needs a CPU "
                         f"target of this machine, not {target}; to measure on the board, start an RPC tracker and "
                         f"an rpc_server on the board registered under a key, and pass tracker='HOST:PORT' and "
                         f"key=KEY (pipecomp build: --tune-tracker, --tune-key)")
    if "num-cores" not in target.attrs:
        raise ValueError(f"MetaSchedule needs 'num-cores' in the target; got {target}")
    per_task = max(1, math.ceil(trials / len(todo)))
    strategy = "evolutionary" if per_task >= EVOLUTIONARY_FROM else "replay-trace"
    with _unnamed_handlers_set_aside():
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            todo, work_dir=database, strategy=strategy, num_threads=os.cpu_count() or 1)
    if tracker is None:
        runner, export = ms.runner.LocalRunner(), None
    else:
        host, port = _address(tracker)
        runner = ms.runner.RPCRunner(ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                                         session_timeout_sec=60), max_workers=1)
        export = _export_kernel(_cross_gxx(arch(target), f"tuning {arch(target)} kernels on a board"))
    try:
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=database, max_trials_global=trials,
                      max_trials_per_task=per_task, num_trials_per_iter=min(per_task, 64), database=db,
                      builder=ms.builder.LocalBuilder(max_workers=os.cpu_count() or 1, timeout_sec=120,
                                                      f_build=_build_kernel(), f_export=export),
                      runner=runner, cost_model=_cost_model())
    finally:
        runner.pool.shutdown()  # its worker process would outlive us otherwise
    for task in todo:
        db.commit_workload(task.dispatched[0])
    return db


@contextlib.contextmanager
def _unnamed_handlers_set_aside():
    """MetaSchedule rebuilds its logger's configuration from its handlers' names, and fails on a
    handler without one (one that pytest, or the application, attached): those wait outside."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for h in unnamed:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in unnamed:
            logger.addHandler(h)


def arch(target) -> str:
    """The CPU architecture of `target`'s host code: x86_64, aarch64, ..."""
    host = target if target.kind.name in ("llvm", "c") else target.host
    triple = (host.attrs.get("mtriple") if host is not None else None) or \
        tvm.target.codegen.llvm_get_system_triple()
    return str(triple).split("-")[0]


def _build_kernel():
    """MetaSchedule's default_build without its `import tvm.s_tir.tensor_intrin`.

    That import parses hundreds of TVMScript intrinsics (30-60 s on 2 cores) and the local
    builder pays it in fresh worker processes for every batch of candidates, which then time
    out. Float32 CPU kernels use no tensor intrinsics, and a candidate arrives already
    scheduled. Defined in a function so that cloudpickle sends it by value: the worker then
    imports tvm only, not pipecomp and torch.
    """
    def build(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
        return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)
    return build


def _export_kernel(gxx: str | None):
    """The builder's export for RPC measurement: a shared library, linked for the board by `gxx`.

    (MetaSchedule's default sends a tar of object files that the board must link itself.)
    Defined in a function so that cloudpickle sends it by value, like `_build_kernel`.
    """
    def export(mod):
        import os
        import tempfile

        from tvm.support import cc
        path = os.path.join(tempfile.mkdtemp(prefix="pipecomp-kernel-"), "kernel.so")
        mod.export_library(path, fcompile=cc.cross_compiler(gxx) if gxx else None)
        return path
    return export


def _address(tracker) -> tuple:
    host, _, port = str(tracker).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"tracker={tracker!r} must be 'HOST:PORT', the address of a TVM RPC tracker "
                         f"(python -m tvm.exec.rpc_tracker --port PORT)")
    return host, int(port)


def _cost_model() -> str:
    try:
        import xgboost  # noqa: F401  (MetaSchedule's default cost model)
        return "xgb"
    except ImportError:
        return "random"


def _tuning(tuning) -> dict:
    if not isinstance(tuning, dict) or set(tuning) - {"trials", "database", "tracker", "key"} \
            or "database" not in tuning:
        raise ValueError(f"tuning={tuning!r} must be dict(trials=N, database=PATH), with tracker='HOST:PORT' and "
                         f"key=KEY to measure on a board")
    if ("tracker" in tuning) != ("key" in tuning):
        raise ValueError(f"tuning={tuning!r}: tracker and key go together (the tracker's address and the key the "
                         f"board's rpc_server registered with)")
    if "tracker" in tuning:
        _address(tuning["tracker"])
    trials = tuning.get("trials", 0)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ValueError(f"tuning trials={trials!r} must be an integer >= 0 (0: only use the database)")
    return {"trials": trials, "database": os.fspath(tuning["database"]),
            "tracker": tuning.get("tracker"), "key": tuning.get("key")}
