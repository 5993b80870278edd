"""Training depth-parallel video networks (issue 9): memory, speed and convergence, BPTT against Sideways.

Three sections, each written into results/train.json (and the README's table through .md):

1. memory: peak memory of one training episode (forward and backward of a clip) of resnet18,
   batch 2, parallel=4, for T = 8, 32, 128 frames at 112 px, and one large episode (224 px,
   T = 512, which BPTT's memory, extrapolated from the small episodes, puts above this
   machine's). Each point runs in a fresh process and is the peak resident memory above the
   baseline with the model loaded, the clip made and one short warm-up episode done
   (/proc/self/status VmHWM, reset through /proc/self/clear_refs). The process's address space
   is capped (RLIMIT_AS) so that an episode that does not fit fails alone, as "does not fit",
   instead of taking the shared machine's memory.
2. speed: training frames per second (B·T frames of the clip per forward-and-backward episode)
   of resnet18 at 112 px, split in two at the block boundary that balances its FLOPs best, at
   per-tick batch sizes 2 and 8:
   - BPTT on one worker (`net(clip)`: each node over all B·T frames at once), at its best of
     1 and 2 intra-op threads;
   - BPTT model-parallel on 2 worker threads (`workers=2`): each stage over the whole clip in
     turn, forward then backward, each worker waiting for the other (the papers' BP baseline);
   - `torch.distributed.pipelining`'s GPipe and 1F1B schedules on 2 processes (gloo, loopback,
     1 thread each), the clip's ticks as T micro-batches of B frames, exact gradients;
   - Sideways on one worker (1 and 2 intra-op threads), on 2 workers (threads, `workers=2`) and
     on 2 processes (`distributed.train`, gloo, 1 thread each, SGD with learning rate 0 so that
     every episode starts from the same weights).
   The peak memory of each row's episode above its baseline is recorded too (summed over the
   processes of a multi-process row).
3. convergence: the motion task of train_task.py (32 px, T = 8, 4 directions), Simple-CNN and a
   small ResNet compiled with 4 stages and `shift="online", shift_fraction=1/4` (the temporal
   shift is what lets these networks see motion: without it each node sees one frame), trained
   on the same clips (new ones every epoch) with BPTT and Sideways, `delays="aligned"`
   (Sideways) and `"diagonal"` (Skip-Sideways), several seeds, held-out accuracy; optionally at
   temporal strides 1, 2, 4. The small ResNet is cut so that its first block's identity
   connection spans two stages and the two delay modes differ; Simple-CNN has no connection
   that spans a stage, so its diagonal network is its aligned one and it has no Skip-Sideways
   row of its own.

Every row trains through `pipecomp.train.backward` (`rule="bptt"` or `"sideways"`, `workers=`)
or, on processes, `pipecomp.backends.distributed.train`.

Run: `python benchmarks/bench_train.py [--section memory|speed|convergence]` (all three: about
an hour on 2 shared cores); `--quick` for a small smoke run, written to --out (not to results/).
"""
import argparse
import ctypes
import json
import os
import pathlib
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import pipecomp
import train_task
from pipecomp import train
from pipecomp.backends import distributed
from _results import RESULTS, machine, save, timed

CLASSES = 10
LIBC = ctypes.CDLL("libc.so.6")


def load() -> list:
    return [round(x, 2) for x in os.getloadavg()]


def loss_fn(output, target):
    return F.cross_entropy(output, target)


def episode(rule, net, clip, targets, workers=None):
    if rule == ABLATION:
        return without_memory_gradient(net, clip, targets)
    return train.backward(net, clip, targets, loss_fn, rule=rule, workers=workers)


# An ablation outside semantics §8: Sideways with the online shift's memory gradient dropped. §8
# rule 2 sends the gradient a shift computes at tick t for its memory (the channels of its input at
# t - 1) to the input at t + 1, pairing it with activations two frames later; on a task whose only
# signal is motion, that pairing reverses the very relation between frames the network must learn.
# Only this benchmark uses it, to show that effect; pipecomp.train follows the contract.
ABLATION = "sideways-without-memory-gradient"


class _WithoutMemoryGradient(train._Sideways):
    def step(self, *args, **kwargs):
        result = super().step(*args, **kwargs)
        self.grads = {k: g for k, g in self.grads.items() if not k.endswith("_gmem")}
        return result


def without_memory_gradient(net, clip, targets):
    T = clip.shape[1]
    W = train._check_episode(net, clip, targets, loss_fn, "sideways", None, 0)
    losses = torch.full((T,), float("nan"))
    trainer = _WithoutMemoryGradient(net)
    train.episode(trainer, clip, targets, loss_fn, W, 0, losses)
    return losses


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
    cmd = [sys.executable, __file__, "--memory-point", rule, str(frames), str(size), str(batch), str(parallel),
           str(limit_mib)]
    start = time.perf_counter()
    # Large blocks straight from mmap: resident memory then follows the live tensors rather than
    # glibc's heap high-water mark (which otherwise grew Sideways' peak by 17% from T = 8 to 128).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        # killed, e.g. by the kernel's out-of-memory killer despite the cap
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"fits": False, "limit_mib": limit_mib, "error": tail[:200], "seconds": seconds}
    point = json.loads(done.stdout.strip().splitlines()[-1])
    point["seconds"] = seconds
    return point


def memory(quick, keep):
    """The points smallest first, `keep(data)` after each: the large Sideways episode, last,
    takes longest."""
    frames, size, batch, parallel = ((4,), 32, 2, 4) if quick else ((8, 32, 128), 112, 2, 4)
    large = (8, 64) if quick else (512, 224)
    available = status_meminfo("MemAvailable")
    limit = int(min(0.6 * available, 12 * 1024))  # the machine is shared: never take most of it
    large_limit = 16 if quick else limit  # the smoke run checks that an episode too large fails alone
    data = {"model": f"resnet18, batch {batch}, parallel={parallel}", "size": size, "machine_mib": status_meminfo("MemTotal"),
            "available_mib": available, "load_before": load(), "points": []}
    points = [(rule, t, size, limit) for t in frames for rule in ("bptt", "sideways")]
    points += [(rule, *large, large_limit) for rule in ("bptt", "sideways")]
    data["planned"] = [(t, size) for t in frames] + [large]
    for rule, t, px, cap in points:
        data["points"].append(dict(rule=rule, frames=t, size=px, **run_point(rule, t, px, batch, parallel, cap)))
        print(data["points"][-1], flush=True)
        data["load_after"] = load()
        bp = {p["frames"]: p["peak_mib"] for p in data["points"] if p["rule"] == "bptt" and p["size"] == size and p["fits"]}
        if len(bp) >= 2:  # BPTT's memory is linear in the frames it stores: extrapolate the large point
            lo, hi = min(bp), max(bp)
            per_frame = (bp[hi] - bp[lo]) / (hi - lo) * (large[1] / size) ** 2
            data["bptt_large_extrapolated_mib"] = bp[lo] * (large[1] / size) ** 2 + per_frame * (large[0] - lo)
        keep(data)


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resnet18_halves(size):
    """resnet18 (the same weights in every process), its two halves, and the network compiled
    with its stage boundary between them."""
    torch.manual_seed(0)
    model = tvm.resnet18(num_classes=CLASSES).train()
    front, back, cut = halves(model, size)
    return model, front, back, pipecomp.compile(model, cuts=[cut], example_input=(1, 3, size, size)).train(), cut


def episode_data(batch, frames, size):
    torch.manual_seed(1)
    return torch.randn(batch, frames, 3, size, size), torch.randint(CLASSES, (batch, frames))


def rank_rows(rank, port, size, batch, frames, rounds, out):
    """One of the 2 processes of the multi-process rows: GPipe and 1F1B with this rank's half of
    resnet18 as a PipelineStage, then Sideways with this rank's stage (distributed.train)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, front, back, net, _ = resnet18_halves(size)
    clip, targets = episode_data(batch, frames, size)
    # pipelining's micro-batches are the clip's ticks: micro-batch i holds the B frames of tick i
    by_tick, targets_by_tick = clip.transpose(0, 1).flatten(0, 1), targets.transpose(0, 1).flatten(0, 1)
    stage = PipelineStage(front if rank == 0 else back, rank, 2, torch.device("cpu"))
    steps = {}
    for name, cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        schedule = cls(stage, n_microbatches=frames, loss_fn=loss_fn)
        steps[name] = (lambda s: lambda: s.step(by_tick) if rank == 0 else s.step(target=targets_by_tick))(schedule)
    # Sideways: lr 0, so that every timed episode starts from the same weights as the other rows
    steps["sideways_2_processes"] = lambda: distributed.train(net, [(clip, targets)], loss_fn,
                                                              lambda ps: torch.optim.SGD(ps, lr=0.0))
    result = {}
    for name, step in steps.items():
        model.zero_grad()
        step()  # warm-up: shapes, buffers
        times = []
        for _ in range(rounds):
            model.zero_grad()
            dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        model.zero_grad()
        dist.barrier()
        result[name] = {"seconds": statistics.median(times), "peak_mib": peak_above(step)}
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        pathlib.Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def multi_process_rows(size, batch, frames, rounds):
    """Seconds per episode (the slower rank's median) and peak MiB (summed over the 2 ranks)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        mp.spawn(rank_rows, args=(free_port(), size, batch, frames, rounds, out), nprocs=2)
        ranks = json.loads(pathlib.Path(out).read_text())
    return {name: {"seconds": max(r[name]["seconds"] for r in ranks), "peak_mib": sum(r[name]["peak_mib"] for r in ranks)}
            for name in ranks[0]}


def with_threads(n, fn):
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            fn()
        finally:
            torch.set_num_threads(before)
    return run


def balance(quick, rounds=5):
    """How evenly the speed rows' cut splits the work: forward and backward of each half of
    resnet18 on one tick's frames, one thread, median of `rounds`; a pipeline of the two halves
    on 2 workers can reach at most their total over twice the larger."""
    size, batch = (32, 2) if quick else (112, 8)
    model, front, back, _, cut = resnet18_halves(size)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        mid = front(x)
    def tick(half, inp):
        def run():
            out = half(inp.clone().requires_grad_())
            out.backward(torch.ones_like(out))
        return with_threads(1, run)
    seconds = timed([tick(front, x), tick(back, mid)], rounds)
    return {"model": "resnet18", "size": size, "batch": batch, "cut": cut, "seconds": seconds,
            "bound": sum(seconds) / (2 * max(seconds)), "load": load()}


def speed(quick, frames, rounds):
    size, batches = (32, (2,)) if quick else (112, (2, 8))
    data = {"model": "resnet18", "size": size, "frames": frames, "rounds": rounds, "load_before": load(), "rows": {}}
    for batch in batches:
        model, _, _, net, data["cut"] = resnet18_halves(size)
        clip, targets = episode_data(batch, frames, size)

        def row(rule, workers=None, threads=None):
            def run():
                model.zero_grad()
                train.backward(net, clip, targets, loss_fn, rule=rule, workers=workers)
            return run if threads is None else with_threads(threads, run)
        fns = {"bptt_1_thread": row("bptt", threads=1), "bptt_2_threads": row("bptt", threads=2),
               "bptt_model_parallel_2_workers": row("bptt", workers=2),
               "sideways_1_thread": row("sideways", threads=1), "sideways_2_threads": row("sideways", threads=2),
               "sideways_2_workers": row("sideways", workers=2)}
        seconds = dict(zip(fns, timed(list(fns.values()), rounds)))
        rows = {k: {"seconds": s, "peak_mib": peak_above(fns[k])} for k, s in seconds.items()}
        rows.update(multi_process_rows(size, batch, frames, rounds))
        for r in rows.values():
            r["fps"] = batch * frames / r["seconds"]
        data["rows"][str(batch)] = rows
        print(batch, json.dumps(rows), flush=True)
    data["load_after"] = load()
    return data


# Convergence.

# 16 frames: with 8, a 4-stage network's first stage gets gradients at only 2 ticks of an episode
# (they reach it 2·3 ticks after the first frame), and Sideways stayed at chance.
CONVERGENCE = {"size": 32, "frames": 16, "directions": 4, "clips_per_epoch": 512, "held_out_clips": 128,
               "epochs": 4, "batch": 8, "lr": 1e-3, "parallel": 4, "shift_fraction": 1 / 4}
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


ROWS = (("bptt", "aligned"), ("sideways", "aligned"), (ABLATION, "aligned"), ("bptt", "diagonal"),
        ("sideways", "diagonal"))


def convergence(quick, seeds, strides, models, keep, epochs=None, earlier=None):
    """The rows seed by seed, so that a run cut short has whole seeds; `keep(data)` after each row.
    `epochs` (default the config's) trains longer or shorter: the rows say how many. The rows of
    `earlier` (a convergence section of the results file) on the same task are not trained again."""
    cfg = dict(CONVERGENCE, epochs=epochs or CONVERGENCE["epochs"])
    if quick:
        cfg.update(clips_per_epoch=16, held_out_clips=8, epochs=epochs or 1, batch=4)
    data = {"config": cfg, "load_before": load(), "rows": []}
    done = {row_key(r) for r in rows_of_task(earlier, cfg)}
    task = dict(frames=cfg["frames"], size=cfg["size"], directions=cfg["directions"])
    for stride in strides:
        # the same clips for every row: epoch e's from seed 1 + e, the held-out ones from seed 0
        epochs = [train_task.clips(cfg["clips_per_epoch"], stride=stride, seed=1 + e, **task)
                  for e in range(cfg["epochs"])]
        held_out = train_task.clips(cfg["held_out_clips"], split="held-out", stride=stride, seed=0, **task)
        for seed in seeds:
            for model_name in models:
                same = (video_net(model_name, "aligned", cfg, 0).plan.delay_of
                        == video_net(model_name, "diagonal", cfg, 0).plan.delay_of)
                for rule, delays in ROWS:
                    if same and delays == "diagonal":
                        continue  # the same network as the aligned one
                    if (model_name, rule, delays, stride, cfg["epochs"], seed) in done:
                        continue
                    result = fit(rule, video_net(model_name, delays, cfg, seed), epochs, held_out, cfg, seed)
                    data["rows"].append(dict(model=model_name, rule=rule, delays=delays, stride=stride, seed=seed,
                                             epochs=cfg["epochs"], **result))
                    print({k: v for k, v in data["rows"][-1].items() if not k.endswith("epoch")}, flush=True)
                    data["load_after"] = load()
                    keep(data)
    return data


# Tables.

def mib(x):
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def memory_table(m):
    lines = [f"| {m['model']}: peak memory of one episode | BPTT | Sideways |", "|---|---|---|"]
    cells = {(t, px): {} for t, px in m.get("planned", [])}
    for p in m["points"]:
        cell = mib(p["peak_mib"]) if p["fits"] else f"does not fit (address space capped at {mib(p['limit_mib'])})"
        cells.setdefault((p["frames"], p["size"]), {})[p["rule"]] = cell
    for (frames, size), c in cells.items():
        lines.append(f"| T = {frames}, {size} px | {c.get('bptt', 'not run')} | {c.get('sideways', 'not run')} |")
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
        cells = [f"{s['rows'][b][key]['fps']:.1f} ({mib(s['rows'][b][key]['peak_mib'])})" for b in batches]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    goals = []
    for b in batches:  # the goals, one line per batch size
        r = {k: v["fps"] for k, v in s["rows"][b].items()}
        best = max(r["bptt_1_thread"], r["bptt_2_threads"])
        for side in ("sideways_2_workers", "sideways_2_processes"):
            goals.append(f"batch {b}, {side.replace('_', ' ')}: {r[side] / r['bptt_model_parallel_2_workers']:.2f}× "
                         f"model-parallel BPTT, {r[side] / r['gpipe']:.2f}× GPipe, {r[side] / r['1f1b']:.2f}× 1F1B, "
                         f"{r[side] / best:.2f}× the best BPTT on one worker")
        # Each worker is one core: the pipeline's efficiency is its rate over twice the rate of one
        # worker on one core (the one-device rate), as the papers count devices.
        goals.append(f"batch {b}: Sideways pipeline efficiency on 2 workers (their rate over twice one worker's "
                     f"on 1 thread) {r['sideways_2_workers'] / (2 * r['sideways_1_thread']):.2f}")
    return "\n".join(lines) + (f"\n\n_frames per second: B·T frames over the median of {s['rounds']} episodes "
                               f"(forward and backward; the rows of one process interleaved); "
                               + "; ".join(goals) + f"; load average {s['load_before']} before, "
                               f"{s['load_after']} after._")


def row_key(r):
    return r["model"], r["rule"], r["delays"], r["stride"], r["epochs"], r["seed"]


def rows_of_task(section, cfg):
    """The rows of a convergence section (of the results file, or None) trained on the task of
    `cfg`: the same config up to the number of epochs."""
    def task(c):
        return {k: v for k, v in c.items() if k != "epochs"}
    return section["rows"] if section and task(section["config"]) == task(cfg) else []


def convergence_table(c):
    cfg = c["config"]
    lines = [f"| motion task ({cfg['size']} px, T = {cfg['frames']}, {cfg['directions']} directions, "
             f"{cfg['clips_per_epoch']} new clips per epoch) | stride | epochs | held-out accuracy per seed | mean |",
             "|---|---|---|---|---|"]
    groups = {}
    order = {rule_delays: i for i, rule_delays in enumerate(ROWS)}
    for r in sorted(c["rows"], key=lambda r: (r["stride"], r["epochs"],
                                              list(train_task.MODELS).index(r["model"]),
                                              order[r["rule"], r["delays"]], r["seed"])):
        groups.setdefault(row_key(r)[:-1], []).append(r)
    for (model, rule, delays, stride, epochs), rows in groups.items():
        name = {"bptt": "BPTT", "sideways": "Sideways" if delays == "aligned" else "Skip-Sideways",
                ABLATION: "Sideways, shift-memory gradient dropped (ablation outside §8)"}[rule]
        accs = [r["held_out_accuracy"] for r in rows]
        lines.append(f"| {model}, {name} ({delays}) | {stride} | {epochs} | {', '.join(f'{a:.2f}' for a in accs)} | "
                     f"{statistics.fmean(accs):.2f} |")
    return "\n".join(lines) + (f"\n\n_chance is {1 / cfg['directions']:.2f}; Adam, lr {cfg['lr']}, {cfg['batch']} clips "
                               f"per episode; load average {c['load_before']} before, {c['load_after']} after._")


def table(d):
    parts = [f"_{d['machine']}._"]
    if "memory" in d:
        parts.append(memory_table(d["memory"]))
    parts += [speed_table(s) for _, s in sorted(d.get("speed", {}).items(), key=lambda kv: int(kv[0]))]
    if "balance" in d:
        b = d["balance"]
        front, back = (x / sum(b["seconds"]) for x in b["seconds"])
        parts.append(f"_the speed rows' cut (before {b['cut']}): forward and backward of one tick (batch {b['batch']}, "
                     f"{b['size']} px, one thread) {front:.0%} in the first half, {back:.0%} in the second; a pipeline "
                     f"of the two on 2 workers can reach at most {b['bound']:.2f} efficiency; load average {b['load']}._")
    if "convergence" in d:
        parts.append(convergence_table(d["convergence"]))
    return "\n\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("memory", "balance", "speed", "convergence"), action="append",
                        help="run only this section (repeatable; default: all four)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run, written to --out")
    parser.add_argument("--out", type=pathlib.Path, help="folder for the --quick run's train.json (default: a temporary one)")
    parser.add_argument("--frames", type=int, default=8,
                        help="speed: frames per episode (default 8; each length's run is kept)")
    parser.add_argument("--rounds", type=int, default=3, help="speed: timed episodes per row (default 3)")
    parser.add_argument("--seeds", type=int, default=2, help="convergence: seeds per row (default 2)")
    parser.add_argument("--strides", type=int, nargs="+", default=[1], help="convergence: temporal strides (default 1)")
    parser.add_argument("--epochs", type=int, help=f"convergence: epochs per row (default {CONVERGENCE['epochs']}; "
                        "each count's rows are kept)")
    parser.add_argument("--resume", action="store_true",
                        help="convergence: leave out the rows the results file already has")
    parser.add_argument("--models", nargs="+", choices=sorted(train_task.MODELS), default=list(train_task.MODELS),
                        help="convergence: networks (default both)")
    parser.add_argument("--memory-point", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_point:
        rule, *numbers = args.memory_point
        print(json.dumps(memory_point(rule, *map(int, numbers))))
        return
    sections = args.section or ["memory", "balance", "speed", "convergence"]
    path = (args.out or pathlib.Path(tempfile.mkdtemp())) / "train.json" if args.quick else RESULTS / "train.json"

    def write(key, value):
        # read the file again each time: a section run at the same time in another process keeps its results
        data = {**(json.loads(path.read_text()) if path.exists() else {}), "machine": machine(), key: value}
        if args.quick:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2) + "\n")
        else:
            save("train", data, table(data))
    if "memory" in sections:
        memory(args.quick, lambda data: write("memory", data))
    if "balance" in sections:
        write("balance", balance(args.quick))
    if "speed" in sections:  # one run per clip length, kept side by side
        frames = 4 if args.quick else args.frames
        runs = json.loads(path.read_text()).get("speed", {}) if path.exists() else {}
        write("speed", {**runs, str(frames): speed(args.quick, frames, 1 if args.quick else args.rounds)})
    def keep_convergence(data):  # with the earlier rows of the same task that this run does not train again
        old = json.loads(path.read_text()).get("convergence") if path.exists() else None
        rows = rows_of_task(old, data["config"])
        new = {row_key(r) for r in data["rows"]}
        write("convergence", {**data, "rows": [r for r in rows if row_key(r) not in new] + data["rows"]})
    if "convergence" in sections:
        earlier = json.loads(path.read_text()).get("convergence") if args.resume and path.exists() else None
        convergence(args.quick, range(1 if args.quick else args.seeds), args.strides, args.models, keep_convergence,
                    args.epochs, earlier)


if __name__ == "__main__":
    main()
