"""The ONNX backend (backends/onnx.py, onnx_run.py) gives what `net.step` gives, float32 to 1e-4
relative (semantics §7): on ONNX Runtime, on OpenVINO, and through the board-side runner alone."""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.models as models
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map, tree_structure

import pipecomp

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
from pipecomp.backends import manifest as manifests  # noqa: E402
from pipecomp.backends import onnx as backend  # noqa: E402
from tests.models import TinyResNet, tiny_dict, tiny_resnet  # noqa: E402

RELATIVE = 1e-4




NETS = {"resnet-shift": tiny_resnet, "dict-output": tiny_dict}


@pytest.fixture(scope="module", params=list(NETS))
def exported(request, tmp_path_factory):
    net = NETS[request.param]()
    folder = backend.export(net, tmp_path_factory.mktemp(request.param) / "program")
    with backend.load(folder, workers=2) as program:
        yield net, folder, program


def frames(net, n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *net.plan.example_shape)).astype(np.float32)


def reference(net, xs):
    net.reset()
    with torch.no_grad():
        out = [tree_map(lambda t: t.numpy(), net.step(torch.from_numpy(x))) for x in xs]
    net.reset()
    return out


def assert_close(got, want, relative=RELATIVE):
    """Each tensor within `relative` times the largest magnitude of the reference's."""
    assert len(got) == len(want)
    for t, (g, w) in enumerate(zip(got, want)):
        assert tree_structure(g) == tree_structure(w), f"tick {t}"
        for a, b in zip(tree_leaves(g), tree_leaves(w)):
            assert a.shape == b.shape and a.dtype == b.dtype, f"tick {t}"
            assert np.abs(a - b).max() <= relative * max(np.abs(b).max(), 1e-12), f"tick {t}"


def ticks_for(net):
    return 2 * net.plan.hyperperiod + 1  # every clock phase, twice


# -- what a program computes ------------------------------------------------------------------
def test_program_matches_step(exported):
    net, _, program = exported
    xs = frames(net, ticks_for(net))
    program.reset()
    assert_close(program.run(xs), reference(net, xs))


def test_reset_restarts_and_workers_agree(exported):
    net, folder, program = exported
    xs = frames(net, ticks_for(net), seed=1)
    program.reset()
    first = program.run(xs)
    program.reset()
    assert_close(program.run(xs), first, relative=0)
    with backend.load(folder, workers=1) as sequential:
        assert_close(sequential.run(xs), first, relative=0)


def test_outputs_are_read_only_and_frames_are_checked(exported):
    net, _, program = exported
    program.reset()
    with pytest.raises(ValueError, match="read-only"):
        tree_leaves(program.step(frames(net, 1)[0]))[0][...] = 0
    with pytest.raises(ValueError, match=r"compiled for float32 \[.*16, 16\]"):
        program.step(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="float64"):
        program.step(frames(net, 1)[0].astype(np.float64))


def test_openvino_runs_the_same_folder(exported):
    pytest.importorskip("openvino")
    net, folder, _ = exported
    xs = frames(net, ticks_for(net), seed=3)
    with backend.load(folder, engine="openvino") as program:
        assert_close(program.run(xs), reference(net, xs))


# -- the files ----------------------------------------------------------------------------------
def test_manifest_follows_the_shared_schema_and_says_what_the_plan_says(exported):
    net, folder, program = exported
    manifest, plan = program.manifest, net.plan
    manifests.validate(manifest, folder, "onnx")
    assert manifest["backend"] == "onnx" and manifest["weights"] == "shared"
    assert manifest["latency"] == plan.latency and manifest["parallel"] == plan.parallel
    assert {m["format"] for m in manifest["modules"].values()} == {"onnx"}
    assert "arch" not in manifest and "tvm_version" not in manifest
    for stage, step in zip(manifest["stages"], net._stages):
        assert manifests.variant_of_tick(stage) == step.variant_of_tick and stage["warmup"] == step.warmup
    for name, module in manifest["modules"].items():
        onnx.checker.check_model(str(folder / module["file"]))  # with its external data
        model = onnx.load(folder / module["file"], load_external_data=False)
        assert [i.name for i in model.graph.input] == [a["name"] for a in module["inputs"]]
        assert len(model.graph.output) == len(module["outputs"])
        assert "BatchNormalization" not in {n.op_type for n in model.graph.node}  # folded into the convolutions
    with pytest.raises(ValueError, match="load it with pipecomp.backends.onnx.load"):
        manifests.validate(manifest, folder, "tvm")
    bad = json.loads(json.dumps(manifest))
    del bad["onnx_opset"]
    with pytest.raises(ValueError, match="missing 'onnx_opset'"):
        manifests.validate(bad)
    bad = json.loads(json.dumps(manifest))
    next(iter(bad["modules"].values()))["format"] = "tvm"
    with pytest.raises(ValueError, match="must be 'onnx'"):
        manifests.validate(bad)
    old = json.loads(json.dumps(manifest))  # as exported before manifests said the warm-up ticks
    old["format"] = "pipecomp/1"
    for stage in old["stages"]:
        del stage["warmup"]
    with pytest.raises(ValueError, match="'pipecomp/1'; this runner reads 'pipecomp/2': export the program again"):
        manifests.validate(old)


def test_a_filling_pipeline_runs_its_warm_up_variants(tmp_path):
    """Semantics §6: while an aligned pipeline fills, its shift memories stay zero, as in `step`."""
    net = tiny_resnet(parallel=4, delays="aligned", clocks=None)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data.uniform_(-1, 1)  # zero registers then give non-zero values, which memories must not keep
    assert any(step.filling[i] for step in net._stages for i in step.warmup)
    xs = frames(net, net.latency + 2, seed=5)
    with backend.load(backend.export(net, tmp_path / "program")) as program:
        assert [s["warmup"] for s in program.manifest["stages"]] == [step.warmup for step in net._stages]
        assert_close(program.run(xs), reference(net, xs))


def test_variants_of_a_stage_share_its_weights_file(exported, request):
    """Each distinct tensor of a stage is stored once, and each model read on its own (as TensorRT or
    OpenVINO read it, through ONNX external data) computes what the program's shared sessions compute."""
    import onnxruntime as ort

    net, folder, program = exported
    xs = frames(net, 1, seed=4)[0]
    by_file = {}
    for name, module in program.manifest["modules"].items():
        model = onnx.load(folder / module["file"])  # resolves the external data
        stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        for t in module["initializers"]:
            assert stored[t["name"]].shape == tuple(t["shape"])
            by_file.setdefault(module["weights"], {})[t["offset"]] = stored[t["name"]].nbytes
        feed = [xs if n == "frame" else np.random.default_rng(5).standard_normal(a["shape"]).astype(a["dtype"])
                for n, a in zip((a["name"] for a in module["inputs"]), module["inputs"])]
        alone = ort.InferenceSession(str(folder / module["file"]), providers=["CPUExecutionProvider"])
        want = alone.run(None, {a["name"]: x for a, x in zip(module["inputs"], feed)})
        for a, b in zip(program._models[name](feed), want):
            np.testing.assert_array_equal(a, b)
    shared = False
    for file, tensors in by_file.items():
        size = (folder / file).stat().st_size
        assert size == max(o + n for o, n in tensors.items())  # nothing but the tensors (and alignment)
        assert sum(tensors.values()) <= size < sum(tensors.values()) + 64 * len(tensors)
        listed = sum(len(m["initializers"]) for m in program.manifest["modules"].values() if m["weights"] == file)
        shared |= listed > len(tensors)
    if request.node.callspec.params["exported"] == "resnet-shift":  # the other's weights are too small to share
        assert shared, "no stage has variants that share a weight"


def test_runner_alone_as_on_a_board(exported, tmp_path):
    net, folder, program = exported
    names = {p.name for p in folder.iterdir()}
    assert {"manifest.json", "manifest.schema.json", "manifest.py", "run.py"} <= names
    xs = frames(net, ticks_for(net), seed=2)
    program.reset()
    want = program.run(xs)
    np.save(tmp_path / "frames.npy", xs)
    code = ("import runpy, sys; sys.modules['torch'] = sys.modules['pipecomp'] = sys.modules['onnx'] = None; "
            f"sys.argv = ['run.py', {str(folder)!r}, '--frames', {str(tmp_path / 'frames.npy')!r}, "
            f"'--out', {str(tmp_path / 'out.npz')!r}]; runpy.run_path({str(folder / 'run.py')!r}, run_name='__main__')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    saved = np.load(tmp_path / "out.npz")
    for t, w in enumerate(want):
        leaves = tree_leaves(w)
        assert sorted(k for k in saved.files if k.startswith(f"{t}_")) == sorted(f"{t}_{i}" for i in range(len(leaves)))
        for i, leaf in enumerate(leaves):
            np.testing.assert_array_equal(saved[f"{t}_{i}"], leaf)


# -- errors a person can act on -----------------------------------------------------------------
def test_refusals(tmp_path):
    net = tiny_resnet(parallel=2)
    with pytest.raises(ValueError, match="shift='online'"):
        backend.export(tiny_resnet(parallel=2, shift="offline"), tmp_path / "a")
    with pytest.raises(ValueError, match="net.eval()"):
        backend.export(copy.deepcopy(net).train(), tmp_path / "b")
    with pytest.raises(TypeError, match="VideoNet that pipecomp.compile returns"):
        backend.export(TinyResNet(), tmp_path / "c")


def test_runner_options_are_checked(exported):
    _, folder, _ = exported
    with pytest.raises(ValueError, match="onnxruntime, openvino"):
        backend.load(folder, engine="tensorrt")
    with pytest.raises(ValueError, match="engine='onnxruntime'"):
        backend.load(folder, engine="openvino", providers=["CPUExecutionProvider"])


def test_missing_onnxscript_says_what_to_install():
    code = "import sys; sys.modules['onnxscript'] = None; import pipecomp.backends.onnx"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "pip install 'pipecomp[onnx]'" in result.stderr


# -- torchvision models, with clocks and online shift ---------------------------------------------
# resnet18: test_export_command_matches_step_for_resnet18
@pytest.mark.parametrize("name", ["mobilenet_v2", "lraspp_mobilenet_v3_large"])
def test_torchvision_models_match_step(name, tmp_path):
    torch.manual_seed(0)
    if name.startswith("lraspp"):
        model = models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    else:
        model = getattr(models, name)()
    # max_period=2 keeps the variants (one ONNX export each) few: the clocks still run at two rates.
    net = pipecomp.compile(model.eval(), parallel=2, clocks="halve", max_period=2, shift="online",
                           example_input=(1, 3, 64, 64)).eval()
    xs = frames(net, ticks_for(net) + 2)
    with backend.load(backend.export(net, tmp_path / name)) as program:
        assert_close(program.run(xs), reference(net, xs))


# -- the export subcommand --------------------------------------------------------------------
def test_export_command_matches_step_for_resnet18(tmp_path, capsys):
    from pipecomp.cli import main

    folder = tmp_path / "p"
    options = ["--parallel", "2", "--clocks", "halve", "--max-period", "2", "--shift", "online", "--input", "1,3,64,64"]
    torch.manual_seed(0)  # the command builds torchvision's resnet18 with these weights
    assert main(["export", "torchvision:resnet18", *options, "--format", "onnx", "-o", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "run.py" in out and "latency" in out
    torch.manual_seed(0)
    net = pipecomp.compile(models.resnet18().eval(), parallel=2, clocks="halve", max_period=2, shift="online",
                           example_input=(1, 3, 64, 64)).eval()
    xs = frames(net, ticks_for(net) + 2)
    with backend.load(folder) as program:
        assert program.manifest["parallel"] == 2 and program.manifest["input"]["shape"] == [1, 3, 64, 64]
        assert_close(program.run(xs), reference(net, xs))
    model = ["torchvision:resnet18,num_classes=10", "--input", "1,3,32,32"]
    assert main(["export", *model, "--shift", "offline", "-o", str(tmp_path / "q")]) == 1
    assert "shift='online'" in capsys.readouterr().err
    assert main(["export", *model, "--format", "tflite", "-o", str(tmp_path / "q")]) == 2
    assert "onnx" in capsys.readouterr().err
