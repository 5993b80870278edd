"""Operations that passes insert into the compiled graph."""
from __future__ import annotations

import torch


def temporal_shift(x: torch.Tensor, fold: int, direction: str) -> torch.Tensor:
    """A TSM shift node (semantics §6): moves `fold` channels of `x` along time.

    It has no meaning on a single image: the lowering of a `VideoNet` replaces it by the
    stateful online shift of `step` or the clip-wide shift of `forward`.
    """
    raise RuntimeError(
        "temporal_shift mixes frames and has no meaning on one image; "
        "run the compiled network through VideoNet.step or VideoNet.forward"
    )


def shift_online(x: torch.Tensor, memory: torch.Tensor, fold: int):
    """One firing of an online shift: the first `fold` channels come from the previous firing.

    The new memory is a copy, not a view, so that it does not keep all of `x` alive."""
    return torch.cat([memory, x[:, fold:]], dim=1), x[:, :fold].clone()


def feedback_in() -> torch.Tensor:
    """Where feedback's back edge enters the graph (semantics §9): the output's tensor of `d` ticks ago.

    Its source comes later in topological order, so it is no fx argument: the plan records the
    edge (`Plan.feedback`) and the tick functions read the source's register in its place.
    """
    raise RuntimeError(
        "feedback_in is the output of an earlier tick and has no meaning on one image; "
        "run the compiled network through VideoNet.step or VideoNet.forward"
    )
