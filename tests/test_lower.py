"""Golden text of a small compiled network's tick functions (style §4: readable generated code)."""
import torch
from torch import nn

import pipecomp

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
