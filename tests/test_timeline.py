"""The time-space table (fig. 1 of *Massively Parallel Video Networks*) against the tick rule
of semantics §3, and against the network itself: the frame a cell names is the newest
frame whose perturbation changes the output."""
import pytest
import torch
import torchvision

import pipecomp
from pipecomp.timeline import Timeline, timeline

SIZE = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18().eval()


def test_aligned_output_reflects_frame_t_minus_k_minus_1(resnet18):
    net = pipecomp.compile(resnet18, parallel=4, delays="aligned", example_input=SIZE)
    tl = net.timeline(12)
    assert isinstance(tl, Timeline) and len(tl.stages) == 4 and tl.ticks == 12
    assert tl.output == [t - 3 if t >= 3 else None for t in range(12)]
    # Stage j works on frame t - j: the diagonal of fig. 1b.
    for j, row in enumerate(tl.stages):
        assert [c.frame for c in row] == [t - j if t >= j else None for t in range(12)]
        assert all(c.fires for c in row)


def test_diagonal_output_reflects_t_minus_latency_with_temporal_skips():
    # Dense connections jump stages at delay 1, so the latency is below k - 1 (fig. 1d).
    net = pipecomp.compile(torchvision.models.densenet121(), parallel=7, example_input=SIZE)
    assert net.latency < 6
    tl = timeline(net.plan, 12)
    assert tl.output[net.latency:] == [t - net.latency for t in range(net.latency, 12)]
    assert tl.output[:net.latency] == [None] * net.latency


def test_clocked_stage_fires_only_every_period_ticks(resnet18):
    net = pipecomp.compile(resnet18, parallel=4, clocks="halve", phases="zero", example_input=SIZE)
    tl = net.timeline(33)
    single = [(j, p[0]) for j, p in enumerate(tl.periods) if len(p) == 1 and p[0] > 1]
    assert single, "expected a stage with one clock period > 1"
    for j, p in single:
        assert [c.fires for c in tl.stages[j]] == [t % p == 0 for t in range(33)]
    for row in tl.stages:
        # An idle stage holds its value.
        assert all(row[t].frame == row[t - 1].frame for t in range(1, 33) if not row[t].fires)
    # The deepest stage ticks every 16 frames and sees its input one tick late: nothing
    # reaches the output before tick 16.
    assert tl.output[:16] == [None] * 16 and tl.output[16] is not None


def _newest_frame_that_matters(net, ticks):
    """Per tick: the newest frame whose perturbation changes the output (None if none does)."""
    clip = torch.randn(1, ticks, *SIZE[1:])
    batch = clip.repeat(ticks + 1, 1, 1, 1, 1)
    for f in range(ticks):
        batch[f + 1, f] += 1  # sample f+1 perturbs frame f only
    with torch.no_grad():
        out = net(batch)
    changed = (out[1:] - out[:1]).abs().flatten(2).amax(-1) > 1e-6  # [frame, tick]
    return [max((f for f in range(ticks) if changed[f, t]), default=None) for t in range(ticks)]


@pytest.mark.parametrize("options", [
    dict(parallel=4, clocks="halve", max_period=4),
    dict(parallel=3, delays="aligned", shift="online"),
], ids=["clocks", "aligned-shift"])
def test_output_row_matches_the_network(resnet18, options):
    net = pipecomp.compile(resnet18, example_input=SIZE, **options).eval()
    output = net.timeline(14).output
    assert len(set(output) - {None}) >= 2
    assert output == _newest_frame_that_matters(net, 14)


def test_table_text(resnet18):
    net = pipecomp.compile(resnet18, parallel=2, clocks="halve", max_period=2, example_input=SIZE)
    text = net.timeline(4).table()
    lines = text.splitlines()
    assert lines[0].split() == ["tick", "0", "1", "2", "3"]
    assert lines[1].split() == ["frame", "0", "1", "2", "3"]
    assert lines[-2].startswith("output")
    assert "." in lines[3]  # the period-2 stage idles on odd ticks
    assert "latency 1" in lines[-1]


def test_rejects_bad_ticks(resnet18):
    net = pipecomp.compile(resnet18, parallel=2, example_input=SIZE)
    with pytest.raises(ValueError, match="ticks"):
        net.timeline(0)


def test_table_of_a_clocked_net_says_when_a_frame_first_reaches_the_output(resnet18):
    net = pipecomp.compile(resnet18, parallel=4, clocks="halve", example_input=SIZE)
    tl = net.timeline(2 * net.plan.hyperperiod)
    first = next(t for t, f in enumerate(tl.output) if f is not None)
    assert first > net.plan.latency  # the clocks, not the delays, decide it
    caption = tl.table().splitlines()[-1]
    assert f"first reaches the output at tick {first} (frame {tl.output[first]})" in caption
    assert "reflects frame t-" not in caption
