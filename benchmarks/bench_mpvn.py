"""The findings of *Massively Parallel Video Networks* on real video, with a real pretrained network (issue 10).

No labelled action videos ship in any package, so this measures what the paper measures relative to
the sequential model, which is also what a user cares about: how often the pipelined network says
what the sequential image model would have said.

- Teacher: EfficientNet-Lite0 with its ImageNet weights (`pipecomp.models`; tests/test_models.py
  checks it on real photographs), at SIZE px.
- Footage (`pipecomp.footage`, decoded with PyAV, centre crop): training on bikes.mp4 (its 250
  frames), evaluation on the first EVAL_FRAMES frames of vtest.avi and cityCC0.mpg.
- Metric (the clips streamed by `step`), per tick `t` from tick SKIP on (or later, once the pipeline has filled: `filled`), between the compiled
  network's output at tick `t` and the teacher's on frame `t − p`: top-1 agreement, top-5 agreement
  (the teacher's top-1 among the network's 5 best) and the mean KL divergence
  KL(teacher ‖ network); averaged over the two evaluation clips.
- Rows, `parallel` 1, 2, 4, 7 with `delays="diagonal"`:
  - rewired: the image model's weights, no training (fig. 8 left);
  - outputs, BPTT / Sideways: distillation of the teacher's outputs (KL) by each rule;
  - outputs + activations: and of `m = 3` activations (fig. 7; the last module before each of the
    last three stage boundaries; one at parallel 2), BPTT, λ = 0.01 (the activation terms, sums
    of squares over a frame's values per channel, are about 100× the KL);
  - outputs + temporal filters (`temporal=2` on every spatial convolution), and + skips
    (`skips=2`, 3 stages and more), Sideways (BPTT through them did not fit in memory);
  - p = 2 (sec. 4.5): rewired and outputs (BPTT), with the output of tick t compared with (and
    trained towards) the teacher on frame t − 2;
  - clocks (`clocks="halve"`): rewired and outputs (BPTT).
  At parallel 1 the network is the teacher, so only the rows whose targets or network differ
  (p = 2, clocks) train there. Training rows run seeds 0 and 1 (the offsets of the training
  windows; `--seed` runs some, keeping the others' rows); every network starts from the same
  weights (added connections start at zero, §9). The training clip is scored too, apart.

Run: `python benchmarks/bench_mpvn.py` (about an hour on 2 cores; `--quick` for a smoke run
written to --out); writes results/mpvn.json, .md and mpvn.png, the README table between its
markers.
"""
import argparse
import copy
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _results  # noqa: E402
import pipecomp  # noqa: E402
from pipecomp import footage, models, train  # noqa: E402

SIZE, EVAL_FRAMES, SKIP = 112, 190, 16
TRAIN_CLIP, EVAL_CLIPS = "bikes", ("vtest", "city")
PARALLEL = (1, 2, 4, 7)
CONFIG = {"episodes": 20, "batch": 2, "frames": 12, "lr": 1e-5, "weight": 0.01, "temperature": 1.0}


def load() -> list:
    return [round(x, 2) for x in os.getloadavg()]


def teacher_logits(teacher, frames):
    with torch.no_grad():
        return torch.cat([teacher(x) for x in frames.split(16)])


def compiled(teacher, parallel, recipe):
    options = dict(parallel=parallel, delays="diagonal", example_input=(1, 3, SIZE, SIZE))
    if recipe.get("clocks"):
        options["clocks"] = "halve"
    if recipe.get("temporal"):
        options["temporal"] = 2
    if recipe.get("skips") and parallel >= 3:
        options["skips"] = 2
    net = pipecomp.compile(copy.deepcopy(teacher), **options)
    return net.eval()  # batch norm keeps the teacher's statistics, dropout is off


def filled(net) -> int:
    """The first tick from which every value the output reads comes from frames: the longest
    total delay of a path from the frame to the output, plus, with clocks, one hyperperiod (a
    slow node has fired on filled inputs within one of its periods). Before it the pipeline is
    filling, and its outputs mix in zeros."""
    plan, longest = net.plan, {}
    for v in plan.graph.nodes:
        if v.op == "placeholder":
            longest[v.name] = 0
        elif v.op != "get_attr":
            ins = [longest[u.name] + plan.delay_of.get((u.name, v.name), 0) for u in v.all_input_nodes
                   if u.name in longest]
            if ins:
                longest[v.name] = max(ins)
    out = next(n for n in plan.graph.nodes if n.op == "output")
    return int(longest[out.name]) + (plan.hyperperiod if plan.hyperperiod > 1 else 0)


def evaluate(net, clips, p):
    """Agreement with the teacher on frame t - p, ticks SKIP.., per clip and averaged over the
    held-out ones. The clips (of one length) stream side by side as one batch through `step`:
    memory stays that of one tick, where `net(clip)` would hold every node's whole series."""
    names = list(clips)
    x = torch.stack([clips[n][0] for n in names], 1)  # [T, clips, C, H, W]
    target = torch.stack([clips[n][1] for n in names], 1)
    skip = max(SKIP, p, filled(net))
    net.reset()
    with torch.no_grad():
        out = torch.stack([net.step(frame) for frame in x])[skip:]
    net.reset()
    want = target[skip - p:len(x) - p]
    per_clip = {}
    for i, name in enumerate(names):
        o, w = out[:, i], want[:, i]
        per_clip[name] = {
            "top1": (o.argmax(1) == w.argmax(1)).float().mean().item(),
            "top5": (o.topk(5, 1).indices == w.argmax(1, keepdim=True)).any(1).float().mean().item(),
            "kl": F.kl_div(o.log_softmax(1), w.log_softmax(1), log_target=True, reduction="batchmean").item()}
    held_out = [c for name, c in per_clip.items() if name in EVAL_CLIPS]
    return ({k: statistics.fmean(c[k] for c in held_out) for k in ("top1", "top5", "kl")}
            | {"scored_from_tick": skip, "clips": per_clip})


def fit(net, frames, recipe, cfg, seed):
    """Adam over `episodes` episodes of `batch` windows at random offsets of the training frames,
    distilling the image model (`train.Distill`'s default teacher: the net's weights before
    training, without delays or added connections); no labels."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), cfg["lr"])
    # Every episode trains `frames` ticks after the pipeline has filled (the ticks it is scored on:
    # the filling ticks' outputs mix in zeros, and their large losses would drown the others).
    p = recipe.get("p", 0)
    start = max(p, filled(net))
    T = start + cfg["frames"]
    distill = train.Distill(net, activation_nodes(net) if recipe.get("activations") else (), weight=cfg["weight"],
                            outputs="kl", temperature=cfg["temperature"])
    losses, began = [], time.perf_counter()
    for _ in range(cfg["episodes"]):
        offsets = torch.randint(0, len(frames) - T + 1, (cfg["batch"],), generator=g).tolist()
        clip = torch.stack([frames[o:o + T] for o in offsets])
        opt.zero_grad()
        per_tick = train.backward(net, clip, None, None, rule=recipe["rule"], prediction_latency=p,
                                  ticks=range(start, T), distill=distill)
        opt.step()
        losses.append(per_tick.nanmean().item())
    return {"train_loss_first": statistics.fmean(losses[:5]), "train_loss_last": statistics.fmean(losses[-5:]),
            "episode_frames": T, "distilled_nodes": list(distill.nodes), "seconds": time.perf_counter() - began}


def activation_nodes(net, m=3):
    """Up to m nodes for activation distillation: the last module of each stage but the last, of
    the last m such stages (the features that stage boundaries carry, where pipelining makes them
    stale): 1 node at parallel 2, 3 from parallel 4 on."""
    plan = net.plan
    last = {}
    for n in plan.graph.nodes:
        if n.op == "call_module" and n.name not in plan.added_nodes:
            last[plan.stage_of[n.name]] = n.name
    return [last[s] for s in sorted(last)[:-1]][-m:]


RECIPES = {
    "rewired": {"train": False},
    "outputs, BPTT": {"train": True, "rule": "bptt"},
    "outputs, Sideways": {"train": True, "rule": "sideways"},
    "outputs + activations, BPTT": {"train": True, "rule": "bptt", "activations": True},
    # Sideways: BPTT through the temporal filters of every depthwise convolution held 15 GB at
    # parallel 2 (killed), where Sideways keeps one tick's activations.
    "outputs + temporal filters, Sideways": {"train": True, "rule": "sideways", "temporal": True},
    "outputs + temporal filters + skips, Sideways": {"train": True, "rule": "sideways", "temporal": True,
                                                     "skips": True},
    "rewired, p = 2": {"train": False, "p": 2},
    "outputs, BPTT, p = 2": {"train": True, "rule": "bptt", "p": 2},
    "rewired, clocks": {"train": False, "clocks": True},
    "outputs, BPTT, clocks": {"train": True, "rule": "bptt", "clocks": True},
}


def rows_to_run(recipes, parallels):
    for name in recipes:
        recipe = RECIPES[name]
        for parallel in parallels:
            # At parallel 1 the network is the teacher: every loss starts at its minimum, zero, so
            # training changes nothing unless the targets move (p = 2) or the clocks change the network.
            if parallel == 1 and recipe["train"] and not (recipe.get("p") or recipe.get("clocks")):
                continue
            if parallel < 3 and recipe.get("skips"):
                continue  # a jump of 2 needs 3 stages
            yield name, parallel


def run(cfg, recipes, parallels, keep, seeds=(0, 1)):
    teacher = models.efficientnet_lite0()
    frames = models.normalize(footage.decode(TRAIN_CLIP, cfg["train_frames"], SIZE))
    # scored apart: the training clip's first eval_frames frames
    clips = {TRAIN_CLIP: (frames[:cfg["eval_frames"]], teacher_logits(teacher, frames[:cfg["eval_frames"]]))}
    for name in EVAL_CLIPS:
        x = models.normalize(footage.decode(name, cfg["eval_frames"], SIZE))
        clips[name] = (x, teacher_logits(teacher, x))
    data = {"config": cfg, "load_before": load(), "rows": []}
    for name, parallel in rows_to_run(recipes, parallels):
        recipe = RECIPES[name]
        for seed in (seeds if recipe["train"] else [0]):
            if not recipe["train"] and 0 not in seeds:
                continue
            torch.manual_seed(seed)
            net = compiled(teacher, parallel, recipe)
            row = {"recipe": name, "parallel": parallel, "seed": seed, "latency": net.latency}
            if recipe["train"]:
                row |= fit(net, frames, recipe, cfg, seed)
            row |= evaluate(net, clips, recipe.get("p", 0))
            data["rows"].append(row)
            data["load_after"] = load()
            print({k: v for k, v in row.items() if k != "clips"}, flush=True)
            keep(data)
    return data


def grouped(d):
    groups = {}
    for r in d["rows"]:
        groups.setdefault(r["recipe"], {}).setdefault(r["parallel"], []).append(r)
    return groups


def _cells(by_parallel, parallels, clip=None):
    cells = []
    for k in parallels:
        rows = by_parallel.get(k)
        if not rows:
            cells.append("")
            continue
        pick = (lambda r, m: r[m]) if clip is None else (lambda r, m: r["clips"][clip][m])
        top1 = [pick(r, "top1") for r in rows]
        spread = f" ± {(max(top1) - min(top1)) / 2:.2f}" if len(rows) > 1 else ""
        cells.append(f"{statistics.fmean(top1):.2f}{spread} ({statistics.fmean(pick(r, 'top5') for r in rows):.2f}, "
                     f"{statistics.fmean(pick(r, 'kl') for r in rows):.2f})")
    return cells


def table(d):
    cfg, groups = d["config"], grouped(d)
    parallels = sorted({r["parallel"] for r in d["rows"]})
    head = " | ".join(f"parallel {k}" for k in parallels)
    lines = [f"| held out ({' + '.join(EVAL_CLIPS)}): top-1 agreement (top-5, KL) | {head} |",
             "|---|" + "---|" * len(parallels)]
    lines += [f"| {recipe} | " + " | ".join(_cells(by, parallels)) + " |" for recipe, by in groups.items()]
    lines += ["", f"| training clip ({TRAIN_CLIP}): top-1 agreement (top-5, KL) | {head} |",
              "|---|" + "---|" * len(parallels)]
    lines += [f"| {recipe} | " + " | ".join(_cells(by, parallels, TRAIN_CLIP)) + " |" for recipe, by in groups.items()]
    return "\n".join(lines) + (
        f"\n\n_EfficientNet-Lite0 at {SIZE} px, delays=\"diagonal\"; agreement of the output at tick t with the "
        f"teacher on frame t − p, ticks {SKIP}.. (later once the pipeline has filled, with clocks), on the first "
        f"{cfg['eval_frames']} frames of {' and '.join(EVAL_CLIPS)} (mean of the two), and on the first "
        f"{cfg['eval_frames']} of the {cfg['train_frames']} frames of {TRAIN_CLIP} that training used: {cfg['episodes']} episodes of {cfg['batch']} windows of "
        f"{cfg['frames']} scored ticks, Adam lr {cfg['lr']}, KL at temperature {cfg['temperature']}, λ = "
        f"{cfg['weight']}; ± is half the range over 2 seeds where shown; {_results.machine()}; load average "
        f"{d['load_before']} before, {d.get('load_after')} after._")


def plot(d, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for recipe, by_parallel in grouped(d).items():
        ks = sorted(by_parallel)
        ax.plot(ks, [statistics.fmean(r["top1"] for r in by_parallel[k]) for k in ks], marker="o", label=recipe)
    ax.set_xlabel("parallel (pipeline stages)")
    ax.set_ylabel("top-1 agreement with the teacher")
    ax.set_xticks(PARALLEL)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"EfficientNet-Lite0 pipelined, {' + '.join(EVAL_CLIPS)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run, written to --out")
    parser.add_argument("--out", type=pathlib.Path, help="folder for the --quick run's files (default: a temporary one)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--parallel", nargs="+", type=int, default=list(PARALLEL))
    parser.add_argument("--seed", type=int, action="append",
                        help="train only these seeds (default: 0 and 1); rows of other seeds in the results file stay")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = dict(CONFIG, train_frames=250, eval_frames=EVAL_FRAMES)
    out = _results.RESULTS
    if args.quick:
        cfg.update(episodes=2, frames=4, train_frames=64, eval_frames=64)
        out = args.out or pathlib.Path(tempfile.mkdtemp())
        out.mkdir(parents=True, exist_ok=True)

    def keep(data):  # with the rows this run does not make (runs may go side by side)
        path = out / "mpvn.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        mine = {(r["recipe"], r["parallel"], r["seed"]) for r in data["rows"]}
        data = {**data, "rows": [r for r in old.get("rows", []) if (r["recipe"], r["parallel"], r["seed"]) not in mine]
                + data["rows"],
                "load_before": old.get("load_before", data["load_before"])}
        if args.quick:
            path.write_text(json.dumps(data, indent=2) + "\n")
        else:
            _results.save("mpvn", data, table(data))
        plot(data, out / "mpvn.png")
    run(cfg, args.recipes, args.parallel, keep, args.seed or (0, 1))


if __name__ == "__main__":
    main()
