"""Shift insertion (semantics §6): where shift nodes go and how many channels they move."""
import pytest
import torchvision.models as tvm

import pipecomp


def test_residual_shift_goes_before_each_blocks_first_convolution():
    net = pipecomp.compile(tvm.resnet18(), shift="online", example_input=(1, 3, 64, 64))
    plan = net.plan
    want = [f"layer{i}_{j}_conv1_shift" for i in range(1, 5) for j in range(2)]
    assert list(plan.shift_nodes) == want
    for name in want:
        shift = plan.node(name)
        (conv,) = shift.users
        assert conv.name == name[: -len("_shift")]
        assert shift.meta["pipecomp"]["fold"] == shift.meta["pipecomp"]["shape"][1] // 8
    # the identity path reads the unshifted block input
    add = plan.node("add")
    assert not any(a.name.endswith("_shift") for a in add.args)
    assert all(plan.stage_of[n] is not None for n in plan.shift_nodes)


def test_downsample_convolutions_are_not_shifted():
    net = pipecomp.compile(tvm.resnet50(), shift="offline", shift_fraction=0.25, example_input=(1, 3, 64, 64))
    assert len(net.plan.shift_nodes) == 16
    assert not any("downsample" in n for n in net.plan.shift_nodes)
    shift = net.plan.node("layer2_0_conv1_shift")
    assert shift.meta["pipecomp"]["fold"] == 256 // 4


def test_mobilenet_v2_shifts_only_blocks_with_residual_connections():
    net = pipecomp.compile(tvm.mobilenet_v2(), shift="online", example_input=(1, 3, 64, 64))
    assert len(net.plan.shift_nodes) == 10  # mobilenet_v2 has 10 residual inverted-residual blocks


def test_no_residual_blocks_suggests_inplace():
    with pytest.raises(pipecomp.CompileError, match="shift_place='inplace'"):
        pipecomp.compile(tvm.vgg11(), shift="online", example_input=(1, 3, 32, 32))
    net = pipecomp.compile(tvm.vgg11(), shift="online", shift_place="inplace", example_input=(1, 3, 32, 32))
    assert net.plan.shift_nodes


def test_shift_nodes_have_stages_and_clocks():
    net = pipecomp.compile(tvm.resnet18(), parallel=3, clocks="halve", shift="online",
                           example_input=(1, 3, 64, 64))
    plan = net.plan
    for name in plan.shift_nodes:
        (conv,) = plan.node(name).users
        assert plan.period_of[name] == plan.period_of[plan.node(name).args[0].name]
        assert plan.stage_of[name] <= plan.stage_of[conv.name]
