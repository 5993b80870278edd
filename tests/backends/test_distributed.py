"""Multi-process pipelines on loopback (gloo) return exactly what `VideoNet.step` returns."""
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
import torch
import torchvision.models as tvm

import pipecomp
from pipecomp.backends import distributed

SIZE = 32


def _stream(net, frames):
    net.reset()
    with torch.no_grad():
        return [net.step(x) for x in frames]


@pytest.mark.parametrize("nprocs, options", [
    (2, dict(parallel=3, clocks="halve")),
    (3, dict(parallel=3, delays="aligned", shift="online")),
    (2, dict(parallel=4, clocks="halve", shift="online")),
    (3, dict(parallel=3, clocks="halve", phases="align")),
])
def test_processes_equal_step(nprocs, options):
    torch.manual_seed(0)
    net = pipecomp.compile(tvm.resnet18(num_classes=5).eval(), example_input=(1, 3, SIZE, SIZE), **options)
    frames = [torch.randn(2, 3, SIZE, SIZE) for _ in range(6)]
    got = distributed.launch(net, frames, nprocs=nprocs, timeout=120)
    want = _stream(net, frames)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
    assert not multiprocessing.active_children()


def test_only_crossing_registers_are_sent():
    net = pipecomp.compile(tvm.resnet18().eval(), parallel=4, example_input=(1, 3, SIZE, SIZE))
    wiring = distributed.Wiring(net, [[0, 1], [2, 3]])
    (keys,) = wiring.links.values()
    assert list(wiring.links) == [(0, 1)]
    for key in keys:
        name = key.rsplit("_d", 1)[0]
        assert net.plan.stage_of[name] == 1  # written by stage 1, read by stage 2 across the ranks


def test_segmentation_dict_outputs():
    import torchvision.models.segmentation as seg
    model = seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    net = pipecomp.compile(model, parallel=2, example_input=(1, 3, SIZE, SIZE))
    frames = [torch.randn(1, 3, SIZE, SIZE) for _ in range(3)]
    got = distributed.launch(net, frames, nprocs=2, timeout=120)
    for g, w in zip(got, _stream(net, frames)):
        assert torch.allclose(g["out"], w["out"], atol=1e-5)


def _die(rank):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_dying_process_fails_fast(monkeypatch):
    net = pipecomp.compile(tvm.resnet18().eval(), parallel=2, example_input=(1, 3, SIZE, SIZE))
    original = distributed._Rank.step

    def step(self, frame=None):
        if self.rank == 1 and self.tick == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, frame)
    monkeypatch.setattr(distributed._Rank, "step", step)
    frames = [torch.randn(1, 3, SIZE, SIZE) for _ in range(5)]
    with pytest.raises(Exception, match="signal|SIGKILL|exited"):
        distributed.launch(net, frames, nprocs=2, timeout=90)
    assert not multiprocessing.active_children()


def _cli(*argv, runner=(sys.executable, "-m", "pipecomp")):
    return subprocess.run([*runner, *argv], capture_output=True, text=True, timeout=180)


MODEL = ("pipeline", "torchvision:resnet18,num_classes=10", "--parallel", "4", "--input", "1,3,32,32",
         "--frames", "6", "--check")


@pytest.mark.parametrize("runner", [
    (sys.executable, "-m", "pipecomp"),
    (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pipecomp"),
], ids=["fork", "torchrun"])
def test_command_line_pipeline_equals_step(runner):
    done = _cli(*MODEL, runner=runner)
    assert done.returncode == 0, done.stderr
    assert "largest difference from VideoNet.step: 0.0e+00" in done.stdout or \
        float(done.stdout.rsplit(": ", 1)[1]) < 1e-5


def test_command_line_pipeline_refuses_more_processes_than_stages():
    done = _cli(*MODEL[:3], "2", *MODEL[4:], "--procs", "3")
    assert done.returncode == 2 and "exceeds the 2 stages" in done.stderr


def test_launch_streams_from_the_zero_state_whatever_step_did_before():
    torch.manual_seed(0)
    net = pipecomp.compile(tvm.resnet18(num_classes=5).eval(), parallel=2, example_input=(1, 3, SIZE, SIZE))
    with torch.no_grad():
        net.step(torch.randn(1, 3, SIZE, SIZE))  # a batch-1 stream in net.step's own state
    frames = [torch.randn(2, 3, SIZE, SIZE) for _ in range(3)]
    got = distributed.launch(net, frames, nprocs=2, timeout=120)
    for g, w in zip(got, _stream(net, frames)):
        assert torch.allclose(g, w, atol=1e-5)


def test_offline_shift_is_refused_before_any_process_starts():
    net = pipecomp.compile(tvm.resnet18(num_classes=5).eval(), parallel=2, shift="offline",
                           example_input=(1, 3, SIZE, SIZE))
    with pytest.raises(RuntimeError, match="shift='online'"):
        distributed.launch(net, [torch.randn(1, 3, SIZE, SIZE)], nprocs=2, timeout=60)
    assert not multiprocessing.active_children()


def test_command_line_pipeline_streams_non_square_frames_and_refuses_other_channels():
    done = _cli(*MODEL[:5], "1,3,32,48", *MODEL[6:], "--procs", "2")
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.rsplit(": ", 1)[1]) < 1e-5
    done = _cli(*MODEL[:5], "1,1,32,32", *MODEL[6:])
    assert done.returncode == 2 and "3 channels" in done.stderr


def test_pipeline_command_needs_no_graphviz():
    code = ("import sys; sys.modules['graphviz'] = None; from pipecomp.cli import main; "
            "sys.exit(main(['pipeline', 'torchvision:resnet18,num_classes=10', '--parallel', '2', "
            "'--input', '1,3,32,32', '--frames', '2', '--procs', '2']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
