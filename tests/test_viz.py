"""The pictures: the DOT source read back statement by statement and checked against the
plan (stages, delays, periods, shifts), collapsed or not; then real renderings."""
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torchvision

import pipecomp
from pipecomp.analysis import info
from pipecomp.passes.shift import is_shift

pytest.importorskip("graphviz")  # the pictures are the optional `viz` extra
from pipecomp.viz import FLOPS_FILL, MAX_BOXES, auto_collapse, timeline_dot, to_dot, visualize  # noqa: E402

SIZE = (1, 3, 64, 64)
FULL = 99  # a collapse level deeper than any module path: every node drawn
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot program: apt-get install graphviz")

CONFIGS = {
    "resnet18-diagonal-clocks": ("resnet18", dict(parallel=4, clocks="halve")),
    "resnet18-online-shift": ("resnet18", dict(parallel=3, shift="online", clocks="halve")),
    "resnet50-aligned-clocks": ("resnet50", dict(parallel=7, delays="aligned", clocks="halve")),
    "resnet50-offline-shift": ("resnet50", dict(parallel=5, shift="offline")),
    "densenet121-diagonal-clocks": ("densenet121", dict(parallel=7, clocks="halve")),
    "mobilenet_v2-inplace-shift": ("mobilenet_v2", dict(parallel=5, shift="online", shift_place="inplace")),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def net(request):
    name, options = CONFIGS[request.param]
    return pipecomp.compile(getattr(torchvision.models, name)(), example_input=SIZE, **options)


_ID = r'("(?:[^"\\]|\\.)*"|[\w.]+)'
_ATTR = re.compile(r'\s*([\w-]+)=("(?:[^"\\]|\\.)*"|<|[^\s\]]+)')


def _unquote(s):
    return s[1:-1].replace('\\"', '"') if s.startswith('"') else s


def _attrs(text):
    """key=value pairs of a DOT attribute list; HTML-like values <...> are kept as text."""
    attrs, i = {}, 0
    while m := _ATTR.match(text, i):
        key, value = m.groups()
        if value == "<":
            depth, j = 0, m.start(2)
            while True:
                depth += {"<": 1, ">": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
            attrs[key], i = text[m.start(2) + 1:j - 1], j
        else:
            attrs[key], i = _unquote(value), m.end()
    return attrs


def parse(source):
    """Nodes {id: (cluster, attrs)}, edges [(a, b, attrs)] and clusters {name: attrs} of `source`."""
    nodes, edges, clusters, cluster = {}, [], {}, None
    for line in source.splitlines()[1:]:
        line = line.strip()
        if m := re.match(r"subgraph (\w+) \{$", line):
            cluster = m.group(1)
            clusters[cluster] = {}
        elif line == "}":
            cluster = None
        elif m := re.match(_ID + r" -> " + _ID + r"(?: \[(.*)\])?$", line):
            edges.append((_unquote(m.group(1)), _unquote(m.group(2)), _attrs(m.group(3) or "")))
        elif m := re.match(_ID + r" \[(.*)\]$", line):
            if m.group(1) not in ("graph", "node", "edge"):
                nodes[_unquote(m.group(1))] = (cluster, _attrs(m.group(2)))
        elif cluster is not None:
            clusters[cluster].update(_attrs(line))
    return nodes, edges, clusters


def _boxes(plan, nodes):
    """fx node name -> id of the box that draws it (groups list their members in the tooltip)."""
    box_of = {}
    for box, (cluster, attrs) in nodes.items():
        if cluster is None:  # the legend
            continue
        members = attrs["tooltip"].split(", ") if "pc-group" in attrs.get("class", "") else [box]
        box_of.update({m: box for m in members})
    return box_of


def _check(plan, source):
    """What every picture keeps exact, collapsed or not (semantics §2)."""
    nodes, edges, clusters = parse(source)
    assert sorted(clusters) == sorted(f"cluster_stage{j}" for j in range(plan.parallel))
    for j in range(plan.parallel):
        assert re.search(rf"<B>stage {j}</B>.*FLOPs/frame.*% of total", clusters[f"cluster_stage{j}"]["label"])
    box_of = _boxes(plan, nodes)
    assert set(box_of) == {n.name for n in plan.graph.nodes}
    stage_of_box = {}
    for n in plan.graph.nodes:
        cluster = nodes[box_of[n.name]][0]
        assert cluster == f"cluster_stage{plan.stage_of[n.name]}", n.name  # boxes never mix stages
        stage_of_box[box_of[n.name]] = plan.stage_of[n.name]
    drawn = {(a, b, e.get("label")): e for a, b, e in edges}
    for v in plan.graph.nodes:
        for u in v.all_input_nodes:
            a, b = box_of[u.name], box_of[v.name]
            span = plan.stage_of[v.name] - plan.stage_of[u.name]
            if span == 0:
                continue
            d = plan.delay_of[(u.name, v.name)]
            temporal_skip = plan.delays == "diagonal" and span > 1 and info(u)["kind"] == "tensor"
            edge = drawn[(a, b, f"d={d} skip" if temporal_skip else f"d={d}")]
            assert "dashed" in edge["style"] and "pc-crossing" in edge["class"]
            assert ("pc-skip" in edge["class"]) == temporal_skip
    for a, b, e in edges:  # and no edge pretends to cross, or hides a crossing
        assert ("pc-crossing" in e.get("class", "")) == (stage_of_box[a] != stage_of_box[b])
        assert ("dashed" in e.get("style", "")) == (stage_of_box[a] != stage_of_box[b])
    return nodes, box_of


def test_full_picture_shows_every_node_with_op_shape_period_and_shift(net):
    plan = net.plan
    nodes, box_of = _check(plan, to_dot(net, collapse=FULL).source)
    assert all(box_of[n.name] == n.name for n in plan.graph.nodes)
    for n in plan.graph.nodes:
        label = nodes[n.name][1]["label"]
        assert f"<B>{n.name}</B>" in label
        period = plan.period_of.get(n.name, 1)
        assert (f"period {period}" in label) == (period != 1), n.name
        if is_shift(n):
            meta = info(n)
            assert nodes[n.name][1]["class"] == "pc-shift" and nodes[n.name][1]["shape"] == "cds"
            assert f"{meta['fold']}/{meta['shape'][1]} channels" in label and plan.shift in label
        elif info(n).get("kind") == "tensor":
            assert "×".join(map(str, info(n)["shape"])) in label
    assert {n for n, (_, a) in nodes.items() if a.get("class") == "pc-shift"} == set(plan.shift_nodes)


@pytest.mark.parametrize("collapse", [None, 2, 1, 0])
def test_collapsed_pictures_keep_stage_boundaries_and_delays(net, collapse):
    plan = net.plan
    nodes, box_of = _check(plan, to_dot(net, collapse=collapse).source)
    for box in set(box_of.values()):
        members = [plan.node(m) for m, b in box_of.items() if b == box]
        label = nodes[box][1]["label"]
        periods = sorted({plan.period_of[m.name] for m in members if m.name in plan.period_of})
        if periods not in ([], [1]):
            assert f"period{'s' * (len(periods) > 1)} {','.join(map(str, periods))} </FONT>" in label, box
        shifts = [m for m in members if is_shift(m)]
        if len(members) > 1 and shifts:
            assert f"{len(shifts)} shift" in label
    if collapse is None:
        assert len(set(box_of.values())) <= MAX_BOXES


def test_auto_collapse_levels():
    big = pipecomp.compile(torchvision.models.resnet50(), parallel=7, example_input=SIZE)
    small = pipecomp.compile(torchvision.models.resnet18(), parallel=4, example_input=SIZE)
    assert auto_collapse(big.plan) == 2  # one box per bottleneck block
    assert auto_collapse(small.plan) is None  # 71 nodes fit


def test_temporal_skips_are_highlighted_only_in_diagonal_mode():
    model = torchvision.models.densenet121()
    for delays, skips in (("diagonal", True), ("aligned", False)):
        plan = pipecomp.compile(model, parallel=7, delays=delays, example_input=SIZE).plan
        _, edges, _ = parse(to_dot(plan, collapse=2).source)
        assert any("pc-skip" in e["class"] for _, _, e in edges) == skips
        assert ("temporal skip" in to_dot(plan, collapse=2).source) == skips  # the legend too


def test_options_are_checked():
    net = pipecomp.compile(torchvision.models.resnet18(), parallel=2, example_input=SIZE)
    nodes, _, _ = parse(to_dot(net, color_by="flops").source)
    assert {a.get("fillcolor") for _, a in nodes.values()} & set(FLOPS_FILL[1:])
    with pytest.raises(ValueError, match="color_by"):
        to_dot(net, color_by="stage")
    with pytest.raises(ValueError, match="collapse"):
        to_dot(net, collapse=-1)
    with pytest.raises(ValueError, match=r"\.svg"):
        visualize(net, "picture.jpeg")
    with pytest.raises(ValueError, match="view"):
        visualize(net, "picture.dot", view="table")


@pytest.fixture(scope="module")
def clocked():
    return pipecomp.compile(torchvision.models.resnet50(), parallel=7, clocks="halve", example_input=SIZE)


@needs_dot
def test_svg_renderings_parse_as_xml(clocked, tmp_path):
    for view in ("graph", "timeline"):
        path = visualize(clocked, tmp_path / f"{view}.svg", view=view, ticks=20)
        root = ET.parse(path).getroot()
        assert root.tag.endswith("svg")
        text = "".join(root.itertext())
        assert ("stage 6" in text) and ("output" in text)


@needs_dot
def test_png_and_dot_files(clocked, tmp_path):
    densenet = pipecomp.compile(torchvision.models.densenet121(), parallel=7, clocks="halve", example_input=SIZE)
    for net in (clocked, densenet):
        png = visualize(net, tmp_path / "graph.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert visualize(clocked, tmp_path / "t.png", view="timeline").read_bytes()[:4] == b"\x89PNG"
    source = visualize(clocked, tmp_path / "graph.dot").read_text()
    assert source == to_dot(clocked).source


def test_without_the_dot_program(clocked, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="apt-get install graphviz"):
        visualize(clocked, tmp_path / "graph.svg")
    assert to_dot(clocked).source.startswith("digraph")
    assert visualize(clocked, tmp_path / "graph.dot").exists()


def test_timeline_picture_marks_idle_cells_and_output(clocked):
    source = timeline_dot(clocked, 20).source
    tl = clocked.timeline(20)
    idle = sum(not c.fires for row in tl.stages for c in row)
    assert source.count('BGCOLOR="white"> </TD>') == idle  # blank where a clocked stage does not fire
    assert source.count('BORDER="2"') == 20  # the framed output row
    assert "no frame reaches the output in 20 ticks" in source


def test_stages_coloured_and_labelled_by_worker():
    net = pipecomp.compile(torchvision.models.resnet18(), parallel=4, example_input=(1, 3, 64, 64))
    placement = pipecomp.schedule(net, 2)
    source = net.to_dot(placement=placement).source
    fills = {}
    for w, group in enumerate(placement.groups):
        for j in group:
            block = source.split(f"subgraph cluster_stage{j} ", 1)[1].split("subgraph cluster_stage", 1)[0]
            assert f"stage {j} · worker {w} (cpu)" in block
            fills[j] = block.split('fillcolor="', 1)[1].split('"', 1)[0]
    assert len({fills[g[0]] for g in placement.groups}) == 2
    assert all(fills[j] == fills[g[0]] for g in placement.groups for j in g)


def test_star_import_needs_no_graphviz():
    code = "import sys; sys.modules['graphviz'] = None; from pipecomp import *; print(compile.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "compile" in done.stdout, done.stderr
