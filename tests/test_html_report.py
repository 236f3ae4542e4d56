"""`prune --html`: one self-contained page (no scripts, nothing fetched), read back with a parser."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import onnx
import pytest

from graphprune.cli import main
from graphprune.examples import example_cnn
from graphprune.html_report import LayerWidth, bar_chart_svg, layer_widths, scatter_svg


class Page(HTMLParser):
    """Collects tags, attributes, table rows, SVG layer bars and text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def assert_self_contained(page: Page) -> None:
    assert not page.find("script") and not page.find("link") and not page.find("img")
    assert not page.find("iframe")
    for _, attrs in page.tags:
        for key in ("src", "href", "xlink:href"):
            assert not attrs.get(key, "").startswith(("http", "//")), attrs
    assert "@import" not in "".join(page.text) and "url(" not in "".join(page.text)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("m") / "cnn.onnx"
    onnx.save(example_cnn(), path)
    return path


def run(*args: object) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)


def test_prune_html_report(cnn, tmp_path, capsys):
    html, report = tmp_path / "report.html", tmp_path / "report.json"
    code = run("prune", "-q", cnn, "-o", tmp_path / "small.onnx", "--html", html, "--report", report,
               "--latency-runs", "3")
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"and {html}" in out
    page = parse(html)
    assert_self_contained(page)
    data = json.loads(report.read_text())

    # before/after table, with latency
    table = {row[0]: row[1:] for row in page.rows if row}
    assert table["parameters"][2] == f"{data['params_after'] / data['params_before']:.3f}"
    assert table["MACs"][2] == f"{data['macs_after'] / data['macs_before']:.3f}"
    assert any(key.startswith("latency (cpu") for key in table)
    # the page prints three decimals: it may differ from the JSON by half a unit in the last place
    assert float(table["median ms"][0]) == pytest.approx(data["latency"]["before"]["median_ms"], abs=5.01e-4)

    # verification: what it compared with
    assert table["compared with"] == [data["verification"]["reference"]]
    assert "the zeroed original" in "".join(page.text)

    # per-layer widths: one bar group per conv / gemm layer, kept <= before, something pruned
    layers = page.find("g", **{"class": "layer"})
    model = onnx.load(cnn)
    linear = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(layers) == len(linear)
    widths = [(int(a["data-before"]), int(a["data-after"])) for a in layers]
    assert all(0 < after <= before for before, after in widths)
    assert any(after < before for before, after in widths)
    assert page.find("svg")

    # frozen groups with their reasons
    frozen = data["frozen"]
    assert frozen
    for group in frozen:
        assert any(row[:2] == [str(group["group"]), group["anchor"]] and group["reasons"][0] in row[3]
                   for row in page.rows)


def test_html_after_depth_pruning_shows_erased_layers_and_the_real_difference(cnn, tmp_path, capsys):
    html = tmp_path / "depth.html"
    code = run("prune", "-q", cnn, "-o", tmp_path / "d.onnx", "--erase-blocks", "1", "--html", html,
               "--latency-runs", "2")
    assert code == 0, capsys.readouterr()
    page = parse(html)
    assert_self_contained(page)
    erased = [a for a in page.find("g", **{"class": "layer"}) if a["data-after"] == "0"]
    assert erased, "the erased block's convolutions are drawn at width 0"
    table = {row[0]: row[1:] for row in page.rows if row}
    assert "zeroed" in table["compared with"][0]
    assert float(table["max rel diff to the original itself"][0]) > 1e-3


def test_layer_widths_match_by_node_and_weight_names():
    original = example_cnn()
    rows = layer_widths(original, original)
    assert rows and all(r.before == r.after > 0 for r in rows)
    assert [r.name for r in rows] == [n.name for n in original.graph.node if n.op_type == "Conv"] + \
        [n.name for n in original.graph.node if n.op_type == "Gemm"]


def test_charts_escape_names_and_handle_no_data():
    svg = bar_chart_svg([LayerWidth("<conv&1>", "Conv", 8, 4)])
    assert "<conv&1>" not in svg and "&lt;conv&amp;1&gt;" in svg
    assert "No linear layers" in bar_chart_svg([])
    assert "no data" in scatter_svg([], x="a", y="b", x_label="a", y_label="b")
    svg = scatter_svg([{"a": 0.5, "b": 0.9, "label": "p"}, {"a": None, "b": 1}], x="a", y="b",
                      x_label="a", y_label="b")
    assert svg.count("<circle") == 1


def test_a_frozen_group_without_units_shows_its_channels_and_an_unchanged_model_its_timing_noise(tmp_path, capsys):
    """A frozen group whose units were never told apart (a size behind a computed ``Reshape``
    unknown) read "0 units" on the page and ``size: 0`` in the report, where ``analyze`` says
    "16 ch"; and a prune that removed nothing timed its unchanged copy at 0.815 of itself, which
    read as a speed-up (shakkala's BiLSTM, round 71)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Reshape", ["r", "s"], ["b"]), helper.make_node("MatMul", ["b", "W2"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in (("W1", (8, 16)),
                                                                                            ("W2", (16, 3)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 8]),
                                           helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["U", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    page, report = tmp_path / "p.html", tmp_path / "r.json"
    code = main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--html", str(page),
                 "--report", str(report), "--input-shape", "x=4,8", "--latency-runs", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads(report.read_text())
    unseparated = [g for g in data["frozen"] if g["size"] == 0]
    assert unseparated and all(g["channels"] == 16 for g in unseparated), data["frozen"]
    text = page.read_text()
    assert "<td>16 ch</td>" in text
    assert data.get("unchanged") and "the ratio shows how much the timing varies on this machine" in text
    assert "the latency ratio of a model to itself shows how much the timing varies here" in out
