"""Threaded runtime: the stages of a tick run at the same time, one worker thread per placement slot.

In a depth-parallel network every stage reads only the frame and the previous tick's state
(*Massively Parallel Video Networks* sec. 3), so the stages of one tick are independent and
a tick takes as long as its slowest worker: max_j T(H_j) instead of the sum (Skip-Sideways
supplementary sec. 5). The registers are double-buffered: a tick reads the state dict of
the previous tick while each stage writes its new values into a dict of its own, and the
one barrier of the tick merges them into the state the next tick reads. `run` needs that one
barrier per tick; `step`, which waits for its own tick, needs one to start it and one to end it.

Intra-op threads: `torch.set_num_threads` sets the OpenMP thread count of the calling thread
only (each thread that runs a parallel op leads an OpenMP team of its own), but it also sets
the process default, which ATen copies into a thread's own setting once, lazily, on the
thread's first parallel op or `get_num_threads()` (overwriting what the thread set before).
Each worker sets its own count and at once reads it back, which does that copy while the
default is still its count; the constructor then puts the default back for the caller.

Inference-ready kernels (`prepare="freeze"`) and device copies are made by `pipecomp.prepare`.

Devices: a worker on another device than the net's runs copies of its stages' modules made at
construction (one copy per device of each module), with its own CUDA streams: one computes,
one copies each stage's registers to the devices of the stages that read them while the next
stage computes. Each worker synchronises its streams before the barrier, so the barrier means
"written and delivered" and the next tick reads complete values.
"""
from __future__ import annotations

import contextlib
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from threading import BrokenBarrierError

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

from ..lower import zero_state
from ..prepare import _canonical, _home, _stage_runs, _StageRun
from ..schedule import Placement, _cores, schedule
from ..videonet import VideoNet

class StageError(RuntimeError):
    """A stage failed on a worker: `stage`, `node`, `worker` and `tick` say where, `__cause__` what."""

    def __init__(self, message, stage, node, worker, tick):
        super().__init__(message)
        self.stage, self.node, self.worker, self.tick = stage, node, worker, tick


class _Barrier:
    """A cyclic barrier whose last arrival runs `action` while the others still wait.

    threading.Barrier wakes its parties through a Condition and took about twice as long per
    trip here; each party below sleeps on a lock of its own that the last arrival releases.
    """

    def __init__(self, parties: int, action):
        self._parties, self._action = parties, action
        self._mutex = threading.Lock()
        self._waiting = []
        self._broken = False

    def wait(self):
        gate = threading.Lock()
        gate.acquire()
        with self._mutex:
            if self._broken:
                raise BrokenBarrierError
            last = len(self._waiting) + 1 == self._parties
            if last:
                waiting, self._waiting = self._waiting, []
            else:
                self._waiting.append(gate)
        if not last:
            gate.acquire()
            if self._broken:
                raise BrokenBarrierError
            return
        try:
            self._action()
        except BaseException:
            self._broken = True  # the others must not run on a half-done action, nor wait forever
            raise
        finally:
            for g in waiting:
                g.release()

    def abort(self):
        """Every party waiting now or later gets BrokenBarrierError."""
        with self._mutex:
            self._broken = True
            waiting, self._waiting = self._waiting, []
        for g in waiting:
            g.release()


class _Stream:
    """A runtime's streaming state, under VideoNet's attribute names so that its frame check applies."""

    check, _check_input = VideoNet._check_frame, VideoNet._check_input

    def __init__(self, net: VideoNet):
        self.plan, self.parameters = net.plan, net.parameters
        self.reset()

    def reset(self):
        self._state, self._tick, self._batch, self._device = None, 0, None, None


@dataclass(eq=False)
class _Tick:
    frame: torch.Tensor
    grad: bool  # grad mode is per thread: the workers take the caller's
    fresh: bool  # the first tick of a stream: a failure puts the stream back to "after reset"
    results: list  # per worker: [(output, {device: written state})] of its stages, or a StageError
    seconds: list  # per worker: how long it computed (and delivered) this tick
    tick: int = 0
    state: dict = field(default_factory=dict)  # device -> the state its stages read
    output: object = None
    error: StageError | None = None
    ready: object = None  # a CUDA event on the caller's stream after which the frame is complete
    caller: object = None  # the caller's CUDA stream, which the outputs are handed to


class Runtime:
    """Runs a compiled `VideoNet` on worker threads; `step` returns what `net.step` returns.

    `workers` is a count of CPU threads, a list of devices, or a `Placement` from
    `pipecomp.schedule`. The runtime keeps its own stream (the net's `step` state is left
    alone). Frames come from, and outputs go to, the device of the net's weights.

    `prepare="freeze"` (the default) gives ticks that run without grad, while the modules a
    stage calls are in eval mode, inference-ready kernels: each tick function frozen with
    TorchScript (weights as constants, batch norm folded), checked against the generated code
    within `TOLERANCE` at construction. Other ticks run the generated code on the net's modules,
    as does `prepare=None`. `placement.threads_per_worker` intra-op threads each. Frozen
    kernels and the modules of stages placed on another device than the net's are snapshots
    of the net's weights: if those change in place (an optimiser step, `load_state_dict`), the
    copies are refreshed and the frozen kernels dropped, with a warning. Ticks with grad must
    run every stage on the net's own device (gradients must reach its parameters).
    `preparation` says per stage what runs. Close the runtime, or use it as a context manager.
    """

    def __init__(self, net: VideoNet, workers, prepare: str | None = "freeze"):
        net._check_streamable()
        placement = workers if isinstance(workers, Placement) else schedule(net, workers)
        if [s for g in placement.groups for s in g] != list(range(net.plan.parallel)):
            raise ValueError(f"placement groups {placement.groups} do not list the net's stages "
                             f"0..{net.plan.parallel - 1} in order; make it with pipecomp.schedule(net, ...)")
        devices = [_canonical(d) for d in placement.devices]
        if any(torch.device(d).type == "cuda" for d in devices) and not torch.cuda.is_available():
            raise RuntimeError(f"the placement puts workers on {devices}, but CUDA is not available here")
        if any(torch.device(d).type not in ("cpu", "cuda") for d in devices):
            raise NotImplementedError(f"the threaded runtime runs workers on CPU and CUDA devices, not {devices}")
        cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
        missing = [str(d) for d in cuda if d.index >= torch.cuda.device_count()]
        if missing:
            raise ValueError(f"the placement puts workers on {missing}, but there are {torch.cuda.device_count()} "
                             f"CUDA devices here")
        self.net, self.placement, self.devices = net, placement, devices
        cpu_workers, cores = sum(torch.device(d).type == "cpu" for d in devices), _cores()
        if cpu_workers > cores:
            warnings.warn(f"{cpu_workers} CPU workers on {cores} cores: at most {cores} can compute at once, and every "
                          f"tick wakes each worker thread in turn (a Python thread handoff, tens of µs each); "
                          f"schedule the net on at most {cores} CPU workers", stacklevel=2)
        self._home = _home(net)
        stage_devices = [devices[w] for w, g in enumerate(placement.groups) for _ in g]
        self._runs = _stage_runs(net, stage_devices, prepare)
        self._copied = any(r.device != self._home for r in self._runs)
        self._readers = {}  # state key -> devices whose stages read it
        for run in self._runs:
            for key in run.reads:
                self._readers.setdefault(key, set()).add(run.device)
        self._stream = _Stream(net)
        self._counters = {"ticks": 0, "slowest_worker_s": 0.0, "worker_s": [0.0] * len(placement.groups)}
        self._job = self._next = None  # the tick the workers run; the one to start at the next barrier
        self._closed = False
        self._busy = threading.Lock()
        self._barrier = _Barrier(len(placement.groups) + 1, self._trip)
        runs = iter(self._runs)
        # Per CUDA worker: a stream that computes and one that copies registers to their readers' devices.
        streams = [(torch.cuda.Stream(d), torch.cuda.Stream(d)) if torch.device(d).type == "cuda" else None
                   for d in devices]
        self._threads = [
            threading.Thread(target=self._work, args=(w, [next(runs) for _ in g], streams[w]),
                             name=f"pipecomp-worker-{w}", daemon=True)
            for w, g in enumerate(placement.groups)]
        default = torch.get_num_threads()
        for t in self._threads:
            t.start()
        self._barrier.wait()  # every worker has set its intra-op thread count
        torch.set_num_threads(default)

    def counters(self) -> dict:
        """Since construction or the last `reset`: ticks done, each worker's compute time (its stages
        and their deliveries) and the sum over ticks of the slowest worker's: the ideal run time of
        a pipeline whose barrier cost nothing (Skip-Sideways supplementary sec. 5, max_j T(H_j))."""
        c = self._counters
        return {"ticks": c["ticks"], "slowest_worker_s": c["slowest_worker_s"], "worker_s": list(c["worker_s"])}

    @property
    def preparation(self) -> list:
        """Per stage, what runs its ticks without grad: "freeze", or "eager" and why."""
        return [r.how for r in self._runs]

    def step(self, frame: torch.Tensor):
        """One tick (semantics §3): feed frame `x_t`, get the output of tick `t`.

        A frame that is rejected, or whose computation fails, changes no state.
        """
        with self._using():
            self._stream.check(frame)
            self._advance(frame)
            return self._advance()

    def run(self, frames):
        """The outputs of `frames`, one per frame, as `step` would give them.

        Tick t+1 already runs while the caller takes the output of tick t. If a frame is
        rejected, the frames before it still get their outputs, then the error is raised.
        """
        with self._using():
            started = False
            try:
                for frame in frames:
                    self._stream.check(frame)
                    output = self._advance(frame)
                    if started:
                        yield output
                    started = True
                if self._job is not None:
                    yield self._advance()
            except Exception:
                if self._job is not None and not self._closed:
                    yield self._advance()
                raise
            finally:
                if self._job is not None and not self._closed:
                    # The consumer stopped early: the frame was taken, so its tick counts; its output is dropped.
                    with contextlib.suppress(StageError):
                        self._advance()

    def reset(self) -> None:
        """Back to the zero state: the next frame starts a new video."""
        with self._using():
            self._stream.reset()
            self._counters.update(ticks=0, slowest_worker_s=0.0, worker_s=[0.0] * len(self._threads))

    def close(self) -> None:
        """Stops the workers, each after the stage it is running; a tick in flight raises in its caller.

        Ctrl-C in a caller waiting for a tick closes the runtime too, and the KeyboardInterrupt
        goes on; later calls say that the runtime is closed.
        """
        self._closed = True
        self._barrier.abort()
        for t in self._threads:
            t.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def _using(self):
        if self._closed:
            raise RuntimeError("this Runtime is closed; make a new one")
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this Runtime is busy: a run() generator is still open, or another thread is "
                               "stepping; finish or close the generator first")
        try:
            yield
        finally:
            self._busy.release()

    def _advance(self, frame=None):
        """One barrier: ends the tick in flight (returning its output) and starts one on `frame`, if given."""
        ended = self._job
        if frame is not None:
            self._next = self._start(frame)
        try:
            self._barrier.wait()
        except BrokenBarrierError:
            self._closed = True
            raise RuntimeError("the Runtime was closed while a tick was running") from None
        except BaseException:
            # Ctrl-C (or another asynchronous exception) while the workers run a tick: the tick's
            # end can no longer be awaited in step, so the runtime closes; its state is not half-new.
            self.close()
            raise
        if ended is not None and ended.error is not None:
            raise ended.error
        return None if ended is None else ended.output

    def _start(self, frame) -> _Tick:
        grad = torch.is_grad_enabled()
        if grad and self._copied:
            raise RuntimeError(f"this Runtime runs stages on copies of the net's modules (devices {self.devices}, "
                               f"the net's weights on {self._home}), so gradients would not reach the net's "
                               f"parameters; run it under torch.no_grad(), or put every worker on {self._home}")
        stream = self._stream
        fresh = stream._state is None
        if fresh:
            batch = frame.shape[0]
            if self._copied:
                zero = {}
                for d in {r.device for r in self._runs}:
                    keys = {k for r in self._runs if r.device == d for k in r.reads}
                    zero[d] = {k: v for k, v in zero_state(self.net.plan, batch, d).items() if k in keys}
            else:
                zero = {self._home: zero_state(self.net.plan, batch, frame.device)}
            for d in zero:  # the zeros are written on the caller's streams, read on the workers'
                if torch.device(d).type == "cuda":
                    torch.cuda.synchronize(d)
            stream._state, stream._batch, stream._device = zero, batch, frame.device
        job = _Tick(frame, grad, fresh, [None] * len(self._threads), [0.0] * len(self._threads))
        if frame.is_cuda:
            job.ready, job.caller = torch.cuda.Event(), torch.cuda.current_stream(frame.device)
            job.ready.record(job.caller)
        return job

    def _trip(self):
        """At the barrier, run by its last arrival while all others wait: commit one tick, start the next."""
        done, self._job = self._job, None
        failed = done is not None and self._commit(done)
        start, self._next = self._next, None
        if start is not None and not failed:
            start.tick, start.state = self._stream._tick, self._stream._state
            self._job = start

    def _commit(self, done: _Tick) -> bool:
        """The state of the next tick is the union of what the stages wrote (semantics §3); True if one failed."""
        errors = [r for r in done.results if isinstance(r, StageError)]
        if errors:
            done.error = errors[0]
            if done.fresh:
                self._stream.reset()
            return True
        state = {d: {} for d in self._stream._state}
        for results in done.results:
            for _, written in results:
                for d, part in written.items():
                    state[d].update(part)
        done.output = done.results[-1][-1][0]
        self._stream._state, self._stream._tick = state, self._stream._tick + 1
        counters = self._counters
        counters["ticks"] += 1
        counters["slowest_worker_s"] += max(done.seconds)
        counters["worker_s"] = [a + b for a, b in zip(counters["worker_s"], done.seconds)]
        return False

    def _work(self, worker: int, runs, streams):
        torch.set_num_threads(self.placement.threads_per_worker)
        # ATen reads the process default into a thread's OpenMP setting on the thread's first parallel
        # op, or first get_num_threads(); done now, before the constructor puts the caller's default back.
        torch.get_num_threads()
        device = self.devices[worker]
        if streams is not None:
            torch.cuda.set_device(device)
        while True:
            try:
                self._barrier.wait()
            except BrokenBarrierError:
                return
            job = self._job
            if job is not None:
                start = time.perf_counter()
                job.results[worker] = self._compute(worker, device, runs, job, streams)
                job.seconds[worker] = time.perf_counter() - start

    def _compute(self, worker: int, device: str, runs, job: _Tick, streams):
        results, run = [], runs[0]
        try:
            with torch.set_grad_enabled(job.grad), _on(streams and streams[0]):
                frame = job.frame
                if streams is not None and job.ready is not None:
                    streams[0].wait_event(job.ready)
                if device != self._home:
                    frame = _move(frame, device)
                for run in runs:
                    i, fast = run.index(job.tick), False
                    try:
                        if run.versions is not None and run.stale():
                            run.refresh()
                        if run.fast is not None or run.copies:
                            fast = not run.training() and not job.grad and run.fast is not None
                        fn = run.fast[i] if fast else run.eager[i]
                        output, written = fn(frame, job.state[run.device])
                    except BaseException as e:  # whatever escapes would leave the barrier one party short
                        return _failure(e, run, i, fast, frame, job, worker)
                    results.append(self._deliver(run, output, written, job, streams))
                if streams is not None:
                    for s in streams:
                        s.synchronize()  # the barrier means "written and delivered"
            return results
        except BaseException as e:  # moving the frame or the registers failed (a device out of memory)
            if streams is not None:
                with contextlib.suppress(BaseException):
                    for s in streams:
                        s.synchronize()
            error = StageError(f"stage {run.stage} (worker {worker}) failed moving values between devices on tick "
                               f"{job.tick}: {type(e).__name__}: {e}", run.stage, None, worker, job.tick)
            error.__cause__ = e
            return error

    def _deliver(self, run: _StageRun, output, written: dict, job: _Tick, streams):
        """Each register written goes to the devices of the stages that read it; the output to the frame's."""
        if not self._copied:
            return _handed(output, job), {run.device: written}
        if streams is not None:
            streams[1].wait_stream(streams[0])  # the copies overlap the worker's next stage
        with _on(streams and streams[1]):
            parts = {}
            for key, value in written.items():
                for d in self._readers.get(key, ()):
                    parts.setdefault(d, {})[key] = value if d == run.device else _move(value, d)
            if output is not None and run.device != self._home:
                output = tree_map_only(torch.Tensor, lambda t: _move(t, self._home), output)
        return _handed(output, job), parts


def _handed(output, job: _Tick):
    """The output, its CUDA memory marked as used by the caller's stream (the allocator must not reuse it early)."""
    if job.caller is not None and output is not None:
        for t in tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor) and t.device == job.frame.device:
                t.record_stream(job.caller)
    return output


def _on(stream):
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


def _move(tensor: torch.Tensor, device: str) -> torch.Tensor:
    # Asynchronous from a CUDA source: on the worker's copy stream, which it synchronises before the barrier.
    return tensor.to(device, non_blocking=tensor.is_cuda)


def _failure(e: BaseException, run: _StageRun, variant: int, fast: bool, frame, job: _Tick,
             worker: int) -> StageError:
    """The StageError of a failed stage; a frozen kernel's failure is located by running the generated code."""
    if fast and run.fast is not None and run.fast[variant] is not run.eager[variant]:
        try:
            with torch.no_grad():
                run.eager[variant](frame, job.state[run.device])
        except BaseException as eager:
            e = eager
    return _stage_error(e, run.modules[variant], run.stage, worker, job.tick)


def _stage_error(e: BaseException, gm, stage: int, worker: int, tick: int) -> StageError:
    code = type(gm).forward.__code__
    lines = [line for frame, line in traceback.walk_tb(e.__traceback__) if frame.f_code is code]
    index = (gm._lineno_map or {}).get(lines[-1] - gm._prologue_start) if lines else None
    node = list(gm.graph.nodes)[index] if index is not None else None
    if node is None:
        where = "its generated code"
    elif node.op == "call_module":
        where = f"node '{node.name}' ({type(gm.get_submodule(node.target)).__name__})"
    else:
        where = f"node '{node.name}' ({getattr(node.target, '__name__', node.target)})"
    error = StageError(f"stage {stage} (worker {worker}) failed at {where} on tick {tick}: "
                       f"{type(e).__name__}: {e}", stage, None if node is None else node.name, worker, tick)
    error.__cause__ = e
    return error


__all__ = ["Runtime", "StageError"]
