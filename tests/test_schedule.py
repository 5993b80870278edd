"""Placement (schedule.py): exact against brute force, per-tick costs from the clocks, threads per worker."""
import importlib
import itertools

import pytest
import torch
import torchvision.models as tvm
from hypothesis import given, settings
from hypothesis import strategies as st

import pipecomp
from pipecomp.schedule import Placement, _best_groups, schedule
from tests.models import RandomNet

schedule_module = importlib.import_module("pipecomp.schedule")  # `pipecomp.schedule` is the function

TINY = [("conv", 0, 0), ("down", 1, 1), ("conv", 2, 2), ("add", 3, 2), ("down", 4, 4), ("conv", 5, 5)]


def _placement(costs, groups):
    return Placement(groups, ["cpu"] * len(groups), 1, costs, "FLOPs")


def _brute_force(costs, n):
    k = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, k), min(n, k) - 1):
        bounds = [0, *cuts, k]
        p = _placement(costs, [list(range(a, b)) for a, b in zip(bounds, bounds[1:])])
        score = (p.average_tick, p.worst_tick)
        best = score if best is None or score < best else best
    return best


@st.composite
def cost_profiles(draw):
    k, ticks = draw(st.integers(1, 7)), draw(st.integers(1, 4))
    costs = [[draw(st.integers(0, 20)) for _ in range(ticks)] for _ in range(k)]
    return costs, draw(st.integers(1, k + 2))


@settings(max_examples=300, deadline=None)
@given(cost_profiles())
def test_grouping_is_optimal_against_brute_force(profile):
    costs, n = profile
    groups = _best_groups(costs, n)
    assert [s for g in groups for s in g] == list(range(len(costs)))
    assert len(groups) == min(n, len(costs)) and all(groups)
    p = _placement(costs, groups)
    assert (p.average_tick, p.worst_tick) == pytest.approx(_brute_force(costs, n))


def test_ticks_matter_not_only_the_average_cost():
    # Every stage costs 2 per tick on average; only the tick-aware split pairs 0 and 1, whose peaks alternate.
    costs = [[4, 0], [0, 4], [2, 2]]
    assert _best_groups(costs, 2) == [[0, 1], [2]]
    assert _placement(costs, [[0, 1], [2]]).average_tick == 4


@pytest.fixture(scope="module")
def resnet_halve():
    # Phase 0 everywhere: every node fires at tick 0 (the costs test reads the full cost there).
    return pipecomp.compile(tvm.resnet18().eval(), parallel=4, clocks="halve", phases="zero",
                            example_input=(1, 3, 64, 64))


def test_flop_costs_follow_the_clocks(resnet_halve):
    plan = resnet_halve.plan
    p = schedule(resnet_halve, 2)
    assert len(p.costs) == plan.parallel and all(len(c) == plan.hyperperiod for c in p.costs)
    for s, row in enumerate(p.costs):
        assert row[0] == pytest.approx(plan.stage_flops[s])  # every node fires at tick 0
        # Firing nodes whose values nobody reads are dead code in the tick functions: not counted.
        assert 0 < sum(row) / len(row) <= plan.stage_flops_clocked[s] * (1 + 1e-9)
    assert p.worst_tick >= p.average_tick > 0


def test_flop_costs_leave_out_dead_firings():
    # One stage, all phases 0: the stem fires every tick, but what reads it fires every other
    # tick only and nothing keeps the stem's value across ticks, so on odd ticks it is dead.
    net = pipecomp.compile(RandomNet(TINY).eval(), parallel=1, clocks="halve", example_input=(1, 3, 16, 16))
    (row,) = schedule(net, 1).costs
    assert row[0] == pytest.approx(net.plan.stage_flops[0])
    assert row[1] == 0 < net.plan.stage_flops_clocked[0]
    code = net._stages[0].variants[net._stages[0].variant_of_tick[1]].code
    assert "stem" not in code


def test_without_clocks_every_tick_costs_the_same():
    net = pipecomp.compile(tvm.resnet18().eval(), parallel=3, example_input=(1, 3, 64, 64))
    p = schedule(net, 3)
    assert p.costs == [[f] for f in net.plan.stage_flops]
    assert p.groups == [[0], [1], [2]]


@pytest.mark.parametrize("cores, workers, threads", [(2, 1, 2), (2, 2, 1), (2, 3, 1), (8, 3, 2), (8, 9, 2)])
def test_threads_per_worker_share_the_cores(resnet_halve, monkeypatch, cores, workers, threads):
    monkeypatch.setattr(schedule_module, "_cores", lambda: cores)
    p = schedule(resnet_halve, workers)
    assert p.threads_per_worker == threads
    assert len(p.groups) == len(p.devices) == min(workers, 4)


def test_devices_are_kept_in_order(resnet_halve):
    p = schedule(resnet_halve, ["cpu", "cuda:0", torch.device("cuda", 1)])
    assert p.devices == ["cpu", "cuda:0", "cuda:1"] and len(p.groups) == 3


@pytest.mark.parametrize("workers", [0, True, "cpu", [], [3]])
def test_bad_workers_are_rejected(resnet_halve, workers):
    with pytest.raises(ValueError, match="workers="):
        schedule(resnet_halve, workers)


def test_table_shows_every_worker_and_the_average_and_worst_tick(resnet_halve):
    table = schedule(resnet_halve, 2).table()
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["worker", "device", "threads", "stages"]
    assert lines[2].startswith("0 ") and lines[3].startswith("1 ")
    assert "average" in lines[4] and "worst" in lines[4] and "hyperperiod of 16 ticks" in lines[4]


def test_profile_measures_seconds_on_a_worker_like_thread():
    net = pipecomp.compile(RandomNet(TINY).eval(), parallel=3, clocks="halve", example_input=(1, 3, 16, 16))
    before = torch.get_num_threads()
    p = schedule(net, 2, profile=True)
    assert torch.get_num_threads() == before
    assert p.unit == "s" and "measured seconds" in p.table()
    assert len(p.costs) == 3 and all(len(c) == net.plan.hyperperiod for c in p.costs)
    assert all(0 < c < 1 for row in p.costs for c in row)
    with pytest.raises(NotImplementedError, match="one kind of worker"):
        schedule(net, ["cpu", "cuda:0"], profile=True)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            schedule(net, ["cuda:0"], profile=True)
    offline = pipecomp.compile(RandomNet(TINY).eval(), parallel=3, shift="offline", example_input=(1, 3, 16, 16))
    assert len(schedule(offline, 2).groups) == 2
    with pytest.raises(RuntimeError, match="clips only"):
        schedule(offline, 2, profile=True)


def test_profile_times_the_tick_functions_the_runtime_runs():
    from pipecomp.prepare import _PREPARED
    net = pipecomp.compile(RandomNet(TINY).eval(), parallel=3, clocks="halve", example_input=(1, 3, 16, 16))
    frozen = schedule(net, 2, profile=True)
    assert frozen.prepare == "freeze" and "frozen tick functions" in frozen.table()
    assert all(gm in _PREPARED for stage in net._stages for gm in stage.variants)  # the runtime reuses them
    generated = schedule(net, 2, profile=True, prepare=None)
    assert generated.prepare is None and "generated tick functions" in generated.table()
    net.bn.train()  # frozen kernels would not normalise by batch statistics: the runtime runs these eager
    assert schedule(net, 2, profile=True).prepare is None
    with pytest.raises(ValueError, match="prepare="):
        schedule(net, 2, profile=True, prepare="jit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_on_cuda():
    net = pipecomp.compile(RandomNet(TINY).eval(), parallel=3, clocks="halve", example_input=(1, 3, 16, 16))
    p = schedule(net, ["cuda:0", "cuda:0"], profile=True)
    assert p.unit == "s" and p.prepare == "freeze" and all(0 < c < 1 for row in p.costs for c in row)
