"""`pipecomp` on the command line: compile a model, draw it, stream a video through it, or run the demo.

    pipecomp compile torchvision:resnet50 --parallel 7 --clocks halve
    pipecomp viz torchvision:densenet121 --parallel 7 -o densenet.svg --view timeline
    pipecomp run torchvision:resnet18 video.mp4 --parallel 4 -o out.mp4 --jsonl preds.jsonl
    pipecomp demo --out out
    pipecomp pipeline torchvision:resnet18 --parallel 4 --procs 2 --check
    pipecomp build torchvision:mobilenet_v2 --target rpi4 --parallel 2 --clocks halve -o out/mnv2
    pipecomp export torchvision:mobilenet_v2 --format onnx --parallel 2 --shift online -o out/mnv2-onnx
    torchrun --nproc-per-node 2 -m pipecomp pipeline torchvision:resnet18 --parallel 4

MODEL is ``torchvision:NAME[,key=value...]`` (a classification or segmentation builder,
untrained unless ``weights=`` names weights already on disk) or ``path/to/file.py:FACTORY``
(a function returning an nn.Module). Bad input is one line on stderr and exit status 2.
``pipecomp:efficientnet_lite0`` is EfficientNet-Lite0 with its ImageNet weights (pipecomp.models).
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
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
    segmentation = list_models(module=torchvision.models.segmentation)
    names = sorted(set(list_models(module=torchvision.models)) | set(segmentation))
    if name not in names:
        close = difflib.get_close_matches(name, names, 5, 0.5)
        hint = f"close matches: {', '.join(close)}" if close else "see torchvision.models.list_models()"
        raise UsageError(f"unknown torchvision model '{name}'; {hint}")
    requested = kwargs.pop("weights", None)
    weights = None if requested is None else _weights_on_disk(name, str(requested))
    if name in segmentation:
        kwargs.setdefault("weights_backbone", None)  # the default would download ImageNet weights
    try:
        return get_model(name, weights=weights, **kwargs)
    except Exception as e:
        raise UsageError(f"torchvision builder {name}({spec[len(name) + 1:]}) failed: {type(e).__name__}: {e}")


def _weights_on_disk(name: str, which: str):
    """torchvision's `weights=` enum member for `name`, if its file is already in torch's cache."""
    import os
    from urllib.parse import urlparse

    import torch
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    which = which.removeprefix(f"{enum.__name__}.")
    if which not in enum.__members__:
        raise UsageError(f"{name} has no weights '{which}'; choose from {', '.join(enum.__members__)}")
    weights = enum[which]
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not file.is_file():
        raise UsageError(f"torchvision weights {weights} are not on disk ({file}) and pipecomp does not download; "
                         f"fetch {weights.url} into that folder, or drop weights= for an untrained model")
    return weights


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


def _triple(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"'{text}' is not three numbers R,G,B such as 0.485,0.456,0.406")
    return values


def _skips(text: str):
    try:
        jumps = [int(j) for j in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a jump J or a list of jumps J,J such as 2,3")
    return jumps[0] if len(jumps) == 1 else jumps


def _temporal(text: str):
    try:
        if "=" not in text:
            return int(text)
        return {pattern: int(k) for pattern, k in (item.rsplit("=", 1) for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a filter length K or PATTERN=K[,PATTERN=K...] "
                                         f"such as 3 or 'layer1.*=3'")


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
    p.add_argument("--skips", type=_skips, metavar="J[,J]",
                   help="temporal skips into every stage s >= J from J stages below (start at zero)")
    p.add_argument("--temporal", type=_temporal, metavar="K|PATTERN=K",
                   help="causal temporal filters of length K on every spatial convolution, or on those "
                        "matching PATTERN (start at zero)")
    p.add_argument("--feedback", type=int, metavar="D",
                   help="feed the output of tick t-D back into the first convolution (starts at zero)")
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
    run = sub.add_parser("run", help="stream a video file, a folder of images or a camera through MODEL "
                                     "and show its labels (or masks)")
    _model_options(run)
    run.add_argument("source", metavar="SOURCE", help="a video file FFmpeg reads, a folder of images, or a "
                                                      "camera such as /dev/video0")
    run.add_argument("--workers", type=int, metavar="N", help="threaded runtime workers (default: one per "
                                                              "stage, at most one per core)")
    run.add_argument("-o", "--output", metavar="VIDEO", help="write the frames with the labels drawn on them "
                                                             "(.mp4, .mkv, .mov, .avi, .webm)")
    run.add_argument("--jsonl", metavar="FILE", help="write each frame's predictions as one JSON line")
    run.add_argument("--top", type=int, default=5, metavar="K", help="classes per frame (default 5)")
    run.add_argument("--smooth", type=int, default=1, metavar="N",
                     help="average the class probabilities over the last N ticks (default 1: none)")
    run.add_argument("--labels", metavar="FILE", help="class names, one per line (default: the weights' own)")
    run.add_argument("--mean", type=_triple, metavar="R,G,B", help="normalisation mean on [0, 1] pixels "
                                                                   "(default: the weights', else ImageNet's)")
    run.add_argument("--std", type=_triple, metavar="R,G,B", help="normalisation std (default as --mean)")
    run.add_argument("--crop", type=float, metavar="F", help="fraction of the scaled frame kept by the centre "
                                                             "crop (default: the weights', else 0.875)")
    run.add_argument("--no-resize", action="store_true", help="feed frames as decoded: they must have --input's "
                                                              "height and width")
    run.add_argument("--fps", type=float, metavar="F", help="frame rate of a folder of images, or to override "
                                                           "the source's (default: the source's, else 25)")
    run.add_argument("--frames", type=int, metavar="N", help="stop after N frames (default: the whole source)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    demo = sub.add_parser("demo", help="EfficientNet-Lite0 (ImageNet weights) on packaged footage, sequential "
                                       "and pipelined, labels side by side")
    demo.add_argument("--out", type=Path, default=Path("out"), metavar="DIR",
                      help="where the videos, pictures and JSON lines go (default ./out)")
    demo.add_argument("--frames", type=int, default=48, metavar="N", help="frames of each clip (default 48)")
    demo.add_argument("--size", type=int, default=224, metavar="PX",
                      help="the network's input height and width, a multiple of 32 (default 224)")
    demo.add_argument("--parallel", type=int, default=4, metavar="K", help="stages of the pipelined network")
    demo.add_argument("--clips", type=lambda s: [c for c in s.split(",") if c], default=["bikes", "vtest"],
                      metavar="A,B", help="pipecomp.footage names or video files (default bikes,vtest)")
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
    export = sub.add_parser("export", help="export MODEL's stage variants as ONNX models with a manifest")
    _model_options(export)
    export.add_argument("--format", choices=("onnx",), default="onnx", help="the model format (default onnx)")
    export.add_argument("-o", "--output", required=True, metavar="FOLDER", help="where the program goes")
    return p


def _export(args):
    try:
        from .backends import onnx as onnx_backend
    except ImportError as e:
        raise UsageError(str(e).splitlines()[0], status=1)
    net = _compile(args).eval()
    print(net.report())
    _say(f"exporting to {args.format}")
    try:
        folder = onnx_backend.export(net, args.output)
    except (ValueError, TypeError, OSError) as e:  # e.g. offline shift, an output that is not a tensor
        raise UsageError(str(e).splitlines()[0], status=1)
    modules = json.loads((folder / "manifest.json").read_text())["modules"]
    print(f"wrote {folder}: {len(modules)} ONNX models\nrun it (onnxruntime and numpy): "
          f"python3 {folder}/run.py {folder}")


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
            skips=args.skips, temporal=args.temporal, feedback=args.feedback, example_input=args.input)
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


def model_meta(spec: str, classes: int, size: tuple) -> tuple:
    """(class names or None, `video.Preprocess` or None) for MODEL `spec` at input `size` (H, W):
    pipecomp's own models' and torchvision's weights' — the weights it names, else its builder's
    DEFAULT ones (their metadata needs no download) when they have `classes` classes."""
    from . import video

    if spec == "pipecomp:efficientnet_lite0":
        from . import models

        # models.normalize: (255 x - 127) / 128 on every channel; the release's centre crop 224/256
        return models.categories(), video.Preprocess(size, 224 / 256, (127 / 255,) * 3, (128 / 255,) * 3)
    if not spec.startswith("torchvision:"):
        return None, None
    from torchvision.models import get_model_weights

    name, *pairs = spec[len("torchvision:"):].split(",")
    kwargs = dict(pair.partition("=")[::2] for pair in pairs)
    try:
        enum = get_model_weights(name)
    except (KeyError, ValueError):  # a builder without published weights
        return None, None
    requested = _value(kwargs.get("weights", "None"))
    weights = enum.DEFAULT if requested is None else enum[str(requested).removeprefix(f"{enum.__name__}.")]
    categories = weights.meta.get("categories")
    if categories is not None and len(categories) != classes:
        return None, None  # e.g. num_classes=10: neither the names nor (surely) the preprocessing apply
    return categories, video.Preprocess.of(weights, size)


def _output_classes(net) -> int:
    """Classes of the compiled model's output: the channel axis of its first tensor."""
    import torch.fx as fx
    from torch.utils._pytree import tree_leaves

    from .analysis import info

    output = next(n for n in net.plan.graph.nodes if n.op == "output")
    first = next(n for n in tree_leaves(output.args) if isinstance(n, fx.Node) and "shape" in info(n))
    shape = info(first)["shape"]
    return shape[1] if len(shape) in (2, 4) else 0


def _run(args):
    from . import video

    batch, channels, height, width = args.input
    if batch != 1 or channels != 3:
        raise UsageError(f"run feeds one RGB frame per tick, so --input must be 1,3,H,W, not "
                         f"{','.join(map(str, args.input))}")
    if min(args.top, args.smooth, args.workers or 1, args.frames or 1) < 1:
        raise UsageError("--top, --smooth, --workers and --frames must be >= 1")
    if args.crop is not None and (args.no_resize or not 0 < args.crop <= 1):
        raise UsageError("--crop takes a fraction in (0, 1], and no --no-resize")
    for path in (args.output, args.jsonl):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"folder '{Path(path).parent}' for '{path}' does not exist; create it first")
    if args.output is not None and Path(args.output).suffix.lower() not in video.CONTAINERS:
        raise UsageError(f"cannot tell the video format of '{args.output}': use {', '.join(video.CONTAINERS)}")
    labels = None
    if args.labels is not None:
        try:
            labels = [line.strip() for line in Path(args.labels).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read labels file '{args.labels}': {e.strerror or e}")
    if args.shift == "offline":
        raise UsageError("run streams frame by frame, and offline shift needs future frames: use --shift online")
    try:
        video.check_source(args.source)  # before compiling, which can take a while
    except video.VideoError as e:
        raise UsageError(str(e))
    net = _compile(args).eval()
    if args.workers is not None and args.workers > net.plan.parallel:
        raise UsageError(f"--workers {args.workers} exceeds the {net.plan.parallel} stages; use --parallel")
    classes = _output_classes(net)
    size = (height, width)
    categories, pre = model_meta(args.model, classes, size)
    if labels is not None:
        if len(labels) != classes:
            raise UsageError(f"labels file '{args.labels}' has {len(labels)} names but {args.model} outputs "
                             f"{classes} classes; give one name per class, one per line")
        categories = labels
    pre = pre or video.Preprocess(size)
    pre = video.Preprocess(size, None if args.no_resize else args.crop or pre.crop, args.mean or pre.mean,
                           args.std or pre.std)
    _say(f"opening {args.source}")
    try:
        frames = video.Frames(args.source, pre, fps=args.fps, limit=args.frames)
    except video.VideoError as e:
        raise UsageError(str(e))
    about = f"{frames.width}x{frames.height}" + (f", {frames.fps:g} fps" if frames.fps else "") + \
        (f", {frames.count} frames" if frames.count else "")
    _say(f"streaming {args.source} ({about}) through {net.plan.parallel} stages, latency {net.latency} frames; "
         f"preparing the threaded runtime first")
    try:
        summary = video.run(net, frames, workers=args.workers, categories=categories, k=args.top,
                            smooth=args.smooth, video=args.output, jsonl=args.jsonl, progress=not args.quiet)
    except video.VideoError as e:
        raise UsageError(str(e))
    print(summary)
    for path in (args.output, args.jsonl):
        if path is not None:
            print(f"wrote {path}")
    if summary.interrupted:
        raise UsageError(f"interrupted after {summary.frames} frames; the files written so far are complete",
                         status=130)


def _demo(args):
    from . import demo, footage

    if args.frames < 1 or args.size < 32 or args.size % 32 or args.parallel < 2:
        raise UsageError("--frames must be >= 1, --size a multiple of 32 (EfficientNet-Lite0 downsamples 32 "
                         "times) and --parallel >= 2")
    for clip in args.clips:
        if clip in footage.CLIPS:
            try:
                footage.footage(clip)
            except FileNotFoundError as e:
                raise UsageError(str(e))
        elif not Path(clip).is_file():
            raise UsageError(f"--clips: '{clip}' is neither a video file nor footage "
                             f"({', '.join(footage.CLIPS)})")
    try:
        demo.run(args.out, args.frames, args.size, args.parallel, args.clips, _say)
    except FileNotFoundError as e:  # the weights' package is missing
        raise UsageError(str(e))
    except ValueError as e:  # VideoError, CompileError (e.g. --parallel too large)
        raise UsageError(str(e).splitlines()[0])


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
    """Run the command line; returns the exit status (0; 2 for bad input; 1 without Graphviz's dot;
    130 after Ctrl-C)."""
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
        elif args.command == "run":
            _run(args)
        elif args.command == "export":
            _export(args)
        else:
            _demo(args)
    except UsageError as e:
        print(f"pipecomp: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:  # Ctrl-C while building, compiling or preparing: nothing was written yet
        print("pipecomp: interrupted", file=sys.stderr)
        return 130
    return 0
