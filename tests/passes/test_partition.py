"""Partition: optimal contiguous stages, explicit cuts, the largest parallel."""
import itertools

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import pipecomp
from pipecomp.analysis import COMPUTE_OPS


class Chain(nn.Module):
    def __init__(self, widths):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else widths[i - 1], w, 3, padding=1)
                                   for i, w in enumerate(widths))

    def forward(self, x):
        for c in self.convs:
            x = c(x)
        return x


def _brute_force(costs, k):
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), k - 1):
        bounds = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("widths", [[4, 16, 2, 8, 32, 4, 4], [8, 8, 8, 8, 8, 8], [32, 2, 2, 2, 2, 32]])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_most_expensive_stage_is_optimal(widths, k):
    net = pipecomp.compile(Chain(widths), parallel=k, example_input=(1, 3, 8, 8))
    units = [n for n in net.plan.graph.nodes if n.op in COMPUTE_OPS]
    costs = [n.meta["pipecomp"]["flops"] for n in units]
    assert max(net.plan.stage_flops) <= _brute_force(costs, k) * 1.02 + 1e-9


def test_too_many_stages_names_the_largest():
    model = Chain([4, 4, 4])
    with pytest.raises(ValueError, match="largest possible value is 3"):
        pipecomp.compile(model, parallel=4, example_input=(1, 3, 8, 8))
    assert pipecomp.compile(model, parallel=3, example_input=(1, 3, 8, 8)).plan.parallel == 3


def test_explicit_cuts_by_module_and_node_name():
    net = pipecomp.compile(tvm.resnet18(), cuts=["layer2", "layer3_1_conv1"], example_input=(1, 3, 64, 64))
    plan = net.plan
    assert plan.parallel == 3
    assert plan.stage_of["layer1_1_relu_1"] == 0 and plan.stage_of["layer2_0_conv1"] == 1
    assert plan.stage_of["layer3_0_relu_1"] == 1 and plan.stage_of["layer3_1_conv1"] == 2


def test_unknown_cut_lists_close_matches():
    with pytest.raises(ValueError, match="layer2"):
        pipecomp.compile(tvm.resnet18(), cuts=["layr2"], example_input=(1, 3, 64, 64))


def test_near_optimal_partitions_prefer_fewer_crossing_bytes():
    # All costs sit in the convolutions; the ReLUs cost nothing, so a cut can go before or
    # after a ReLU for the same balance: the partitioner must pick the cheaper crossing.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    net = pipecomp.compile(model, parallel=2, example_input=(1, 3, 16, 16))
    assert net.plan.stage_of["_2"] == 0  # the pooled tensor (16× smaller) crosses
    with torch.no_grad():
        assert net.step(torch.zeros(1, 3, 16, 16)).shape == (1, 8, 4, 4)


@pytest.mark.parametrize("factory", [tvm.resnet18, tvm.squeezenet1_0])
def test_every_parallel_up_to_the_largest_is_a_valid_network(factory):
    model = factory().eval()
    largest = None
    with pytest.raises(ValueError, match="largest possible value is") as e:
        pipecomp.compile(model, parallel=10_000, example_input=(1, 3, 64, 64))
    largest = int(str(e.value).rsplit(" ", 1)[1])
    net = pipecomp.compile(model, parallel=largest, example_input=(1, 3, 64, 64))
    assert net.plan.parallel == largest
    frames = torch.randn(1, largest + 2, 3, 64, 64)
    with torch.no_grad():
        clip = net(frames)
        net.reset()
        steps = [net.step(frames[:, t]) for t in range(frames.shape[1])]
    assert torch.allclose(clip, torch.stack(steps, 1), atol=1e-5)


class WithSize(nn.Module):
    """Returns its output and a size, as timm's MViTv2 attention (kept whole) does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x), x.shape[-2:]


class SizeFromStructure(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.pair = nn.Conv2d(3, 4, 3, padding=1), WithSize()
        self.convs = nn.Sequential(*[nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])

    def forward(self, x):
        y, size = self.pair(self.stem(x))
        y = self.convs(nn.functional.avg_pool2d(y, 2))
        return nn.functional.interpolate(y, size=size)


def test_a_size_taken_from_a_structure_never_crosses_a_cut():
    # It could be recomputed only by calling its producer again, and a structure is never state.
    model = SizeFromStructure().eval()
    largest = None
    for parallel in range(1, 8):
        try:
            net = pipecomp.compile(model, parallel=parallel, delays="aligned", leaf_modules=(WithSize,),
                                   example_input=(1, 3, 8, 8))
        except ValueError as e:
            assert "largest possible value" in str(e)
            break
        largest = parallel
        xs = [torch.randn(2, 3, 8, 8) for _ in range(parallel + 1)]
        with torch.no_grad():
            outs = [net.step(x) for x in xs]
            assert torch.allclose(outs[net.latency], model(xs[0]), atol=1e-6)
    size_users = [n for n in net.plan.graph.nodes if n.name.startswith("interpolate")]
    assert {net.plan.stage_of[n.name] for n in size_users} == {net.plan.stage_of["pair"]}
    assert largest == 2  # the pair's stage runs from it to the interpolation: one cut left, before it
