"""Golden text of a small compiled network's tick functions (style §4: readable generated code)."""
import torch
from torch import nn

import pipecomp

from . import reference

GOLDEN = '''\
# stage 0, every tick
def forward(self, frame, state):
    _0 = getattr(self, "0")(frame);  frame = None
    _1 = getattr(self, "1")(_0);  _0 = None
    return (None, {'_1_d1': _1})

# stage 1, ticks t with t % 2 in [0]
def forward(self, frame, state):
    _1_d1 = state['_1_d1'];  state = None
    _2 = getattr(self, "2")(_1_d1);  _1_d1 = None
    _3 = getattr(self, "3")(_2);  _2 = None
    _4 = getattr(self, "4")(_3);  _3 = None
    return (_4, {'_4_d1': _4})

# stage 1, ticks t with t % 2 in [1]
def forward(self, frame, state):
    _4_d1 = state['_4_d1'];  state = None
    return (_4_d1, {'_4_d1': _4_d1})
'''


def test_tick_functions_golden():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(4, 2, 1))
    net = pipecomp.compile(model, parallel=2, clocks="halve", example_input=(1, 3, 8, 8))
    assert net.step_code() == GOLDEN


def test_a_stage_that_does_not_fire_does_no_work():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    net = pipecomp.compile(model, parallel=2, clocks="halve", example_input=(1, 3, 8, 8))
    calls = []
    net.get_submodule("1").register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for _ in range(6):
            net.step(torch.randn(1, 3, 8, 8))
        assert len(calls) == 3
        calls.clear()
        net(torch.randn(2, 6, 3, 8, 8))
    assert len(calls) == 1  # one call for all firing frames of the clip


class SizedByAnotherClock(nn.Module):
    """The output is reshaped by the size of a period-2 node, read in a period-1 stage."""

    def __init__(self):
        super().__init__()
        self.c, self.e = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.s = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        c = self.c(x)  # the first convolution sets the full resolution: s, at half, ticks every 2
        a = self.s(x)
        return self.e(c).reshape(a.size(0), -1), a


def test_shape_values_do_not_split_a_stage_into_identical_tick_functions():
    torch.manual_seed(0)
    net = pipecomp.compile(SizedByAnotherClock().eval(), clocks="halve", cuts=["e"], example_input=(1, 3, 16, 16))
    assert net.plan.period_of["size"] == 2 and net.plan.stage_of["size"] == 1
    assert len(net._stages[1].variants) == 1  # the size's clock changes no code
    frames = [torch.randn(1, 3, 16, 16) for _ in range(5)]
    with torch.no_grad():
        want = reference.run(net, frames)
        net.reset()
        for t, (x, w) in enumerate(zip(frames, want)):
            for g, v in zip(net.step(x), w):
                torch.testing.assert_close(g, v, msg=f"tick {t}")


def test_a_clip_holds_the_series_still_to_be_read_not_every_nodes():
    """`net(clip)` frees a node's time series once its last reader has run: with no autograd,
    a chain of 8 convolutions holds at most a few of their outputs at once, not all 8."""
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(8)]).eval()
    net = pipecomp.compile(model, parallel=4, example_input=(1, 4, 8, 8)).eval()
    alive, most = [], [0]

    def hook(module, args, out):
        alive.append(weakref.ref(out))
        most[0] = max(most[0], sum(r() is not None for r in alive))
    for block in model:
        block[0].register_forward_hook(hook)
    clip = torch.randn(2, 6, 4, 8, 8)
    with torch.no_grad():
        out = net(clip)
    assert len(alive) == 8 and most[0] <= 3, f"{most[0]} of the 8 convolutions' series alive at once"
    with torch.no_grad():  # what the network computes, from semantics.md
        expected = torch.stack(reference.run(net, list(clip.unbind(1))), 1)
    torch.testing.assert_close(out, expected)
