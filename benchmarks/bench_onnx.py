"""Speed of the ONNX backend on this CPU: ONNX Runtime against PyTorch, and against a TSM written by hand.

1. resnet18 and mobilenet_v2, 112 px, parallel=2, clocks="halve", shift="online", one thread
   each: every stage variant (its ONNX Runtime session against PyTorch running the same tick
   function on the same state) and per tick (the mean over a hyperperiod of `Program.step`
   against `VideoNet.step`), and how long the export took.
2. An online-TSM MobileNetV2 at 224 px the way the TSM online demo runs it: a module written
   by hand here (`HandTSM`) that takes the frame and the shift buffers and returns the logits
   and the new buffers, against pipecomp on the same weights (parallel=1, no clocks,
   shift="online": the same network, checked below) through `net.step`, the threaded runtime
   with one worker, and the ONNX program, at 1 and 2 threads. Where `net.step`'s time goes:
   the generated tick function called alone (no `VideoNet.step` around it), and the hand
   module with pipecomp's shift (whose new buffer is a copy, not a view of the input), and the
   shift ops alone. Best of HAND_ROUNDS interleaved rounds.

Run: `python benchmarks/bench_onnx.py` (about 8 minutes on 2 cores); writes results/onnx.json, .md.
"""
import dataclasses
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.models as models
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

import pipecomp
from _results import machine, save, timed
from pipecomp.backends import onnx as backend
from pipecomp.backends.threaded import Runtime
from pipecomp.lower import zero_state
from pipecomp.ops import shift_online

import onnxruntime  # noqa: E402  (after pipecomp: the backend's ImportError says what to install)

ROUNDS = 7
TICKS = 8  # ticks per timed call in part 2
# Part 2 compares code paths of a few per cent: the best of many rounds, the least disturbed by
# the other programs on this shared machine, says more than their median.
HAND_ROUNDS = 15


class HandTSM(nn.Module):
    """MobileNetV2 with online TSM as the TSM demo writes it: `(frame, *buffers) -> (logits, *buffers)`.

    Each inverted residual block with a skip connection shifts the first 1/8 of its input's
    channels by one frame before its first convolution; the buffer it returns is a view of
    the frame's own channels, which the next frame reads.
    """

    def __init__(self, mnv2, clone=False):
        super().__init__()
        self.features, self.classifier, self.clone = mnv2.features, mnv2.classifier, clone

    def forward(self, x, *buffers):
        new, old = [], iter(buffers)
        for block in self.features:
            if isinstance(block, InvertedResidual) and block.use_res_connect:
                fold = x.shape[1] // 8
                new.append(x[:, :fold].clone() if self.clone else x[:, :fold])
                x = x + block.conv(torch.cat((next(old), x[:, fold:]), 1))
            else:
                x = block(x)
        return (self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1)), *new)

    def zeros(self, frame):
        """The buffers before the first frame."""
        return [torch.zeros(x.shape[0], x.shape[1] // 8, *x.shape[2:]) for x in self.shifted_inputs(frame)]

    def shifted_inputs(self, frame):
        """The inputs of the blocks that shift, for `frame`."""
        inputs, x = [], frame
        with torch.no_grad():
            for block in self.features:
                if isinstance(block, InvertedResidual) and block.use_res_connect:
                    inputs.append(x)
                x = block(x)
        return inputs


def compiled(model, size, **options):
    torch.manual_seed(0)
    return pipecomp.compile(model.eval(), example_input=(1, 3, size, size), **options).eval()


# -- 1. ONNX Runtime against PyTorch, per stage variant and per tick --------------------------
def per_variant(net, program):
    """{stage/variant: {torch_s, onnx_s}} for every variant that calls a model, on random state."""
    plan = net.plan
    torch.manual_seed(1)
    frame = torch.randn(plan.example_shape)
    state = {k: torch.randn_like(v) for k, v in zero_state(plan, plan.example_shape[0], "cpu").items()}
    out = {}
    for s, stage in enumerate(program.manifest["stages"]):
        for i, v in enumerate(stage["variants"]):
            if v["module"] is None:
                continue
            gm, model = net._stages[s].variants[i], program._models[v["module"]]
            args = [(frame if n == "frame" else state[n]).numpy() for n in v["inputs"]]
            with torch.no_grad():
                t_torch, t_onnx = timed([lambda: gm(frame, state), lambda: model(args)], ROUNDS)
            out[f"stage{s}/v{i}"] = {"ticks": len(v["ticks"]), "hyperperiod": stage["hyperperiod"],
                                     "torch_s": t_torch, "onnx_s": t_onnx}
    return out


def per_tick(net, program):
    """Mean seconds per tick over a hyperperiod: VideoNet.step and Program.step."""
    n = net.plan.hyperperiod
    xs = np.random.default_rng(0).standard_normal((n, *net.plan.example_shape)).astype(np.float32)
    ts = [torch.from_numpy(x) for x in xs]

    def torch_ticks():
        net.reset()
        for x in ts:
            net.step(x)

    def onnx_ticks():
        program.reset()
        for x in xs:
            program.step(x)
    with torch.no_grad():
        t_torch, t_onnx = timed([torch_ticks, onnx_ticks], ROUNDS)
    return {"torch_s": t_torch / n, "onnx_s": t_onnx / n}


def stages_against_torch(name, folder):
    net = compiled(getattr(models, name)(), 112, parallel=2, clocks="halve", shift="online")
    start = time.perf_counter()
    backend.export(net, folder)
    export_s = time.perf_counter() - start
    torch.set_num_threads(1)
    with backend.load(folder, workers=1, threads=1) as program:
        return {"export_s": export_s, "models": len(program.manifest["modules"]),
                "variants": per_variant(net, program), "tick": per_tick(net, program)}


# -- 2. against the hand-written TSM --------------------------------------------------------------
def against_hand(folder):
    torch.manual_seed(0)
    mnv2 = models.mobilenet_v2().eval()
    net = compiled(mnv2, 224, shift="online")
    hand, hand_clone = HandTSM(mnv2), HandTSM(mnv2, clone=True)
    frames = [torch.randn(1, 3, 224, 224) for _ in range(TICKS)]
    arrays = [f.numpy() for f in frames]
    buffers = hand.zeros(frames[0])
    if len(buffers) != len(net.plan.shift_nodes):
        raise AssertionError(f"the hand-written TSM shifts {len(buffers)} blocks, pipecomp {len(net.plan.shift_nodes)}")
    backend.export(net, folder)
    checked = _check_same_network(net, hand, frames, folder)

    def run_hand(module):
        def ticks():
            nonlocal buffers
            for f in frames:
                _, *buffers = module(f, *buffers)
        return ticks

    def run_step():
        for f in frames:
            net.step(f)

    (tick,) = net._stages
    state = zero_state(net.plan, 1, "cpu")

    def run_tick():  # the generated tick function alone: what net.step adds is around it
        nonlocal state
        for f in frames:
            _, state = tick(0, f, state)

    shifted = [(x, torch.randn(x.shape[0], x.shape[1] // 8, *x.shape[2:]), x.shape[1] // 8)
               for x in hand.shifted_inputs(frames[0])]

    def shifts_pipecomp():  # the online shift op of pipecomp's tick functions: its new memory is a copy
        for _ in frames:
            for x, memory, fold in shifted:
                shift_online(x, memory, fold)

    def shifts_hand():
        for _ in frames:
            for x, memory, fold in shifted:
                torch.cat((memory, x[:, fold:]), 1), x[:, :fold]

    rows = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        placement = dataclasses.replace(pipecomp.schedule(net, 1), threads_per_worker=threads)
        with Runtime(net, placement) as runtime, backend.load(folder, workers=1, threads=threads) as program:
            def run_runtime():
                for f in frames:
                    runtime.step(f)

            def run_onnx():
                for a in arrays:
                    program.step(a)
            names = ["hand", "net_step", "runtime", "onnx", "tick_function", "hand_with_copied_buffers",
                     "shift_ops_pipecomp", "shift_ops_hand"]
            with torch.no_grad():
                times = timed([run_hand(hand), run_step, run_runtime, run_onnx, run_tick, run_hand(hand_clone),
                               shifts_pipecomp, shifts_hand], HAND_ROUNDS, best=True)
            rows[threads] = {n: t / TICKS for n, t in zip(names, times)}
            rows[threads]["runtime_preparation"] = runtime.preparation
    torch.set_num_threads(2)
    return {"checked": checked, "per_frame_s": rows, "shift_nodes": len(buffers)}


def _check_same_network(net, hand, frames, folder):
    """pipecomp (net.step and the ONNX program) computes what the hand-written module computes."""
    buffers = hand.zeros(frames[0])
    net.reset()
    worst = 0.0
    with torch.no_grad(), backend.load(folder, workers=1) as program:
        for f in frames[:3]:
            want, *buffers = hand(f, *buffers)
            for got in (net.step(f), torch.from_numpy(np.array(program.step(f.numpy())))):
                worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    net.reset()
    if worst > 1e-4:
        raise AssertionError(f"pipecomp and the hand-written TSM differ: {worst:.1e} relative")
    return f"outputs of 3 ticks within {worst:.1e} relative"


def main():
    data = {"machine": machine(), "onnxruntime": onnxruntime.__version__, "rounds": ROUNDS,
            "hand_rounds": HAND_ROUNDS}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("resnet18", "mobilenet_v2"):
            data[name] = stages_against_torch(name, f"{tmp}/{name}")
        data["tsm"] = against_hand(f"{tmp}/tsm")
    torch.set_num_threads(2)
    data["load_after"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    save("onnx", data, table(data))


def table(d):
    def ms(x):
        return f"{1000 * x:.2f} ms"
    rows = ["| measure (112 px, parallel=2, clocks=halve, shift=online, 1 thread) | ONNX Runtime | PyTorch | "
            "ONNX Runtime / PyTorch |", "|---|---|---|---|"]
    for name in ("resnet18", "mobilenet_v2"):
        m = d[name]
        tick = m["tick"]
        rows.append(f"| {name}: per tick (export: {m['models']} models in {m['export_s']:.0f} s) | "
                    f"{ms(tick['onnx_s'])} | {ms(tick['torch_s'])} | {tick['onnx_s'] / tick['torch_s']:.2f}× |")
        for key, v in m["variants"].items():
            rows.append(f"| {name}: {key} ({v['ticks']} of {v['hyperperiod']} ticks) | {ms(v['onnx_s'])} | "
                        f"{ms(v['torch_s'])} | {v['onnx_s'] / v['torch_s']:.2f}× |")
    tsm = d["tsm"]
    rows += ["", "| online-TSM MobileNetV2, 224 px, per frame | 1 thread | 2 threads |", "|---|---|---|"]
    labels = {"hand": "hand-written module (the TSM demo's way)", "net_step": "pipecomp `net.step`",
              "runtime": "pipecomp threaded runtime, 1 worker (frozen)", "onnx": "pipecomp ONNX program (ONNX Runtime)",
              "tick_function": "`net.step`'s generated tick function alone",
              "hand_with_copied_buffers": "hand-written, buffers copied as pipecomp's shift does",
              "shift_ops_pipecomp": "the shift ops alone: pipecomp's (`shift_online`, memory copied)",
              "shift_ops_hand": "the shift ops alone: the hand module's (memory a view)"}
    one, two = tsm["per_frame_s"][1], tsm["per_frame_s"][2]
    for key, label in labels.items():
        cells = [f"{ms(r[key])} ({r[key] / r['hand']:.2f}×)" for r in (one, two)]
        rows.append(f"| {label} | {cells[0]} | {cells[1]} |")
    rows.append(f"\n_{d['machine']} at the start, {d['load_after']} at the end; "
                f"ONNX Runtime {d['onnxruntime']}; medians of {d['rounds']} interleaved rounds, TSM: best of "
                f"{d['hand_rounds']} interleaved rounds of {TICKS} frames; {tsm['shift_nodes']} shift nodes, pipecomp and the hand module agree ({tsm['checked']})._")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
