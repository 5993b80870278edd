"""Training depth-parallel video networks (issue 9): memory, speed and convergence, BPTT against Sideways.

Three sections, each written into results/train.json (and the README's table through .md):

1. memory: peak memory of one training episode (forward and backward of a clip) of resnet18,
   batch 2, parallel=4, for T = 8, 32, 128 frames at 112 px, and one large episode (224 px,
   T = 512, which BPTT's memory, extrapolated from the small episodes, puts above this machine's). Each point runs in a fresh process and is the peak resident memory above the
   baseline with the model loaded, the clip made and one short warm-up episode done
   (/proc/self/status VmHWM, reset through /proc/self/clear_refs). The process's address space
   is capped (RLIMIT_AS) so that an episode that does not fit fails alone, as "does not fit",
   instead of taking the shared machine's memory.
2. speed: training frames per second (B·T frames of the clip per forward-and-backward episode)
   of resnet18 at 112 px, split in two at the block boundary that balances its FLOPs best, at
   per-tick batch sizes 2 and 8:
   - BPTT on one worker (`net(clip)`: each node over all B·T frames at once), at its best of
     1 and 2 intra-op threads;
   - BPTT model-parallel on 2 worker threads (1 intra-op thread each): the first half over
     the whole clip, then the second half and the loss, then the backward back through the
     first half, each worker waiting for the other (the papers' BP baseline);
   - `torch.distributed.pipelining`'s GPipe and 1F1B schedules on 2 processes (gloo, loopback,
     1 thread each), the clip's ticks as T micro-batches of B frames, exact gradients;
   - Sideways (`pipecomp.train.backward(rule="sideways")`) on one worker, on 2 workers (threads)
     and on 2 processes.
   The peak memory of each row's episode above its baseline is recorded too (summed over the
   processes of a multi-process row).
3. convergence: the motion task of train_task.py (32 px, T = 8, 4 directions), Simple-CNN and a
   small ResNet compiled with 4 stages and `shift="online", shift_fraction=1/4` (the temporal
   shift is what lets these networks see motion: without it each node sees one frame), trained
   on the same clips (new ones every epoch) with BPTT and Sideways, `delays="aligned"` (Sideways) and `"diagonal"` (Skip-Sideways),
   several seeds, held-out accuracy; optionally at temporal strides 1, 2, 4. The small ResNet is
   cut so that its first block's identity connection spans two stages and the two delay modes
   differ; Simple-CNN has no connection that spans a stage, so its diagonal
   network is its aligned one and it has no Skip-Sideways row of its own.

The Sideways rows need `pipecomp.train`; where it cannot be imported they read
"not run: pipecomp.train missing".

Run: `python benchmarks/bench_train.py [--section memory|speed|convergence]` (all three: about
an hour on 2 shared cores); `--quick` for a small smoke run, written to --out (not to results/).
"""
import argparse
import ctypes
import json
import math
import os
import pathlib
import queue
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import pipecomp
import train_task
from _results import RESULTS, machine, save, timed

MISSING = "not run: pipecomp.train missing"
NO_PROCESSES = "not run: pipecomp.train has no multi-process runtime yet"
CLASSES = 10
LIBC = ctypes.CDLL("libc.so.6")


def trainer():
    """pipecomp.train, or None before it exists. A train.py that is not beside this pipecomp's
    own files (an editable install of another checkout answering for the missing module) is
    not it."""
    try:
        from pipecomp import train
    except ImportError:
        return None
    return train if pathlib.Path(train.__file__).parent == pathlib.Path(pipecomp.__file__).parent else None


def load() -> list:
    return [round(x, 2) for x in os.getloadavg()]


def loss_fn(output, target):
    return F.cross_entropy(output, target)


def counted_ticks(net, ticks: int) -> list:
    """Semantics §8's W with prediction latency 0: the ticks whose output depends on a frame."""
    return [t for t, frame in enumerate(net.timeline(ticks).output) if frame is not None]


def bptt(net, clip, targets):
    """Exact BPTT of one episode: the mean loss over the counted ticks of `net(clip)`, backward.
    Returns the per-tick losses [T], NaN where not counted (as `pipecomp.train.backward`)."""
    out = net(clip)
    ticks = counted_ticks(net, clip.shape[1])
    terms = [loss_fn(out[:, t], targets[:, t]) for t in ticks]
    (sum(terms) / len(terms)).backward()
    losses = torch.full((clip.shape[1],), math.nan)
    losses[ticks] = torch.stack(terms).detach()
    return losses


def episode(rule, net, clip, targets, workers=None):
    if rule == "bptt":
        return bptt(net, clip, targets)
    return trainer().backward(net, clip, targets, loss_fn, rule="sideways", workers=workers)


# Memory: status of this process, in MiB.

def status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}: this benchmark needs Linux")


def status_meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    raise RuntimeError(f"/proc/meminfo has no {key}: this benchmark needs Linux")


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def peak_above(fn) -> float:
    """MiB of resident memory that `fn()` needs above what the process holds before it."""
    LIBC.malloc_trim(0)  # hand memory freed by earlier work back, or fn() would reuse it unseen
    reset_peak()
    base = status("VmRSS")
    fn()
    return status("VmHWM") - base


def memory_point(rule, frames, size, batch, parallel, limit_mib):
    """One episode in this (fresh) process; a dict for the parent, printed as JSON."""
    torch.manual_seed(0)
    net = pipecomp.compile(tvm.resnet18(num_classes=CLASSES), parallel=parallel,
                           example_input=(1, 3, size, size)).train()
    clip = torch.randn(batch, frames, 3, size, size)
    targets = torch.randint(CLASSES, (batch, frames))
    warm = net.latency + 2
    episode(rule, net, clip[:, :warm], targets[:, :warm])  # kernels, autograd's threads, .grad buffers
    resource.setrlimit(resource.RLIMIT_AS, (int((status("VmSize") + limit_mib) * 2**20), resource.RLIM_INFINITY))
    try:
        peak = peak_above(lambda: episode(rule, net, clip, targets))
    except (RuntimeError, MemoryError) as e:
        return {"fits": False, "limit_mib": limit_mib, "error": str(e).splitlines()[0][:200]}
    return {"fits": True, "peak_mib": peak, "limit_mib": limit_mib}


def run_point(rule, frames, size, batch, parallel, limit_mib):
    if rule == "sideways" and trainer() is None:
        return {"fits": None, "note": MISSING}
    cmd = [sys.executable, __file__, "--memory-point", rule, str(frames), str(size), str(batch), str(parallel),
           str(limit_mib)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        # killed, e.g. by the kernel's out-of-memory killer despite the cap
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"fits": False, "limit_mib": limit_mib, "error": tail[:200], "seconds": seconds}
    point = json.loads(done.stdout.strip().splitlines()[-1])
    point["seconds"] = seconds
    return point


def memory(quick):
    frames, size, batch, parallel = ((4,), 32, 2, 4) if quick else ((8, 32, 128), 112, 2, 4)
    large = (8, 64) if quick else (512, 224)
    available = status_meminfo("MemAvailable")
    limit = int(min(0.6 * available, 12 * 1024))  # the machine is shared: never take most of it
    large_limit = 16 if quick else limit  # the smoke run checks that an episode too large fails alone
    data = {"model": f"resnet18, batch {batch}, parallel={parallel}", "size": size, "machine_mib": status_meminfo("MemTotal"),
            "available_mib": available, "limit_mib": limit, "load_before": load(), "points": []}
    for t in frames:
        for rule in ("bptt", "sideways"):
            data["points"].append(dict(rule=rule, frames=t, size=size, **run_point(rule, t, size, batch, parallel, limit)))
            print(data["points"][-1], flush=True)
    for rule in ("bptt", "sideways"):
        data["points"].append(dict(rule=rule, frames=large[0], size=large[1],
                                   **run_point(rule, large[0], large[1], batch, parallel, large_limit)))
        print(data["points"][-1], flush=True)
    data["load_after"] = load()
    bp = {p["frames"]: p["peak_mib"] for p in data["points"] if p["rule"] == "bptt" and p["size"] == size and p.get("fits")}
    if len(bp) >= 2:  # BPTT's memory is linear in the frames it stores: extrapolate the large point
        lo, hi = min(bp), max(bp)
        per_frame = (bp[hi] - bp[lo]) / (hi - lo) * (large[1] / size) ** 2
        data["bptt_large_extrapolated_mib"] = bp[lo] * (large[1] / size) ** 2 + per_frame * (large[0] - lo)
    return data


# Speed.

def blocks(model):
    """resnet18 as a list of (name, module) in execution order, blocks whole."""
    out = [(n, getattr(model, n)) for n in ("conv1", "bn1", "relu", "maxpool")]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        out += [(f"{layer}.{i}", b) for i, b in enumerate(getattr(model, layer))]
    return out + [("avgpool", model.avgpool), ("flatten", nn.Flatten()), ("fc", model.fc)]


def halves(model, size):
    """(front, back, name of back's first block): resnet18 cut at the block boundary that best
    balances the FLOPs of one frame."""
    parts, x, flops = blocks(model), torch.zeros(2, 3, size, size), []  # 2: batch norm in train mode
    with torch.no_grad():
        for _, m in parts:
            with FlopCounterMode(display=False) as counter:
                x = m(x)
            flops.append(counter.get_total_flops())
    total = sum(flops)
    cut = min(range(1, len(parts)), key=lambda i: max(sum(flops[:i]), total - sum(flops[:i])))
    return nn.Sequential(*[m for _, m in parts[:cut]]), nn.Sequential(*[m for _, m in parts[cut:]]), parts[cut][0]


class ModelParallelBPTT:
    """Exact BPTT with the two halves of a 2-stage network on two threads, 1 intra-op thread
    each: the front over the whole clip, the back (reading the front's output one tick late, the
    register between the stages) with the loss and its backward, then the front's backward.
    Each waits for the other: the papers' BP baseline on two devices."""

    def __init__(self, front, back):
        self.front, self.back = front, back
        self.to_front, self.to_back, self.done = queue.Queue(), queue.Queue(), queue.Queue()
        self.threads = [threading.Thread(target=self._front_loop, daemon=True),
                        threading.Thread(target=self._back_loop, daemon=True)]
        for t in self.threads:
            t.start()

    def _front_loop(self):
        torch.set_num_threads(1)
        while (clip := self.to_front.get()) is not None:
            h = self.front(clip.flatten(0, 1))
            self.to_back.put(h.detach().requires_grad_())
            grad = self.to_front.get()
            h.backward(grad)
            self.done.put(None)
        self.to_back.put(None)

    def _back_loop(self):
        torch.set_num_threads(1)
        while (h := self.to_back.get()) is not None:
            b, t, targets = self.shape[0], self.shape[1], self.targets
            seq = h.unflatten(0, (b, t))
            delayed = torch.cat([torch.zeros_like(seq[:, :1]), seq[:, :-1]], 1)  # the register: one tick late
            out = self.back(delayed.flatten(0, 1)).unflatten(0, (b, t))
            terms = [loss_fn(out[:, i], targets[:, i]) for i in range(1, t)]  # tick 0 reflects no frame
            (sum(terms) / len(terms)).backward()
            self.to_front.put(h.grad)

    def __call__(self, clip, targets):
        self.shape, self.targets = clip.shape, targets
        self.to_front.put(clip)
        self.done.get()

    def close(self):
        self.to_front.put(None)
        for t in self.threads:
            t.join()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipelined_rank(rank, port, size, batch, frames, rounds, out):
    """One process of the GPipe and 1F1B rows: its half of resnet18 as a PipelineStage."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    front, back, _ = halves(tvm.resnet18(num_classes=CLASSES), size)
    torch.manual_seed(1)
    # The clip's frames tick by tick: micro-batch i holds the B frames of tick i.
    frames_x = torch.randn(batch, frames, 3, size, size).transpose(0, 1).flatten(0, 1)
    targets = torch.randint(CLASSES, (batch, frames)).transpose(0, 1).flatten(0, 1)
    stage = PipelineStage(front if rank == 0 else back, rank, 2, torch.device("cpu"))
    result = {}
    for name, cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        schedule = cls(stage, n_microbatches=frames, loss_fn=loss_fn)

        def step():
            stage.submod.zero_grad()
            if rank == 0:
                schedule.step(frames_x)
            else:
                schedule.step(target=targets)
        step()  # warm-up: shapes, buffers
        times = []
        for _ in range(rounds):
            dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        dist.barrier()
        mib = peak_above(step)
        result[name] = {"seconds": statistics.median(times), "peak_mib": mib}
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        pathlib.Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def pipelined(size, batch, frames, rounds):
    """GPipe and 1F1B on 2 processes: seconds per episode (the slower rank) and peak MiB (summed)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        mp.spawn(pipelined_rank, args=(free_port(), size, batch, frames, rounds, out), nprocs=2)
        ranks = json.loads(pathlib.Path(out).read_text())
    return {name: {"seconds": max(r[name]["seconds"] for r in ranks), "peak_mib": sum(r[name]["peak_mib"] for r in ranks)}
            for name in ("gpipe", "1f1b")}


def with_threads(n, fn):
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            fn()
        finally:
            torch.set_num_threads(before)
    return run


def speed(quick, frames, rounds):
    size, batches = (32, (2,)) if quick else (112, (2, 8))
    train = trainer()
    data = {"model": "resnet18", "size": size, "frames": frames, "rounds": rounds, "load_before": load(), "rows": {}}
    for batch in batches:
        torch.manual_seed(0)
        model = tvm.resnet18(num_classes=CLASSES).train()
        front, back, cut = halves(model, size)
        net = pipecomp.compile(model, cuts=[cut], example_input=(1, 3, size, size)).train()
        data["cut"] = cut
        torch.manual_seed(1)
        clip = torch.randn(batch, frames, 3, size, size)
        targets = torch.randint(CLASSES, (batch, frames))
        mp_bptt = ModelParallelBPTT(front, back)

        def fresh(fn):
            def run():
                net.zero_grad()
                model.zero_grad()
                fn()
            return run
        fns = {"bptt_1_thread": with_threads(1, fresh(lambda: bptt(net, clip, targets))),
               "bptt_2_threads": with_threads(2, fresh(lambda: bptt(net, clip, targets))),
               "bptt_model_parallel_2_workers": fresh(lambda: mp_bptt(clip, targets))}
        if train is not None:
            def sideways(workers):
                return fresh(lambda: train.backward(net, clip, targets, loss_fn, rule="sideways", workers=workers))
            fns.update({"sideways_1_thread": with_threads(1, sideways(None)),
                        "sideways_2_threads": with_threads(2, sideways(None)),
                        "sideways_2_workers": sideways(2)})
        seconds = dict(zip(fns, timed(list(fns.values()), rounds)))
        rows = {k: {"seconds": s, "fps": batch * frames / s, "peak_mib": peak_above(fns[k])} for k, s in seconds.items()}
        mp_bptt.close()
        for name, row in pipelined(size, batch, frames, rounds).items():
            rows[name] = dict(row, fps=batch * frames / row["seconds"])
        if train is None:
            rows.update({k: {"note": MISSING} for k in ("sideways_1_thread", "sideways_2_threads", "sideways_2_workers")})
        rows["sideways_2_processes"] = {"note": MISSING if train is None else NO_PROCESSES}
        data["rows"][str(batch)] = rows
        print(batch, json.dumps(rows), flush=True)
    data["load_after"] = load()
    return data


# Convergence.

CONVERGENCE = {"size": 32, "frames": 8, "directions": 4, "clips_per_epoch": 512, "held_out_clips": 256,
               "epochs": 8, "batch": 8, "lr": 1e-3, "parallel": 4, "shift_fraction": 1 / 4}
# The small ResNet's stage starts (fx node names): stage 1 is the first block's second
# convolution alone, so that the block's identity connection spans two stage boundaries: delay 2
# when aligned, 1 when diagonal (the Skip-Sideways shortcut; information latency 3 against 2).
RESNET_CUTS = ["blocks_0_conv2", "add", "blocks_2_conv2"]


def video_net(model_name, delays, cfg, seed):
    torch.manual_seed(seed)
    model = train_task.MODELS[model_name](cfg["directions"])
    where = dict(shift_place="inplace", parallel=cfg["parallel"]) if model_name == "simple-cnn" else dict(cuts=RESNET_CUTS)
    return pipecomp.compile(model, delays=delays, shift="online", shift_fraction=cfg["shift_fraction"],
                            example_input=(1, 3, cfg["size"], cfg["size"]), **where)


def accuracy(net, x, y, batch=64):
    """Held-out clip accuracy: the class of the logits averaged over the last half of the ticks."""
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(x[i:i + batch])[:, x.shape[1] // 2:].mean(1) for i in range(0, len(x), batch)])
    net.train()
    return (logits.argmax(1) == y).float().mean().item()


def fit(rule, net, epochs, held_out, cfg, seed):
    """Adam over `epochs` (each a list of (clips, labels), new clips every epoch: with a fixed set
    the small ResNet learned the training clips by heart before it learned motion), the clips of
    an epoch in an order drawn from `seed`; held-out accuracy after every epoch."""
    opt = torch.optim.Adam(net.parameters(), cfg["lr"])
    order = torch.Generator().manual_seed(seed)
    curve, losses, start = [], [], time.perf_counter()
    net.train()
    for x, y in epochs:
        perm = torch.randperm(len(x), generator=order)
        epoch_losses = []
        for i in range(0, len(x) - cfg["batch"] + 1, cfg["batch"]):
            idx = perm[i:i + cfg["batch"]]
            opt.zero_grad()
            per_tick = episode(rule, net, x[idx], y[idx, None].expand(-1, x.shape[1]))
            opt.step()
            epoch_losses.append(per_tick.nanmean().item())
        losses.append(statistics.fmean(epoch_losses))
        curve.append(accuracy(net, *held_out))
    return {"held_out_accuracy": curve[-1], "accuracy_by_epoch": curve, "train_loss_by_epoch": losses,
            "seconds": time.perf_counter() - start}


ROWS = (("bptt", "aligned"), ("sideways", "aligned"), ("bptt", "diagonal"), ("sideways", "diagonal"))


def convergence(quick, seeds, strides, models):
    cfg = dict(CONVERGENCE)
    if quick:
        cfg.update(clips_per_epoch=16, held_out_clips=8, epochs=1, batch=4)
    data = {"config": cfg, "load_before": load(), "rows": []}
    train = trainer()
    task = dict(frames=cfg["frames"], size=cfg["size"], directions=cfg["directions"])
    for stride in strides:
        # the same clips for every row: epoch e's from seed 1 + e, the held-out ones from seed 0
        epochs = [train_task.clips(cfg["clips_per_epoch"], stride=stride, seed=1 + e, **task)
                  for e in range(cfg["epochs"])]
        held_out = train_task.clips(cfg["held_out_clips"], split="held-out", stride=stride, seed=0, **task)
        for model_name in models:
            same = (video_net(model_name, "aligned", cfg, 0).plan.delay_of
                    == video_net(model_name, "diagonal", cfg, 0).plan.delay_of)
            for rule, delays in ROWS:
                row = {"model": model_name, "rule": rule, "delays": delays, "stride": stride}
                if same and delays == "diagonal":
                    continue  # the same network as the aligned one
                if rule == "sideways" and train is None:
                    data["rows"].append(dict(row, note=MISSING))
                    continue
                for seed in seeds:
                    result = fit(rule, video_net(model_name, delays, cfg, seed), epochs, held_out, cfg, seed)
                    data["rows"].append(dict(row, seed=seed, **result))
                    print({k: v for k, v in data["rows"][-1].items() if not k.endswith("epoch")}, flush=True)
    data["load_after"] = load()
    return data


# Tables.

def mib(x):
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def memory_table(m):
    lines = [f"| {m['model']}: peak memory of one episode | BPTT | Sideways |", "|---|---|---|"]
    cells = {}
    for p in m["points"]:
        cell = (p.get("note") if p["fits"] is None else
                mib(p["peak_mib"]) if p["fits"] else f"does not fit (address space capped at {mib(p['limit_mib'])})")
        cells.setdefault((p["frames"], p["size"]), {})[p["rule"]] = cell
    for (frames, size), c in cells.items():
        lines.append(f"| T = {frames}, {size} px | {c.get('bptt', '')} | {c.get('sideways', '')} |")
    notes = [f"peak resident memory above the loaded model and clip, fresh process per point; machine "
             f"{mib(m['machine_mib'])}, {mib(m['available_mib'])} available"]
    if "bptt_large_extrapolated_mib" in m:
        notes.append(f"BPTT's large episode would need about {mib(m['bptt_large_extrapolated_mib'])} "
                     "(linear in frames and pixels from its small episodes)")
    notes.append(f"load average {m['load_before']} before, {m['load_after']} after")
    return "\n".join(lines) + "\n\n_" + "; ".join(notes) + "._"


SPEED_ROWS = (("bptt_1_thread", "BPTT, one worker, 1 thread"), ("bptt_2_threads", "BPTT, one worker, 2 threads"),
              ("bptt_model_parallel_2_workers", "BPTT, model-parallel, 2 workers (threads)"),
              ("gpipe", "GPipe, 2 processes (torch.distributed.pipelining)"),
              ("1f1b", "1F1B, 2 processes (torch.distributed.pipelining)"),
              ("sideways_1_thread", "Sideways, one worker, 1 thread"), ("sideways_2_threads", "Sideways, one worker, 2 threads"),
              ("sideways_2_workers", "Sideways, 2 workers (threads)"), ("sideways_2_processes", "Sideways, 2 processes"))


def speed_table(s):
    batches = list(s["rows"])
    lines = ["| training, " + f"{s['model']} {s['size']} px, T = {s['frames']}, cut before {s.get('cut')} | "
             + " | ".join(f"batch {b}: frames/s (peak memory)" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for key, label in SPEED_ROWS:
        cells = []
        for b in batches:
            r = s["rows"][b].get(key, {})
            cells.append(r["note"] if "note" in r else f"{r['fps']:.1f} ({mib(r['peak_mib'])})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n_frames per second: B·T frames over the median of {s['rounds']} interleaved "
                               f"episodes (forward and backward); load average {s['load_before']} before, "
                               f"{s['load_after']} after._")


def convergence_table(c):
    cfg = c["config"]
    lines = [f"| motion task ({cfg['size']} px, T = {cfg['frames']}, {cfg['directions']} directions, "
             f"{cfg['epochs']} epochs of {cfg['clips_per_epoch']} new clips) | stride | held-out accuracy per seed | mean |",
             "|---|---|---|---|"]
    groups = {}
    for r in c["rows"]:
        groups.setdefault((r["model"], r["rule"], r["delays"], r["stride"]), []).append(r)
    for (model, rule, delays, stride), rows in groups.items():
        name = {"bptt": "BPTT", "sideways": "Sideways" if delays == "aligned" else "Skip-Sideways"}[rule]
        if "note" in rows[0]:
            lines.append(f"| {model}, {name} ({delays}) | {stride} | {rows[0]['note']} | |")
            continue
        accs = [r["held_out_accuracy"] for r in rows]
        lines.append(f"| {model}, {name} ({delays}) | {stride} | {', '.join(f'{a:.2f}' for a in accs)} | "
                     f"{statistics.fmean(accs):.2f} |")
    return "\n".join(lines) + (f"\n\n_chance is {1 / cfg['directions']:.2f}; Adam, lr {cfg['lr']}, {cfg['batch']} clips "
                               f"per episode; load average {c['load_before']} before, {c['load_after']} after._")


def table(d):
    parts = [f"_{d['machine']}._"]
    for key, fn in (("memory", memory_table), ("speed", speed_table), ("convergence", convergence_table)):
        if key in d:
            parts.append(fn(d[key]))
    return "\n\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("memory", "speed", "convergence"), action="append",
                        help="run only this section (repeatable; default: all three)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run, written to --out")
    parser.add_argument("--out", type=pathlib.Path, help="folder for the --quick run's train.json (default: a temporary one)")
    parser.add_argument("--frames", type=int, default=8, help="speed: frames per episode (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="speed: timed episodes per row (default 3)")
    parser.add_argument("--seeds", type=int, default=2, help="convergence: seeds per row (default 2)")
    parser.add_argument("--strides", type=int, nargs="+", default=[1], help="convergence: temporal strides (default 1)")
    parser.add_argument("--models", nargs="+", choices=sorted(train_task.MODELS), default=list(train_task.MODELS),
                        help="convergence: networks (default both)")
    parser.add_argument("--memory-point", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_point:
        rule, *numbers = args.memory_point
        print(json.dumps(memory_point(rule, *map(int, numbers))))
        return
    sections = args.section or ["memory", "speed", "convergence"]
    path = (args.out or pathlib.Path(tempfile.mkdtemp())) / "train.json" if args.quick else RESULTS / "train.json"
    new = {"machine": machine()}
    if "memory" in sections:
        new["memory"] = memory(args.quick)
    if "speed" in sections:
        new["speed"] = speed(args.quick, 4 if args.quick else args.frames, 1 if args.quick else args.rounds)
    if "convergence" in sections:
        new["convergence"] = convergence(args.quick, range(1 if args.quick else args.seeds), args.strides, args.models)
    # read only now: a section run at the same time in another process keeps its results
    data = {**(json.loads(path.read_text()) if path.exists() else {}), **new}
    if args.quick:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(table(data))
    else:
        save("train", data, table(data))


if __name__ == "__main__":
    main()
