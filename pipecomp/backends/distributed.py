"""Multi-process pipelines: one process per placement slot, registers sent through torch.distributed.

Each process (rank) runs a contiguous group of stages (*Massively Parallel Video
Networks* sec. 3: one parallel subnetwork per device). Within a tick a rank reads only the
frame and the previous tick's state (semantics §3), so ranks compute at once and then
exchange, point to point, just the registers that cross from one rank's stages to
another's — once per tick, with their delays already in the register chain. Rank 0 feeds
the frames and collects the outputs. Outputs equal `VideoNet.step` (semantics §7).

Two ways to start it:

- `launch(net, frames, nprocs=N)`: forks N processes on loopback (gloo) and returns the
  outputs, for one machine and for tests;
- `torchrun --nproc-per-node N -m pipecomp pipeline MODEL [options]`: every rank compiles
  the same model (same `--seed`) and calls `stream`; rank 0 streams a clip and prints
  frames per second. Across machines, torchrun's `--nnodes`/`--rdzv-endpoint`.

gloo serves CPUs, NCCL GPUs. Every exchange has a timeout, so a rank that dies makes the
others fail with an error naming the peer rather than hang.
"""
from __future__ import annotations

import datetime
import math
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.multiprocessing as mp
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..analysis import info
from ..lower import zero_state

TIMEOUT = datetime.timedelta(seconds=60)


class Wiring:
    """Who sends which registers to whom each tick, from the generated stage functions."""

    def __init__(self, net, groups):
        self.groups = groups
        stages = net._stages
        self.owner = {key: r for r, g in enumerate(groups) for s in g for key in stages[s].writes}
        self.reads = [set().union(*(stages[s].reads for s in g)) for g in groups]
        self.needs_frame = [r == 0 or any(stages[s].reads_frame for s in g) for r, g in enumerate(groups)]
        #: (sender, receiver) -> sorted keys crossing between their stage groups
        self.links = {}
        for r, keys in enumerate(self.reads):
            for key in sorted(keys):
                src = self.owner[key]
                if src != r:
                    self.links.setdefault((src, r), []).append(key)

    def table(self) -> str:
        lines = [f"rank {r}: stages {g}" for r, g in enumerate(self.groups)]
        lines += [f"rank {a} -> rank {b}: {', '.join(keys)}" for (a, b), keys in sorted(self.links.items())]
        return "\n".join(lines)


def _output_leaves(net, batch):
    """Shapes and dtypes of the output's tensor leaves, and its structure, from the plan."""
    out = next(n for n in net.plan.graph.nodes if n.op == "output")
    leaves, spec = tree_flatten(fx.map_arg(out.args[0], lambda n: n))
    shapes = []
    for n in leaves:
        meta = info(n) if isinstance(n, fx.Node) else {}
        if meta.get("kind") != "tensor":
            raise NotImplementedError(f"the distributed backend sends tensor outputs only; output "
                                      f"'{getattr(n, 'name', n)}' is not a tensor")
        shape = list(meta["shape"])
        shape[meta["batch_dim"]] = batch
        shapes.append((shape, meta["dtype"]))
    return shapes, spec


def _wait_all(works):
    for w in works:
        w.wait(TIMEOUT)


class _Rank:
    """One process's part of the pipeline: its stages, its state, its links."""

    def __init__(self, net, wiring, rank, batch, device, frame_shape):
        self.net, self.wiring, self.rank, self.device = net, wiring, rank, torch.device(device)
        self.stages = [net._stages[s] for s in wiring.groups[rank]]
        zeros = zero_state(net.plan, batch, self.device)
        keep = wiring.reads[rank] | {k for k, r in wiring.owner.items() if r == rank}
        self.state = {k: v for k, v in zeros.items() if k in keep}
        self.frame = torch.zeros(frame_shape, dtype=net.plan.example_dtype, device=self.device)
        self.last = len(wiring.groups) - 1
        self.out_shapes, self.out_spec = _output_leaves(net, batch)
        self.tick = 0

    def step(self, frame=None):
        """One tick of this rank; returns the output on rank 0, else None."""
        w, r = self.wiring, self.rank
        if r == 0:
            self.frame = frame.to(self.device)
            ops = [dist.P2POp(dist.isend, self.frame, peer) for peer in range(1, self.last + 1)
                   if w.needs_frame[peer]]
        else:
            ops = [dist.P2POp(dist.irecv, self.frame, 0)] if w.needs_frame[r] else []
        if ops:
            _wait_all(dist.batch_isend_irecv(ops))
        written, output = {}, None
        for stage in self.stages:
            out, new = stage(self.tick, self.frame, self.state)
            written.update(new)
            if stage.stage == self.net.plan.parallel - 1:
                output = out
        self.state.update(written)
        ops, incoming = [], {}
        for (src, dst), keys in sorted(w.links.items()):
            for key in keys:
                if src == r:
                    ops.append(dist.P2POp(dist.isend, self.state[key].contiguous(), dst))
                elif dst == r:
                    incoming[key] = torch.empty_like(self.state[key])
                    ops.append(dist.P2POp(dist.irecv, incoming[key], src))
        if self.last != 0 and r in (0, self.last):
            if r == self.last:
                leaves = [t.contiguous() for t in tree_flatten(output)[0]]
                ops += [dist.P2POp(dist.isend, t, 0) for t in leaves]
            else:
                leaves = [torch.empty(s, dtype=d, device=self.device) for s, d in self.out_shapes]
                ops += [dist.P2POp(dist.irecv, t, self.last) for t in leaves]
                output = tree_unflatten(leaves, self.out_spec)
        if ops:
            _wait_all(dist.batch_isend_irecv(ops))
        self.state.update(incoming)
        self.tick += 1
        return output if r == 0 else None


def _placement(net, nprocs, devices):
    from ..schedule import schedule
    return schedule(net, devices if devices is not None else nprocs)


def stream(net, frames=None, *, ticks: int | None = None, batch: int | None = None, groups=None,
           device: str = "cpu"):
    """This process's part of the pipeline, in an initialised process group (e.g. under torchrun).

    Rank 0 passes the `frames` and gets the outputs back; the other ranks pass the number of
    `ticks` and the frames' `batch` size (default: the example's), and get None. Every rank must place the stages alike: by default
    `pipecomp.schedule(net, world_size)` on FLOPs, which is the same on every rank.
    """
    net._check_streamable()
    rank, world = dist.get_rank(), dist.get_world_size()
    if groups is None:
        groups = _placement(net, world, None).groups
    if len(groups) != world:
        raise ValueError(f"{len(groups)} stage groups for {world} processes; the network has "
                         f"{net.plan.parallel} stages, so use at most that many processes")
    frames = list(frames) if rank == 0 else [None] * ticks
    batch = frames[0].shape[0] if rank == 0 else batch or net.plan.example_shape[0]
    net.to(device).eval()
    part = _Rank(net, Wiring(net, groups), rank, batch, device, (batch, *net.plan.example_shape[1:]))
    with torch.no_grad():
        outputs = [part.step(x) for x in frames]
    return outputs if rank == 0 else None


def train(net, episodes, loss_fn, optimizer, *, prediction_latency: int = 0, groups=None) -> tuple:
    """This process's part of Sideways training (semantics §8), in an initialised process group.

    Every rank passes the same `episodes` (an iterable of `(clip, targets)`, as
    `pipecomp.train.backward` takes them) and `optimizer`, a function from a list of parameters
    to a torch optimizer: each rank makes one for the parameters of its own stages and steps it
    after every episode, so parameters never travel. Each tick, ranks run their stages' forward
    and backward at once, then exchange point to point only what crosses between their stage
    groups: registers forward, their gradient registers back. Returns the losses `[E, T]` (NaN
    outside W) and this rank's part of the state dict (its stages' parameters and buffers).
    """
    from .. import train as training

    rank, world = dist.get_rank(), dist.get_world_size()
    if groups is None:
        groups = _placement(net, world, None).groups
    if len(groups) != world:
        raise ValueError(f"{len(groups)} stage groups for {world} processes; the network has "
                         f"{net.plan.parallel} stages, so use at most that many processes")
    wiring = Wiring(net, groups)
    trainer = training._Sideways(net, stages=groups[rank])
    owners = {}
    for r, g in enumerate(groups):
        for s in g:
            for p in trainer.steps[s].params:
                if owners.setdefault(id(p), r) != r:
                    raise ValueError(f"a parameter is used by stages on ranks {owners[id(p)]} and {r}; each rank "
                                     f"updates only its own, so place the stages that share it on one rank")
    params = list({id(p): p for s in groups[rank] for p in trainer.steps[s].params}.values())
    opt = optimizer(params)
    all_losses = []

    def exchange():
        ops, incoming, flags, sent = [], {}, {}, []
        for (src, dst), keys in sorted(wiring.links.items()):
            names = [training.grad_name(k) for k in keys]
            if src == rank:  # registers forward; the reader's gradients for them come back
                ops += [dist.P2POp(dist.isend, trainer.state[k].contiguous(), dst) for k in keys]
                flags[dst] = torch.zeros(len(keys), dtype=torch.uint8)
                ops.append(dist.P2POp(dist.irecv, flags[dst], dst))
                for k, name in zip(keys, names):
                    incoming[name] = torch.empty_like(trainer.state[k])
                    ops.append(dist.P2POp(dist.irecv, incoming[name], dst))
            elif dst == rank:
                for k in keys:
                    incoming[k] = torch.empty_like(shapes[k])
                    ops.append(dist.P2POp(dist.irecv, incoming[k], src))
                have = [trainer.grads.pop(name, None) for name in names]
                mask = torch.tensor([g is not None for g in have], dtype=torch.uint8)
                sent.append(mask)
                ops.append(dist.P2POp(dist.isend, mask, src))
                ops += [dist.P2POp(dist.isend, (torch.zeros_like(shapes[k]) if g is None else g).contiguous(), src)
                        for k, g in zip(keys, have)]
        if ops:
            _wait_all(dist.batch_isend_irecv(ops))
        for (src, dst), keys in sorted(wiring.links.items()):
            if src == rank:
                for name, there in zip((training.grad_name(k) for k in keys), flags[dst].tolist()):
                    g = incoming.pop(name)
                    if there:
                        trainer.grads[name] = g + trainer.grads[name] if name in trainer.grads else g
        trainer.state.update(incoming)

    shapes = {}
    for clip, targets in episodes:
        W = training._check_episode(net, clip, targets, loss_fn, "sideways", None, prediction_latency)
        shapes = zero_state(net.plan, clip.shape[0], clip.device)
        losses = torch.full((clip.shape[1],), math.nan)
        opt.zero_grad()
        training.episode(trainer, clip, targets, loss_fn, W, prediction_latency, losses, exchange)
        opt.step()
        dist.broadcast(losses, src=world - 1)
        all_losses.append(losses)
    ids = {id(t) for s in groups[rank] for gm in net._stages[s].variants
           for t in (*gm.parameters(), *gm.buffers())}
    mine = {n: t.detach().clone() for n, t in net.state_dict(keep_vars=True).items() if id(t) in ids}
    return torch.stack(all_losses) if all_losses else torch.empty(0), mine


def _serve_training(rank, net, groups, threads, episodes, loss_fn, optimizer, p, results, master_port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
    dist.init_process_group("gloo", rank=rank, world_size=len(groups), timeout=TIMEOUT)
    try:
        torch.set_num_threads(threads)
        losses, mine = train(net, episodes, loss_fn, optimizer, prediction_latency=p, groups=groups)
        torch.save((losses, mine), os.path.join(results, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch_train(net, episodes, loss_fn, optimizer, nprocs: int = 2, *, prediction_latency: int = 0,
                 timeout: float = 600.0) -> torch.Tensor:
    """Sideways training of `net` on `episodes`, its stages split over `nprocs` processes on this machine.

    As `train` under torchrun, forked on loopback (gloo): each process updates its own stages'
    parameters with its own `optimizer(params)`. At the end the trained parameters and buffers
    are loaded back into `net`; returns the losses `[E, T]`.
    """
    from .. import train as training

    episodes = list(episodes)
    for clip, targets in episodes:  # every check before any process starts
        training._check_episode(net, clip, targets, loss_fn, "sideways", None, prediction_latency)
    placement = _placement(net, nprocs, None)
    folder = tempfile.mkdtemp(prefix="pipecomp-train-")
    try:
        _run_all(_serve_training, (net, placement.groups, placement.threads_per_worker, episodes, loss_fn, optimizer,
                                   prediction_latency, folder, _free_port()), len(placement.groups), timeout)
        losses = None
        with torch.no_grad():
            for r in range(len(placement.groups)):
                losses, mine = torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False)
                net.load_state_dict(mine, strict=False)
        return losses
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_all(target, args, nprocs: int, timeout: float) -> None:
    """Fork `nprocs` processes running `target(rank, *args)`; raise the first one's error, or TimeoutError."""
    procs = mp.start_processes(target, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not procs.join(timeout=0.2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {nprocs} pipeline processes did not finish in {timeout:.0f} s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()


def _serve(rank, net, groups, devices, threads, frames, results, master_port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
    backend = "nccl" if devices[rank].startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=len(groups), timeout=TIMEOUT)
    try:
        torch.set_num_threads(threads)
        outputs = stream(net, frames if rank == 0 else None, ticks=len(frames), batch=frames[0].shape[0],
                         groups=groups, device=devices[rank])
        if rank == 0:
            # a file, not a queue: torch's shared-memory handles would die with this process
            torch.save([_to_cpu(o) for o in outputs], results)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _to_cpu(out):
    leaves, spec = tree_flatten(out)
    return tree_unflatten([t.cpu() for t in leaves], spec)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(net, frames, nprocs: int = 2, *, devices=None, timeout: float = 300.0) -> list:
    """Run `frames` through `net` split over `nprocs` processes on this machine; the outputs.

    Stages are grouped by `pipecomp.schedule`; each process gets `cores / nprocs` threads.
    Raises the first worker's error, or `TimeoutError` after `timeout` seconds.
    """
    net._check_streamable()
    frames = list(frames)
    if not frames:
        return []
    for x in frames:
        net._check_input(x)  # launch streams from the zero state, whatever net.step did before
    placement = _placement(net, nprocs, devices)
    groups, devs = placement.groups, list(placement.devices)
    # forked children inherit the compiled network: nothing to pickle
    folder = tempfile.mkdtemp(prefix="pipecomp-")
    results = os.path.join(folder, "outputs.pt")
    try:
        _run_all(_serve, (net, groups, devs, placement.threads_per_worker, frames, results, _free_port()),
                 len(groups), timeout)
        return torch.load(results, weights_only=False)  # our own file, from our own process
    finally:
        shutil.rmtree(folder, ignore_errors=True)


