import io
import json
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from graphopt.errors import UsageError
from graphopt_plugins.partition.placement import (backend_colours, compatibility_table, render, summary_table, to_dot,
                                _layout)

REASON = 'op cumsum not supported by xnnpack ("scan" \\ no kernel)'


def _node(name, kinds, inputs, placement, macs=1000, reason=None, shape=(1, 8, 16, 16)):
    return {"name": name, "kinds": kinds, "dtype": "float32", "shape": list(shape) if shape else None,
            "macs": macs, "placement": placement, "reason": reason, "inputs": inputs}


@pytest.fixture
def report():
    """x -> conv -> relu -> cumsum (cpu) -> add(relu, cumsum) -> fc; y -> fc: two partitions."""
    nodes = [_node("conv", ["conv2d"], ["x"], "xnnpack_0", 3456),
             _node("relu", ["relu"], ["conv"], "xnnpack_0", 0),
             _node("cumsum", ["cumsum"], ["relu"], "cpu", 10, REASON),
             _node("add", ["add"], ["relu", "cumsum"], "xnnpack_1", 0),
             _node("fc", ["linear"], ["add", "y"], "xnnpack_1", 2000, shape=None)]
    return {"backend": "xnnpack", "min_size": 1,
            "partitions": [{"name": "xnnpack_0", "nodes": ["conv", "relu"], "macs": 3456},
                           {"name": "xnnpack_1", "nodes": ["add", "fc"], "macs": 2000}],
            "nodes": nodes,
            "summary": {"backends": {"xnnpack": {"nodes": 4, "macs": 5456}, "cpu": {"nodes": 1, "macs": 10}},
                        "delegated_share": 5456 / 5466, "estimated_time": 0.25}}


def _text(table) -> str:
    console = Console(file=io.StringIO(), width=200, highlight=False)
    console.print(table)
    return console.file.getvalue()


def test_compatibility_table_has_a_row_per_node(report):
    text = _text(compatibility_table(report))
    assert "placement on xnnpack (min_size=1)" in text
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["conv", "relu", "cumsum", "add", "fc"]
    conv, cumsum, fc = rows[0], rows[2], rows[4]
    assert all(cell in conv for cell in ("conv2d", "float32", "1x8x16x16", "3.46k", "xnnpack_0"))
    assert "cpu" in cumsum and REASON in cumsum      # brackets and quotes are not markup
    assert "│ -" in fc                               # no single output shape


def test_summary_table(report):
    text = _text(summary_table(report))
    xnnpack = next(line for line in text.splitlines() if line.startswith("│ xnnpack"))
    cpu = next(line for line in text.splitlines() if line.startswith("│ cpu"))
    assert re.search(r"│\s+2 │\s+4 │\s+5.46k │\s+99.82% │", xnnpack), xnnpack
    assert re.search(r"│\s+- │\s+1 │\s+10 │\s+0.18% │", cpu), cpu
    assert "estimated time 0.25" in text


def _clusters(dot: str) -> dict[str, list[str]]:
    clusters, current = {}, None
    for line in dot.splitlines():
        if m := re.match(r'\s*subgraph "cluster_(\w+)" \{', line):
            current = clusters.setdefault(m[1], [])
        elif line.strip() == "}":
            current = None
        elif current is not None and (m := re.match(r'\s*"(\w+)" \[', line)):
            current.append(m[1])
    return clusters


def test_dot_clusters_colours_and_edges(report):
    dot = to_dot(report)
    assert dot.startswith("digraph placement {") and dot.endswith("}\n")
    assert _clusters(dot) == {"xnnpack_0": ["conv", "relu"], "xnnpack_1": ["add", "fc"]}
    assert 'label="xnnpack_0\\n3.46k MACs"' in dot
    line, fill = backend_colours("xnnpack")
    cpu_fill = backend_colours("cpu")[1]
    fills = dict(re.findall(r'"(\w+)" \[label=[^\]]*fillcolor="(#\w+)"', dot))
    assert fills == {"conv": fill, "relu": fill, "add": fill, "fc": fill, "cumsum": cpu_fill}
    assert fill != cpu_fill and f'color="{line}"' in dot
    assert '"conv" [label="conv\\nconv2d"' in dot
    assert re.findall(r'"(\w+)" \[shape=ellipse', dot) == ["x", "y"]
    edges = re.findall(r'"(\w+)" -> "(\w+)";', dot)
    assert edges == [("x", "conv"), ("conv", "relu"), ("relu", "cumsum"), ("relu", "add"), ("cumsum", "add"),
                     ("add", "fc"), ("y", "fc")]


def test_dot_escapes_and_tooltips(report):
    dot = to_dot(report)
    assert 'tooltip="op cumsum not supported by xnnpack (\\"scan\\" \\\\ no kernel)"' in dot
    assert dot.count("tooltip=") == 1     # only cpu nodes carry a reason


def test_dot_and_colours_are_the_same_in_every_process(report, tmp_path):
    """Python salts str hashes per process: two interpreters with other PYTHONHASHSEEDs must draw
    the same DOT text and pick the same colours."""
    (tmp_path / "report.json").write_text(json.dumps(report))
    code = ("import json, sys\nfrom graphopt_plugins.partition.placement import backend_colours, to_dot\n"
            "print(json.dumps([to_dot(json.load(open(sys.argv[1]))), backend_colours('xnnpack'), "
            "backend_colours('toy-dsp')]))")
    outputs = [subprocess.run([sys.executable, "-c", code, str(tmp_path / "report.json")], check=True,
                              capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED=seed)).stdout
               for seed in ("1", "2")]
    assert outputs[0] == outputs[1]
    dot, xnnpack, toy = json.loads(outputs[0])
    assert dot == to_dot(report) and xnnpack == list(backend_colours("xnnpack")) and xnnpack != toy
    assert backend_colours("cpu")[1] == "#d9d9d9"


def test_layers_are_longest_paths_from_inputs(report):
    at = _layout(report)
    assert {name: k for name, (_, k) in at.items()} == {"x": 0, "y": 0, "conv": 1, "relu": 2, "cumsum": 3,
                                                        "add": 4, "fc": 5}
    assert at["x"][0] != at["y"][0]       # side by side in one layer


def test_render_dot_svg_png(tmp_path, report):
    for suffix in ("dot", "svg", "png"):
        render(report, tmp_path / f"p.{suffix}")
    assert (tmp_path / "p.dot").read_text() == to_dot(report)
    svg = (tmp_path / "p.svg").read_bytes()
    assert svg.startswith(b"<?xml") and b"<svg" in svg and b"<dc:date>" not in svg
    render(report, tmp_path / "again.svg")
    render(report, tmp_path / "again.png")
    assert (tmp_path / "again.svg").read_bytes() == svg
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "p.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "again.svg", "p.dot", "p.png", "p.svg"]


def test_png_shows_placements_in_their_colours(tmp_path, report):
    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread
    render(report, tmp_path / "p.png")
    image = imread(tmp_path / "p.png")[..., :3]
    height, width, _ = image.shape
    assert height > 300 and width > 300

    def pixels(colour):
        return int((np.abs(image - np.array(to_rgb(colour))).max(axis=-1) < 0.01).sum())

    assert pixels(backend_colours("xnnpack")[1]) > 200         # xnnpack_0's boxes
    assert pixels(backend_colours("cpu")[1]) > 100             # the cumsum box
    assert pixels("#ffffff") > height * width // 2              # mostly background


def test_big_graph_is_capped(tmp_path):
    from matplotlib.image import imread
    nodes = [_node(f"n{i}", ["conv2d"], [f"n{i - 1}" if i else "x"] + ([f"n{i - 3}"] if i >= 3 else []),
                   "cpu" if i % 50 == 49 else f"xnnpack_{i // 50}", reason="r" if i % 50 == 49 else None)
             for i in range(500)]
    report = {"backend": "xnnpack", "min_size": 1, "nodes": nodes,
              "partitions": [{"name": f"xnnpack_{k}", "nodes": [], "macs": 49000} for k in range(10)],
              "summary": {"backends": {"xnnpack": {"nodes": 490, "macs": 490000}, "cpu": {"nodes": 10, "macs": 10000}},
                          "delegated_share": 0.98, "estimated_time": 0.27}}
    render(report, tmp_path / "big.png")
    height, width, _ = imread(tmp_path / "big.png").shape
    assert height > 5000 and height * width <= 2.5e7


def test_bad_suffix_is_a_one_line_usage_error(tmp_path, report):
    with pytest.raises(UsageError, match=r"cannot draw a placement as p\.jpg: give a \.dot, \.svg, \.png file"):
        render(report, tmp_path / "p.jpg")
    assert list(tmp_path.iterdir()) == []


def test_nothing_written_on_error(tmp_path, report):
    target = tmp_path / "p.svg"
    target.write_bytes(b"the user's old picture")
    report["nodes"][0]["placement"] = "nowhere"      # no such partition: drawing fails
    with pytest.raises(KeyError):
        render(report, target)
    assert target.read_bytes() == b"the user's old picture"
    assert [p.name for p in tmp_path.iterdir()] == ["p.svg"]
