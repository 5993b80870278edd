"""Clocks (semantics §5): the "halve" rule, mappings, callables, the max_period cap."""
import pytest
import torchvision.models as tvm
import torchvision.models.segmentation as seg

import pipecomp


def _periods_by_module(net, prefix):
    return {p for name, p in net.plan.period_of.items()
            if net.plan.node(name).meta["pipecomp"]["module"].startswith(prefix)}


def test_resnet50_halve_matches_semantics():
    net = pipecomp.compile(tvm.resnet50(), clocks="halve")
    period = net.plan.period_of
    assert period["conv1"] == 1 and period["x"] == 1
    for layer, p in (("layer1", 2), ("layer2", 4), ("layer3", 8), ("layer4", 16)):
        # a stage's first block reads the previous resolution, so only its later blocks are pure
        assert _periods_by_module(net, f"{layer}.1") == {p}
    assert period["fc"] == 16 and period["flatten"] == 16


def test_densenet121_halve_gets_the_par_densenet_rates():
    net = pipecomp.compile(tvm.densenet121(), clocks="halve", example_input=(1, 3, 64, 64))
    assert net.plan.period_of["features_conv0"] == 1
    for block, p in (("denseblock1", 2), ("denseblock2", 4), ("denseblock3", 8), ("denseblock4", 16)):
        assert _periods_by_module(net, f"features.{block}.") == {p}


def test_segmentation_head_at_full_resolution_ticks_every_frame():
    model = seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    net = pipecomp.compile(model, clocks="halve", example_input=(1, 3, 64, 64))
    out = next(n for n in net.plan.graph.nodes if n.op == "output")
    (final,) = out.args[0].values()
    assert net.plan.period_of[final.name] == 1
    assert max(net.plan.period_of.values()) >= 8


def test_max_period_caps_the_periods():
    net = pipecomp.compile(tvm.resnet18(), clocks="halve", max_period=4, example_input=(1, 3, 64, 64))
    assert max(net.plan.period_of.values()) == 4
    assert net.plan.period_of["layer1_0_conv1"] == 2


def test_mapping_matches_node_and_module_names_with_phases():
    net = pipecomp.compile(tvm.resnet18(), clocks={"layer4.*": (4, 1), "fc": 2}, phases="zero",
                           example_input=(1, 3, 64, 64))  # the clocks' own phases, as given
    plan = net.plan
    assert plan.period_of["layer4_1_conv2"] == 4 and plan.phase_of["layer4_1_conv2"] == 1
    assert plan.period_of["fc"] == 2 and plan.period_of["layer3_0_conv1"] == 1


def test_callable_clocks():
    net = pipecomp.compile(tvm.resnet18(), clocks=lambda n: 3 if n.name.startswith("layer2") else 1,
                           example_input=(1, 3, 64, 64))
    assert net.plan.period_of["layer2_0_conv1"] == 3 and net.plan.period_of["layer3_0_conv1"] == 1


@pytest.mark.parametrize("clocks", [{"fc": 0}, {"fc": (2, 2)}, {"fc": "fast"}])
def test_bad_clock_values_are_rejected(clocks):
    with pytest.raises(ValueError, match="period"):
        pipecomp.compile(tvm.resnet18(), clocks=clocks, example_input=(1, 3, 64, 64))


@pytest.mark.parametrize("parallel", [1, 3])
def test_clock_speedup_is_what_streaming_really_computes(parallel):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = pipecomp.compile(tvm.resnet18().eval(), parallel=parallel, clocks="halve", example_input=(1, 3, 64, 64))
    plan = net.plan
    ticks = plan.hyperperiod
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for _ in range(ticks):
            net.step(torch.randn(1, 3, 64, 64))
    executed = counter.get_total_flops() / ticks
    assert sum(plan.stage_flops_clocked) == pytest.approx(executed)
    assert plan.clock_speedup == pytest.approx(sum(plan.stage_flops) / executed)
    # one stage: the head fires every 16 ticks, so everything else is needed only then
    if parallel == 1:
        assert plan.clock_speedup == pytest.approx(16)
    assert plan.clock_speedup > 2
