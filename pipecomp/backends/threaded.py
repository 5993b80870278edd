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
the process default that a thread takes on its first parallel op. Each worker sets its own
count; the constructor then puts the default back, so the caller keeps its own.
"""
from __future__ import annotations

import contextlib
import threading
import traceback
from dataclasses import dataclass, field
from threading import BrokenBarrierError

import torch

from ..lower import zero_state
from ..schedule import Placement, schedule
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

    check = VideoNet._check_frame

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
    results: list  # per worker: [(output, written state)] of its stages, or a StageError
    tick: int = 0
    state: dict = field(default_factory=dict)
    output: object = None
    error: StageError | None = None


class Runtime:
    """Runs a compiled `VideoNet` on worker threads; `step` returns what `net.step` returns.

    `workers` is a count of CPU threads, a list of devices, or a `Placement` from
    `pipecomp.schedule`. The runtime keeps its own stream (the net's `step` state is left
    alone) and shares the net's weights. Close it, or use it as a context manager.
    """

    def __init__(self, net: VideoNet, workers):
        if net.plan.shift == "offline":
            raise RuntimeError("offline (bi-directional) shift needs future frames and only works on clips; "
                               "compile with shift='online' to stream frames")
        placement = workers if isinstance(workers, Placement) else schedule(net, workers)
        if [s for g in placement.groups for s in g] != list(range(net.plan.parallel)):
            raise ValueError(f"placement groups {placement.groups} do not list the net's stages "
                             f"0..{net.plan.parallel - 1} in order; make it with pipecomp.schedule(net, ...)")
        if any(d != "cpu" for d in placement.devices):
            raise NotImplementedError(
                f"the threaded runtime runs on CPU workers only for now, not {placement.devices}: the stages "
                f"share their modules with the net, so putting weights on several devices needs per-device copies")
        self.net, self.placement = net, placement
        self._stream = _Stream(net)
        self._job = self._next = None  # the tick the workers run; the one to start at the next barrier
        self._closed = False
        self._busy = threading.Lock()
        self._barrier = _Barrier(len(placement.groups) + 1, self._trip)
        self._threads = [
            threading.Thread(target=self._work, args=(w, [net._stages[s] for s in g]),
                             name=f"pipecomp-worker-{w}", daemon=True)
            for w, g in enumerate(placement.groups)]
        default = torch.get_num_threads()
        for t in self._threads:
            t.start()
        self._barrier.wait()  # every worker has set its intra-op thread count
        torch.set_num_threads(default)

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

    def close(self) -> None:
        """Stops the workers, each after the stage it is running; a tick in flight raises in its caller."""
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
        if ended is not None and ended.error is not None:
            raise ended.error
        return None if ended is None else ended.output

    def _start(self, frame) -> _Tick:
        stream = self._stream
        fresh = stream._state is None
        if fresh:
            stream._state = zero_state(self.net.plan, frame.shape[0], frame.device)
            stream._batch, stream._device = frame.shape[0], frame.device
        return _Tick(frame, torch.is_grad_enabled(), fresh, [None] * len(self._threads))

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
        state = {}
        for results in done.results:
            for _, written in results:
                state.update(written)
        done.output = done.results[-1][-1][0]
        self._stream._state, self._stream._tick = state, self._stream._tick + 1
        return False

    def _work(self, worker: int, stages):
        torch.set_num_threads(self.placement.threads_per_worker)
        while True:
            try:
                self._barrier.wait()
            except BrokenBarrierError:
                return
            job = self._job
            if job is not None:
                job.results[worker] = _compute(worker, stages, job)


def _compute(worker: int, stages, job: _Tick):
    results = []
    with torch.set_grad_enabled(job.grad):
        for stage in stages:
            # The generated forward itself, not the GraphModule's __call__: when an op fails right on
            # a generated line, fx's wrapper prints to stderr and cuts the frame that names the node.
            gm = stage.variants[stage.variant_of_tick[job.tick % stage.hyperperiod]]
            try:
                results.append(gm.forward(job.frame, job.state))
            except BaseException as e:  # whatever escapes would leave the barrier one party short
                return _stage_error(e, gm, stage.stage, worker, job.tick)
    return results


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
