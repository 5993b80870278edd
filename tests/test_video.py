"""Real video in and out (`pipecomp.video`, `pipecomp run`): decoding packaged footage, what `run`
writes checked against `net.step` and against decoding the file back, every bad source, Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

import pipecomp
from pipecomp import video
from pipecomp.cli import load_model, main
from pipecomp.footage import footage

ROOT = Path(__file__).resolve().parents[1]
VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")


def _bikes() -> Path:
    try:
        return footage("bikes")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _decode(path, n=None) -> list:
    """Frames of a file decoded straight with PyAV, as H×W×3 uint8: the independent expectation."""
    with av.open(str(path)) as c:
        frames = []
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
            if len(frames) == n:
                break
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """The first 12 frames of bikes.mp4 at 320×136, as H.264 in mp4: a real clip that decodes fast."""
    path = tmp_path_factory.mktemp("clip") / "bikes12.mp4"
    with av.open(str(_bikes())) as src, av.open(str(path), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 136, "yuv420p"
        for i, frame in enumerate(src.decode(video=0)):
            if i == 12:
                break
            out.mux(stream.encode(frame.reformat(width=320, height=136)))
        out.mux(stream.encode())
    return path


MODEL = """import time

import torch

torch.fx.wrap("slow")


def slow(x):
    time.sleep(0.1)
    return x


def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 6))


class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make()

    def forward(self, x):
        return self.body(slow(x))


def make_slow():
    return Slow()


def make_segmenter():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 3, padding=1))
"""


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    (tmp_path / "tiny.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "tiny.py"


def test_frames_decode_real_footage_as_ffmpeg_does(clip):
    pre = video.Preprocess((48, 64))
    with video.Frames(_bikes(), pre, limit=5) as frames:
        assert (frames.width, frames.height, frames.fps, frames.count) == (640, 272, 25.0, 5)
        got = list(frames)
    want = _decode(_bikes(), 5)
    assert [f.index for f in got] == list(range(5)) and frames.problem is None
    assert all(np.array_equal(f.image, w) for f, w in zip(got, want))
    assert [f.time for f in got] == pytest.approx([i / 25 for i in range(5)])
    assert got[0].input.shape == (1, 3, 48, 64)
    # the centre crop keeps 0.875 of the short side (272 px) at the input's aspect ratio
    assert pre.box(640, 272) == pytest.approx((320 - 119 * 4 / 3, 17, 320 + 119 * 4 / 3, 255))


def test_preprocessing_matches_torchvision():
    """Without a crop, the frame is scaled to the input (by 8 here) and normalised: torchvision's
    antialiased resize and normalize on the same frame."""
    image = _decode(_bikes(), 1)[0]
    got = video.Preprocess((34, 80), crop=1.0)(image)
    x = TF.resize(torch.from_numpy(image).permute(2, 0, 1), [34, 80], antialias=True)
    x = TF.normalize(x.float() / 255, video.IMAGENET_MEAN, video.IMAGENET_STD)
    assert (got[0] - x).abs().max() < 3 / 255 / min(video.IMAGENET_STD)  # uint8 rounding of two resamplers


@pytest.mark.skipif(not VTEST.is_file(), reason="vtest.avi comes with Debian's opencv-doc: apt-get install opencv-doc")
def test_frames_decode_vtest():
    with video.Frames(VTEST, limit=3) as frames:
        got = [f.image for f in frames]
    assert frames.fps == 10 and all(np.array_equal(a, b) for a, b in zip(got, _decode(VTEST, 3)))
    assert got[0].shape == (576, 768, 3)


def test_a_folder_of_images_is_a_video(clip, tmp_path):
    from PIL import Image

    want = _decode(clip, 3)
    for i, image in enumerate(want):
        Image.fromarray(image).save(tmp_path / f"frame{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "frame001b.png").write_bytes(b"not a PNG")
    with video.Frames(tmp_path, video.Preprocess((136, 320), crop=None)) as frames:
        got = list(frames)
    assert frames.fps is None and frames.count == 4 and frames.problem == "1 corrupt frame skipped"
    assert all(np.array_equal(f.image, w) for f, w in zip(got, want))
    x = (torch.from_numpy(want[1]).permute(2, 0, 1).float() / 255 - torch.tensor(video.IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(video.IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(got[1].input[0], x)


def test_closing_early_stops_the_decoder(clip):
    frames = video.Frames(clip, video.Preprocess((32, 32)), buffer=2)
    next(iter(frames))
    frames.close()
    assert not frames._thread.is_alive()


def test_writer_output_decodes_back(clip, tmp_path):
    want = _decode(clip)
    with video.Writer(tmp_path / "copy.mp4", fps=12.5) as writer:
        for image in want:
            writer.write(image)
    with av.open(str(tmp_path / "copy.mp4")) as c:
        assert c.streams.video[0].average_rate == 12.5
    got = _decode(tmp_path / "copy.mp4")
    assert len(got) == len(want) == writer.frames
    assert all(np.abs(a.astype(int) - b).mean() < 6 for a, b in zip(got, want))  # lossy, but these frames
    with video.Writer(tmp_path / "sizes.avi") as writer:
        writer.write(want[0][:67, :159])  # odd sides: the last row and column go
        writer.write(want[1])  # another size: scaled to the first
    got = _decode(tmp_path / "sizes.avi")
    assert [g.shape for g in got] == [(66, 158, 3)] * 2
    from PIL import Image

    scaled = np.asarray(Image.fromarray(want[1]).resize((158, 66), Image.BILINEAR))
    assert np.abs(got[1].astype(int) - scaled).mean() < 8


def _lines(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_run_labels_equal_net_step_and_the_video_plays(clip, models, capsys):
    labels = [f"thing {i}" for i in range(6)]
    Path("labels.txt").write_text("\n".join(labels) + "\n")
    argv = ["run", "tiny.py:make", str(clip), "--parallel", "2", "--delays", "aligned", "--input", "1,3,48,48",
            "--top", "3", "--labels", "labels.txt", "-o", "out.mp4", "--jsonl", "preds.jsonl", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "12 frames in" in out and "the top label changed" in out
    records = _lines("preds.jsonl")
    assert [r["frame"] for r in records] == list(range(12))
    net = pipecomp.compile(load_model("tiny.py:make"), parallel=2, delays="aligned", example_input=(1, 3, 48, 48))
    with video.Frames(clip, video.Preprocess((48, 48))) as frames, torch.no_grad():
        want = [torch.softmax(net.step(f.input)[0], 0) for f in frames]
    for record, p in zip(records, want):
        top = p.topk(3)
        assert [e["class"] for e in record["top"]] == top.indices.tolist()
        assert [e["label"] for e in record["top"]] == [labels[i] for i in top.indices]
        assert [e["p"] for e in record["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert [r["reflects"] for r in records] == [None] + list(range(11))  # aligned, latency 1
    decoded = _decode("out.mp4")
    source = _decode(clip)
    assert len(decoded) == 12 and decoded[0].shape == source[0].shape
    # the labels are drawn in the top-left corner; the rest of the picture is the source frame
    assert all(np.abs(a[100:, 200:].astype(int) - b[100:, 200:]).mean() < 6 for a, b in zip(decoded, source))
    assert all(np.abs(a[:20, :60].astype(int) - b[:20, :60]).mean() > 20 for a, b in zip(decoded, source))


def test_smoothing_averages_probabilities_over_the_window():
    smoother, outputs = video.Smoother(3), [torch.randn(1, 5) for _ in range(5)]
    got = [video.predict(smoother(o), k=5)["top"] for o in outputs]
    for t, top in enumerate(got):
        p = torch.stack([torch.softmax(o[0], 0) for o in outputs[max(0, t - 2):t + 1]]).mean(0)
        assert [e["class"] for e in top] == p.topk(5).indices.tolist()
        assert [e["p"] for e in top] == pytest.approx(p.topk(5).values.tolist(), abs=1e-5)


def test_run_a_segmentation_model_overlays_its_mask(clip, models):
    assert main(["run", "tiny.py:make_segmenter", str(clip), "--input", "1,3,68,160", "--crop", "1",
                 "-o", "seg.mp4", "--jsonl", "seg.jsonl", "--quiet", "--frames", "4", "--top", "4"]) == 0
    net = pipecomp.compile(load_model("tiny.py:make_segmenter"), example_input=(1, 3, 68, 160))
    records = _lines("seg.jsonl")
    assert len(records) == 4
    with video.Frames(clip, video.Preprocess((68, 160), crop=1), limit=4) as frames, torch.no_grad():
        for record, f in zip(records, frames):
            classes = net.step(f.input)[0].argmax(0)
            share = torch.bincount(classes.flatten(), minlength=4).float() / classes.numel()
            assert {e["class"]: e["share"] for e in record["classes"]} == pytest.approx(
                {i: s for i, s in enumerate(share.tolist()) if s > 0}, abs=1e-5)
    decoded, source = _decode("seg.mp4"), _decode(clip, 4)
    assert len(decoded) == 4
    assert np.abs(decoded[2][100:, 200:].astype(int) - source[2][100:, 200:]).mean() > 20  # coloured


def _corrupt(clip, tmp_path) -> Path:
    data = bytearray(clip.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 300] = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(bytes(data))
    return path


def _truncated(tmp_path) -> Path:
    if not VTEST.is_file():
        pytest.skip("vtest.avi comes with Debian's opencv-doc: apt-get install opencv-doc")
    path = tmp_path / "short.avi"
    path.write_bytes(VTEST.read_bytes()[:250_000])  # the header announces 795 frames
    return path


@pytest.mark.parametrize("make, message", [
    (_corrupt, "corrupt packets skipped"),
    (lambda clip, tmp: _truncated(tmp), "the stream ended after"),
])
def test_a_damaged_video_finishes_what_it_decoded_and_says_so(make, message, clip, models, capsys):
    source = make(clip, models.parent)
    assert main(["run", "tiny.py:make", str(source), "--input", "1,3,32,32", "--jsonl", "p.jsonl",
                 "-o", "p.mp4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert message in out
    decoded = _decodable(source)
    assert len(_lines("p.jsonl")) == decoded == len(_decode("p.mp4")) and decoded > 0
    assert f"{decoded} frames in" in out


def _decodable(path) -> int:
    """How many frames FFmpeg decodes from a damaged file, packet by packet."""
    count = 0
    with av.open(str(path)) as c:
        for packet in c.demux(video=0):
            try:
                count += len(packet.decode())
            except av.error.InvalidDataError:
                pass
    return count


def _unknown_codec(clip, tmp_path) -> Path:
    path = tmp_path / "odd.avi"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 136, "yuv420p"
        for image in _decode(clip, 2):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    path.write_bytes(path.read_bytes().replace(b"FMP4", b"QQQQ"))  # a codec tag FFmpeg knows no decoder for
    return path


BAD_SOURCES = [
    (lambda clip, tmp: tmp / "missing.mp4", [], "no such file or folder: '{source}'"),
    (lambda clip, tmp: _text(tmp), [], "'{source}' is not a video FFmpeg can read"),
    (lambda clip, tmp: Path("/dev/video97"), [], "camera '/dev/video97' does not open"),
    (lambda clip, tmp: Path("/dev/null"), [], "camera '/dev/null' does not open"),
    (_unknown_codec, [], "FFmpeg has no decoder for the video codec of '{source}'"),
    (lambda clip, tmp: clip, ["--no-resize"], "a 320x136 frame does not fit the compiled example 32x32"),
    (lambda clip, tmp: _empty(tmp), [], "folder '{source}' has no images"),
    (lambda clip, tmp: clip, ["-o", "out.gif"], "cannot tell the video format of 'out.gif'"),
    (lambda clip, tmp: clip, ["--jsonl", "nowhere/p.jsonl"], "folder 'nowhere' for 'nowhere/p.jsonl' does not exist"),
    (lambda clip, tmp: clip, ["--labels", "two.txt"], "has 2 names but tiny.py:make outputs 6 classes"),
    (lambda clip, tmp: clip, ["--input", "2,3,32,32"], "--input must be 1,3,H,W"),
    (lambda clip, tmp: clip, ["--workers", "3"], "--workers 3 exceeds the 1 stages"),
    (lambda clip, tmp: clip, ["--mean", "0.5,0.5"], "is not three numbers R,G,B"),
    (lambda clip, tmp: clip, ["--shift", "offline"], "use --shift online"),
]


def _text(tmp: Path) -> Path:
    (tmp / "notes.mp4").write_text("not a video\n")
    return tmp / "notes.mp4"


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


@pytest.mark.parametrize("make, extra, message", BAD_SOURCES)
def test_bad_sources_are_one_line_and_status_2(make, extra, message, clip, models, capsys):
    Path("two.txt").write_text("a\nb\n")
    source = make(clip, models.parent)
    assert main(["run", "tiny.py:make", str(source), "--input", "1,3,32,32", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    if "no such file" in message:
        assert "compiling" not in err  # said before the slow part
    errors = [line for line in err.splitlines() if line.startswith("pipecomp: error:")]
    assert len(errors) == 1 and message.format(source=source) in errors[0], err
    assert "Traceback" not in err


def _pipecomp_threads():
    return [t for t in threading.enumerate() if t.name.startswith("pipecomp-")]


@pytest.mark.filterwarnings("ignore:stage 0. could not freeze")  # time.sleep is no TorchScript
def test_ctrl_c_closes_the_files_and_leaves_no_thread(clip, models, capsys):
    """A real SIGINT to this process while `run` streams, as a person pressing Ctrl-C."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        def interrupt():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if Path("p.jsonl").exists() and len(Path("p.jsonl").read_text().splitlines()) >= 3:
                    os.kill(os.getpid(), signal.SIGINT)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=interrupt)
        killer.start()
        status = main(["run", "tiny.py:make_slow", str(clip), "--input", "1,3,32,32", "--parallel", "2",
                       "--jsonl", "p.jsonl", "-o", "p.mp4", "--quiet"])
        killer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 130
    err = capsys.readouterr().err
    done = len(_lines("p.jsonl"))
    assert 3 <= done < 12 and f"interrupted after {done} frames" in err
    assert len(_decode("p.mp4")) == done  # the file was finished: it plays to its last frame
    assert _pipecomp_threads() == []


def test_ctrl_c_from_the_shell(clip, models):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipecomp", "run", "tiny.py:make_slow", str(clip), "--input",
                             "1,3,32,32", "--jsonl", "p.jsonl", "-o", "p.mp4"], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if Path("p.jsonl").exists() and len(Path("p.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    done = len(_lines("p.jsonl"))
    assert "Traceback" not in err and f"interrupted after {done} frames" in err
    assert len(_decode("p.mp4")) == done


def test_torchvision_weights_load_from_disk_and_only_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from pipecomp.cli import UsageError

    with pytest.raises(UsageError, match="are not on disk .* pipecomp does not download"):
        load_model("torchvision:resnet18,weights=DEFAULT")
    with pytest.raises(UsageError, match="no weights 'IMAGENET9K'; choose from IMAGENET1K_V1, DEFAULT"):
        load_model("torchvision:resnet18,weights=IMAGENET9K")
    import torchvision

    torch.manual_seed(3)
    saved = torchvision.models.resnet18().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(saved, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = load_model("torchvision:resnet18,weights=ResNet18_Weights.IMAGENET1K_V1")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    untrained = load_model("torchvision:resnet18,weights=None")
    assert not torch.equal(untrained.conv1.weight, saved["conv1.weight"])


def test_class_names_and_preprocessing_come_from_the_weights_metadata():
    import torchvision

    from pipecomp.cli import model_meta

    names, pre = model_meta("torchvision:resnet18", 1000, (64, 64))
    assert names == torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    assert pre == video.Preprocess((64, 64), 224 / 256, video.IMAGENET_MEAN, video.IMAGENET_STD)
    assert model_meta("torchvision:resnet18,weights=None", 1000, (64, 64)) == (names, pre)
    assert model_meta("torchvision:resnet18,num_classes=10", 10, (64, 64)) == (None, None)
    names, pre = model_meta("torchvision:lraspp_mobilenet_v3_large", 21, (64, 64))
    assert names[:2] == ["__background__", "aeroplane"] and pre.crop == 1.0  # segmentation: no crop
    names, pre = model_meta("pipecomp:efficientnet_lite0", 1000, (224, 224))
    x = torch.rand(1, 3, 224, 224)
    image = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    from pipecomp import models

    torch.testing.assert_close(video.Preprocess((224, 224), None, pre.mean, pre.std)(image),
                               models.normalize(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255))
    assert len(names) == 1000


def test_ctrl_c_before_streaming_is_status_130(clip, monkeypatch, capsys):
    def interrupted(spec):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipecomp.cli.load_model", interrupted)
    assert main(["run", "torchvision:resnet18", str(clip)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "pipecomp: interrupted"
