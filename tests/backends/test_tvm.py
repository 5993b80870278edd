"""The TVM backend (backends/tvm/) gives what `net.step` gives, float32 to 1e-4 relative (semantics §7),
after export and load, on an emulated Raspberry Pi, over RPC, and with tuned kernels."""
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as models
from torch import nn

import pipecomp

tvm = pytest.importorskip("tvm")
from pipecomp.backends import tvm as backend  # noqa: E402
from pipecomp.backends.tvm import compiler, run  # noqa: E402
from pipecomp.lower import zero_state  # noqa: E402
from tests.models import tiny_dict, tiny_resnet  # noqa: E402

RELATIVE = 1e-4
AARCH64_PYTHON = os.environ.get("PIPECOMP_AARCH64_PYTHON",
                                str(Path.home() / ".cache/pipecomp/aarch64/python3"))  # tools/aarch64-python.sh




NETS = {"resnet-shift": tiny_resnet, "dict-output": tiny_dict,
        "resnet-aligned-phases": lambda: tiny_resnet(phases="align", shift=None)}


@pytest.fixture(scope="module", params=list(NETS))
def built(request):
    net = NETS[request.param]()
    with backend.build(net, "host", workers=2) as program:
        yield net, program


def frames(net, n, seed=0):
    shape = net.plan.example_shape
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def reference(net, xs):
    net.reset()
    with torch.no_grad():
        out = [torch.utils._pytree.tree_map(lambda t: t.numpy(), net.step(torch.from_numpy(x))) for x in xs]
    net.reset()
    return out


def assert_close(got, want, relative=RELATIVE):
    """Each tensor within `relative` times the largest magnitude of the reference's."""
    assert len(got) == len(want)
    for t, (g, w) in enumerate(zip(got, want)):
        gs, ws = torch.utils._pytree.tree_leaves(g), torch.utils._pytree.tree_leaves(w)
        assert torch.utils._pytree.tree_structure(g) == torch.utils._pytree.tree_structure(w), f"tick {t}"
        for a, b in zip(gs, ws):
            assert a.shape == b.shape and a.dtype == b.dtype, f"tick {t}"
            assert np.abs(a - b).max() <= relative * max(np.abs(b).max(), 1e-12), f"tick {t}"


def ticks_for(net):
    return 2 * net.plan.hyperperiod + 1  # every clock phase, twice


# -- what a program computes ------------------------------------------------------------------
def test_program_matches_step(built):
    net, program = built
    xs = frames(net, ticks_for(net))
    program.reset()
    assert_close([program.step(x) for x in xs], reference(net, xs))


def test_run_restarts_after_reset_and_workers_agree(built):
    net, program = built
    xs = frames(net, ticks_for(net), seed=1)
    program.reset()
    first = program.run(xs)
    program.reset()
    assert_close(program.run(xs), first, relative=0)
    with run.Program(program.manifest, program._libraries, workers=1) as sequential:
        assert_close(sequential.run(xs), first, relative=0)


def test_frames_are_checked(built):
    net, program = built
    with pytest.raises(ValueError, match=r"compiled for float32 \[.*16, 16\]"):
        program.step(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="float64"):
        program.step(frames(net, 1)[0].astype(np.float64))


def test_manifest_says_what_the_plan_says(built):
    net, program = built
    manifest, plan = program.manifest, net.plan
    run.validate(manifest)
    assert manifest["latency"] == plan.latency and manifest["parallel"] == plan.parallel
    assert [b["name"] for b in manifest["state"]] == list(zero_state(plan, plan.example_shape[0], "cpu"))
    readers = {}  # the stages whose generated tick functions index the state with a buffer's name
    for step in net._stages:
        for gm in step.variants:
            state = [n for n in gm.graph.nodes if n.op == "placeholder"][1]
            for use in state.users:
                readers.setdefault(use.args[1], set()).add(step.stage)
    for b in manifest["state"]:
        assert b["stage"] == plan.stage_of[b["node"]] and b["init"] == "zeros"
        assert set(b["readers"]) == readers.get(b["name"], set()), b["name"]
    for stage, step in zip(manifest["stages"], net._stages):
        of_tick = [None] * stage["hyperperiod"]
        for i, v in enumerate(stage["variants"]):
            for t in v["ticks"]:
                of_tick[t] = i
        assert of_tick == step.variant_of_tick and stage["warmup"] == step.warmup
    for name, clock in manifest["clocks"].items():
        assert (clock["period"], clock["phase"], clock["stage"]) == (
            plan.period_of[name], plan.phase_of[name], plan.stage_of[name])


def test_identical_tick_functions_share_a_module():
    net = tiny_resnet()
    step = next(s for s in net._stages if len(s.variants) > 1)
    step.variants[1] = copy.deepcopy(step.variants[0])
    manifest, irmods = compiler.lower(net)
    variants = manifest["stages"][step.stage]["variants"]
    assert variants[0]["module"] == variants[1]["module"] is not None
    assert set(irmods) == set(manifest["modules"])


class ConvNorms(nn.Module):
    """conv -> bn twice; the first convolution's output is also returned, so its norm must stay."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)

    def forward(self, x):
        y = self.conv1(x)
        return y, self.bn2(self.conv2(self.bn1(y)))


def test_batch_norms_fold_into_the_convolutions_they_alone_read():
    torch.manual_seed(0)
    model = ConvNorms().eval()
    before = copy.deepcopy(model.state_dict())
    gm = torch.fx.symbolic_trace(model)
    folded = compiler._fold_batch_norms(gm)
    called = [n.target for n in folded.graph.nodes if n.op == "call_module"]
    assert called == ["conv1", "bn1", "conv2"]  # conv1's output is returned too: bn1 stays
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for a, b in zip(folded(x), model(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the model's own weights are untouched


def test_tvm_modules_of_a_resnet_have_no_batch_norm_left():
    net = tiny_resnet(parallel=1, clocks=None)
    _, irmods = compiler.lower(net)
    (mod,) = irmods.values()
    assert "conv2d" in mod.script() and "batch_norm" not in mod.script()


# -- export, load, the runner -----------------------------------------------------------------
def test_export_load_and_runner_round_trip(built, tmp_path):
    net, program = built
    folder = program.export(tmp_path / "program")
    names = {p.name for p in folder.iterdir()}
    assert {"manifest.json", "manifest.schema.json", "run.py"} <= names
    assert {m["file"] for m in program.manifest["modules"].values()} <= names
    xs = frames(net, ticks_for(net), seed=2)
    program.reset()
    want = program.run(xs)
    with backend.load(folder) as loaded:
        assert_close(loaded.run(xs), want, relative=0)

    # The runner as on a board: its own copy, with torch and pipecomp impossible to import.
    np.save(tmp_path / "frames.npy", xs)
    code = ("import runpy, sys; sys.modules['torch'] = sys.modules['pipecomp'] = None; "
            f"sys.argv = ['run.py', {str(folder)!r}, '--frames', {str(tmp_path / 'frames.npy')!r}, "
            f"'--out', {str(tmp_path / 'out.npz')!r}]; runpy.run_path({str(folder / 'run.py')!r}, run_name='__main__')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert_close(_runner_outputs(tmp_path / "out.npz", len(xs)), [_leaves(w) for w in want], relative=0)


def _leaves(output):
    return [np.asarray(x) for x in torch.utils._pytree.tree_leaves(output)]


def _runner_outputs(path, ticks):
    saved = np.load(path)
    return [[saved[k] for k in sorted((k for k in saved.files if k.startswith(f"{t}_")),
                                      key=lambda k: int(k.split("_")[1]))] for t in range(ticks)]


def test_validate_names_what_is_wrong(built, tmp_path):
    _, program = built
    good = program.manifest

    def broken(change):
        m = json.loads(json.dumps(good))
        change(m)
        return m
    with pytest.raises(ValueError, match="missing 'stages'"):
        run.validate(broken(lambda m: m.pop("stages")))
    with pytest.raises(ValueError, match=r"manifest.state\[0\].shape\[0\]: expected integer"):
        run.validate(broken(lambda m: m["state"][0]["shape"].__setitem__(0, "B")))
    with pytest.raises(ValueError, match="each of 0..*once"):
        run.validate(broken(lambda m: m["stages"][0]["variants"][0]["ticks"].append(0)))
    with pytest.raises(ValueError, match="not a state buffer"):
        run.validate(broken(lambda m: m["stages"][0]["variants"][0]["writes"].update(nowhere={"state": "x"})))
    with pytest.raises(ValueError, match="warmup .* names variants it does not have"):
        run.validate(broken(lambda m: m["stages"][0].update(warmup=[99])))
    with pytest.raises(ValueError, match="is missing from"):
        run.validate(good, tmp_path)


def test_a_filling_pipeline_runs_its_warm_up_variants():
    """Semantics §6: while an aligned pipeline fills, its shift memories stay zero, as in `step`."""
    net = tiny_resnet(parallel=4, delays="aligned", clocks=None)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data.uniform_(-1, 1)  # zero registers then give non-zero values, which memories must not keep
    assert any(step.filling[i] for step in net._stages for i in step.warmup)
    xs = frames(net, net.latency + 2, seed=5)
    with backend.build(net, "host", workers=2) as program:
        assert [s["warmup"] for s in program.manifest["stages"]] == [step.warmup for step in net._stages]
        assert_close(program.run(xs), reference(net, xs))


# -- errors a person can act on -----------------------------------------------------------------
def test_refusals():
    net = tiny_resnet(parallel=2)
    with pytest.raises(ValueError, match="rpi4, jetson-nano, jetson-orin-nano"):
        backend.build(net, "raspberry-pi-5")
    with pytest.raises(ValueError, match="dict\\(trials=N, database=PATH\\)"):
        backend.build(net, "host", tuning=dict(trials=3))
    with pytest.raises(ValueError, match="tracker and key go together"):
        backend.build(net, "host", tuning=dict(trials=3, database="db", tracker="127.0.0.1:9190"))
    with pytest.raises(ValueError, match="'HOST:PORT'"):
        backend.build(net, "host", tuning=dict(trials=3, database="db", tracker="9190", key="rpi4"))
    with pytest.raises(ValueError, match="shift='online'"):
        backend.build(tiny_resnet(parallel=2, shift="offline"), "host")
    with pytest.raises(ValueError, match="net.eval()"):
        backend.build(copy.deepcopy(net).train(), "host")


def test_missing_tvm_says_what_to_install():
    code = "import sys; sys.modules['tvm'] = None; import pipecomp.backends.tvm"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "pip install 'pipecomp[tvm]'" in result.stderr


def test_a_program_for_another_cpu_says_where_to_run_it(built):
    net, program = built
    elsewhere = run.Program({**program.manifest, "arch": "riscv64"}, program._libraries)
    with pytest.raises(RuntimeError, match="export"):
        elsewhere.step(frames(net, 1)[0])


# -- a Raspberry Pi 4 without a Pi --------------------------------------------------------------
needs_cross = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                                 reason="apt-get install g++-aarch64-linux-gnu")


@pytest.fixture(scope="module")
def rpi4(tmp_path_factory):
    net = tiny_resnet()
    program = backend.build(net, "rpi4")
    folder = program.export(tmp_path_factory.mktemp("rpi4") / "program")
    return net, program, folder


@needs_cross
def test_rpi4_export_is_aarch64(rpi4):
    _, program, folder = rpi4
    assert program.manifest["target_name"] == "rpi4" and program.manifest["arch"] == "aarch64"
    assert program.manifest["target"]["mcpu"] == "cortex-a72"
    for module in program.manifest["modules"].values():
        header = (folder / module["file"]).read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    run.validate(json.loads((folder / "manifest.json").read_text()), folder)  # against its schema, files there


@needs_cross
def test_jetson_cpu_variant_builds_for_its_arm_cores_and_gpu_builds_say_what_is_unchecked(tmp_path):
    net = tiny_resnet()
    program = backend.build(net, "jetson-orin-nano-cpu")
    assert program.manifest["arch"] == "aarch64" and program.manifest["target"]["mcpu"] == "cortex-a78"
    folder = program.export(tmp_path / "orin")
    module = next(iter(program.manifest["modules"].values()))
    assert (folder / module["file"]).read_bytes()[:4] == b"\x7fELF"
    with pytest.warns(UserWarning, match="jetson-orin-nano-cpu") as warned:
        backend.build(net, "jetson-orin-nano")
    if _nvrtc():  # the Orin's sm_87 kernels compile here; CUDA 13's NVRTC no longer knows the Nano's sm_53
        assert re.search("compiled \\([0-9]+ modules? with NVRTC [0-9.]+ for sm_87\\)", str(warned[0].message))
        with pytest.warns(UserWarning, match="could not be checked here: .*sm_53"):
            backend.build(net, "jetson-nano")


def _nvrtc() -> bool:
    try:
        from cuda.bindings import nvrtc  # noqa: F401
        from cuda.pathfinder import find_nvidia_header_directory
        return find_nvidia_header_directory("cccl") is not None
    except ImportError:
        return False


@needs_cross
def test_rpi4_export_needs_the_cross_compiler(rpi4, monkeypatch, tmp_path):
    _, program, _ = rpi4
    monkeypatch.setattr(run.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        program.export(tmp_path)


@pytest.mark.slow
@needs_cross
@pytest.mark.skipif(not (shutil.which("qemu-aarch64") and os.access(AARCH64_PYTHON, os.X_OK)),
                    reason="no emulated aarch64 python: run tools/aarch64-python.sh")
def test_rpi4_program_runs_under_qemu_as_on_the_host(rpi4, tmp_path):
    net, _, folder = rpi4
    xs = frames(net, ticks_for(net), seed=3)
    np.save(tmp_path / "frames.npy", xs)
    subprocess.run([AARCH64_PYTHON, str(folder / "run.py"), str(folder), "--frames", str(tmp_path / "frames.npy"),
                    "--out", str(tmp_path / "out.npz")], check=True, timeout=300)
    host = backend.build(net, "host", workers=1)
    assert_close(_runner_outputs(tmp_path / "out.npz", len(xs)), [_leaves(o) for o in host.run(xs)])


# -- RPC on loopback -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("built", ["resnet-shift"], indirect=True)
def test_rpc_runs_an_exported_program(built, tmp_path):
    net, program = built
    folder = program.export(tmp_path / "program")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        session = _connect(port)
        xs = frames(net, ticks_for(net), seed=4)
        program.reset()
        with backend.load(folder, session=session) as remote:
            assert_close(remote.run(xs), program.run(xs), relative=0)
    finally:
        server.kill()
        server.wait()


def _connect(port, seconds=60):
    from tvm import rpc
    deadline = time.monotonic() + seconds
    while True:
        try:
            return rpc.connect("127.0.0.1", port)
        except Exception:  # the server is still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# -- tuning ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_tuning_database_is_reused(tmp_path, monkeypatch):
    pytest.importorskip("psutil")  # MetaSchedule needs it
    torch.manual_seed(0)
    net = pipecomp.compile(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval(),
                           example_input=(1, 3, 16, 16)).eval()
    tuning = dict(trials=1, database=tmp_path / "db")
    tuned = backend.build(net, "host", tuning=tuning)
    assert (tmp_path / "db" / "database_tuning_record.json").read_text().strip()
    from tvm.s_tir import meta_schedule as ms

    def no_tuning(*args, **kwargs):
        raise AssertionError("the second build tuned again")
    monkeypatch.setattr(ms, "tune_tasks", no_tuning)
    again = backend.build(net, "host", tuning=tuning)
    xs = frames(net, 3)
    assert_close(tuned.run(xs), reference(net, xs))
    assert_close(again.run(xs), tuned.run(xs), relative=0)


@contextlib.contextmanager
def rpc_tracker(python, key):
    """A TVM RPC tracker on loopback and a server registered with it under `key`, run by `python`."""
    tracker_port, server_port = _free_port(), _free_port()
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(tracker_port), "--port-end", str(tracker_port + 1)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        _wait_for_port(tracker_port, tracker)
        server = subprocess.Popen([python, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                   "--port", str(server_port), "--port-end", str(server_port + 1),
                                   "--tracker", f"127.0.0.1:{tracker_port}", "--key", key],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from tvm import rpc
        deadline = time.monotonic() + 120
        while key not in rpc.connect_tracker("127.0.0.1", tracker_port).text_summary():
            assert server.poll() is None and time.monotonic() < deadline, "the RPC server did not register"
            time.sleep(0.5)
        yield f"127.0.0.1:{tracker_port}"
    finally:
        for p in (server, tracker):
            if p is not None:
                p.kill()
                p.wait()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port, process, seconds=60):
    deadline = time.monotonic() + seconds
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert process.poll() is None, f"{process.args} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"nothing listens on port {port}"
        time.sleep(0.2)


def _measured(database):
    """The run times MetaSchedule recorded in `database`, per record (failed runs count 1e10 s)."""
    from tvm.s_tir import meta_schedule as ms
    records = ms.database.JSONDatabase(work_dir=str(database)).get_all_tuning_records()
    return [[float(t) for t in r.run_secs] for r in records if r.run_secs is not None]


def conv_net():
    torch.manual_seed(0)
    return pipecomp.compile(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval(),
                            example_input=(1, 3, 16, 16)).eval()


@pytest.mark.slow
def test_tuning_measures_through_an_rpc_tracker(tmp_path):
    pytest.importorskip("psutil")
    net = conv_net()
    # A handler without a name on MetaSchedule's logger (pytest attaches such) broke TVM's logging set-up.
    logger, unnamed = logging.getLogger("tvm.s_tir.meta_schedule"), logging.NullHandler()
    logger.addHandler(unnamed)
    with rpc_tracker(sys.executable, "pipecomp-host") as tracker:
        tuned = backend.build(net, "host", tuning=dict(trials=2, database=tmp_path / "db", tracker=tracker,
                                                       key="pipecomp-host"))
    assert unnamed in logger.handlers
    logger.removeHandler(unnamed)
    measured = _measured(tmp_path / "db")
    assert measured and all(0 < t < 1 for times in measured for t in times)  # real run times, no failures
    xs = frames(net, 3)
    assert_close(tuned.run(xs), reference(net, xs))


@pytest.mark.slow
@needs_cross
@pytest.mark.skipif(not (shutil.which("qemu-aarch64") and os.access(AARCH64_PYTHON, os.X_OK)),
                    reason="no emulated aarch64 python: run tools/aarch64-python.sh")
def test_rpi4_kernels_are_tuned_on_the_board_over_rpc(tmp_path):
    """The board is the emulated aarch64 Python: candidates are cross-compiled here and timed there."""
    pytest.importorskip("psutil")
    net = conv_net()
    tuning = dict(trials=2, database=tmp_path / "db")
    with pytest.raises(ValueError, match="tracker='HOST:PORT'"):
        backend.build(net, "rpi4", tuning=tuning)
    with rpc_tracker(AARCH64_PYTHON, "rpi4") as tracker:
        backend.build(net, "rpi4", tuning=dict(tuning, tracker=tracker, key="rpi4"))
    measured = _measured(tmp_path / "db")
    assert measured and all(0 < t < 1 for times in measured for t in times)
    # The records are for the board's target, and a build for it applies them without a board.
    program = backend.build(net, "rpi4", tuning=dict(trials=0, database=tmp_path / "db"))
    assert program.manifest["arch"] == "aarch64"


# -- torchvision models ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_match_step(name):
    torch.manual_seed(0)
    net = pipecomp.compile(getattr(models, name)().eval(), parallel=2, clocks="halve", shift="online",
                           example_input=(1, 3, 64, 64)).eval()
    xs = frames(net, net.plan.hyperperiod + 1)  # tick 16: the head (period 16) fires on real features
    with backend.build(net, "host") as program:
        assert_close(program.run(xs), reference(net, xs))


# -- the build subcommand --------------------------------------------------------------------
def test_build_command_exports_a_program(tmp_path, capsys):
    from pipecomp.cli import main

    folder = tmp_path / "p"
    model = ["torchvision:resnet18,num_classes=10", "--parallel", "3", "--shift", "online", "--input", "1,3,32,32"]
    assert main(["build", *model, "-o", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "run.py" in out and "latency" in out
    with backend.load(folder) as program:
        assert program.manifest["parallel"] == 3 and program.manifest["input"]["shape"] == [1, 3, 32, 32]
    assert main(["build", *model, "--tune", "8", "-o", str(tmp_path / "q")]) == 2
    assert "--tuning-db" in capsys.readouterr().err
    assert main(["build", *model, "--tune", "8", "--tuning-db", str(tmp_path / "db"), "--tune-tracker",
                 "127.0.0.1:9190", "-o", str(tmp_path / "q")]) == 2
    assert "--tune-key" in capsys.readouterr().err
    assert main(["build", *model, "--target", "pi5", "-o", str(tmp_path / "q")]) == 2
    assert "rpi4" in capsys.readouterr().err
