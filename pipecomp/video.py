"""Real video in and out: frames from a file, a folder of images or a camera, and the network's
outputs as labels, JSON lines and an annotated video.

`Frames(source, preprocess)` opens a source and decodes it on a thread of its own, so that
decoding and preprocessing overlap the network's ticks; `Writer(path, fps)` encodes frames;
`run(net, frames, ...)` streams the frames through a compiled network causally, on the threaded
runtime, with a progress bar, and writes what it predicts. Files go through FFmpeg (PyAV), so
any format FFmpeg reads works; cameras through PyAV's v4l2 input. Labels are smoothed, when
asked, by averaging the class probabilities over a window of ticks, as the TSM online demo
averages its logit history.
"""
from __future__ import annotations

import collections
import functools
import json
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

#: ImageNet's per-channel mean and standard deviation on [0, 1] pixels (torchvision's weights use them).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: Output containers and the codec each is written with (H.264 where FFmpeg has libx264).
CONTAINERS = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".avi": "mpeg4", ".webm": "libvpx"}


class VideoError(ValueError):
    """A source or an output that cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class Preprocess:
    """How a decoded frame becomes the network's input `[1, 3, H, W]`.

    The frame is scaled so that it covers `size` (height, width) divided by `crop`, then the
    centre `size` is cut out — torchvision's classification transform (resize 256, crop 224 is
    `crop=0.875`), for any input shape — and normalised with `mean` and `std` on [0, 1] pixels.
    `crop=None` takes frames as they are: they must have `size` already.
    """

    size: tuple
    crop: float | None = 0.875
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        if self.crop is not None and not 0 < self.crop <= 1:
            raise ValueError(f"crop={self.crop} must be in (0, 1]: the fraction of the scaled frame kept")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean {self.mean} and std {self.std} need 3 values each (R, G, B), std > 0")

    @classmethod
    def of(cls, weights, size) -> "Preprocess":
        """The preprocessing of torchvision `weights` (their `transforms()`) for frames of `size`."""
        transform = weights.transforms()
        crop = getattr(transform, "crop_size", None)
        ratio = 1.0 if crop is None else crop[0] / transform.resize_size[0]
        return cls(tuple(size), ratio, tuple(transform.mean), tuple(transform.std))

    def box(self, width: int, height: int) -> tuple:
        """The part of a `width` × `height` frame that the network sees: (left, top, right, bottom)."""
        h, w = self.size
        if self.crop is None:
            return 0, 0, width, height
        scale = max(h / height, w / width) / self.crop
        bw, bh = w / scale, h / scale
        left, top = (width - bw) / 2, (height - bh) / 2
        return left, top, left + bw, top + bh

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        from PIL import Image

        height, width = image.shape[:2]
        h, w = self.size
        if self.crop is None:
            if (height, width) != (h, w):
                raise VideoError(f"a {width}x{height} frame does not fit the compiled example {w}x{h}: "
                                 f"compile with --input 1,3,{height},{width}, or let frames be resized")
        else:
            # PIL filters over the whole footprint when it shrinks (antialiasing) and lets go of the GIL.
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR, box=self.box(width, height)))
        x = (image.astype(np.float32) / 255 - np.float32(self.mean)) / np.float32(self.std)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


@dataclass
class Frame:
    """One decoded frame: `image` as decoded (H×W×3 RGB uint8), `input` for the network."""

    index: int
    image: np.ndarray
    input: torch.Tensor | None
    time: float | None  # seconds into the source, where it says


_END = object()


def _is_camera(path: Path) -> bool:
    return str(path).startswith("/dev/video") or path.is_char_device()


def check_source(source) -> None:
    """Raises `VideoError` unless `source` names a camera or an existing file or folder: the check
    that needs no decoding, for callers that have slow work to do before opening it."""
    path = Path(source)
    if not _is_camera(path) and not path.exists():
        raise VideoError(f"no such file or folder: '{source}'; give a video file, a folder of images or a "
                         f"camera such as /dev/video0")


class Frames:
    """The frames of `source`, decoded (and preprocessed) on a thread of their own.

    `source` is a video file FFmpeg reads, a folder of images (in name order) or a camera
    (`/dev/video0`). Opening checks that the source exists, opens, and decodes at least one
    frame, or raises `VideoError`. Iterate to get `Frame`s (at most `limit` of them). A stream
    that ends before its announced length, or has frames FFmpeg cannot decode, ends after what
    it decoded, and `problem` says so. `fps` and `count` are the source's (None where it does
    not say). Close it (or use it as a context manager) to stop the thread early.
    """

    def __init__(self, source, preprocess: Preprocess | None = None, *, fps: float | None = None,
                 limit: int | None = None, buffer: int = 8):
        if limit is not None and limit < 1:
            raise ValueError(f"limit={limit}: give at least 1 frame, or None for the whole source")
        self.source, self.preprocess, self.limit = str(source), preprocess, limit
        self.problem: str | None = None
        self.decoded = 0
        self._skipped, self._container = 0, None
        try:
            images, self.fps, self._announced = self._open(Path(source))
        except VideoError:
            self.close()  # a container opened without a usable video stream
            raise
        self.fps = fps or self.fps
        self.count = self._announced if limit is None else min(limit, self._announced or limit)
        self._images = images
        try:
            first = self._next_frame()
        except BaseException:
            self.close()
            raise
        if first is None:
            self.close()
            raise VideoError(f"no frame could be decoded from '{self.source}'"
                             + (f" ({self.problem})" if self.problem else "") + "; check the file with ffprobe")
        self.height, self.width = first.image.shape[:2]
        self._queue = queue.Queue(maxsize=buffer)
        self._queue.put(first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._decode, name="pipecomp-decode", daemon=True)
        self._thread.start()

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stops decoding and closes the source; the thread is gone when this returns."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            while self._thread.is_alive():  # the thread may wait for room in the queue
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _open(self, path: Path):
        check_source(path)
        if _is_camera(path):
            return self._camera(path)
        if path.is_dir():
            return self._folder(path)
        return self._file(path)

    def _camera(self, path: Path):
        import av

        try:
            self._container = av.open(str(path), format="v4l2")
        except (av.error.FFmpegError, OSError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise VideoError(f"camera '{self.source}' does not open ({reason}); check that it is plugged in and "
                             f"free (ls /dev/video*) and that you may read it (group 'video')") from None
        stream = self._container.streams.video[0]
        return self._packets(stream), _rate(stream), None

    def _folder(self, path: Path):
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise VideoError(f"folder '{self.source}' has no images ({', '.join(IMAGE_SUFFIXES)}); "
                             f"put the frames there, named in order")
        return self._pictures(files), None, len(files)

    def _file(self, path: Path):
        import av

        try:
            self._container = av.open(str(path))
        except av.error.FFmpegError as e:
            reason = e.strerror or str(e)
            raise VideoError(f"'{self.source}' is not a video FFmpeg can read ({reason}); convert it with "
                             f"ffmpeg -i '{self.source}' out.mp4, or give another file") from None
        except OSError as e:
            raise VideoError(f"cannot read '{self.source}': {e.strerror or e}; check its permissions") from None
        if not self._container.streams.video:
            raise VideoError(f"'{self.source}' has no video stream; give a file with a picture track")
        stream = self._container.streams.video[0]
        if stream.codec_context is None:
            raise VideoError(f"FFmpeg has no decoder for the video codec of '{self.source}'; re-encode it where a "
                             f"decoder exists, e.g. ffmpeg -i '{self.source}' -c:v libx264 out.mp4")
        stream.thread_type = "AUTO"  # FFmpeg's own decoding threads
        return self._packets(stream), _rate(stream), stream.frames or None

    def _packets(self, stream):
        import av

        for packet in self._container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                self._skipped += 1  # a corrupt packet: FFmpeg goes on with the next one
                continue
            for frame in frames:
                yield frame.to_ndarray(format="rgb24"), frame.time

    def _pictures(self, files):
        from PIL import Image

        for file in files:
            try:
                with Image.open(file) as picture:
                    yield np.asarray(picture.convert("RGB")), None
            except OSError:
                self._skipped += 1

    def _next_frame(self) -> Frame | None:
        if self.decoded == self.limit:
            self._finish()
            return None
        try:
            image, seconds = next(self._images)
        except StopIteration:
            self._finish()
            return None
        except Exception as e:  # a container error FFmpeg cannot skip: end the stream here
            self.problem = f"decoding stopped after {self.decoded} frames: {type(e).__name__}: {e}"
            return None
        x = None if self.preprocess is None else self.preprocess(image)
        if seconds is None and self.fps:
            seconds = self.decoded / self.fps
        frame = Frame(self.decoded, image, x, seconds)
        self.decoded += 1
        return frame

    def _finish(self):
        notes = []
        if self._skipped:
            notes.append(f"{_plural(self._skipped, 'corrupt ' + ('frame' if self._container is None else 'packet'))}"
                         f" skipped")
        if self._container is not None and self.count and self.decoded < self.count:
            notes.append(f"the stream ended after {self.decoded} of the {self._announced} frames it announces")
        if notes:
            self.problem = "; ".join(notes)

    def _decode(self):
        try:
            while not self._stop.is_set():
                frame = self._next_frame()
                if frame is None:
                    break
                self._queue.put(frame)
        except BaseException as e:  # a frame that does not fit, say: the consumer raises it
            self._queue.put(e)
        self._queue.put(_END)


def _rate(stream) -> float | None:
    rate = stream.average_rate or stream.base_rate
    return float(rate) if rate else None


class Writer:
    """Encodes RGB frames (H×W×3 uint8) into a video file: H.264 in .mp4/.mkv/.mov, MPEG-4 in
    .avi, VP8 in .webm. The file opens at the first frame, which sets the size (later frames of
    another size are scaled to it), and plays once `close()` has run (the context manager closes
    it, also on Ctrl-C)."""

    def __init__(self, path, fps: float = 25.0):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in CONTAINERS:
            raise VideoError(f"cannot tell the video format of '{self.path}': use {', '.join(CONTAINERS)}")
        if not self.path.parent.is_dir():
            raise VideoError(f"folder '{self.path.parent}' for '{self.path}' does not exist; create it first")
        self.fps = Fraction(fps).limit_denominator(1001)
        self.frames = 0
        self._container = self._stream = None

    def write(self, image: np.ndarray) -> None:
        import av

        if self._container is None:
            self._open(*image.shape[:2])
        height, width = self._stream.height, self._stream.width
        if image.shape[0] < height or image.shape[1] < width or image.shape[0] > height + 1 or \
                image.shape[1] > width + 1:  # a folder's images need not share one size
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        # yuv420p needs even sides: an odd last row or column is dropped
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:height, :width]), format="rgb24")
        frame.pts = self.frames
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def _open(self, height: int, width: int):
        import av

        codec = CONTAINERS[self.path.suffix.lower()]
        if codec not in av.codecs_available:
            codec = "mpeg4"
        self._container = av.open(str(self.path), "w")
        self._stream = self._container.add_stream(codec, rate=self.fps)
        self._stream.width, self._stream.height = width - width % 2, height - height % 2
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = 1 / self.fps
        if codec == "libx264":
            self._stream.options = {"preset": "veryfast", "crf": "23"}
        elif codec == "mpeg4":
            self._stream.bit_rate = 4_000_000

    def close(self) -> None:
        """Flushes the encoder and finishes the file."""
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@functools.lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def draw_text(image: np.ndarray, lines, *, corner: str = "top-left") -> np.ndarray:
    """`image` with `lines` of text on a dark translucent panel in a corner."""
    from PIL import Image, ImageDraw

    height, width = image.shape[:2]
    font = _font(max(12, height // 24))
    pad, step = font.size // 2, int(font.size * 1.25)
    w = min(width, int(max((font.getlength(line) for line in lines), default=0)) + 2 * pad + 1)
    h = min(height, step * len(lines) + 2 * pad)
    left = 0 if corner.endswith("left") else width - w
    top = 0 if corner.startswith("top") else height - h
    out = image.copy()
    # only the panel is drawn on: converting whole frames for a composite cost ~20 ms at 768×576
    panel = Image.fromarray((out[top:top + h, left:left + w] * 0.4).astype(np.uint8))
    draw = ImageDraw.Draw(panel)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * step), line, font=font, fill=(255, 255, 255))
    out[top:top + h, left:left + w] = np.asarray(panel)
    return out


def palette(classes: int) -> np.ndarray:
    """A distinct colour per class, `[classes, 3]` uint8 (golden-angle hues, fixed)."""
    import colorsys

    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.75, 1.0)]
                     for i in range(classes)], dtype=np.uint8)


def draw_mask(image: np.ndarray, mask: np.ndarray, box, colours: np.ndarray, *, skip=(0,), alpha=0.5) -> np.ndarray:
    """`image` with the class map `mask` (h×w ints) blended over `box` (left, top, right, bottom);
    classes in `skip` (background) stay clear."""
    from PIL import Image

    left, top, right, bottom = (round(v) for v in box)
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(right, image.shape[1]), min(bottom, image.shape[0])
    scaled = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((right - left, bottom - top), Image.NEAREST))
    out = image.copy()
    region = out[top:bottom, left:right]
    shown = ~np.isin(scaled, list(skip))
    region[shown] = (region[shown] * (1 - alpha) + colours[scaled[shown]] * alpha).astype(np.uint8)
    return out


def _logits(output) -> torch.Tensor:
    """The tensor a prediction is read from: the output itself, or a dict's "out" (or first) entry."""
    if isinstance(output, dict):
        output = output.get("out", next(iter(output.values())))
    elif isinstance(output, (tuple, list)):
        output = output[0]
    return output


def predict(output, categories=None, k: int = 5) -> dict:
    """What an output says, as a JSON-ready dict: for a classifier (`[1, K]`) the top `k` classes
    with their softmax probabilities (`"top"`); for a segmentation map (`[1, K, H, W]`) the `k`
    classes covering most pixels and their share (`"classes"`)."""
    x = _logits(output).detach().float()
    if x.dim() == 2:
        p = torch.softmax(x[0], 0)
        values, indices = p.topk(min(k, p.numel()))
        key, what = "top", "p"
    elif x.dim() == 4:
        counts = torch.bincount(x[0].argmax(0).flatten(), minlength=x.shape[1]).float()
        values, indices = (counts / counts.sum()).topk(min(k, x.shape[1]))
        keep = values > 0
        values, indices, key, what = values[keep], indices[keep], "classes", "share"
    else:
        raise ValueError(f"an output of shape {list(x.shape)} is neither a classifier's [1, K] nor a "
                         f"segmentation map [1, K, H, W]; run shows only those")
    return {key: [{"class": int(i), "label": _label(categories, int(i)), what: round(float(v), 6)}
                  for v, i in zip(values, indices)]}


def _label(categories, i: int) -> str:
    return categories[i] if categories is not None and i < len(categories) else f"class {i}"


class Smoother:
    """Averages the class probabilities of the last `window` outputs (the TSM demo's logit history);
    `window=1` passes them through."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"smoothing window {window} must be >= 1 (1: no smoothing)")
        self.window = window
        self._history = collections.deque(maxlen=window)

    def __call__(self, output):
        x = _logits(output).detach().float()
        if self.window == 1 or x.dim() != 2:
            return x
        self._history.append(torch.softmax(x, -1))
        return torch.log(torch.stack(tuple(self._history)).mean(0))  # log: predict's softmax undoes it


def _reflects(net):
    """tick -> the newest frame the output reflects (None while the pipeline fills), from the plan's
    time-space table, periodic with the clocks' hyperperiod once the pipeline has filled."""
    hyper = net.plan.hyperperiod
    known = net.timeline(net.latency + 4 * hyper + 64).output
    tail = len(known) - hyper

    def reflects(t: int):
        if t < len(known):
            return known[t]
        same = tail + (t - tail) % hyper  # the tick one whole number of hyperperiods earlier
        return None if known[same] is None else known[same] + t - same

    return reflects


@dataclass
class Summary:
    """What `run` did: frames streamed, how fast, how often the top label changed."""

    frames: int = 0
    seconds: float = 0.0
    changes: int = 0
    compared: int = 0  # ticks whose label could change: both they and the tick before reflect a frame
    labels: list = field(default_factory=list)  # per tick: the top class (None before a frame arrives)
    problem: str | None = None
    interrupted: bool = False

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    def __str__(self):
        text = f"{self.frames} frames in {self.seconds:.1f} s ({self.fps:.1f} frames/s)"
        if self.compared:
            text += (f"; the top label changed {_times(self.changes)} in {self.compared + 1} frames "
                     f"({100 * self.changes / self.compared:.0f}% of ticks)")
        if self.problem:
            text += f"; {self.problem}"
        if self.interrupted:
            text += "; stopped by Ctrl-C"
        return text


def _plural(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _stop_on_ctrl_c(stop: threading.Event):
    """Makes the first Ctrl-C set `stop`, so that the stream ends after the frame in hand (every file
    then holds the same frames), and a second one interrupt at once; returns the handler it replaced
    (None off the main thread, where Python delivers no signal)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    return previous


class _Overlay:
    """Draws on a frame what the network says of it: a mask, the top labels, the frame rate and
    the information latency (in frames, and in milliseconds at the source's frame rate)."""

    def __init__(self, latency: int, frames: Frames, categories):
        self.latency, self.fps = latency, frames.fps
        self.preprocess = frames.preprocess
        self.skip = (0,) if categories and categories[0] == "__background__" else ()
        self.colours = None

    def __call__(self, frame: Frame, output, top, fps: float) -> np.ndarray:
        image, x = frame.image, _logits(output)
        if x.dim() == 4 and self.preprocess is not None:
            self.colours = palette(x.shape[1]) if self.colours is None else self.colours
            box = self.preprocess.box(image.shape[1], image.shape[0])  # where the network looked
            image = draw_mask(image, x[0].argmax(0).cpu().numpy(), box, self.colours, skip=self.skip)
        text = ["(pipeline filling)"] if top is None else \
            [f"{e['label']}  {e.get('p', e.get('share')):.0%}" for e in top[:3]]
        info = f"{fps:.1f} fps   latency {_plural(self.latency, 'frame')}"
        if self.fps:
            info += f" ({1000 * self.latency / self.fps:.0f} ms)"
        return draw_text(image, [*text, info])


def run(net, frames: Frames, *, workers=None, categories=None, k: int = 5, smooth: int = 1, video=None,
        jsonl=None, progress: bool = True, prepare="freeze") -> Summary:
    """Streams `frames` through the compiled `net` (put in eval mode) causally, one tick per frame, on
    the threaded runtime (`workers`: a count or devices; default one per stage, at most one per core).

    Each tick's output is turned into labels (`predict`, after `Smoother(smooth)`), written to
    `jsonl` (a path: one JSON object per frame) and drawn, with the frame rate and the network's
    information latency, onto the frame written to `video` (a path or a `Writer`). Ctrl-C stops
    the stream after the frame in hand (a second one at once): the runtime, the decoder and the
    files are closed, and the summary says so.
    """
    from tqdm import tqdm

    from .backends.threaded import Runtime
    from .schedule import _cores

    smoother = Smoother(smooth)
    summary = Summary()
    reflects = _reflects(net)
    workers = workers or min(net.plan.parallel, _cores())
    pending = collections.deque()  # frames given to the runtime whose outputs have not come yet

    def inputs():
        for frame in frames:
            pending.append(frame)
            yield frame.input

    recent = collections.deque(maxlen=16)  # when the last outputs came: the frame rate drawn
    start = time.perf_counter()
    runtime = ticks = bar = writer = lines = None
    stop = threading.Event()
    previous = _stop_on_ctrl_c(stop)
    try:
        writer = video if video is None or isinstance(video, Writer) else Writer(video, frames.fps or 25.0)
        lines = open(jsonl, "w") if jsonl is not None else None
        overlay = _Overlay(net.latency, frames, categories)
        runtime = Runtime(net.eval(), workers, prepare=prepare)
        bar = tqdm(total=frames.count, unit="frame", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        start = time.perf_counter()
        with torch.no_grad():
            ticks = runtime.run(inputs())
            for output in ticks:
                frame = pending.popleft()
                recent.append(time.perf_counter())
                newest = reflects(frame.index)
                record = {"frame": frame.index, "time": None if frame.time is None else round(frame.time, 4),
                          "reflects": newest, **predict(smoother(output), categories, k)}
                top = record.get("top") or record.get("classes")
                label = top[0]["class"] if top and newest is not None else None
                if label is not None and summary.labels and summary.labels[-1] is not None:
                    summary.compared += 1
                    summary.changes += label != summary.labels[-1]
                summary.labels.append(label)
                if lines is not None:
                    lines.write(json.dumps(record) + "\n")
                    lines.flush()  # a reader following the file sees each frame as it comes
                if writer is not None:
                    fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
                    writer.write(overlay(frame, output, top if newest is not None else None, fps))
                summary.frames += 1
                bar.update()
                if top:
                    bar.set_postfix_str(top[0]["label"], refresh=False)
                if stop.is_set():
                    summary.interrupted = True
                    break
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread's handler
        summary.interrupted = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        summary.seconds = time.perf_counter() - start
        if ticks is not None:
            ticks.close()
        if runtime is not None:
            runtime.close()
        frames.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if lines is not None:
            lines.close()
    summary.problem = frames.problem
    return summary


__all__ = ["Frames", "Frame", "check_source", "Preprocess", "Writer", "VideoError", "Smoother", "Summary", "run", "predict",
           "draw_text", "draw_mask", "palette", "IMAGENET_MEAN", "IMAGENET_STD"]
