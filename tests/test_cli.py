"""The command line: `python -m pipecomp` in a subprocess for what a person runs, and `main()`
in process for the many ways input can be wrong (one line on stderr, exit status 2)."""
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torchvision

from pipecomp.cli import load_model, main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--input", "1,3,64,64"]
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot program: apt-get install graphviz")


def run(*argv, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipecomp", *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_compile_prints_the_report():
    r = run("compile", "torchvision:resnet18,num_classes=10", "--parallel", "4", "--clocks", "halve",
            "--phases", "align", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "phases aligned" in r.stdout
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["stage", "first", "node"]
    assert [line.split()[0] for line in lines[2:6]] == ["0", "1", "2", "3"]
    assert "parallel=4, delays=diagonal" in r.stdout and "clock speed-up" in r.stdout
    assert "pipecomp: compiling" in r.stderr  # progress goes to stderr


@needs_dot
def test_viz_writes_the_picture(tmp_path):
    r = run("viz", "torchvision:resnet18", "--parallel", "3", "--delays", "aligned", *SMALL,
            "-o", "graph.svg", "--collapse", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "graph.svg" in r.stdout
    svg = ET.parse(tmp_path / "graph.svg").getroot()
    assert "stage 2" in "".join(svg.itertext())


def test_demo(tmp_path):
    """The demo's labels are EfficientNet-Lite0's (run by `pipecomp run`), its video plays."""
    import json

    import av

    r = run("demo", "--size", "64", "--frames", "6", "--clips", "bikes", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "agreement: 3 of 3 frames with the pipelined output 3 ticks later" in r.stdout
    assert r.stdout.count("frames/s") == 2
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["bikes_labels.mp4", "bikes_labels.png",
                                                     "bikes_pipelined.jsonl", "bikes_sequential.jsonl"]
    sequential = [json.loads(line) for line in (out / "bikes_sequential.jsonl").read_text().splitlines()]
    pipelined = [json.loads(line) for line in (out / "bikes_pipelined.jsonl").read_text().splitlines()]
    assert [r["reflects"] for r in pipelined] == [None] * 3 + [0, 1, 2]
    # the image model itself on the same frames, preprocessed as EfficientNet-Lite0 was trained
    import torch

    from pipecomp import footage, models, video

    model = models.efficientnet_lite0()
    pre = video.Preprocess((64, 64), 224 / 256, (127 / 255,) * 3, (128 / 255,) * 3)
    with video.Frames(footage.footage("bikes"), pre, limit=6) as frames, torch.no_grad():
        want = [model(f.input)[0].argmax().item() for f in frames]
    assert [r["top"][0]["class"] for r in sequential] == want
    assert [r["top"][0]["class"] for r in pipelined[3:]] == want[:3]
    with av.open(str(out / "bikes_labels.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6


@pytest.mark.parametrize("argv, message", [
    (["compile", "torchvision:resnt18"], "close matches: resnet18"),
    (["compile", "torchvision:resnet18", "--parallel", "1000", *SMALL], "parallel=1000 is too large"),
])
def test_bad_input_from_the_shell(argv, message):
    r = run(*argv)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in r.stderr


FILES = {
    "syntax.py": "def make(:\n",
    "raises.py": "def make():\n    raise RuntimeError('no weights here')\n",
    "notmodule.py": "def make():\n    return 3\n",
    "good.py": ("import torch\n\ndef make():\n"
                "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())\n"),
}


@pytest.mark.parametrize("argv, message", [
    (["compile", "missing.py:make"], "cannot read model file 'missing.py'"),
    (["compile", "syntax.py:make"], "importing 'syntax.py' failed: SyntaxError"),
    (["compile", "raises.py:make"], "raises.py:make() failed: RuntimeError: no weights here"),
    (["compile", "notmodule.py:make"], "returned int, not an nn.Module"),
    (["compile", "good.py:mkae"], "no function 'mkae'; close matches: make"),
    (["compile", "resnet18"], "(torchvision:resnet18?)"),
    (["compile", "torchvision:resnet18,weights=DEFAULT"], "are not on disk"),
    (["compile", "torchvision:resnet18,num_clases=10"], "unexpected keyword argument 'num_clases'"),
    (["compile", "torchvision:resnet18,10"], "must be key=value"),
    (["compile", "torchvision:resnet18", "--input", "1,3"], "is not a frame shape"),
    (["compile", "torchvision:resnet18", "--clocks", "double"], "invalid choice: 'double'"),
    (["compile", "torchvision:resnet18", "--cuts", "layer9", *SMALL], "cut 'layer9'"),
    (["compile", "torchvision:squeezenet1_1", "--shift", "online", *SMALL], "shift_place='inplace'"),
    (["viz", "torchvision:resnet18", "-o", "picture.jpeg"], "picture format"),
    (["viz", "torchvision:resnet18", "-o", "nowhere/picture.svg"], "'nowhere' does not exist"),
    (["demo", "--size", "8"], "--size"),
    (["demo", "--clips", "nothing.mp4"], "'nothing.mp4' is neither a video file nor footage"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_bad_input(argv, message, tmp_path, monkeypatch, capsys):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no downloaded weights
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("pipecomp: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


def test_model_from_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "good.py").write_text(FILES["good.py"])
    monkeypatch.chdir(tmp_path)
    assert main(["compile", "good.py:make", "--parallel", "2", *SMALL]) == 0
    assert "parallel=2" in capsys.readouterr().out


def test_segmentation_builders_take_no_downloaded_weights():
    model = load_model("torchvision:lraspp_mobilenet_v3_large,num_classes=3")
    assert isinstance(model, torchvision.models.segmentation.LRASPP)


def test_missing_dot_program_is_one_line_and_status_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["viz", "torchvision:resnet18", "-o", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install graphviz" in err
