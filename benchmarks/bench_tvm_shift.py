"""What the online temporal shift costs inside a TVM module, per frame (TSM: under 0.1 ms).

resnet18 at 224 px with shift="online", one stage, no clocks: TVM fuses the shift's slices
and concatenations into kernels of their own (or into the epilogue of a convolution, where
they cost nothing measurable). Each pure shift kernel (only strided slices and
concatenations) is compiled alone and timed with TVM's `time_evaluator`, once with the
default schedule of legalization and once with MetaSchedule's parallel/vectorize/unroll
rewrite (no measuring); the sum over the kernels a frame runs is the shift's cost per
frame. For comparison, PyTorch running pipecomp's online shift on the same tensors. One
thread each.

Run: `python benchmarks/bench_tvm_shift.py` (about a minute); writes results/tvm_shift.json, .md.
"""
import numpy as np
import torch
import torchvision.models as models

import pipecomp
from _results import machine, save, timed
from bench_tvm import no_tuning_schedules
from pipecomp import ops
from pipecomp.analysis import info
from pipecomp.backends.tvm import compiler, schedule

import tvm  # noqa: E402  (after pipecomp: the backend's ImportError says what to install)

SIZE = 224


def shift_kernels(irmods, target):
    """The fused kernels made only of the shift's slices and concatenations, with their uses per frame."""
    found = []
    for task in schedule.kernels(irmods, target):
        ops_in = task.task_name.removeprefix("fused_").split("_")
        names = {w.rstrip("0123456789") for w in ops_in if w and not w.isdigit()}
        if names <= {"strided", "slice", "concatenate"}:
            found.append(task)
    return found


def seconds(mod, target, rewrite=()):
    """Mean seconds of one call of the kernel in `mod`, on random inputs."""
    if rewrite:
        mod = tvm.transform.Sequential(list(rewrite))(mod)
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    lib = tvm.compile(mod, target=target)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in a.shape]).astype(str(a.dtype)), dev)
            for a in ArgInfo.from_prim_func(mod["main"])]
    return lib.mod.time_evaluator("main", dev, number=200, repeat=7)(*args).median


def main():
    torch.set_num_threads(1)
    tvm.get_global_func("runtime.config_threadpool")(1, 1)
    torch.manual_seed(0)
    net = pipecomp.compile(models.resnet18().eval(), shift="online", example_input=(1, 3, SIZE, SIZE)).eval()
    target, _ = compiler.resolve_target("host")
    _, irmods = compiler.lower(net)
    kernels = shift_kernels(irmods, target)
    rewrite = no_tuning_schedules()[1:]  # the parallel/vectorize/unroll rewrite
    rows = []
    for task in kernels:
        mod = task.dispatched[0]
        rows.append({"kernel": task.task_name, "uses": task.weight,
                     "default_s": seconds(mod, target), "rewritten_s": seconds(mod, target, rewrite)})

    # PyTorch: pipecomp's online shift on the inputs of the network's shift nodes.
    plan = net.plan
    inputs = [torch.randn(info(plan.node(name).args[0])["shape"]) for name in plan.shift_nodes]
    fold = [info(plan.node(name))["fold"] for name in plan.shift_nodes]
    memories = [torch.zeros_like(x[:, :f]) for x, f in zip(inputs, fold)]

    def torch_shifts():
        for x, m, f in zip(inputs, memories, fold):
            ops.shift_online(x, m, f)
    with torch.no_grad():
        (torch_s,) = timed([torch_shifts], 50)
    data = {"machine": machine(), "tvm": tvm.__version__, "model": f"resnet18, {SIZE} px, shift='online'",
            "shift_nodes": len(plan.shift_nodes), "kernels": rows, "torch_s": torch_s,
            "tvm_default_s": sum(r["uses"] * r["default_s"] for r in rows),
            "tvm_rewritten_s": sum(r["uses"] * r["rewritten_s"] for r in rows)}
    save("tvm_shift", data, table(data))


def table(d):
    ms = lambda s: f"{1000 * s:.3f} ms"  # noqa: E731
    rows = [f"| online shift per frame, {d['model']} ({d['shift_nodes']} shift nodes), 1 thread | time |",
            "|---|---|",
            f"| TVM, {sum(r['uses'] for r in d['kernels'])} calls of {len(d['kernels'])} distinct shift kernels, "
            f"default schedules | {ms(d['tvm_default_s'])} |",
            f"| TVM, the same kernels, parallel/vectorize/unroll rewrite | {ms(d['tvm_rewritten_s'])} |",
            f"| PyTorch, pipecomp's shift op on the same tensors | {ms(d['torch_s'])} |"]
    rows.append(f"\n_{d['machine']}, TVM {d['tvm']}; kernels timed alone by time_evaluator (median of 7 × 200 "
                f"calls); shift slices fused into a convolution are not counted._")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
