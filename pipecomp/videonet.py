"""`VideoNet`: the compiled, stateful video network (semantics §3–4)."""
from __future__ import annotations

import torch
from torch import nn

from .errors import CompileError
from .lower import lower_steps, run_clip, run_ticks, zero_state
from .plan import Plan


class VideoNet(nn.Module):
    """A causal video network made from an image model by `pipecomp.compile`.

    `step(frame)` runs one tick on a `[B, C, H, W]` frame with the state kept inside;
    `forward(clip)` runs a `[B, T, C, H, W]` clip from a fresh state without looping over
    ticks where nothing is recurrent. Parameters and buffers are the image model's own,
    under the same qualified names, and those of added connections under ``skips.*``,
    ``temporal.*`` and ``feedback.*``.
    """

    def __init__(self, model: nn.Module, plan: Plan):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        # Tensors that tracing made (fx's `_tensor_constant0`, say): not the model's, so buffers
        # of ours, outside the state dict, that move with the network.
        for n in plan.graph.nodes:
            if n.op == "get_attr" and "." not in n.target and not hasattr(self, n.target):
                self.register_buffer(n.target, getattr(plan.module, n.target), persistent=False)
        # The added connections' modules (semantics §9), under their own top-level names.
        for name in dict.fromkeys(plan.node(n).target.split(".")[0] for n in plan.added_nodes
                                  if plan.node(n).op == "call_module"):
            if hasattr(model, name):
                raise CompileError(f"{type(model).__name__} has an attribute '{name}', the name under which "
                                   f"compile() registers the modules of added connections; rename it")
            self.add_module(name, plan.module.get_submodule(name))
        self.plan = plan
        self.training = model.training
        # Generated code lives in a plain list so that nn.Module does not register the
        # modules it calls a second time under other names.
        self._stages = lower_steps(plan, self)
        self._state = None
        self._tick = 0

    def __getstate__(self):
        # The tick functions are generated from the plan: pickle the plan, generate them again.
        return {k: v for k, v in super().__getstate__().items() if k not in ("_stages", "_train_steps")}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._stages = lower_steps(self.plan, self)

    @property
    def latency(self) -> int:
        """Information latency in frames: the smallest total delay from frame to output."""
        return self.plan.latency

    def reset(self) -> None:
        """Back to the zero state: the next frame starts a new video."""
        self._state = None
        self._tick = 0

    def _check_frame(self, frame):
        """The frame fits the network and this stream (batch size and device of its state)."""
        self._check_input(frame)
        if self._state is not None:
            if frame.shape[0] != self._batch:
                raise ValueError(f"frame has batch size {frame.shape[0]}, but this stream started with "
                                 f"{self._batch}; call reset() to start a stream of another batch size")
            if frame.device != self._device:
                raise ValueError(f"frame is on {frame.device}, but this stream's state is on {self._device}; "
                                 f"move the frame, or reset()")
        else:
            device = next(iter(self.parameters()), frame).device
            if frame.device != device:
                raise ValueError(f"frame is on {frame.device}, but the network is on {device}")

    def _check_input(self, frame):
        """The frame fits the network: a tensor of the example's channels, size and dtype."""
        if not isinstance(frame, torch.Tensor):
            raise TypeError(f"step() takes a tensor frame [B, C, H, W], got {type(frame).__name__}")
        want = tuple(self.plan.example_shape[1:])
        if frame.dim() != 4 or tuple(frame.shape[1:]) != want:
            raise ValueError(f"frame has shape {list(frame.shape)}, expected [B, {', '.join(map(str, want))}] "
                             f"(the example_input given to compile)")
        if frame.dtype != self.plan.example_dtype:
            raise ValueError(f"frame has dtype {frame.dtype}, expected {self.plan.example_dtype}")

    def _check_streamable(self):
        """Streaming needs tick functions; offline shift has none (semantics §6)."""
        if self.plan.shift == "offline":
            raise RuntimeError("offline (bi-directional) shift needs future frames, so it runs on clips only: "
                               "call the network on a [B, T, C, H, W] clip, or compile with shift='online'")

    def step(self, frame: torch.Tensor):
        """One tick (semantics §3): feed frame `x_t`, get the output of tick `t`.

        A frame that is rejected, or whose computation fails, changes no state.
        """
        self._check_streamable()
        self._check_frame(frame)
        state = self._state if self._state is not None else zero_state(self.plan, frame.shape[0], frame.device)
        new_state, output = {}, None
        for stage in self._stages:
            out, written = stage(self._tick, frame, state)
            new_state.update(written)
            if out is not None or stage.stage == self.plan.parallel - 1:
                output = out
        if self._state is None:
            self._batch, self._device = frame.shape[0], frame.device
        self._state, self._tick = new_state, self._tick + 1
        return output

    def forward(self, clip: torch.Tensor):
        """Outputs `[B, T, ...]` of ticks 0..T-1 of `clip` `[B, T, C, H, W]` after a reset (§4).

        Leaves the streaming state of `step` alone. Differentiable end to end. With feedback
        (§9) every node depends on the output of earlier ticks, so it runs tick by tick.
        """
        self._check_clip(clip)
        if self.plan.feedback:
            return run_ticks(self.plan, self._stages, clip)
        return run_clip(self.plan, self, clip)

    def _check_clip(self, clip):
        """The clip fits the network: a [B, T, C, H, W] tensor of the example's frame size and dtype."""
        if not isinstance(clip, torch.Tensor):
            raise TypeError(f"a clip must be a tensor [B, T, C, H, W], got {type(clip).__name__}")
        want = tuple(self.plan.example_shape[1:])
        if clip.dim() != 5 or tuple(clip.shape[2:]) != want:
            raise ValueError(f"clip has shape {list(clip.shape)}, expected [B, T, {', '.join(map(str, want))}]; "
                             f"for a single frame use step()")
        if clip.dtype != self.plan.example_dtype:
            raise ValueError(f"clip has dtype {clip.dtype}, expected {self.plan.example_dtype}")

    def step_code(self) -> str:
        """The generated tick functions, one per stage and clock phase, as Python."""
        return "\n".join(s.code() for s in self._stages)

    def timeline(self, ticks: int = 12):
        """The time-space table of fig. 1 of *Massively Parallel Video Networks* (see `pipecomp.timeline`)."""
        from .timeline import timeline
        return timeline(self.plan, ticks)

    def to_dot(self, **options):
        """The compiled graph as a `graphviz.Digraph` (see `pipecomp.visualize`)."""
        from .viz import to_dot
        return to_dot(self, **options)

    def report(self) -> str:
        """One row per stage: nodes, FLOPs with and without clocks, params, periods, state."""
        return self.plan.report()

    def __repr__(self) -> str:
        return f"VideoNet(\n{self.report()}\n)"
