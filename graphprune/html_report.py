"""Reports people look at: one self-contained HTML file, charts as inline SVG.

:func:`render_prune_report` turns a prune report (:mod:`graphprune.pipeline.report`) into a
page with the before/after table, the verification (what it compared with, and the real
difference to the original where the report has it), fidelity, latency, the per-layer kept
widths as a bar chart, frozen groups with their reasons and the raw JSON. The page has no
scripts and fetches nothing: styles are inline, charts are SVG written here.

:func:`layer_widths` reads the widths from the models themselves: every linear layer
(Conv, ConvTranspose, Gemm, MatMul with a constant weight, as the rule registry's
``linear()`` describes them) with its output channels before and after.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from graphprune.io import ir
from graphprune.rules import registry
from graphprune.tables import (
    difference_to_original,
    feeds_label,
    human,
    macs_label,
    preparation_summary,
)

__all__ = ["LayerWidth", "bar_chart_svg", "layer_widths", "render_prune_report", "scatter_svg"]

#: at most this many layers in the bar chart (the rest are counted below it)
MAX_CHART_ROWS = 400


@dataclass(frozen=True)
class LayerWidth:
    """Output channels of one linear layer before and after pruning (0: erased)."""

    name: str
    op: str
    before: int
    after: int


def _linear_widths(graph: gs.Graph, opset: int) -> list[tuple[str, str, str, int]]:
    """(node name, op, weight name, output channels) of every linear layer with a constant weight."""
    rows = []
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        info = rule.linear(node) if rule is not None else None
        if info is None or len(node.inputs) <= info.weight:
            continue
        weight = node.inputs[info.weight]
        if not isinstance(weight, gs.Constant) or weight.shape is None:
            continue
        width = int(weight.shape[info.out_axis])
        if info.kernel == "conv_transpose":  # weight [in, out/group, ...]
            width *= info.group
        rows.append((node.name, node.op, weight.name, width))
    return rows


def layer_widths(before: onnx.ModelProto, after: onnx.ModelProto) -> list[LayerWidth]:
    """Per linear layer of ``before`` (in graph order): its output channels before and after.

    Layers are matched by node name, else by weight name; a layer missing from ``after`` was
    erased (width 0).
    """
    old = _linear_widths(ir.import_graph(before), ir.default_opset(before))
    new = _linear_widths(ir.import_graph(after), ir.default_opset(after))
    by_node = {name: width for name, _, _, width in new if name}
    by_weight = {weight: width for _, _, weight, width in new}
    rows = []
    for index, (name, op, weight, width) in enumerate(old):
        kept = by_node.get(name) if name else None
        if kept is None:
            kept = by_weight.get(weight, 0)
        rows.append(LayerWidth(name or weight or f"{op}_{index}", op, width, kept))
    return rows


# ----------------------------------------------------------------------------- SVG
def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def bar_chart_svg(rows: Sequence[LayerWidth], *, width: int = 760) -> str:
    """Horizontal bars, one per layer: grey the width before, blue what was kept."""
    shown = list(rows[:MAX_CHART_ROWS])
    if not shown:
        return "<p>No linear layers with constant weights.</p>"
    label_w, row_h, top = 230, 16, 22
    bar_w = width - label_w - 90
    scale = max(r.before for r in shown) or 1
    height = top + row_h * len(shown) + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="kept output channels per layer">',
        f'<text x="{label_w}" y="14" class="axis">output channels kept of before '
        f'(bar length: before, max {scale})</text>',
    ]
    for i, row in enumerate(shown):
        y = top + i * row_h
        full = bar_w * row.before / scale
        kept = bar_w * row.after / scale
        label = row.name if len(row.name) <= 34 else "…" + row.name[-33:]
        parts.append(
            f'<g class="layer" data-name="{_e(row.name)}" data-before="{row.before}" '
            f'data-after="{row.after}"><title>{_e(row.name)} ({_e(row.op)}): '
            f"{row.after} of {row.before} kept</title>"
            f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end" class="label">{_e(label)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{full:.1f}" height="{row_h - 4}" class="before"/>'
            f'<rect x="{label_w}" y="{y + 2}" width="{kept:.1f}" height="{row_h - 4}" class="kept"/>'
            f'<text x="{label_w + full + 4:.1f}" y="{y + 12}" class="value">'
            f"{row.after}/{row.before}</text></g>"
        )
    parts.append("</svg>")
    more = len(rows) - len(shown)
    return "".join(parts) + (f"<p>(+{more} more layers not drawn)</p>" if more > 0 else "")


def scatter_svg(
    points: Sequence[Mapping[str, Any]],
    *,
    x: str,
    y: str,
    x_label: str,
    y_label: str,
    label: str = "label",
    width: int = 520,
    height: int = 360,
) -> str:
    """A scatter plot of ``points[i][x]`` against ``points[i][y]`` (points without both are
    left out), each point labelled with ``points[i][label]``."""
    data = [(float(p[x]), float(p[y]), str(p.get(label, ""))) for p in points
            if p.get(x) is not None and p.get(y) is not None]
    left, right, top, bottom = 64, 24, 20, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(y_label)} against {_e(x_label)}">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>',
        f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle" class="axis">{_e(x_label)}</text>',
        f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" class="axis" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">{_e(y_label)}</text>',
    ]
    if not data:
        parts.append(f'<text x="{left + 10}" y="{top + 20}" class="axis">no data</text></svg>')
        return "".join(parts)
    xs, ys = [d[0] for d in data], [d[1] for d in data]
    x0, x1 = min(min(xs), 0.0), max(max(xs), 1.0)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.08
    y0, y1 = y0 - pad, y1 + pad

    def px(v: float) -> float:
        return left + plot_w * (v - x0) / (x1 - x0)

    def py(v: float) -> float:
        return top + plot_h * (1 - (v - y0) / (y1 - y0))

    for k in range(5):
        tx, ty = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        parts.append(f'<text x="{px(tx):.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
                     f'class="tick">{tx:.2f}</text>')
        parts.append(f'<text x="{left - 6}" y="{py(ty) + 4:.1f}" text-anchor="end" '
                     f'class="tick">{ty:.3g}</text>')
    for vx, vy, name in sorted(data):
        parts.append(f'<g class="point"><title>{_e(name)}: {_e(x_label)} {vx:.3g}, '
                     f'{_e(y_label)} {vy:.3g}</title>'
                     f'<circle cx="{px(vx):.1f}" cy="{py(vy):.1f}" r="4"/>'
                     f'<text x="{px(vx) + 6:.1f}" y="{py(vy) - 6:.1f}" class="value">{_e(name)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------- page
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:980px;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .8em;border-bottom:1px solid #eee;
text-align:right}td:first-child,th:first-child{text-align:left}
.ok{color:#0a7d32;font-weight:bold}.failed{color:#b00020;font-weight:bold}.note{color:#555}
.chart text{font-size:11px;fill:#333}.chart .axis{font-size:12px}.chart .tick{fill:#666}
.chart .before{fill:#d5d8dc}.chart .kept{fill:#2e6fd8}.chart .frame{fill:none;stroke:#bbb}
.chart circle{fill:#2e6fd8}pre{background:#f6f8fa;padding:1em;overflow:auto;font-size:12px}
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _ratio(before: float | None, after: float | None) -> str:
    return f"{after / before:.3f}" if before and after is not None else "-"


def _verification(report: Mapping[str, Any]) -> str:
    v = report.get("verification") or {}
    if v.get("skipped"):
        return '<p class="failed">Verification skipped (--no-verify).</p>'
    status = '<span class="ok">ok</span>' if v.get("ok") else '<span class="failed">FAILED</span>'
    reference = v.get("reference", "the reference")
    rows = [["compared with", reference],
            ["checks", "onnx.checker (full), ONNX Runtime run, output shapes, outputs"],
            [f"samples ({feeds_label(v)})", v.get("samples", "-")],
            ["max abs diff", f"{v.get('max_abs_diff', float('nan')):.3g}"],
            ["max rel diff", f"{v.get('max_rel_diff', float('nan')):.3g}"],
            ["tolerance", f"{v.get('tolerance', float('nan')):g}"]]
    real = difference_to_original(report)
    if real is not None:
        rows.append(["max rel diff to the original itself", f"{real:.3g}"])
    prepared = preparation_summary(v.get("preparation"))
    if prepared:
        rows.append(["preparation", prepared])
    parts = [f"<p>Verification: {status}. The pruned model was compared with "
             f"<b>{_e(reference)}</b>.</p>", _table(["", ""], rows)]
    if v.get("error"):
        parts.append(f'<p class="failed">{_e(v["error"])}</p>')
    inexact = v.get("inexact_groups") or []
    if inexact:
        parts.append("<p>Inexact groups (a normalisation over the pruned axis), not compared:</p>")
        parts.append(_table(["group", "anchor", "why"],
                            [[g.get("group"), g.get("anchor"), "; ".join(g.get("why") or [])]
                             for g in inexact]))
    for extra in (report.get("provider_check"),):
        if extra:
            parts.append(f"<p>On {_e(extra['provider'])}: the pruned model agrees with its CPU run "
                         f"(max rel diff {extra['max_rel_diff']:.3g}).</p>")
    return "".join(parts)


def _flatten(prefix: str, value: Any, out: list[list[object]]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, float):
        out.append([prefix, f"{value:.4g}"])
    else:
        out.append([prefix, value if not isinstance(value, list) else json.dumps(value)[:200]])


def _fidelity(report: Mapping[str, Any]) -> str:
    fidelity = report.get("fidelity")
    if not fidelity:
        return ("<p class=\"note\">No calibration data was given, so the function was not compared "
                "with the original on real inputs; the verification above is the structural check.</p>")
    rows: list[list[object]] = []
    _flatten("", fidelity, rows)
    source = str((report.get("calibration") or {}).get("source", ""))
    note = (f'<p class="note">Measured on held-out synthetic inputs ({_e(source)}): how closely the pruned '
            "model follows the original on random inputs, which says little about real ones.</p>"
            if source.startswith("random") else "")
    return _table(["measure", "value"], rows) + note


def _latency(latency: Mapping[str, Any] | None, unchanged: bool = False) -> str:
    if not latency:
        return '<p class="note">Latency not measured.</p>'
    before, after = latency["before"], latency["after"]
    rows = [["median ms", f"{before['median_ms']:.3f}", f"{after['median_ms']:.3f}",
             _ratio(before["median_ms"], after["median_ms"])],
            ["p90 ms", f"{before['p90_ms']:.3f}", f"{after['p90_ms']:.3f}",
             _ratio(before["p90_ms"], after["p90_ms"])]]
    threads = after.get("threads")
    note = (f"ONNX Runtime, provider {after['provider']}, batch {after['batch']}, "
            f"{after['runs']} runs interleaved, threads {threads if threads else 'default'}")
    if unchanged:  # (an unchanged copy timed at 0.815 of itself read as a speed-up)
        note += ("; nothing was removed, so both are the same model: the ratio shows how much the timing "
                 "varies on this machine")
    return _table(["", "original", "pruned", "ratio"], rows) + f'<p class="note">{_e(note)}</p>'


def render_prune_report(
    report: Mapping[str, Any],
    *,
    widths: Sequence[LayerWidth] = (),
    latency: Mapping[str, Any] | None = None,
    title: str = "graphprune report",
    source: str = "",
    output: str = "",
) -> str:
    """The HTML page of one prune (see the module docstring)."""
    from graphprune import __version__

    pb, pa = report.get("params_before", 0), report.get("params_after", 0)
    mb, ma = report.get("macs_before", 0), report.get("macs_after", 0)
    nb, na = report.get("nodes_before"), report.get("nodes_after")
    rows: list[list[object]] = [
        ["parameters", human(pb), human(pa), _ratio(pb, pa)],
        [macs_label(report), human(mb), human(ma), _ratio(mb, ma)],
    ]
    if nb is not None and na is not None:
        rows.append(["nodes", nb, na, _ratio(nb, na)])
    if latency:
        b, a = latency["before"]["median_ms"], latency["after"]["median_ms"]
        rows.append([f"latency ({latency['after']['provider']}, median ms)", f"{b:.3f}", f"{a:.3f}",
                     _ratio(b, a)])
    groups, channels = report.get("groups") or {}, report.get("channels") or {}
    frozen = report.get("frozen") or []
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">{_e(source)} → {_e(output)} · mode {_e(report.get("mode", "?"))} · '
        f"graphprune {_e(__version__)}</p>",
        "<h2>Before and after</h2>", _table(["", "before", "after", "ratio"], rows, "summary"),
        "<h2>Verification</h2>", _verification(report),
        "<h2>Fidelity</h2>", _fidelity(report),
        "<h2>Latency</h2>", _latency(latency, bool(report.get("unchanged"))),
        "<h2>Kept widths per layer</h2>", bar_chart_svg(widths),
        "<h2>Channel groups</h2>",
        f"<p>{groups.get('total', '?')} groups found, {groups.get('prunable', '?')} prunable, "
        f"{groups.get('pruned', 0)} pruned, {groups.get('frozen', '?')} frozen; "
        f"{channels.get('removed', 0)} of {channels.get('prunable', '?')} prunable units removed.</p>",
    ]
    if frozen:
        body.append("<p>Frozen groups and why:</p>")
        body.append(_table(["group", "anchor", "units", "reasons"],
                           [[g.get("group"), g.get("anchor"),
                             g.get("size") or (f"{g['channels']} ch" if g.get("channels") else "?"),
                             "; ".join(g.get("reasons") or [])] for g in frozen], "frozen"))
    erased = report.get("erased_nodes") or []
    if erased:
        body.append(f"<p>Operators erased ({len(erased)}): {_e(', '.join(map(str, erased[:60])))}"
                    f"{' …' if len(erased) > 60 else ''}</p>")
    timings = report.get("timings") or {}
    if timings:
        body.append("<h2>Time</h2>")
        body.append(_table(["stage", "seconds"], [[k, f"{v:.2f}"] for k, v in timings.items()]))
    body.append("<h2>Report (JSON)</h2><details><summary>show</summary><pre>"
                + _e(json.dumps(report, indent=1, default=str)) + "</pre></details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
