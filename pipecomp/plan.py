"""The plan: everything compilation decided, and the only thing backends read (style §1)."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch.fx as fx


@dataclass(frozen=True)
class Plan:
    """The inspectable result of compilation (semantics §2).

    Node names are those of `torch.fx.symbolic_trace(model)`; inserted shift nodes are
    named after the convolution they feed (``<conv>_shift``).
    """

    graph: fx.Graph
    module: fx.GraphModule
    parallel: int = 1
    delays: str = "diagonal"
    shift: str | None = None
    stage_of: dict = field(default_factory=dict)
    delay_of: dict = field(default_factory=dict)
    period_of: dict = field(default_factory=dict)
    phase_of: dict = field(default_factory=dict)
    phases: str = "zero"
    shift_nodes: tuple = ()
    #: per online shift node, the first tick (since reset) at which its memory records its input:
    #: its first firing whose input depends on a frame; before it the memory stays zero (semantics §6)
    shift_records_from: dict = field(default_factory=dict)
    #: nodes of the added connections (semantics §9), in the order their passes made them;
    #: each has ``node.meta["pipecomp"]["added"]``: "skip", "temporal" or "feedback", and ``["clock"]``:
    #: ``(u, lag)``, it ticks on `u`'s period `lag` ticks after `u` (so that it adds nothing to
    #: when the image model's nodes fire, however phases are chosen)
    added_nodes: tuple = ()
    #: ticks the added connections put on an edge on top of the delay mode's own: (u, v) -> ticks
    extra_delay: dict = field(default_factory=dict)
    #: feedback's back edge (semantics §9), ``(source, reader, d)`` or ``()``: `reader` (a node with no
    #: inputs) stands for `source`'s value of tick t−d; it is no fx edge (its stage decreases), but
    #: ``delay_of[(source, reader)] == d`` like any edge's
    feedback: tuple = ()
    #: register depth of every tensor node that has one: name -> D (registers name_d1..name_dD)
    registers: dict = field(default_factory=dict)
    #: per stage: FLOPs per frame without clocks; with clocks, as the tick functions execute
    #: them (averaged over the hyperperiod, firings nobody reads left out); parameters; state bytes
    stage_flops: tuple = ()
    stage_flops_clocked: tuple = ()
    stage_params: tuple = ()
    stage_state_bytes: tuple = ()
    latency: int = 0
    #: modules traced as one node without being in leaf_modules: class or qualified name -> why
    kept_whole: dict = field(default_factory=dict)
    example_shape: tuple = ()
    example_dtype: object = None

    def replace(self, **changes) -> "Plan":
        return dataclasses.replace(self, **changes)

    def node(self, name: str) -> fx.Node:
        return self._nodes[name]

    @functools.cached_property
    def _nodes(self):
        return {n.name: n for n in self.graph.nodes}

    def __getstate__(self):
        # The name index is a cache of the graph's nodes: a copy must index its own graph's.
        return {k: v for k, v in self.__dict__.items() if k != "_nodes"}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def nodes_of_stage(self, stage: int):
        return [n for n in self.graph.nodes if self.stage_of.get(n.name) == stage and n.op != "get_attr"]

    @property
    def clock_speedup(self) -> float:
        """Total FLOPs per frame without clocks over the average executed with them (semantics §5)."""
        clocked = sum(self.stage_flops_clocked)
        return sum(self.stage_flops) / clocked if clocked else 1.0

    @property
    def balance(self) -> float:
        """Max stage cost over mean stage cost (per-frame FLOPs with clocks); 1.0 is perfectly even."""
        costs = self.stage_flops_clocked
        mean = sum(costs) / len(costs) if costs else 0
        return max(costs) / mean if mean else 1.0

    def added_costs(self) -> dict:
        """Per kind of added connection ("skip", "temporal", "feedback"): (nodes, parameters, FLOPs per frame)."""
        costs = {}
        for name in self.added_nodes:
            n = self.node(name)
            kind = n.meta["pipecomp"]["added"]
            nodes, params, flops = costs.get(kind, (0, 0, 0.0))
            if n.op == "call_module":
                params += sum(p.numel() for p in self.module.get_submodule(n.target).parameters())
            costs[kind] = (nodes + 1, params, flops + n.meta["pipecomp"]["flops"] / self.example_shape[0])
        return costs

    @property
    def hyperperiod(self) -> int:
        return math.lcm(*self.period_of.values()) if self.period_of else 1

    def report(self) -> str:
        rows = []
        for s in range(self.parallel):
            nodes = [n for n in self.nodes_of_stage(s) if n.op not in ("placeholder", "output")]
            periods = sorted({self.period_of[n.name] for n in nodes})
            rows.append((
                str(s), nodes[0].name if nodes else "-", nodes[-1].name if nodes else "-",
                _si(self.stage_flops[s]), _si(self.stage_flops_clocked[s]),
                _si(self.stage_params[s]), ",".join(map(str, periods)), _bytes(self.stage_state_bytes[s]),
            ))
        rows.append(("total", "", "", _si(sum(self.stage_flops)), _si(sum(self.stage_flops_clocked)),
                     _si(sum(self.stage_params)), "", _bytes(sum(self.stage_state_bytes))))
        head = ("stage", "first node", "last node", "FLOPs/frame", "with clocks", "params", "periods", "state")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        out = [line(head), "-" * len(line(head))] + [line(r) for r in rows[:-1]]
        out += ["-" * len(line(head)), line(rows[-1])]
        shifts = f", shift={self.shift} ({len(self.shift_nodes)} nodes)" if self.shift else ""
        out += [
            f"parallel={self.parallel}, delays={self.delays}{shifts}, input {list(self.example_shape)}",
            f"latency: {self.latency} frames; stage balance (max/mean cost): {self.balance:.2f}; "
            f"clock speed-up: {self.clock_speedup:.2f}x (hyperperiod {self.hyperperiod}"
            + (", phases aligned)" if self.phases == "align" else ")"),
        ]
        if any(self.shift_records_from.values()):
            starts = [max((t for n, t in self.shift_records_from.items() if self.stage_of[n] == s), default=None)
                      for s in range(self.parallel)]
            out.append("shift memories stay zero until a frame reaches them; per stage, all record from tick: "
                       + ", ".join("-" if t is None else str(t) for t in starts))
        out += [f"kept whole: {name}: {why}" for name, why in self.kept_whole.items()]
        for kind, (nodes, params, flops) in self.added_costs().items():
            out.append(f"added {kind} connections: {nodes} nodes, {_si(params)} params, {_si(flops)} FLOPs/frame "
                       f"(counted in the table)")
        if self.feedback:
            source, reader, d = self.feedback
            registers = f"register {source}_d1" if d == 1 else f"registers {source}_d1..{source}_d{d}"
            out.append(f"feedback: the output's '{source}' of tick t-{d}, read in stage {self.stage_of[reader]} "
                       f"as '{reader}' ({registers})")
        return "\n".join(out)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _bytes(x: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"
