"""The threaded runtime (backends/threaded.py) gives what `net.step` gives (semantics §7), and fails safely."""
import importlib
import os
import signal
import threading
import time
import warnings

import pytest
import torch
import torch.fx as fx
import torchvision.models as tvm

import pipecomp
from pipecomp.backends.threaded import Runtime, StageError, _stage_error
from pipecomp.schedule import Placement, schedule
from tests.models import RandomNet

schedule_module = importlib.import_module("pipecomp.schedule")  # `pipecomp.schedule` is the function

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


def assert_same(got, want, relative=None):
    """Equal up to float rounding, or with `relative`: each tensor within that times its largest magnitude."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if relative is None:
            torch.testing.assert_close(g, w)
        else:
            torch.utils._pytree.tree_map(
                lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=relative * float(b.abs().max())), g, w)


def check_all_workers(net, xs, workers=(1, 2, 3, 4), prepare=None):
    want = reference(net, xs)
    relative = None if prepare is None else 1e-4  # frozen kernels fold batch norm: other rounding
    for w in workers:
        with Runtime(net, w, prepare=prepare) as rt:
            assert rt.preparation == [prepare or "eager"] * net.plan.parallel
            assert_same(within(lambda: [rt.step(x) for x in xs]), want, relative)
            rt.reset()
            assert_same(within(lambda: list(rt.run(xs))), want, relative)


@pytest.mark.parametrize("delays", ["diagonal", "aligned"])
@pytest.mark.parametrize("clocks", [None, "halve"])
@pytest.mark.parametrize("shift", [None, "online"])
@pytest.mark.parametrize("prepare", [None, "freeze"])
def test_tiny_model_matches_step(delays, clocks, shift, prepare):
    check_all_workers(tiny(delays=delays, clocks=clocks, shift=shift), frames(9), prepare=prepare)


@pytest.mark.parametrize("options, ticks", [
    (dict(clocks="halve", shift="online"), 17),  # a whole hyperperiod (16) of clock phases
    (dict(clocks="halve", phases="align"), 17),
    (dict(delays="aligned"), 5),
])
@pytest.mark.parametrize("prepare", [None, "freeze"])
def test_resnet18_matches_step(options, ticks, prepare):
    torch.manual_seed(0)
    net = pipecomp.compile(tvm.resnet18(num_classes=10).eval(), parallel=4, example_input=(1, 3, 64, 64), **options)
    check_all_workers(net, frames(ticks, batch=1, size=64), workers=(1, 2, 4), prepare=prepare)


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
    with Runtime(net, 2, prepare=None) as rt:
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
    with Runtime(net, 2, prepare=None) as rt:
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
    with Runtime(net, 4, prepare=None) as rt:
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
    with Runtime(net, 2, prepare=None) as rt:
        got = []

        def consume():
            for out in rt.run(xs):
                got.append(out)
        with pytest.raises(StageError, match="broken frame"):
            within(consume)
        assert_same(got, want[:2])
        rt.reset()
        assert_same(within(lambda: list(rt.run(xs))), want)


def _block_stage(monkeypatch, net, stage):
    """Make `stage` wait inside its tick: (set when a worker is in it, set to let it go on)."""
    _, module = _stage_module(net, stage)
    entered, release = threading.Event(), threading.Event()
    real = module.forward

    def blocking(x):
        entered.set()
        release.wait(SECONDS)
        return real(x)
    monkeypatch.setattr(module, "forward", blocking)
    return entered, release


def test_close_during_a_tick_does_not_hang(monkeypatch):
    net = tiny()
    entered, release = _block_stage(monkeypatch, net, 2)
    rt = Runtime(net, 2, prepare=None)
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


@pytest.mark.parametrize("how", ["step", "run"])
def test_ctrl_c_during_a_tick_closes_the_runtime(monkeypatch, how):
    net, xs = tiny(), frames(3)
    entered, release = _block_stage(monkeypatch, net, 2)
    rt = Runtime(net, 2, prepare=None)

    def ctrl_c():  # once a worker is inside the stage, so the caller is waiting for the tick
        if entered.wait(SECONDS):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        release.set()
    # Python's own Ctrl-C handler, as in a terminal (a shell starts background jobs, such as a CI
    # run may be, with SIGINT ignored, and Python then installs none).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=ctrl_c, daemon=True).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            rt.step(xs[0]) if how == "step" else list(rt.run(xs))
        assert time.monotonic() - start < SECONDS
        signal.signal(signal.SIGINT, previous)
        for use in (lambda: rt.step(xs[0]), rt.reset, lambda: list(rt.run(xs))):
            with pytest.raises(RuntimeError, match="closed"):
                use()
        assert not [t for t in threading.enumerate() if t.name.startswith("pipecomp-worker")]
    finally:
        signal.signal(signal.SIGINT, previous)
        release.set()
        rt.close()  # only if a check above failed: the runtime closed itself


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
    torch.set_num_threads(3)  # the caller's count differs from the workers'
    try:
        with Runtime(net, 2, prepare=None) as rt:
            assert rt.placement.threads_per_worker == 2
            assert torch.get_num_threads() == 3
            within(rt.step, torch.randn(2, 3, 16, 16))  # the first parallel op of each worker runs here
    finally:
        torch.set_num_threads(default)
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
    with pytest.raises(ValueError, match="prepare="):
        Runtime(tiny(), 2, prepare="compile")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_workers_without_cuda_are_refused():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Runtime(tiny(), ["cpu", "cuda:0"])


# Inference-ready kernels (prepare="freeze")

def test_frozen_kernels_serve_ticks_without_grad_only():
    net, xs = tiny(clocks="halve", phases="zero"), frames(3)  # the head fires at tick 0
    with Runtime(net, 2) as rt:  # freeze is the default
        assert rt.preparation == ["freeze"] * 4
        assert_same(within(lambda: [rt.step(x) for x in xs]), reference(net, xs), relative=1e-4)
        rt.reset()
        out = rt.step(xs[0])["logits"]  # with grad: the generated code on the net's own modules
        assert out.requires_grad
        out.sum().backward()
        assert net.head.weight.grad is not None


def test_training_mode_runs_the_generated_code():
    net, xs = tiny(), frames(3)
    with Runtime(net, 2) as rt:
        net.train()  # batch norm now normalises by batch statistics; frozen kernels would not
        try:
            want = reference(net, xs)
            with pytest.warns(RuntimeWarning, match="weights changed"):  # and updates its running statistics
                assert_same(within(lambda: [rt.step(x) for x in xs]), want)
        finally:
            net.eval()
    net.train()
    with Runtime(net, 2) as rt:
        assert set(rt.preparation) == {"eager (modules in training mode)"}
    net.eval()


def test_weights_changed_in_place_drop_the_frozen_kernels():
    net, xs = tiny(), frames(2)
    with Runtime(net, 2) as rt:
        within(rt.step, xs[0])
        with torch.no_grad():
            net.stem.weight.mul_(2)  # what an optimiser step or load_state_dict does
        with pytest.warns(RuntimeWarning, match="weights changed"):
            rt.reset()
            with torch.no_grad():
                got = rt.step(xs[1])
        assert rt.preparation[0].startswith("eager (the net's weights changed")
        assert_same([got], reference(net, [xs[1]]))


def test_frozen_kernels_are_cached_while_the_weights_stay():
    net = tiny()
    with Runtime(net, 2) as first, Runtime(net, 4) as second:
        assert [r.fast[0] for r in first._runs] == [r.fast[0] for r in second._runs]
    with torch.no_grad():
        net.head.bias.add_(1)
    with Runtime(net, 1) as third:
        assert third._runs[3].fast[0] != first._runs[3].fast[0]  # the head changed: frozen again
        assert third._runs[0].fast[0] == first._runs[0].fast[0]


def test_a_tick_function_that_cannot_be_frozen_stays_eager(monkeypatch):
    net, xs = tiny(), frames(2)
    _, module = _stage_module(net, 1)
    real = module.forward
    monkeypatch.setattr(module, "forward", lambda x: real(x))  # TorchScript cannot compile a lambda
    with pytest.warns(RuntimeWarning, match="stage 1: could not freeze"):
        rt = Runtime(net, 2)
    with rt:
        assert rt.preparation[0] == "freeze" and rt.preparation[1].startswith("freeze (0 of 1 tick functions")
        assert_same(within(lambda: [rt.step(x) for x in xs]), reference(net, xs), relative=1e-4)


def test_a_failing_frozen_kernel_is_located_in_the_generated_code(monkeypatch):
    net, x = tiny(), torch.randn(2, 3, 16, 16)
    name, module = _stage_module(net, 2)
    with Runtime(net, 2) as rt:
        run = rt._runs[2]

        def broken(frame, state):
            raise RuntimeError("the frozen kernel failed")
        monkeypatch.setattr(run, "fast", [broken])
        monkeypatch.setattr(module, "forward", lambda x: 1 / 0)  # and so does the generated code, at this node
        with pytest.raises(StageError, match=rf"stage 2 .* at node '{name}' \(Conv2d\)") as info:
            within(rt.step, x)
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        monkeypatch.setattr(module, "forward", type(module).forward.__get__(module))
        with pytest.raises(StageError, match="the frozen kernel failed"):  # the generated code runs: say so
            within(rt.step, x)


# Workers on other devices: per-device copies, registers delivered to their readers' devices.
# "cpu:0" is a CPU device that is not the net's "cpu": the copying and delivering paths run on CPU.

@pytest.mark.parametrize("prepare", [None, "freeze"])
@pytest.mark.parametrize("options", [dict(clocks="halve", shift="online"), dict(delays="aligned")])
def test_stages_on_another_device_run_on_copies(prepare, options):
    net, xs = tiny(**options), frames(9)
    want = reference(net, xs)
    placement = schedule(net, ["cpu", "cpu:0"])
    with Runtime(net, placement, prepare=prepare) as rt:
        assert rt.devices == ["cpu", "cpu:0"]
        ours = {id(m) for r in rt._runs[:len(placement.groups[0])] for _, m in r.watch}
        copied = [r for r in rt._runs if r.device == "cpu:0"]
        theirs = {id(m) for m in net.modules()}
        assert ours <= theirs and all(r.copies for r in copied)
        assert not {id(m) for r in copied for _, m in r.watch} & theirs
        assert_same(within(lambda: [rt.step(x) for x in xs]), want, relative=prepare and 1e-4)
        state = rt._stream._state
        assert set(state) == {"cpu", "cpu:0"}
        for d, part in state.items():  # each device holds what its stages read
            assert set(part) == {k for r in rt._runs if r.device == d for k in r.reads}
        with pytest.raises(RuntimeError, match="gradients would not reach"):
            rt.step(xs[0])
        rt.reset()
        assert_same(within(lambda: list(rt.run(xs))), want, relative=prepare and 1e-4)


def test_copies_follow_the_nets_weights_and_training_flags():
    net, xs = tiny(), frames(3)
    with Runtime(net, schedule(net, ["cpu", "cpu:0"]), prepare=None) as rt:
        within(rt.step, xs[0])
        with torch.no_grad():
            net.head.weight.mul_(-1)
        net.train()
        try:
            rt.reset()
            assert_same(within(lambda: [rt.step(x) for x in xs]), reference(net, xs))
        finally:
            net.eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prepare", [None, "freeze"])
def test_cuda_workers_match_step(prepare):
    net, xs = tiny(clocks="halve", shift="online"), frames(9)
    want = reference(net, xs)
    devices = ["cuda:0", "cuda:1"] if torch.cuda.device_count() > 1 else ["cpu", "cuda:0"]
    with Runtime(net, schedule(net, devices), prepare=prepare) as rt:
        got = within(lambda: [rt.step(x) for x in xs])
        assert all(g["logits"].device.type == "cpu" for g in got)
        assert_same(got, want, relative=1e-4)
        rt.reset()
        assert_same(within(lambda: list(rt.run(xs))), want, relative=1e-4)
    cuda_net = tiny(clocks="halve", shift="online").cuda()  # the same weights (seed), on the GPU
    with Runtime(cuda_net, schedule(cuda_net, ["cuda:0", "cuda:0"]), prepare=prepare) as rt:
        got = within(lambda: list(rt.run([x.cuda() for x in xs])))
        assert_same([tree_map_cpu(g) for g in got], want, relative=1e-4)


def tree_map_cpu(tree):
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.cpu(), tree)


def test_a_failed_delivery_is_a_stage_error_and_changes_no_state(monkeypatch):
    from pipecomp.backends import threaded
    net, xs = tiny(), frames(4)
    want = reference(net, xs)
    with Runtime(net, schedule(net, ["cpu", "cpu:0"]), prepare=None) as rt:
        got = within(lambda: [rt.step(x) for x in xs[:2]])
        real = threaded._move

        def fails(tensor, device):
            raise RuntimeError("CUDA out of memory (pretend)")
        monkeypatch.setattr(threaded, "_move", fails)
        with pytest.raises(StageError, match="failed moving values between devices on tick 2.*out of memory"):
            within(rt.step, xs[2])
        monkeypatch.setattr(threaded, "_move", real)
        got += within(lambda: [rt.step(x) for x in xs[2:]])
    assert_same(got, want)


def test_more_cpu_workers_than_cores_are_warned_about(monkeypatch):
    from pipecomp.backends import threaded
    net = tiny()
    monkeypatch.setattr(threaded, "_cores", lambda: 2)
    with pytest.warns(UserWarning, match="3 CPU workers on 2 cores"):
        Runtime(net, 3).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runtime(net, 2).close()


def test_counters_give_each_workers_compute_time():
    net, xs = tiny(), frames(5)
    with Runtime(net, 2) as rt:
        within(lambda: list(rt.run(xs)))
        c = rt.counters()
        assert c["ticks"] == 5 and len(c["worker_s"]) == 2
        assert max(c["worker_s"]) <= c["slowest_worker_s"] <= sum(c["worker_s"]) + 1e-9
        within(rt.reset)
        assert rt.counters() == {"ticks": 0, "slowest_worker_s": 0.0, "worker_s": [0.0, 0.0]}
