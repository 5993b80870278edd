"""Pictures of a compiled network: the staged graph and the time-space table.

The graph picture draws the plan (semantics §2): one cluster per pipeline stage, crossing
edges dashed and labelled with their delay, temporal skips of the diagonal mode
(*Massively Parallel Video Networks*, fig. 1d) in red, clock periods (sec. 3.1) as badges
and fill colour, TSM shift nodes (semantics §6) in their own shape, and the added connections
(semantics §9: temporal skips' adapters, temporal filters' taps, feedback) in green, nodes and edges,
feedback's back edge from the output's tensor to the first convolution with a hollow arrow. Big graphs are
collapsed into module groups; a group never mixes stages, so boundaries and delays stay
exact. The time-space picture is `pipecomp.timeline` drawn as fig. 1 draws it.
"""
from __future__ import annotations

import html
import math
import shutil
from collections import Counter
from pathlib import Path

from torch import nn

from .analysis import COMPUTE_OPS, info
from .passes.shift import is_shift
from .plan import _si
from .timeline import timeline

try:
    import graphviz
except ImportError as e:  # the pictures are an optional extra
    raise ImportError("pipecomp's pictures need the graphviz package: pip install 'pipecomp[viz]'") from e

MAX_BOXES = 80
FORMATS = ("svg", "png", "pdf", "dot")
# Light to dark by log2(period): slower clocks look heavier.
PERIOD_FILL = ["#ffffff", "#e1edf8", "#b7d4ee", "#84b6de", "#4f91c7", "#2166ac", "#0d3f78"]
FLOPS_FILL = ["#ffffff", "#fee6ce", "#fdc38d", "#fd9a53", "#e8601c", "#b33c06"]
# Qualitative colours for input frames; cells also carry the frame number.
FRAME_FILL = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462",
              "#b3de69", "#fccde5", "#bc80bd", "#ccebc5", "#ffed6f"]
SHIFT_FILL, SHIFT_LINE = "#ecd9f7", "#7b3294"
CONST_FILL = "#f2f2f2"
ADDED_FILL, ADDED_LINE = "#dcf2dc", "#1b7837"
ADDED_TEXT = {"skip": "added temporal skip (starts at zero)", "temporal": "added temporal filter (starts at zero)",
              "feedback": "added feedback (starts at zero)"}
INSIDE, CROSSING, SKIP, VALUE = "#555555", "#1f6fb2", "#d62728", "#999999"


def _plan_root(net):
    """The plan, and the module whose submodules name the groups (the model's own classes)."""
    plan = getattr(net, "plan", net)
    return plan, net if isinstance(net, nn.Module) else plan.module


def _path(node) -> tuple:
    """Module components of the container the node lives in, then the node itself."""
    parts = [p for p in info(node).get("module", "").split(".") if p]
    # A module call (and a shift, which takes its convolution's module) names itself.
    if parts and (node.op == "call_module" or is_shift(node)):
        parts.pop()
    return (*parts, node.name) if node.op in COMPUTE_OPS + ("get_attr",) else ()


def _group_key(plan, node, collapse):
    path = _path(node)
    if collapse is None or len(path) <= collapse:
        return node.name
    return (plan.stage_of[node.name], ".".join(path[:collapse]))


def _groups(plan, collapse):
    """Boxes in topological order: key -> member nodes; a key is a node name or (stage, prefix)."""
    boxes = {}
    for n in plan.graph.nodes:
        boxes.setdefault(_group_key(plan, n, collapse), []).append(n)
    # A group of one is drawn as that node.
    return {(k if len(ms) > 1 or isinstance(k, str) else ms[0].name): ms for k, ms in boxes.items()}


def auto_collapse(plan, max_boxes=MAX_BOXES):
    """The most detailed collapse level that keeps at most `max_boxes` boxes and twice as many
    edges (None: no collapse needed); dense connections make edges the limit there."""
    def fits(collapse):
        groups = _groups(plan, collapse)
        return len(groups) <= max_boxes and len(_edges(plan, groups)) <= 2 * max_boxes
    if fits(None):
        return None
    depth = max(len(_path(n)) for n in plan.graph.nodes)
    return next((c for c in range(depth - 1, 0, -1) if fits(c)), 0)


def _box_id(key):
    # Not a Python identifier, so never the name of an fx node.
    return key if isinstance(key, str) else f"stage{key[0]}/{key[1]}"


def _op(root, node) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return {"placeholder": "input frame", "output": "output", "get_attr": "constant"}[node.op]


def _is_constant(node) -> bool:
    return node.op == "get_attr" or info(node).get("kind") == "constant"


def _shape(node) -> str:
    meta = info(node)
    if meta.get("kind") == "tensor":
        return "×".join(map(str, meta["shape"]))
    if meta.get("kind") == "constant":
        return "constant " + "×".join(map(str, meta.get("shape", ())))
    return {"tuple": "tuple of tensors", "value": "size (no frame)"}.get(meta.get("kind"), "")


def _scale(palette, x):
    """Colour and readable font colour for x in [0, 1]."""
    i = min(len(palette) - 1, max(0, round(x * (len(palette) - 1))))
    return palette[i], "white" if i >= len(palette) - 2 else "black"


def _period_fill(p):
    i = min(len(PERIOD_FILL) - 1, int(math.log2(p)))
    return PERIOD_FILL[i], "white" if i >= len(PERIOD_FILL) - 2 else "black"


def _rows(*rows) -> str:
    """An HTML-like label: one table cell per (text, attributes) row; text is already escaped."""
    cells = "".join(f'<TR><TD {attrs}>{text}</TD></TR>' for text, attrs in rows if text)
    return f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">{cells}</TABLE>>'


def _badge(periods) -> tuple:
    periods = sorted(set(periods) - {None})
    if periods in ([], [1]):
        return "", ""
    text = f"period{'s' if len(periods) > 1 else ''} {','.join(map(str, periods))}"
    return f'<FONT COLOR="white" POINT-SIZE="9"> {text} </FONT>', 'BGCOLOR="#333333"'


def _shift_text(node) -> str:
    meta = info(node)
    c, f = meta["shape"][1], meta["fold"]
    share = f"{f}/{c} channels"
    if meta["direction"] == "online":
        return f"shift {share} from t−1 (online)"
    return f"shift {share} from t+1 and {share} from t−1 (offline)"


def _node_attrs(plan, root, node, color_by, top_flops):
    name, period = node.name, plan.period_of.get(node.name)
    flops = info(node).get("flops", 0) / plan.example_shape[0]
    small = 'ALIGN="CENTER"'
    if is_shift(node):
        label = _rows((f"<B>{html.escape(name)}</B>", small), ("temporal shift (TSM)", small),
                      (f'<FONT POINT-SIZE="9">{_shift_text(node)}</FONT>', small), _badge([period]))
        return dict(label=label, shape="cds", style="filled", fillcolor=SHIFT_FILL, color=SHIFT_LINE,
                    penwidth="1.6", tooltip=_shift_text(node), **{"class": "pc-shift"})
    constant = _is_constant(node)
    added = info(node).get("added")
    if added:
        label = _rows((f"<B>{html.escape(name)}</B>", small), (html.escape(_op(root, node)), small),
                      (f'<FONT POINT-SIZE="9">{ADDED_TEXT[added]}</FONT>', small),
                      (f'<FONT POINT-SIZE="9">{_shape(node)}</FONT>', small), _badge([period]))
        return dict(label=label, shape="box", style="rounded,filled", fillcolor=ADDED_FILL, color=ADDED_LINE,
                    penwidth="1.6", tooltip=f"{name}: {ADDED_TEXT[added]}, {_si(flops)} FLOPs/frame, "
                                            f"stage {plan.stage_of[name]}", **{"class": "pc-added"})
    if node.op in ("placeholder", "output"):
        fill, font = "#fff2cc", "black"
    elif constant:  # no clock and no frame: apart from the per-frame data (semantics §3)
        fill, font, period = CONST_FILL, "black", None
    elif color_by == "flops":
        fill, font = _scale(FLOPS_FILL, flops / top_flops if top_flops else 0)
    else:
        fill, font = _period_fill(period or 1)
    label = _rows((f'<FONT COLOR="{font}"><B>{html.escape(name)}</B></FONT>', small),
                  (f'<FONT COLOR="{font}" POINT-SIZE="10">{html.escape(_op(root, node))}</FONT>', small),
                  (f'<FONT COLOR="{font}" POINT-SIZE="9">{_shape(node)}</FONT>', small), _badge([period]))
    shape = "note" if constant else "box"
    style = "rounded,filled" + (",dashed" if info(node).get("kind") == "value" else "")
    return dict(label=label, shape=shape, style=style, fillcolor=fill, color="#444444",
                tooltip=f"{name}: {_op(root, node)}, {_si(flops)} FLOPs/frame, stage {plan.stage_of[name]}, "
                        f"period {period or 1}",
                **{"class": "pc-constant" if constant and node.op in COMPUTE_OPS else f"pc-{node.op}"})


def _group_attrs(plan, root, key, members, whole, color_by, top_flops):
    stage, prefix = key
    try:
        cls = f" ({type(root.get_submodule(prefix)).__name__})" if prefix else ""
    except AttributeError:
        cls = ""
    flops = sum(info(n).get("flops", 0) for n in members) / plan.example_shape[0]
    periods = [plan.period_of[n.name] for n in members if n.name in plan.period_of]
    shifts = [n for n in members if is_shift(n)]
    out = [n for n in members if info(n).get("kind") == "tensor"]
    shift_text = ""
    if shifts:
        meta = info(shifts[0])
        shift_text = (f'<FONT COLOR="{SHIFT_LINE}" POINT-SIZE="9">{len(shifts)} shift{"s" * (len(shifts) > 1)}: '
                      f'{meta["fold"]}/{meta["shape"][1]} ch, {meta["direction"]}</FONT>')
    if color_by == "flops":
        fill, font = _scale(FLOPS_FILL, flops / top_flops if top_flops else 0)
    else:
        fill, font = _period_fill(min(periods, default=1))
    # "3 of 10 nodes": the rest of the module lies in a neighbouring stage.
    count = f"{len(members)} of {whole}" if whole > len(members) else str(len(members))
    label = _rows((f'<FONT COLOR="{font}"><B>{html.escape(prefix or f"stage {stage}")}</B>{cls}</FONT>', ""),
                  (f'<FONT COLOR="{font}" POINT-SIZE="10">{count} nodes, {_si(flops)} FLOPs/frame</FONT>', ""),
                  (f'<FONT COLOR="{font}" POINT-SIZE="9">out {_shape(out[-1]) if out else ""}</FONT>', ""),
                  (shift_text, 'BGCOLOR="white"'), _badge(periods))
    return dict(label=label, shape="box", style="rounded,filled", fillcolor=fill, peripheries="2",
                color=SHIFT_LINE if shifts else "#444444", penwidth="1.6" if shifts else "1",
                tooltip=", ".join(n.name for n in members), **{"class": "pc-group"})


def _stage_label(plan, j):
    clocked = any(p > 1 for p in plan.period_of.values())
    costs = plan.stage_flops_clocked if clocked else plan.stage_flops
    share = costs[j] / sum(costs) if sum(costs) else 0
    heaviest = max(costs) or 1
    # The bar is scaled to the heaviest stage; red when a stage is 20% over the mean.
    width = max(1, round(160 * costs[j] / heaviest))
    colour = SKIP if costs[j] > 1.2 * sum(costs) / len(costs) else "#4f91c7"
    text = f"{_si(plan.stage_flops[j])} FLOPs/frame"
    if clocked:
        text += f", {_si(plan.stage_flops_clocked[j])} with clocks"
    bar = f'<TD WIDTH="{width}" HEIGHT="7" FIXEDSIZE="TRUE" BGCOLOR="{colour}"></TD>'
    if width < 160:
        bar += f'<TD WIDTH="{160 - width}" HEIGHT="7" FIXEDSIZE="TRUE" BGCOLOR="#dddddd"></TD>'
    return (f'<<TABLE BORDER="0" CELLSPACING="0" CELLPADDING="1">'
            f'<TR><TD ALIGN="LEFT" COLSPAN="2"><B>stage {j}</B>  {text}, {share:.0%} of total</TD></TR>'
            f'<TR><TD ALIGN="LEFT" COLSPAN="2"><TABLE BORDER="0" CELLSPACING="0" CELLPADDING="0" '
            f'FIXEDSIZE="TRUE" WIDTH="160" HEIGHT="7"><TR>{bar}'
            f'</TR></TABLE></TD></TR></TABLE>>')


def _edge(plan, u, v):
    """Classes and attributes of the edge u→v; crossing edges carry their delay (semantics §2)."""
    if _is_constant(u):
        return "const", dict(style="dotted", color=VALUE)
    span = plan.stage_of[v.name] - plan.stage_of[u.name]
    d = plan.delay_of[(u.name, v.name)]
    if info(v).get("added") and info(u).get("kind") == "tensor":
        # A skip's adapter reads across stages (dashed, as every crossing); a temporal filter's
        # taps read older inputs inside one stage (bold: delayed, yet no stage crossed).
        jump = plan.delays == "diagonal" and span > 1
        label = f"d={d} skip" if jump else f"d={d}"
        delayed = dict(style="dashed" if span else "bold", label=label, fontcolor=ADDED_LINE) if d else {}
        cls = ("crossing skip added" if jump else "crossing added") if span else "added"
        return cls, dict(color=ADDED_LINE, penwidth="2.2" if jump else "1.6", **delayed)
    if span == 0:
        return "inside", dict(color=VALUE if info(u).get("kind") == "value" else INSIDE)
    if info(u).get("kind") != "tensor":
        return "crossing value", dict(style="dashed", color=VALUE, label=f"d={d}", fontcolor=VALUE)
    if plan.delays == "diagonal" and span > 1:
        return "crossing skip", dict(style="dashed", color=SKIP, penwidth="2.2", label=f"d={d} skip",
                                     fontcolor=SKIP)
    return "crossing", dict(style="dashed", color=CROSSING, penwidth="1.3", label=f"d={d}", fontcolor=CROSSING)


def _legend(plan, color_by, classes, grouped):
    """What the colours, shapes and lines mean; only those the picture uses."""
    rows = ['<TR><TD COLSPAN="2"><B>legend</B></TD></TR>']
    if color_by == "flops":
        swatches = [(FLOPS_FILL[0], "few FLOPs per frame"), (FLOPS_FILL[-1], "most FLOPs per frame")]
    else:
        swatches = [(_period_fill(p)[0], f"period {p}: fires every {p} ticks" if p > 1 else "period 1: every tick")
                    for p in sorted(set(plan.period_of.values()))]
    if plan.shift_nodes:
        swatches.append((SHIFT_FILL, "temporal shift (TSM) node"))
    if plan.added_nodes:
        swatches.append((ADDED_FILL, "added connection's node: starts at zero, learns"))
    rows += [f'<TR><TD BGCOLOR="{c}" WIDTH="24" BORDER="1"> </TD><TD ALIGN="LEFT">{t}</TD></TR>' for c, t in swatches]
    lines = [("inside", INSIDE, "───", "same stage, same tick"),
             ("crossing", CROSSING, "- - -", "d=n: crosses stages, reads the value of n ticks ago"),
             ("skip", SKIP, "- - -", "temporal skip: jumps stages at delay 1, fresher features"),
             ("value", VALUE, "- - -", "size value: no frame content, never delayed"),
             ("const", VALUE, "·····", "constant (note shape): parameters only, recomputed by each reader"),
             ("added", ADDED_LINE, "━━━", "into an added node; d=n: reads the value of n ticks ago"),
             ("feedback", ADDED_LINE, "- -▷",
              "feedback: the output's tensor of d ticks ago, back to the first convolution")]
    rows += [f'<TR><TD><FONT COLOR="{c}"><B>{s}</B></FONT></TD><TD ALIGN="LEFT">{t}</TD></TR>'
             for cls, c, s, t in lines if cls in classes]
    if grouped:
        rows.append('<TR><TD BORDER="1">||</TD>'
                    '<TD ALIGN="LEFT">double border: nodes of one module in one stage</TD></TR>')
    return f'<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="2" BGCOLOR="white">{"".join(rows)}</TABLE>>'


def _edges(plan, groups) -> dict:
    """Edges between boxes, one per pair of boxes and kind of edge: (a, b, label) -> (class, attributes).

    Boxes never mix stages, so the delay of every edge between two boxes is exact.
    """
    box_of = {n.name: _box_id(k) for k, ms in groups.items() for n in ms}
    edges = {}
    for v in plan.graph.nodes:
        for u in v.all_input_nodes:
            a, b = box_of[u.name], box_of[v.name]
            if a != b:
                cls, attrs = _edge(plan, u, v)
                edges.setdefault((a, b, attrs.get("label")), (cls, attrs))
    source, reader, d = plan.feedback or (None, None, None)
    if source is not None and box_of[source] != box_of[reader]:
        # The one edge whose stage decreases (no fx edge): drawn against the flow, leaving the layout alone.
        crossing = plan.stage_of[source] != plan.stage_of[reader]
        attrs = dict(color=ADDED_LINE, penwidth="2.2", style="dashed" if crossing else "bold", arrowhead="onormal",
                     label=f"d={d} feedback", fontcolor=ADDED_LINE, constraint="false")
        edges[(box_of[source], box_of[reader], attrs["label"])] = (
            "crossing feedback added" if crossing else "feedback added", attrs)
    return edges


WORKER_FILLS = ("#e3f0e3", "#fbe9d7", "#e6e1f3", "#fdf6d3", "#dcefff", "#f6dede", "#e9e9e9", "#dff3ef")


def to_dot(net, collapse=None, color_by=None, placement=None) -> "graphviz.Digraph":
    """The compiled graph as a `graphviz.Digraph`: one cluster per stage (semantics §2).

    `collapse=N` groups the nodes of each stage by the first N components of their module
    path (None: the most detail that keeps about 80 boxes); `color_by` is "period"
    (default; *Massively Parallel Video Networks* sec. 3.1) or "flops". With a
    `placement` (`pipecomp.schedule`), each stage is filled with its worker's colour and
    labelled with the worker. Takes a VideoNet or its Plan.
    """
    plan, root = _plan_root(net)
    color_by = color_by or "period"
    if color_by not in ("period", "flops"):
        raise ValueError(f"color_by={color_by!r} must be 'period' or 'flops'")
    if collapse is None:
        collapse = auto_collapse(plan)
    elif isinstance(collapse, bool) or not isinstance(collapse, int) or collapse < 0:
        raise ValueError(f"collapse={collapse!r} must be None (automatic) or a module depth >= 0")
    groups = _groups(plan, collapse)
    top_flops = max((sum(info(n).get("flops", 0) for n in ms) for ms in groups.values()), default=0)
    top_flops /= plan.example_shape[0]
    # Group sizes over all stages, to tell a module split by a stage boundary.
    whole = Counter(k[1] for n in plan.graph.nodes if not isinstance(k := _group_key(plan, n, collapse), str))

    title = (f"{type(plan.module).__name__}: {plan.parallel} stages, delays={plan.delays}, "
             f"latency {plan.latency} frames")
    if plan.hyperperiod > 1:
        title += f", clock speed-up {plan.clock_speedup:.2f}x"
    if plan.shift:
        title += f", {len(plan.shift_nodes)} {plan.shift} shifts"
    if plan.added_nodes:
        title += f", {len(plan.added_nodes)} added nodes"
    dot = graphviz.Digraph(type(plan.module).__name__, graph_attr=dict(
        label=title, labelloc="t", fontsize="18", fontname="Helvetica", rankdir="TB", nodesep="0.25",
        ranksep="0.35", newrank="true"),
        node_attr=dict(fontname="Helvetica", fontsize="11", margin="0.08,0.04"),
        edge_attr=dict(fontname="Helvetica", fontsize="9", arrowsize="0.6"))
    edges = _edges(plan, groups)
    classes = {c for cls, _ in edges.values() for c in cls.split()}
    grouped = any(not isinstance(k, str) for k in groups)
    dot.node("pipecomp legend", _legend(plan, color_by, classes, grouped), shape="plain")
    worker_of = {s: w for w, group in enumerate(placement.groups) for s in group} if placement else {}
    for j in range(plan.parallel):
        with dot.subgraph(name=f"cluster_stage{j}") as c:
            label, fill = _stage_label(plan, j), "#f6f6f6" if j % 2 else "#eef3fa"
            if placement:
                w = worker_of[j]
                fill = WORKER_FILLS[w % len(WORKER_FILLS)]
                label = label.replace(f"stage {j}", f"stage {j} · worker {w} ({placement.devices[w]})", 1)
            c.attr(label=label, labeljust="l", fontsize="13", style="rounded,filled", color="#888888",
                   fillcolor=fill)
            for key, members in groups.items():
                if plan.stage_of[members[0].name] != j:
                    continue
                if isinstance(key, str):
                    c.node(key, **_node_attrs(plan, root, members[0], color_by, top_flops))
                else:
                    c.node(_box_id(key), **_group_attrs(plan, root, key, members, whole[key[1]], color_by,
                                                              top_flops))
    for (a, b, _), (cls, attrs) in edges.items():
        dot.edge(a, b, **attrs, **{"class": " ".join(f"pc-{c}" for c in cls.split())})
    return dot


def timeline_dot(net, ticks: int = 12) -> "graphviz.Digraph":
    """The time-space table (fig. 1 of *Massively Parallel Video Networks*) as a picture.

    Stages run down, ticks across; a cell is coloured by the input frame its stage's
    output holds, blank where a clocked stage does not fire; the output row is framed.
    """
    plan, _ = _plan_root(net)
    tl = timeline(plan, ticks)

    def cell(frame, fires=True, extra=""):
        if not fires:
            return f'<TD {extra} BGCOLOR="white"> </TD>'
        if frame is None:
            return f'<TD {extra} BGCOLOR="#e4e4e4"><FONT COLOR="#888888">–</FONT></TD>'
        return f'<TD {extra} BGCOLOR="{FRAME_FILL[frame % len(FRAME_FILL)]}">{frame}</TD>'

    def row(head, cells):
        return f'<TR><TD ALIGN="LEFT" BGCOLOR="white" BALIGN="LEFT">{head}</TD>{"".join(cells)}</TR>'

    rows = [row("<B>tick</B>", (f'<TD BGCOLOR="white" WIDTH="26"><B>{t}</B></TD>' for t in range(ticks))),
            row("input frame", (cell(t) for t in range(ticks)))]
    for j, periods in enumerate(tl.periods):
        note = f'<BR/><FONT POINT-SIZE="9">period {",".join(map(str, periods))}</FONT>' if periods != [1] else ""
        rows.append(row(f"stage {j}{note}", (cell(c.frame, c.fires) for c in tl.stages[j])))
    rows.append(row("<B>output</B>", (cell(f, extra='BORDER="2" COLOR="#222222"') for f in tl.output)))
    table = (f'<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="5" COLOR="#bbbbbb">'
             f'{"".join(rows)}</TABLE>>')

    lines = tl.summary()
    lines.append("cell: the newest input frame in the stage's output;  blank: the stage does not fire;  "
                 "–: no frame has reached it yet")
    dot = graphviz.Digraph("timeline", graph_attr=dict(
        label=f"{type(plan.module).__name__}: time-space table, stages down, ticks across", labelloc="t",
        fontname="Helvetica", fontsize="16"), node_attr=dict(fontname="Helvetica", fontsize="11"))
    dot.node("table", table, shape="plain")
    dot.node("caption", "".join(line + "\\l" for line in lines), shape="plain", fontsize="10")
    dot.edge("table", "caption", style="invis")
    return dot


def check_renderer(fmt: str) -> None:
    """Raise RuntimeError, saying how to install it, when `fmt` needs the missing `dot` program."""
    if fmt != "dot" and shutil.which("dot") is None:
        raise RuntimeError(f"rendering .{fmt} needs Graphviz's 'dot' program, which is not on PATH: "
                           f"apt-get install graphviz (or brew install graphviz); a .dot file needs no program")


def visualize(net, path, view="graph", ticks=12, collapse=None, placement=None) -> Path:
    """Write the graph (`view="graph"`) or time-space table (`"timeline"`) picture to `path`.

    With a `placement` (`pipecomp.schedule`) the graph's stages are coloured by worker.
    The format comes from the suffix: .svg, .png, .pdf (rendered by Graphviz's `dot`
    program) or .dot (the source, which needs no program).
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"cannot tell the picture format from '{path}': use one of .{', .'.join(FORMATS)}")
    if view == "graph":
        dot = to_dot(net, collapse=collapse, placement=placement)
    elif view == "timeline":
        dot = timeline_dot(net, ticks)
    else:
        raise ValueError(f"view={view!r} must be 'graph' or 'timeline'")
    if fmt == "dot":
        path.write_text(dot.source)
        return path
    check_renderer(fmt)
    path.write_bytes(dot.pipe(format=fmt))
    return path
