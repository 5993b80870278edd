"""Every torchvision model that fx traces compiles and runs: step equals clip, and aligned
pipelines equal the image model delayed by their latency (semantics §2–4)."""
import pytest
import torch
import torchvision.models as tvm
import torchvision.models.segmentation as seg

import pipecomp

MODELS = {
    "resnet18": tvm.resnet18, "resnext50_32x4d": tvm.resnext50_32x4d, "mobilenet_v2": tvm.mobilenet_v2,
    "mobilenet_v3_small": tvm.mobilenet_v3_small, "densenet121": tvm.densenet121,
    "googlenet": lambda: tvm.googlenet(aux_logits=False, init_weights=False),
    "inception_v3": lambda: tvm.inception_v3(aux_logits=False, init_weights=False),
    "vgg11": tvm.vgg11, "efficientnet_b0": tvm.efficientnet_b0, "regnet_x_400mf": tvm.regnet_x_400mf,
    "shufflenet_v2_x0_5": tvm.shufflenet_v2_x0_5, "squeezenet1_0": tvm.squeezenet1_0,
    "convnext_tiny": tvm.convnext_tiny, "mnasnet0_5": tvm.mnasnet0_5, "alexnet": tvm.alexnet,
    "fcn_resnet50": lambda: seg.fcn_resnet50(weights_backbone=None, aux_loss=True),
    "deeplabv3_mobilenet_v3_large": lambda: seg.deeplabv3_mobilenet_v3_large(weights_backbone=None),
    "lraspp_mobilenet_v3_large": lambda: seg.lraspp_mobilenet_v3_large(weights_backbone=None),
}
T = 4


def _leaf(out):
    return out["out"] if isinstance(out, dict) else out


@pytest.mark.parametrize("name", MODELS)
def test_compiles_and_streams(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    size = 96 if name == "inception_v3" else 64
    clip = torch.randn(2, T, 3, size, size)
    options = [dict(parallel=3, clocks="halve"), dict(parallel=4, delays="aligned"),
               dict(parallel=2, shift="online", shift_place="inplace")]
    for opts in options:
        net = pipecomp.compile(model, example_input=(1, 3, size, size), **opts)
        with torch.no_grad():
            whole = _leaf(net(clip))
            steps = [_leaf(net.step(clip[:, t])) for t in range(T)]
            for t in range(T):
                assert torch.allclose(whole[:, t], steps[t], atol=1e-4, rtol=1e-4), (opts, t)
            if opts.get("delays") == "aligned":
                assert net.latency == 3
                want = _leaf(model(clip[:, 0]))
                assert torch.allclose(steps[net.latency], want, atol=1e-4, rtol=1e-3)
    if isinstance(model(clip[:, 0]), dict):
        assert set(net(clip)) == set(model(clip[:, 0]))
