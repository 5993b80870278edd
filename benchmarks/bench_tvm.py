"""Speed of the TVM backend on this CPU, each stage against PyTorch running the same tick function.

Four measurements, all at 64 px, parallel=2, clocks="halve", one thread for PyTorch and for
TVM (its thread pool), with interleaved medians (`_results.timed`):

1. resnet18, TVM's default schedules (no tuning: what `build` gives): per stage variant and
   per tick (the mean over a hyperperiod of `Program.step` against `VideoNet.step`).
2. the same with the no-tuning scheduling TVM 0.27 offers for CPUs: the dlight CPU rules
   (GEMV, reduction) and MetaSchedule's parallelize-vectorize-unroll rewrite of the naive
   loop nests. There is no conv2d rule that works without measuring.
3. a small residual network (`Small`) before and after a bounded MetaSchedule run
   (`tuning=dict(trials=...)`: PER_KERNEL trials for each of its distinct kernels, enough for
   the evolutionary search with xgboost's cost model), with the tuning time.
4. the cost of online temporal shift inside the TVM modules: resnet18 with shift="online"
   against shift=None, per tick, TVM and PyTorch; without clocks (the concatenation and
   slice themselves) and with clocks="halve", where it costs more: a slow-clock node whose
   value nobody reads at a tick is dead code there, unless a shift memory downstream
   must record the firing.

Run: `python benchmarks/bench_tvm.py` (about 25 minutes on 2 cores, most of it tuning); writes results/tvm.json, .md.
"""
import os
import tempfile
import time

import numpy as np
import torch
import torchvision.models as models
from torch import nn
from torchvision.models.resnet import BasicBlock

import pipecomp
from _results import machine, save, timed
from pipecomp.backends import tvm as backend
from pipecomp.backends.tvm import compiler, schedule
from pipecomp.lower import zero_state

import tvm  # noqa: E402  (after pipecomp: the backend's ImportError says what to install)
from tvm.runtime.vm import VirtualMachine  # noqa: E402

PER_KERNEL = 64  # schedule.EVOLUTIONARY_FROM: below it, MetaSchedule only samples at random
ROUNDS = 7


class Small(nn.Module):
    """A narrow ResNet: four residual blocks at four resolutions, 16 to 64 channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))

        def down(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 1, 2, bias=False), nn.BatchNorm2d(o))
        self.layers = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2, down(16, 32)),
                                    BasicBlock(32, 64, 2, down(32, 64)), BasicBlock(64, 64))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def compiled(model, shift="online", clocks="halve"):
    torch.manual_seed(0)
    return pipecomp.compile(model.eval(), parallel=2, clocks=clocks, shift=shift,
                            example_input=(1, 3, 64, 64)).eval()


def no_tuning_schedules():
    """dlight's CPU rules, then MetaSchedule's parallel/vectorize/unroll rewrite of what is left."""
    from tvm import s_tir
    from tvm.s_tir import dlight
    from tvm.s_tir import meta_schedule as ms

    @tvm.transform.module_pass(opt_level=0, name="ParallelVectorizeUnroll")
    def parallel_vectorize(mod, _ctx):
        rewrite = ms.postproc.RewriteParallelVectorizeUnroll()
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and func.attrs.get("tirx.is_scheduled")):
                continue
            sch = s_tir.Schedule(func)
            root = sch.get_sblock("root")
            sch.annotate(root, "meta_schedule.parallel", 16 * (os.cpu_count() or 1))
            sch.annotate(root, "meta_schedule.vectorize", 64)
            sch.annotate(root, "meta_schedule.unroll_explicit", 16)
            if rewrite.apply(sch):
                mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        return mod
    return [dlight.ApplyDefaultSchedule(dlight.cpu.GEMV(), dlight.cpu.Reduction()), parallel_vectorize]


def per_variant(net, manifest, libraries):
    """{stage/variant: (PyTorch s, TVM s)} for every variant that calls a module."""
    plan = net.plan
    torch.manual_seed(1)
    frame = torch.randn(plan.example_shape)
    state = {k: torch.randn_like(v) for k, v in zero_state(plan, plan.example_shape[0], "cpu").items()}
    out = {}
    for s, stage in enumerate(manifest["stages"]):
        for i, v in enumerate(stage["variants"]):
            if v["module"] is None:
                continue
            gm = net._stages[s].variants[i]
            vm = VirtualMachine(libraries[v["module"]], tvm.cpu())
            args = [tvm.runtime.tensor((frame if n == "frame" else state[n]).numpy()) for n in v["inputs"]]
            with torch.no_grad():
                t_torch, t_tvm = timed([lambda: gm(frame, state), lambda: vm["main"](*args)], ROUNDS)
            out[f"stage{s}/v{i}"] = {"ticks": len(v["ticks"]), "hyperperiod": stage["hyperperiod"],
                                     "torch_s": t_torch, "tvm_s": t_tvm}
    return out


def per_tick(net, program):
    """Mean seconds per tick over a hyperperiod: VideoNet.step and Program.step (one stage thread)."""
    n = net.plan.hyperperiod
    xs = np.random.default_rng(0).standard_normal((n, *net.plan.example_shape)).astype(np.float32)
    ts = [torch.from_numpy(x) for x in xs]

    def torch_ticks():
        net.reset()
        for x in ts:
            net.step(x)

    def tvm_ticks():
        program.reset()
        for x in xs:
            program.step(x)
    with torch.no_grad():
        t_torch, t_tvm = timed([torch_ticks, tvm_ticks], ROUNDS)
    return {"torch_s": t_torch / n, "tvm_s": t_tvm / n}


def measure(net, target, schedules=(), tuning=None):
    manifest, irmods = compiler.lower(net)
    start = time.perf_counter()
    database = schedule.tune(irmods, target, **tuning) if tuning else None
    tuned = time.perf_counter()
    libraries = {name: tvm.compile(mod, target=target, relax_pipeline=schedule.pipeline(target, database, schedules))
                 for name, mod in irmods.items()}
    built = time.perf_counter()
    manifest = {"format": backend.run.FORMAT, "tvm_version": tvm.__version__, "target_name": "host",
                "target": {}, "arch": schedule.arch(target), **manifest}
    program = backend.Program(manifest, libraries, workers=1)
    result = {"tuning_s": tuned - start, "compile_s": built - tuned,
              "variants": per_variant(net, manifest, libraries), "tick": per_tick(net, program)}
    program.close()
    return result


def main():
    torch.set_num_threads(1)
    tvm.get_global_func("runtime.config_threadpool")(1, 1)  # this thread's TVM pool: one thread
    target, _ = compiler.resolve_target("host")
    resnet = compiled(models.resnet18())
    data = {"machine": machine(), "tvm": tvm.__version__, "target": str(target), "threads": 1,
            "model": "64 px, parallel=2, clocks='halve'"}
    data["resnet18_default"] = measure(resnet, target)
    data["resnet18_no_tuning_rules"] = measure(resnet, target, no_tuning_schedules())
    small = compiled(Small())
    data["small_default"] = measure(small, target)
    data["kernels"] = len(schedule.kernels(compiler.lower(small)[1], target))
    data["trials"] = PER_KERNEL * data["kernels"]
    with tempfile.TemporaryDirectory() as db:
        data["small_tuned"] = measure(small, target, tuning=dict(trials=data["trials"], database=db))
        data["small_tuned"]["measured"] = _measured(db)
    data["resnet18_no_shift"] = measure(compiled(models.resnet18(), shift=None), target)
    data["resnet18_unclocked"] = measure(compiled(models.resnet18(), clocks=None), target)
    data["resnet18_unclocked_no_shift"] = measure(compiled(models.resnet18(), shift=None, clocks=None), target)
    save("tvm", data, table(data))


def _measured(database) -> int:
    """How many candidates tuning really timed (the search stops early on kernels it has exhausted)."""
    from tvm.s_tir import meta_schedule as ms
    return len(ms.database.JSONDatabase(work_dir=database).get_all_tuning_records())


def table(d):
    def ratio(m):
        return f"{m['tvm_s'] / m['torch_s']:.1f}×"

    def ms(x):
        return f"{1000 * x:.2f} ms"
    rows = ["| measure (64 px, parallel=2, clocks=halve, 1 thread) | TVM | PyTorch | TVM / PyTorch |", "|---|---|---|---|"]
    for key, label in [("resnet18_default", "resnet18 + online shift, default schedules"),
                       ("resnet18_no_tuning_rules", "resnet18 + online shift, dlight CPU rules + parallel/vectorize"),
                       ("small_default", "small ResNet + online shift, default schedules"),
                       ("small_tuned", f"small ResNet + online shift, MetaSchedule, {d['kernels']} kernels × "
                                       f"{PER_KERNEL} trials ({d['small_tuned']['measured']} measured, "
                                       f"{d['small_tuned']['tuning_s']:.0f} s of tuning)"),
                       ("resnet18_no_shift", "resnet18 without shift, default schedules")]:
        tick = d[key]["tick"]
        rows.append(f"| {label}: per tick | {ms(tick['tvm_s'])} | {ms(tick['torch_s'])} | {ratio(tick)} |")
        worst = max(d[key]["variants"].items(), key=lambda kv: kv[1]["tvm_s"])
        rows.append(f"| {label}: slowest stage variant ({worst[0]}) | {ms(worst[1]['tvm_s'])} | "
                    f"{ms(worst[1]['torch_s'])} | {ratio(worst[1])} |")
    for shifted, plain, label in [
            ("resnet18_unclocked", "resnet18_unclocked_no_shift", "the shift itself (resnet18, no clocks)"),
            ("resnet18_default", "resnet18_no_shift", "with clocks: shift memories also keep otherwise dead "
                                                      "slow-clock work alive (resnet18)")]:
        a, b = d[shifted]["tick"], d[plain]["tick"]
        rows.append(f"| online shift, per tick: {label} | {100 * (a['tvm_s'] / b['tvm_s'] - 1):+.1f}% | "
                    f"{100 * (a['torch_s'] / b['torch_s'] - 1):+.1f}% | |")
    rows.append(f"\n_{d['machine']}, TVM {d['tvm']} ({d['target']}); medians of {ROUNDS} interleaved runs._")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
