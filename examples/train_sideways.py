"""Train a depth-parallel video network with Sideways (semantics §8), on one process or many.

Every stage does one forward and one backward per tick with gradients one tick stale per
stage (*Sideways*, sec. 3.4), so the stages can run at once. The task: a clip brightens or darkens
from a random level; the label is which, and no single frame shows it.

    python examples/train_sideways.py [--episodes 40] [--workers 2]           # threads
    torchrun --nproc-per-node 2 examples/train_sideways.py [--check]          # processes

Under torchrun each rank holds the parameters of its own stages and its own optimizer;
`--check` also trains a copy in this process with `pipecomp.train.backward` and prints how far
this rank's parameters are from it.
"""
import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pipecomp
from pipecomp import train
from pipecomp.backends import distributed

parser = argparse.ArgumentParser()
parser.add_argument("--episodes", type=int, default=40)
parser.add_argument("--frames", type=int, default=8)
parser.add_argument("--size", type=int, default=16)
parser.add_argument("--workers", type=int, default=None, help="threads (without torchrun)")
parser.add_argument("--check", action="store_true")
args = parser.parse_args()


def clips(n, seed):
    """`n` episodes of 4 clips that brighten (label 1) or darken (label 0) from a random level."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 2, (4,), generator=g)
        level = 4 * torch.rand(4, 1, 1, 1, 1, generator=g) - 2
        ramp = 0.25 * torch.arange(args.frames).view(1, -1, 1, 1, 1) * (2 * labels.view(-1, 1, 1, 1, 1) - 1)
        clip = level + ramp + 0.05 * torch.randn(4, args.frames, 3, args.size, args.size, generator=g)
        out.append((clip, labels[:, None].expand(4, args.frames)))
    return out


torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(16, 2))
# Online temporal shifts mix each frame with the one before: the network can see motion.
net = pipecomp.compile(model, parallel=3, shift="online", shift_place="inplace", shift_fraction=0.25,
                       example_input=(1, 3, args.size, args.size))
episodes = clips(args.episodes, seed=1)


def sgd(params):
    return torch.optim.Adam(params, lr=3e-3)


if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
    dist.init_process_group("gloo", timeout=distributed.TIMEOUT)
    try:
        twin = copy.deepcopy(net)
        losses, mine = distributed.train(net, episodes, F.cross_entropy, sgd)
        rank = dist.get_rank()
    finally:
        dist.destroy_process_group()
else:
    rank, twin = 0, None
    opt = sgd(net.parameters())
    losses = []
    for clip, labels in episodes:
        opt.zero_grad()
        losses.append(train.backward(net, clip, labels, F.cross_entropy, workers=args.workers))
        opt.step()
    losses = torch.stack(losses)
if rank == 0:
    for e in range(0, len(losses), max(1, len(losses) // 5)):
        print(f"episode {e:3d}  loss {losses[e].nanmean().item():.4f}")
    print(f"episode {len(losses) - 1:3d}  loss {losses[-1].nanmean().item():.4f}")
if args.check and twin is not None:
    opt = sgd(twin.parameters())
    for clip, labels in episodes:
        opt.zero_grad()
        train.backward(twin, clip, labels, F.cross_entropy)
        opt.step()
    theirs = twin.state_dict()
    worst = max((v.float() - theirs[k].float()).abs().max().item() for k, v in mine.items())
    print(f"rank {rank}: {len(mine)} tensors of its stages, largest difference from one process: {worst:.1e}")
