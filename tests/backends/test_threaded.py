"""The threaded runtime (backends/threaded.py) gives what `net.step` gives (semantics §7), and fails safely."""
import threading

import pytest
import torch
import torch.fx as fx
import torchvision.models as tvm

import pipecomp
from pipecomp import schedule as schedule_module
from pipecomp.backends.threaded import Runtime, StageError, _stage_error
from pipecomp.schedule import Placement, schedule
from tests.models import RandomNet

TINY = [("conv", 0, 0), ("down", 1, 1), ("conv", 2, 2), ("add", 3, 2), ("cat", 4, 3), ("down", 5, 5), ("conv", 6, 6)]
SECONDS = 30  # a runtime call that takes this long is hung


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = set(threading.enumerate())
    yield
    assert not [t for t in threading.enumerate() if t not in before and t.name.startswith("pipecomp")]


def within(fn, *args):
    """`fn(*args)` on a thread of its own, failing the test instead of hanging it."""
    result = {}

    def body():
        try:
            with torch.no_grad():
                result["value"] = fn(*args)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(SECONDS)
    assert not thread.is_alive(), f"{fn} hung"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def tiny(**options):
    torch.manual_seed(0)
    return pipecomp.compile(RandomNet(TINY, dict_output=True).eval(), parallel=4, example_input=(1, 3, 16, 16),
                            **options)


def frames(n, batch=2, size=16):
    return [torch.randn(batch, 3, size, size) for _ in range(n)]


def reference(net, xs):
    net.reset()
    with torch.no_grad():
        return [net.step(x) for x in xs]


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def check_all_workers(net, xs, workers=(1, 2, 3, 4)):
    want = reference(net, xs)
    for w in workers:
        with Runtime(net, w) as rt:
            assert_same(within(lambda: [rt.step(x) for x in xs]), want)
            rt.reset()
            assert_same(within(lambda: list(rt.run(xs))), want)


@pytest.mark.parametrize("delays", ["diagonal", "aligned"])
@pytest.mark.parametrize("clocks", [None, "halve"])
@pytest.mark.parametrize("shift", [None, "online"])
def test_tiny_model_matches_step(delays, clocks, shift):
    check_all_workers(tiny(delays=delays, clocks=clocks, shift=shift), frames(9))


@pytest.mark.parametrize("options, ticks", [
    (dict(clocks="halve", shift="online"), 17),  # a whole hyperperiod (16) of clock phases
    (dict(delays="aligned"), 5),
])
def test_resnet18_matches_step(options, ticks):
    torch.manual_seed(0)
    net = pipecomp.compile(tvm.resnet18(num_classes=10).eval(), parallel=4, example_input=(1, 3, 64, 64), **options)
    check_all_workers(net, frames(ticks, batch=1, size=64))


def test_a_placement_can_be_given():
    net = tiny(clocks="halve")
    xs = frames(5)
    with Runtime(net, schedule(net, 2)) as rt:
        assert rt.placement.groups == schedule(net, 2).groups
        assert_same(within(lambda: [rt.step(x) for x in xs]), reference(net, xs))
    with pytest.raises(ValueError, match="in order"):
        Runtime(net, Placement([[1], [0, 2, 3]], ["cpu", "cpu"], 1, [[0]] * 4, "FLOPs"))


def test_rejected_frames_change_no_state():
    net, xs = tiny(shift="online"), frames(5)
    want = reference(net, xs)
    with Runtime(net, 2) as rt:
        got = within(lambda: [rt.step(x) for x in xs[:2]])
        with pytest.raises(ValueError, match=r"expected \[B, 3, 16, 16\]"):
            within(rt.step, torch.randn(2, 3, 8, 8))
        with pytest.raises(ValueError, match="batch size 1.*started with 2"):
            within(rt.step, torch.randn(1, 3, 16, 16))
        with pytest.raises(ValueError, match="dtype"):
            within(rt.step, xs[2].double())
        got += within(lambda: [rt.step(x) for x in xs[2:]])
    assert_same(got, want)


def test_run_gives_the_outputs_before_a_rejected_frame():
    net, xs = tiny(), frames(4)
    want = reference(net, [xs[0], xs[1], xs[3]])
    with Runtime(net, 3) as rt:
        got = []

        def consume():
            for out in rt.run([xs[0], xs[1], torch.randn(1, 3, 16, 16), xs[3]]):
                got.append(out)
        with pytest.raises(ValueError, match="batch size"):
            within(consume)
        got.append(within(rt.step, xs[3]))
    assert_same(got, want)


def test_stopping_run_early_keeps_the_frames_it_took():
    net, xs = tiny(clocks="halve"), frames(6)
    want = reference(net, xs)
    with Runtime(net, 2) as rt:
        def first_two():
            outs = []
            for out in rt.run(iter(xs[:3])):
                outs.append(out)
                if len(outs) == 2:
                    break  # frame 2 was taken and its tick was running: it still counts
            return outs + [None] + [rt.step(x) for x in xs[3:]]
        got = within(first_two)
    assert_same(got[:2] + got[3:], want[:2] + want[3:])


def _stage_module(net, stage):
    node = next(n for n in net.plan.nodes_of_stage(stage) if n.op == "call_module")
    return node.name, net.get_submodule(node.target)


def test_a_worker_exception_names_stage_and_node_and_changes_no_state(monkeypatch):
    net, xs = tiny(shift="online"), frames(5)
    want = reference(net, xs)
    name, module = _stage_module(net, 2)
    with Runtime(net, 2) as rt:
        got = within(lambda: [rt.step(x) for x in xs[:2]])
        monkeypatch.setattr(module, "forward", lambda x: 1 / 0)
        with pytest.raises(StageError, match=rf"stage 2 \(worker \d\) failed at node '{name}' \(Conv2d\)") as info:
            within(rt.step, xs[2])
        assert (info.value.stage, info.value.node, info.value.tick) == (2, name, 2)
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        monkeypatch.undo()
        got += within(lambda: [rt.step(x) for x in xs[2:]])
    assert_same(got, want)


def test_a_failing_function_node_is_named_too(capsys):
    # An op failing right on a generated line (not inside a module) is the case where calling the
    # GraphModule would print fx's own report to stderr and cut the traceback that names the node.
    def stage(frame, state):
        y = frame + state["x"]
        return None, {"y": y.relu()}
    gm = fx.symbolic_trace(stage)
    with pytest.raises(RuntimeError) as info:
        gm.forward(torch.zeros(2), {"x": torch.zeros(3)})
    error = _stage_error(info.value, gm, 1, 0, 5)
    assert error.node == "add" and "stage 1 (worker 0) failed at node 'add' (add) on tick 5" in str(error)
    assert capsys.readouterr().err == ""


def test_a_failed_first_tick_leaves_the_stream_as_after_reset(monkeypatch):
    net = tiny()
    name, module = _stage_module(net, 1)
    with Runtime(net, 4) as rt:
        monkeypatch.setattr(module, "forward", lambda x: 1 / 0)
        with pytest.raises(StageError, match=name):
            within(rt.step, torch.randn(2, 3, 16, 16))
        monkeypatch.undo()
        x = torch.randn(1, 3, 16, 16)  # another batch size: nothing of the failed stream is left
        assert_same([within(rt.step, x)], reference(net, [x]))


def test_a_failure_in_run_raises_after_the_earlier_outputs(monkeypatch):
    net, xs = tiny(), frames(5)
    want = reference(net, xs)
    _, module = _stage_module(net, 3)
    calls = []
    real = module.forward

    def fails_on_third(x):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("broken frame")
        return real(x)
    monkeypatch.setattr(module, "forward", fails_on_third)
    with Runtime(net, 2) as rt:
        got = []

        def consume():
            for out in rt.run(xs):
                got.append(out)
        with pytest.raises(StageError, match="broken frame"):
            within(consume)
        assert_same(got, want[:2])
        rt.reset()
        assert_same(within(lambda: list(rt.run(xs))), want)


def test_close_during_a_tick_does_not_hang(monkeypatch):
    net = tiny()
    _, module = _stage_module(net, 2)
    entered, release = threading.Event(), threading.Event()
    real = module.forward

    def blocking(x):
        entered.set()
        release.wait(SECONDS)
        return real(x)
    monkeypatch.setattr(module, "forward", blocking)
    rt = Runtime(net, 2)
    outcome = []

    def step():
        try:
            within(rt.step, torch.randn(2, 3, 16, 16))
        except RuntimeError as e:
            outcome.append(e)
    stepping = threading.Thread(target=step, daemon=True)
    stepping.start()
    assert entered.wait(SECONDS)
    closing = threading.Thread(target=rt.close, daemon=True)
    closing.start()
    release.set()  # close waits for the stage a worker is running
    closing.join(SECONDS)
    stepping.join(SECONDS)
    assert not closing.is_alive() and not stepping.is_alive()
    assert outcome and "closed" in str(outcome[0])
    with pytest.raises(RuntimeError, match="closed"):
        rt.step(torch.randn(2, 3, 16, 16))
    with pytest.raises(RuntimeError, match="closed"):
        rt.reset()
    rt.close()


def test_close_while_run_is_suspended_and_busy_while_it_is_open():
    net, xs = tiny(), frames(4)
    rt = Runtime(net, 3)
    outputs = rt.run(xs)
    within(next, outputs)
    with pytest.raises(RuntimeError, match="busy"):
        rt.step(xs[0])
    within(rt.close)
    with pytest.raises(RuntimeError, match="closed"):
        within(next, outputs)


def test_workers_set_their_own_intra_op_threads(monkeypatch):
    monkeypatch.setattr(schedule_module, "_cores", lambda: 4)
    net = tiny()
    seen = {}
    for stage in range(4):
        _, module = _stage_module(net, stage)
        real = module.forward
        monkeypatch.setattr(module, "forward", lambda x, s=stage, real=real: (
            seen.__setitem__(s, torch.get_num_threads()), real(x))[1])
    default = torch.get_num_threads()
    with Runtime(net, 2) as rt:
        assert rt.placement.threads_per_worker == 2
        assert torch.get_num_threads() == default
        within(rt.step, torch.randn(2, 3, 16, 16))
    assert seen == {0: 2, 1: 2, 2: 2, 3: 2}
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [default]  # new threads take the caller's default again


def test_grad_mode_is_the_callers():
    net, x = tiny(), torch.randn(2, 3, 16, 16)
    with Runtime(net, 2) as rt:
        with torch.no_grad():
            assert not rt.step(x)["logits"].requires_grad
        assert rt.step(x)["logits"].requires_grad


def test_streams_that_cannot_run_are_refused():
    with pytest.raises(RuntimeError, match="offline"):
        Runtime(tiny(shift="offline"), 2)
    with pytest.raises(NotImplementedError, match="CPU workers only"):
        Runtime(tiny(), ["cpu", "cuda:0"])
