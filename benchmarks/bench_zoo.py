"""Which image models pipecomp compiles: one model per timm family, and every torchvision model.

A timm family is a model name's first `_`-separated word without its trailing digits
(`resnet18` and `resnet50d` are `resnet`; timm 1.0.31 has 236); its smallest model (fewest
parameters, counted on the meta device) stands for it. Each model is built with random
weights in eval mode and runs at the smallest of 64, 96, 128 px that the image model itself
accepts (asking timm for that `img_size` where the model takes one), else at its own size.
Two checks, each a pass or the first line of its error:

1. `aligned`: `compile(parallel=3, delays="aligned")`; streamed, `net.step` at tick
   `t + latency` equals `model(x_t)` (within 1e-4 of the output's largest magnitude);
2. `clocked`: `compile(parallel=3, clocks="halve", shift="online")` (without shift when the model
   has no residual blocks); 4 ticks of `net.step` equal `net(clip)` (same tolerance).

Each model runs in a process of its own with a time limit (a crash or a hang is its row, not
the end of the sweep), one thread. Rows go to results/zoo.jsonl as they finish, so a sweep that
is stopped keeps what it did; `--summary` writes results/zoo.json, zoo.md and the README table
from them.

Run: `python benchmarks/bench_zoo.py [--timm] [--torchvision] [--only NAME ...]`, then
`python benchmarks/bench_zoo.py --summary` (the whole sweep: about an hour on 2 cores).
"""
import argparse
import collections
import json
import multiprocessing as mp
import re
import sys
import time
import traceback

import torch

from _results import RESULTS, machine, save

ROWS = RESULTS / "zoo.jsonl"
FAMILIES = RESULTS / "zoo-families.json"
SIZES = (64, 96, 128)
TOLERANCE = 1e-4
LIMIT_S = 300


def family(name):
    return re.sub(r"\d+$", "", name.split("_")[0])


def families(only=None):
    """{family: smallest model}, in timm's order of names, of every family or those in `only`
    (all of them are kept in results/zoo-families.json: building every timm model on the meta
    device to count its parameters takes minutes)."""
    import timm
    if only is None and FAMILIES.exists():
        return json.loads(FAMILIES.read_text())
    groups = collections.OrderedDict()
    for name in timm.list_models():
        if only is None or family(name) in only:
            groups.setdefault(family(name), []).append(name)
    chosen = {f: min(names, key=_params) for f, names in groups.items()}
    if only is None:
        FAMILIES.write_text(json.dumps(chosen, indent=0) + "\n")
    return chosen


def _params(name):
    import timm
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in timm.create_model(name).parameters())
    except Exception:
        return float("inf")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _timm_model(name):
    """The model at the smallest size it accepts, and that size."""
    import timm
    own = getattr(timm.get_pretrained_cfg(name), "input_size", None) or (3, 224, 224)
    for size in SIZES + (max(own[1:]),):
        try:
            model = timm.create_model(name, img_size=size)
        except TypeError:  # no img_size argument: the architecture takes any size, or its own
            model = timm.create_model(name)
        if _accepts(model, size):
            return model, (own[0], size, size)
    raise ValueError(f"the image model itself runs at none of {SIZES} px nor its own {own[1:]}")


def _tv_model(name):
    import torchvision
    try:  # segmentation models would download their backbone's weights
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    except TypeError:
        model = torchvision.models.get_model(name, weights=None)
    for size in SIZES + (224, 299, 384, 518):
        if _accepts(model, size):
            return model, (3, size, size)
    raise ValueError(f"the image model itself runs at none of {SIZES} px nor 224, 299, 384, 518")


def _accepts(model, size):
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
        return True
    except Exception:
        return False


def _close(got, want):
    leaves = torch.utils._pytree.tree_leaves
    return all(torch.allclose(g, w, rtol=0, atol=TOLERANCE * max(float(w.abs().max()), 1e-6))
               for g, w in zip(leaves(got), leaves(want)))


def check(source, name):
    """The row of one model: sizes, kept-whole modules, both checks, seconds."""
    import pipecomp
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    row = dict(source=source, model=name)
    try:
        model, shape = (_timm_model if source == "timm" else _tv_model)(name)
    except Exception as e:
        return {**row, "aligned": _one_line(e), "clocked": "not run", "seconds": time.perf_counter() - start}
    model.eval()
    row["input"] = list(shape)
    frames = [torch.randn(1, *shape) for _ in range(5)]
    try:
        net = pipecomp.compile(model, parallel=3, delays="aligned", example_input=(1, *shape))
        row["kept_whole"] = net.plan.kept_whole
        with torch.no_grad():
            outs = [net.step(x) for x in frames]
            ok = all(_close(outs[t + net.latency], model(frames[t])) for t in range(len(frames) - net.latency))
        row["aligned"] = "ok" if ok else "differs from the image model"
    except Exception as e:
        row["aligned"] = _one_line(e)
    try:
        try:
            net = pipecomp.compile(model, parallel=3, clocks="halve", shift="online", example_input=(1, *shape))
            row["shift"] = True
        except pipecomp.CompileError as e:
            if "no residual blocks" not in str(e):
                raise
            net = pipecomp.compile(model, parallel=3, clocks="halve", example_input=(1, *shape))
            row["shift"] = False
        with torch.no_grad():
            steps = [net.step(x) for x in frames[:4]]
            clip = net(torch.stack(frames[:4], 1))
        pick = lambda out, t: torch.utils._pytree.tree_map(lambda y: y[:, t], out)  # noqa: E731
        ok = all(_close(steps[t], pick(clip, t)) for t in range(4))
        row["clocked"] = "ok" if ok else "net(clip) differs from net.step"
    except Exception as e:
        row["clocked"] = _one_line(e)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _child(source, name, queue):
    try:
        queue.put(check(source, name))
    except BaseException as e:  # noqa: BLE001 - the row says what went wrong
        queue.put(dict(source=source, model=name, aligned=_one_line(e), clocked="not run",
                       trace=traceback.format_exc()[-500:]))


def run_isolated(source, name):
    queue = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_child, args=(source, name, queue))
    p.start()
    p.join(LIMIT_S)
    if p.is_alive():
        p.kill()
        p.join()
        return dict(source=source, model=name, aligned=f"timed out after {LIMIT_S} s", clocked="not run")
    if queue.empty():
        return dict(source=source, model=name, aligned=f"process died (exit code {p.exitcode})", clocked="not run")
    return queue.get()


def torchvision_models():
    import torchvision
    return [n for n in torchvision.models.list_models()
            if not n.startswith(("quantized_", "raft", "r3d", "mc3", "r2plus1d", "s3d", "mvit", "swin3d"))
            and ("segmentation" in torchvision.models.get_model_builder(n).__module__
                 or "detection" not in torchvision.models.get_model_builder(n).__module__)]


def sweep(source, names, families_of=None):
    done = {(r["source"], r["model"]) for r in _rows()}
    with ROWS.open("a") as f:
        for name in names:
            if (source, name) in done:
                continue
            row = run_isolated(source, name)
            if families_of:
                row["family"] = families_of[name]
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"{source}:{name}: aligned {row['aligned']}; clocked {row['clocked']}", flush=True)


def _rows():
    if not ROWS.exists():
        return []
    rows = [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    return list({(r["source"], r["model"]): r for r in rows}.values())  # a model run twice: its last row


def summary():
    rows = _rows()
    ok = lambda r: r.get("aligned") == "ok" and r.get("clocked") == "ok"  # noqa: E731
    lines = []
    import timm
    totals = {"timm": len({family(n) for n in timm.list_models()}), "torchvision": len(torchvision_models())}
    for source, label in (("timm", "timm families"), ("torchvision", "torchvision models")):
        mine = [r for r in rows if r["source"] == source]
        good = sum(map(ok, mine))
        share = f" ({good / len(mine):.0%})" if mine else ""
        lines.append(f"| {label} | {good} of the {len(mine)} run{share}; {totals[source] - len(mine)} of "
                     f"{totals[source]} not run |")
    table = ["| what compiles, streams and equals the image model and its clips | |", "|---|---|", *lines, ""]
    failed = [r for r in rows if not ok(r)]
    if failed:
        table += ["| model | aligned (equals the image model) | clocked + shift (step equals clip) |", "|---|---|---|"]
        for r in failed:
            what = r["model"] + (f" ({r['family']})" if r.get("family") else "")
            table.append(f"| {r['source']}:{what} | {_cell(r.get('aligned'))} | {_cell(r.get('clocked'))} |")
    kept = collections.Counter(k for r in rows for k in (r.get("kept_whole") or {}))
    unknown = sum(bool(r.get("from_log")) for r in rows)
    table += ["", "Kept whole automatically (class: in how many models): "
              + ", ".join(f"{k}: {n}" for k, n in kept.most_common())
              + (f" (not recorded for {unknown} rows recovered from a sweep's log)." if unknown else "."),
              f"_{machine()}; timm {_version('timm')}, torchvision {_version('torchvision')}; "
              f"{sum(r.get('seconds') or 0 for r in rows) / 60:.0f} minutes of model time._"]
    save("zoo", dict(rows=rows, machine=machine()), "\n".join(table))


def _cell(text):
    return (text or "").replace("|", "\\|").replace("\n", " ")[:160]


def _version(name):
    return __import__(name).__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timm", action="store_true")
    ap.add_argument("--torchvision", action="store_true")
    ap.add_argument("--only", nargs="*", help="model names (timm, or torchvision with --torchvision): print their rows")
    ap.add_argument("--families", nargs="*", help="sweep only these timm families first")
    ap.add_argument("--rerun-failed", action="store_true", help="run again the models whose row is not ok")
    ap.add_argument("--summary", action="store_true", help="write zoo.json, zoo.md and the README table")
    args = ap.parse_args()
    if args.summary:
        return summary()
    if args.only:
        for name in args.only:
            print(json.dumps(check("torchvision" if args.torchvision else "timm", name)))
        return
    if args.rerun_failed:
        with ROWS.open("a") as f:
            for r in _rows():
                if not (r.get("aligned") == "ok" and r.get("clocked") == "ok"):
                    row = {**run_isolated(r["source"], r["model"]), **({"family": r["family"]} if "family" in r else {})}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(f"{r['source']}:{r['model']}: aligned {row['aligned']}; clocked {row['clocked']}", flush=True)
        return
    if args.families:
        chosen = families(set(args.families))
        sweep("timm", list(chosen.values()), {m: f for f, m in chosen.items()})
        return
    if args.timm or not args.torchvision:
        chosen = families()
        sweep("timm", list(chosen.values()), {m: f for f, m in chosen.items()})
    if args.torchvision or not args.timm:
        sweep("torchvision", torchvision_models())


if __name__ == "__main__":
    sys.exit(main())
