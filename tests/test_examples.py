"""The examples run as documented (small sizes)."""
import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _run(name, *args):
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=300, check=True).stdout


def test_stream_example_shows_aligned_equals_image_model():
    out = _run("stream.py", "--size", "64", "--frames", "6")
    errors = [float(line.rsplit("max error ", 1)[1].rstrip(")")) for line in out.splitlines() if "max error" in line]
    assert len(errors) == 3 and max(errors) < 1e-4


def test_distill_example_lowers_the_loss():
    out = _run("distill.py", "--size", "16", "--steps", "6", "--frames", "5")
    losses = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "loss" in line]
    assert losses[-1] < losses[0]


def test_sideways_example_under_torchrun_trains_like_one_process():
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           str(EXAMPLES / "train_sideways.py"), "--episodes", "3", "--check"],
                          capture_output=True, text=True, timeout=300, check=True).stdout
    worst = [float(line.rsplit(": ", 1)[1]) for line in done.splitlines() if "largest difference" in line]
    assert len(worst) == 2 and max(worst) < 1e-5


def test_sideways_example_learns_on_worker_threads():
    out = _run("train_sideways.py", "--episodes", "40", "--workers", "2")
    losses = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "loss" in line]
    assert losses[-1] < 0.5 * losses[0]
