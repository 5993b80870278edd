"""`pipecomp` on the command line: compile a model, draw it, or run the demo.

    pipecomp compile torchvision:resnet50 --parallel 7 --clocks halve
    pipecomp viz torchvision:densenet121 --parallel 7 -o densenet.svg --view timeline
    pipecomp demo --out out
    pipecomp pipeline torchvision:resnet18 --parallel 4 --procs 2 --check
    pipecomp build torchvision:mobilenet_v2 --target rpi4 --parallel 2 --clocks halve -o out/mnv2
    torchrun --nproc-per-node 2 -m pipecomp pipeline torchvision:resnet18 --parallel 4

MODEL is ``torchvision:NAME[,key=value...]`` (a classification or segmentation builder,
always with weights=None) or ``path/to/file.py:FACTORY`` (a function returning an
nn.Module). Bad input is one line on stderr and exit status 2.
``pipecomp:efficientnet_lite0`` is EfficientNet-Lite0 with its ImageNet weights (pipecomp.models).
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import sys
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """Input a person can fix: reported as one line with exit status 2 (1 for a missing program)."""

    def __init__(self, message, status=EXIT_USAGE):
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage block: the fix is in the message.
        raise UsageError(f"{message} (see {self.prog} --help)")


def _say(message: str) -> None:
    print(f"pipecomp: {message}", file=sys.stderr, flush=True)


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: mode=bilinear


def _torchvision(spec: str):
    import torchvision
    from torchvision.models import get_model, list_models

    name, *pairs = spec.split(",")
    kwargs = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"builder argument '{pair}' in 'torchvision:{spec}' must be key=value")
        kwargs[key] = _value(text)
    if "weights" in kwargs:
        raise UsageError("pipecomp builds untrained torchvision models (weights=None); drop the weights= argument")
    segmentation = list_models(module=torchvision.models.segmentation)
    names = sorted(set(list_models(module=torchvision.models)) | set(segmentation))
    if name not in names:
        close = difflib.get_close_matches(name, names, 5, 0.5)
        hint = f"close matches: {', '.join(close)}" if close else "see torchvision.models.list_models()"
        raise UsageError(f"unknown torchvision model '{name}'; {hint}")
    if name in segmentation:
        kwargs.setdefault("weights_backbone", None)  # the default would download ImageNet weights
    try:
        return get_model(name, weights=None, **kwargs)
    except Exception as e:
        raise UsageError(f"torchvision builder {name}({spec[len(name) + 1:]}) failed: {type(e).__name__}: {e}")


def _pipecomp(name: str):
    from . import models

    if name != "efficientnet_lite0":
        raise UsageError(f"unknown pipecomp model '{name}'; the one there is: pipecomp:efficientnet_lite0")
    try:
        return models.efficientnet_lite0()
    except FileNotFoundError as e:
        raise UsageError(str(e))


def _from_file(path: str, factory: str):
    from torch import nn

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"cannot read model file '{path}': no such file")
    spec = importlib.util.spec_from_file_location(f"pipecomp_model_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except OSError as e:
        raise UsageError(f"cannot read model file '{path}': {e.strerror or e}")
    except Exception as e:
        raise UsageError(f"importing '{path}' failed: {type(e).__name__}: {e}")
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(factory, names, 5, 0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UsageError(f"'{path}' has no function '{factory}'{hint}")
    try:
        model = fn()
    except Exception as e:
        raise UsageError(f"{path}:{factory}() failed: {type(e).__name__}: {e}")
    if not isinstance(model, nn.Module):
        raise UsageError(f"{path}:{factory}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_model(spec: str):
    """The nn.Module named by MODEL: ``torchvision:NAME[,k=v...]`` or ``path/to/file.py:FACTORY``."""
    if spec.startswith("torchvision:"):
        return _torchvision(spec[len("torchvision:"):])
    if spec.startswith("pipecomp:"):
        return _pipecomp(spec[len("pipecomp:"):])
    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py") and factory:
        return _from_file(path, factory)
    hint = f" (torchvision:{spec}?)" if ":" not in spec else ""
    raise UsageError(f"MODEL '{spec}' must be torchvision:NAME[,key=value...] or path/to/file.py:FACTORY{hint}")


def _shape(text: str) -> tuple:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a frame shape B,C,H,W such as 1,3,224,224")
    return dims


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="torchvision:NAME[,key=value...] or path/to/file.py:FACTORY")
    p.add_argument("--parallel", type=int, default=1, metavar="K", help="pipeline stages (default 1)")
    p.add_argument("--delays", choices=("diagonal", "aligned"), default="diagonal")
    p.add_argument("--clocks", choices=("halve", "none"), default="none",
                   help="halve: the period doubles every time the resolution halves")
    p.add_argument("--max-period", type=int, metavar="N")
    p.add_argument("--phases", choices=("zero", "align"), default="align",
                   help="align: each slow node fires when its inputs' new values reach it (fresher outputs)")
    p.add_argument("--shift", choices=("online", "offline"), help="insert temporal shift (TSM) nodes")
    p.add_argument("--shift-place", choices=("residual", "inplace"), default="residual")
    p.add_argument("--cuts", type=lambda s: [c for c in s.split(",") if c], metavar="A,B",
                   help="explicit stage boundaries: fx node or module names (instead of --parallel)")
    p.add_argument("--input", type=_shape, default=(1, 3, 224, 224), metavar="B,C,H,W",
                   help="example frame shape (default 1,3,224,224)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pipecomp", description="Compile image networks into pipelined, multi-rate video networks.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    _model_options(sub.add_parser("compile", help="compile MODEL and print the plan's report"))
    viz = sub.add_parser("viz", help="draw the compiled graph or its time-space table")
    _model_options(viz)
    viz.add_argument("-o", "--output", required=True, metavar="FILE", help="picture: .svg, .png, .pdf or .dot")
    viz.add_argument("--view", choices=("graph", "timeline"), default="graph")
    viz.add_argument("--collapse", type=int, metavar="N",
                     help="group nodes by the first N components of their module (default: automatic)")
    viz.add_argument("--ticks", type=int, default=12, metavar="N", help="ticks in the time-space table")
    demo = sub.add_parser("demo", help="ResNet-50, 7 stages, halving clocks, on a synthetic clip")
    demo.add_argument("--out", type=Path, default=Path("out"), metavar="DIR", help="where pictures go (default ./out)")
    demo.add_argument("--frames", type=int, default=32, metavar="N")
    demo.add_argument("--size", type=int, default=224, metavar="PX", help="frame height and width (default 224)")
    pipe = sub.add_parser("pipeline", help="stream a synthetic clip through MODEL split over processes "
                                           "(torch.distributed; under torchrun, one rank per process)")
    _model_options(pipe)
    pipe.add_argument("--procs", type=int, default=2, metavar="N",
                      help="processes to fork on this machine when not started by torchrun (default 2)")
    pipe.add_argument("--frames", type=int, default=16, metavar="N")
    pipe.add_argument("--seed", type=int, default=0, help="weights seed: every rank builds the same model")
    pipe.add_argument("--check", action="store_true", help="compare the outputs with VideoNet.step")
    build = sub.add_parser("build", help="compile MODEL with TVM for a board and export the program")
    _model_options(build)
    build.add_argument("--target", default="host", help="rpi4, jetson-nano, jetson-orin-nano, host, llvm, "
                                                        "or a TVM target tag (default: host)")
    build.add_argument("--tune", type=int, metavar="TRIALS", help="MetaSchedule measurements (needs --tuning-db)")
    build.add_argument("--tuning-db", metavar="PATH", help="MetaSchedule database folder: its records are "
                                                           "applied; with --tune, new ones are added")
    build.add_argument("--tune-tracker", metavar="HOST:PORT", help="measure on a board: the TVM RPC tracker "
                                                                   "its rpc_server registered with (needs --tune-key)")
    build.add_argument("--tune-key", metavar="KEY", help="the key the board's rpc_server registered under")
    build.add_argument("-o", "--output", required=True, metavar="FOLDER", help="where the program goes")
    return p


def _build(args):
    if args.tune is not None and (args.tuning_db is None or args.tune < 1):
        raise UsageError("--tune TRIALS (>= 1) needs --tuning-db PATH, the folder that keeps what tuning measured")
    if (args.tune_tracker is None) != (args.tune_key is None) or (args.tune_tracker and args.tune is None):
        raise UsageError("--tune-tracker HOST:PORT and --tune-key KEY go together, with --tune TRIALS: the board's "
                         "rpc_server registered with that tracker under that key")
    try:
        from .backends import tvm as tvm_backend
        tvm_backend.resolve_target(args.target)
    except (ImportError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0])
    net = _compile(args).eval()
    print(net.report())
    _say(f"building for {args.target}" + (f", tuning {args.tune} trials" if args.tune else ""))
    tuning = None if args.tuning_db is None else dict(trials=args.tune or 0, database=args.tuning_db)
    if args.tune_tracker:
        tuning.update(tracker=args.tune_tracker, key=args.tune_key)
    try:
        program = tvm_backend.build(net, args.target, tuning=tuning)
        folder = program.export(args.output)
    except (ValueError, RuntimeError) as e:  # e.g. no cross compiler, offline shift
        raise UsageError(str(e).splitlines()[0], status=1)
    print(f"wrote {folder}: {len(program.manifest['modules'])} modules for {program.manifest['target_name']} "
          f"({program.manifest['arch']})\non the board (apache-tvm 0.27 and numpy): python3 {folder}/run.py {folder}")


def _compile(args):
    import pipecomp

    _say(f"building {args.model}")
    model = load_model(args.model)
    _say("compiling")
    try:
        return pipecomp.compile(
            model, parallel=args.parallel, delays=args.delays, clocks=None if args.clocks == "none" else "halve",
            max_period=args.max_period, phases=args.phases, shift=args.shift, shift_place=args.shift_place, cuts=args.cuts,
            example_input=args.input)
    except (ValueError, TypeError) as e:  # CompileError is a ValueError
        raise UsageError(str(e).splitlines()[0])


def _viz(args):
    from .viz import FORMATS, check_renderer, visualize

    out = Path(args.output)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise UsageError(f"cannot tell the picture format of '{out}': use .{', .'.join(FORMATS)}")
    try:
        check_renderer(fmt)
    except RuntimeError as e:
        raise UsageError(str(e), status=1)
    if not out.parent.is_dir():
        raise UsageError(f"folder '{out.parent}' does not exist")
    if args.ticks < 1 or (args.collapse is not None and args.collapse < 0):
        raise UsageError("--ticks must be >= 1 and --collapse >= 0")
    net = _compile(args)
    _say(f"drawing {out}")
    visualize(net, out, view=args.view, ticks=args.ticks, collapse=args.collapse)
    print(f"wrote {out}")


def _demo(args):
    from . import demo

    if args.frames < 1 or args.size < 32:
        raise UsageError("--frames must be >= 1 and --size >= 32 (ResNet-50 downsamples 32 times)")
    demo.run(args.out, args.frames, args.size, _say)


def _pipeline(args):
    import os
    import time

    import torch
    import torch.distributed as dist

    from .backends import distributed
    from .demo import moving_shapes

    torchrun = "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
    if args.frames < 1 or args.procs < 1:
        raise UsageError("--frames and --procs must be >= 1")
    batch, channels, height, width = args.input
    if channels != 3:
        raise UsageError(f"pipeline streams a synthetic RGB clip, so --input needs 3 channels, not {channels}")
    torch.manual_seed(args.seed)
    net = _compile(args).eval()
    clip = moving_shapes(args.frames * batch, max(height, width))[:, :, :height, :width]
    clip = clip.reshape(args.frames, batch, 3, height, width)
    frames = list(clip)
    start = time.perf_counter()
    if torchrun:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=distributed.TIMEOUT)
        try:
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
            rank = dist.get_rank()
            outputs = distributed.stream(net, frames if rank == 0 else None, ticks=len(frames), batch=batch,
                                         device=device)
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return
    else:
        if args.procs > net.plan.parallel:
            raise UsageError(f"--procs {args.procs} exceeds the {net.plan.parallel} stages; use --parallel")
        _say(f"forking {args.procs} processes")
        outputs = distributed.launch(net, frames, nprocs=args.procs)
    elapsed = time.perf_counter() - start
    print(f"{len(frames)} frames in {elapsed:.2f} s ({len(frames) / elapsed:.1f} frames/s, set-up included)")
    if args.check:
        net.reset()
        with torch.no_grad():
            from torch.utils._pytree import tree_leaves
            worst = max((a.cpu() - b).abs().max().item() for x, out in zip(frames, outputs)
                        for a, b in zip(tree_leaves(out), tree_leaves(net.step(x))))
        print(f"largest difference from VideoNet.step: {worst:.1e}")


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0; 2 for bad input; 1 without Graphviz's dot)."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "compile":
            print(_compile(args).report())
        elif args.command == "viz":
            _viz(args)
        elif args.command == "pipeline":
            _pipeline(args)
        elif args.command == "build":
            _build(args)
        else:
            _demo(args)
    except UsageError as e:
        print(f"pipecomp: error: {e}", file=sys.stderr)
        return e.status
    return 0
