#!/usr/bin/env python3
"""Lossless pruning on the zoo with planted zeros, and depth pruning of ResNet-50.

For each exported zoo model (``bench/cache/manifest.json``, status ``ok``), in a subprocess
with a timeout:

1. ``planted, record = graphprune.testing.plant_zeros(path, groups=G, units=U, branches=B)``
   zeroes what a group-sparse optimiser leaves: in a fraction ``G`` of the exact prunable
   channel groups, a fraction ``U`` of the units lose their producer weights and biases and
   their BN scale and shift; ``B`` residual blocks get their whole branch zeroed.
2. ``res = graphprune.pipeline.lossless.prune_lossless(planted)`` (verification against the planted
   model on random inputs, tolerance 1e-5 relative).
3. ``record.measure(res.model)``: planted units still present (all-zero producer slices left)
   and planted branches still present.

Depth pruning: ``graphprune.pipeline.depth.erase_blocks(resnet50, 4)`` (verified against the
original with the erased branches zeroed) and the ORT CPU latency ratio from
``graphprune.verify.timing.time_models([original, pruned])``.

Results go to ``bench/results/lossless.json``; ``docs/lossless.md`` is regenerated from it::

    python bench/lossless_zoo.py                         # every ok entry + depth pruning
    python bench/lossless_zoo.py --only resnet18,densenet121 --no-depth
    python bench/lossless_zoo.py --depth-only
    python bench/lossless_zoo.py --markdown-only
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MANIFEST = HERE / "cache" / "manifest.json"
DEFAULT_RESULTS = HERE / "results" / "lossless.json"
DEFAULT_MD = ROOT / "docs" / "lossless.md"
DEPTH_MODELS = ("resnet50__torchscript", "resnet50__dynamo")


# --------------------------------------------------------------------------------------
# workers (run in a subprocess)
# --------------------------------------------------------------------------------------
def lossless_worker(path: str, groups: float, units: float, branches: int, seed: int) -> dict:
    from graphprune.errors import VerificationError
    from graphprune.pipeline.lossless import prune_lossless
    from graphprune.testing import plant_zeros

    t0 = time.perf_counter()
    planted, record = plant_zeros(path, groups=groups, units=units, branches=branches, seed=seed)
    t1 = time.perf_counter()
    row: dict = {"plant_seconds": round(t1 - t0, 2)}
    try:
        res = prune_lossless(planted)
        ok = True
    except VerificationError as exc:
        res = getattr(exc, "result", None)
        ok = False
        row["error"] = str(exc)[:300]
        if res is None:
            raise
    report = res.report
    row.update(record.measure(res.model))
    row.update(
        ok=ok,
        seconds=round(time.perf_counter() - t1, 2),
        planted_groups=len(record.groups),
        max_rel_diff=report["verification"].get("max_rel_diff"),
        params_before=report["params_before"],
        params_after=report["params_after"],
        macs_before=report["macs_before"],
        macs_after=report["macs_after"],
        nodes_before=report["nodes_before"],
        nodes_after=report["nodes_after"],
        rounds=len(report["lossless"]["rounds"]),
        constants_folded=report["lossless"]["constants_folded"],
        units_removed_total=report["channels"]["removed"],
        skipped_groups=report["lossless"]["skipped_groups"][:5],
    )
    return row


def depth_worker(path: str, blocks: int, runs: int, warmup: int) -> dict:
    from graphprune.pipeline.depth import erase_blocks
    from graphprune.verify.timing import time_models

    t0 = time.perf_counter()
    res = erase_blocks(path, blocks)
    seconds = time.perf_counter() - t0
    report = res.report
    depth = report["depth"]
    timing = time_models([path, res.model], runs=runs, warmup=warmup)
    erased = [b for b in depth["blocks"] if b["erased"]]
    return {
        "ok": bool(report["verification"].get("ok")),
        "seconds": round(seconds, 2),
        "blocks_found": depth["blocks_found"],
        "blocks_erased": [
            {"add": b["add"], "score": round(b["score"], 4), "nodes": b["num_nodes"]}
            for b in erased
        ],
        "score_range": [
            round(min(b["score"] for b in depth["blocks"]), 4),
            round(max(b["score"] for b in depth["blocks"]), 4),
        ],
        "max_rel_diff_vs_zeroed": report["verification"].get("max_rel_diff"),
        "max_rel_diff_vs_original": depth.get("max_rel_diff_vs_original"),
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "macs_before": report["macs_before"],
        "macs_after": report["macs_after"],
        "nodes_before": report["nodes_before"],
        "nodes_after": report["nodes_after"],
        "latency_ms_original": round(timing[0].median_ms, 3),
        "latency_ms_pruned": round(timing[1].median_ms, 3),
        "latency_ratio": round(timing[1].median_ms / timing[0].median_ms, 4),
        "timing_runs": runs,
    }


def worker_main(args: argparse.Namespace) -> int:
    try:
        if args.worker == "lossless":
            row = lossless_worker(args.path, args.groups, args.units, args.branches, args.seed)
        else:
            row = depth_worker(args.path, args.blocks, args.runs, args.warmup)
    except Exception as exc:  # one model failing must not stop the table
        row = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:500],
            "traceback": traceback.format_exc()[-3000:],
        }
    Path(args.out).write_text(json.dumps(row, default=float))
    return 0


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------
def run_sub(kind: str, name: str, path: Path, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            kind,
            "--path",
            str(path),
            "--out",
            str(out),
            "--groups",
            str(args.groups),
            "--units",
            str(args.units),
            "--branches",
            str(args.branches),
            "--seed",
            str(args.seed),
            "--blocks",
            str(args.blocks),
            "--runs",
            str(args.runs),
            "--warmup",
            str(args.warmup),
        ]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"entry": name, "ok": False, "error": f"timeout after {args.timeout} s"}
        if not out.exists():
            return {
                "entry": name,
                "ok": False,
                "error": f"worker exited {p.returncode}: {p.stderr[-500:]}",
            }
        row = json.loads(out.read_text())
        row["entry"] = name
        row["wall_seconds"] = round(time.perf_counter() - t0, 2)
        return row


def load(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"lossless": {}, "depth": {}}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=float))


def _pct(a: float, b: float) -> str:
    return f"{100.0 * a / b:.1f} %" if b else "—"


def _m(v: int | None) -> str:
    return "—" if v is None else f"{v / 1e6:.2f}"


def _e(v: float | None) -> str:
    return "—" if v is None else f"{v:.1e}"


def render_markdown(data: dict) -> str:
    meta = data.get("meta", {})
    rows = [data["lossless"][k] for k in sorted(data["lossless"])]
    lines = [
        "# Lossless pruning and depth pruning",
        "",
        "Generated by `python bench/lossless_zoo.py` from `bench/results/lossless.json`; do not edit by hand.",
        "",
        "## Lossless mode on the zoo with planted zeros",
        "",
        "Each model gets zeros planted as a group-sparse optimiser leaves them "
        f"(`graphprune.testing.plant_zeros(path, groups={meta.get('groups')}, units={meta.get('units')}, "
        f"branches={meta.get('branches')}, seed={meta.get('seed')})`): in "
        "a fraction of the exact prunable channel groups, a fraction of the units lose their "
        "producer weights and biases and their BN scale and shift, and whole residual branches "
        "are zeroed. Then `graphprune.pipeline.lossless.prune_lossless(planted)` (the API's `lossless=True`, "
        "the CLI's `--lossless`) removes what it can prove is zero-invariant and verifies the result "
        "against the planted model on random inputs (tolerance 1e-5 relative).",
        "",
        "*Planted units removed* counts the planted units whose producer slices are gone from the "
        "output; *branches removed* counts planted residual branches whose Add and producers are gone.",
        "",
        "| model | planted units | removed | fraction | planted branches | removed | max rel diff | params M before → after | nodes before → after | rounds | time s | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|",
    ]
    tot_p = tot_r = tot_bp = tot_br = 0
    worst = 0.0
    failed = []
    for r in rows:
        if "planted_units" not in r:
            failed.append(r)
            lines.append(
                f"| {r['entry']} | | | | | | | | | | | failed: {r.get('error', '')[:80]} |"
            )
            continue
        tot_p += r["planted_units"]
        tot_r += r["removed_units"]
        tot_bp += r["planted_branches"]
        tot_br += r["removed_branches"]
        if r.get("max_rel_diff") is not None:
            worst = max(worst, r["max_rel_diff"])
        status = "ok" if r.get("ok") else f"FAILED {r.get('error', '')[:60]}"
        lines.append(
            f"| {r['entry']} | {r['planted_units']} | {r['removed_units']} | "
            f"{_pct(r['removed_units'], r['planted_units'])} | {r['planted_branches']} | "
            f"{r['removed_branches']} | {_e(r.get('max_rel_diff'))} | "
            f"{_m(r['params_before'])} → {_m(r['params_after'])} | {r['nodes_before']} → {r['nodes_after']} | "
            f"{r['rounds']} | {r.get('seconds', 0):.1f} | {status} |"
        )
    ok_rows = [r for r in rows if r.get("ok")]
    lines += [
        "",
        f"**Total: {tot_r} / {tot_p} planted units removed ({_pct(tot_r, tot_p)}), "
        f"{tot_br} / {tot_bp} planted branches removed, worst max relative difference {worst:.1e}; "
        f"{len(ok_rows)} / {len(rows)} models verified.**",
        "",
    ]
    lines += [
        "## Depth pruning: erase residual blocks",
        "",
        "`graphprune.pipeline.depth.erase_blocks(model, 4)` (CLI `--erase-blocks 4`) finds every residual "
        "block — an `Add` whose one operand is a branch that starts at the other operand — scores "
        "each branch data-free by an estimate of its output RMS relative to the skip, from its weights "
        "(`graphprune.analysis.blocks.relative_branch_scales`), and erases the 4 lowest (`Add(x, branch) -> x`). "
        "The result is verified by construction: it must equal the original with those branches "
        "multiplied by zero. Latency: `graphprune.verify.timing.time_models([original, pruned], "
        f"runs={meta.get('runs')}, warmup={meta.get('warmup')})`, ONNX Runtime CPU, median of "
        "interleaved runs (a shared 2-CPU machine: expect a few % of noise).",
        "",
        "| model | blocks found | erased (score) | check vs zeroed | change vs original (rel) | params M | MACs G | MACs ratio | nodes | latency ms | latency ratio |",
        "|---|---:|---|---:|---:|---|---|---:|---|---|---:|",
    ]
    for name in sorted(data["depth"]):
        r = data["depth"][name]
        if "blocks_found" not in r:
            lines.append(f"| {name} | | | | | | | | | failed: {r.get('error', '')[:80]} |")
            continue
        erased = ", ".join(f"`{b['add']}` ({b['score']:.3g})" for b in r["blocks_erased"])
        lines.append(
            f"| {name} | {r['blocks_found']} | {erased} | {_e(r['max_rel_diff_vs_zeroed'])} | "
            f"{_e(r['max_rel_diff_vs_original'])} | {_m(r['params_before'])} → {_m(r['params_after'])} | "
            f"{r['macs_before'] / 1e9:.2f} → {r['macs_after'] / 1e9:.2f} | {r['macs_after'] / r['macs_before']:.3f} | "
            f"{r['nodes_before']} → {r['nodes_after']} | "
            f"{r['latency_ms_original']:.1f} → {r['latency_ms_pruned']:.1f} | **{r['latency_ratio']:.3f}** |"
        )
    env = meta.get("env", {})
    lines += [
        "",
        "Scores are the estimated branch output RMS relative to the skip RMS, from unit-RMS "
        "inputs pushed through the whole graph (`graphprune.analysis.blocks.relative_branch_scales`; "
        "lower = erased first); a calibration-data score can be passed as "
        "`erase_blocks(..., scorer=fn)`. The random-weight zoo models have no unimportant "
        "blocks, so *change vs original* is large: depth pruning is meant for trained models "
        "followed by fine-tuning; what is verified is that the erased model is exactly the "
        "original with those branches zeroed.",
        "",
        "## How lossless mode works",
        "",
        "1. **Zero-invariance analysis** (`graphprune/analysis/zero_analysis.py`). Every op rule has a "
        "`zero_output(node, ctx)` that maps per-channel constants on its inputs to its outputs "
        "(`Relu(0) = 0`, `Sigmoid(0) = 0.5`, BN shifts a constant, a Conv output channel whose "
        "read inputs are known is its bias plus their weighted sum, a zero absorbs the other "
        "operand of `Mul`, data movement moves the constants). A non-zero constant read by a "
        "padded Conv is *not* a constant after it (the border sees zeros), so it stays unknown.",
        "2. **Operator erasure** (`passes/erase_operators.py`, `EraseOperatorsPass`). Where a "
        "tensor whose every channel is known meets live data: `Add(x, 0) -> x` (a zero residual "
        "branch disappears), a constant branch becomes a `[C, 1, 1]` operand, other consumers "
        "read `Expand(constant)` (a Conv with no live input becomes its bias), a Split with one "
        "live output becomes a Slice, a Concat input with no channels is dropped; then dead "
        "code is removed, to a fixed point. A second run changes nothing.",
        "3. **Constant folding** (`passes/fold_constants.py`, `FoldConstantsPass`). Units that reach their consumers as a known constant `c` are "
        "folded into the consumers' biases (`b += c * sum(W[:, u])`, exact for unpadded Convs "
        "and Gemm) and become zero units.",
        "4. **Zero-unit removal.** In every exact, unfrozen channel group, the units whose every "
        "consumer reads zero (or has zero weights, or that reach no consumer at all) are removed "
        "with the channel-removal pass. A live tensor is never emptied: a Concat input that "
        "would lose all its channels is dropped from the Concat (`DropConcatInputsPass`), otherwise one unit is kept.",
        "",
        "Steps 2–4 repeat until nothing changes (`graphprune/pipeline/lossless.py`, a thin driver over the pipeline session); the result is checked against the input model "
        "on two random inputs and a relative difference above 1e-5 raises `VerificationError`.",
        "",
        "**Left on purpose** (lossless but not removed): a constant channel (e.g. `Sigmoid(0)`) "
        "read by a padded Conv — folding it exactly would need a position-dependent bias map; "
        "groups that cross a normalisation over the channel axis (LayerNorm, Softmax — inexact) "
        "or are frozen (graph inputs/outputs, unsupported ops); channels contracted between two "
        "activations (attention `MatMul`), where zeroing a producer is not the same as removing.",
        "",
        "## Reproduce",
        "",
        "```sh",
        "python bench/lossless_zoo.py --jobs 2 --no-depth --fresh   # the lossless table",
        "python bench/lossless_zoo.py --depth-only                  # depth pruning + latency (run alone)",
        "python -m pytest tests/test_lossless.py tests/test_property.py -q",
        "```",
        "",
        "## Environment",
        "",
        f"- machine: {env.get('machine', '?')}, {env.get('cpus', '?')} CPUs, Python {env.get('python', '?')}",
        f"- onnx {env.get('onnx', '?')}, onnxruntime {env.get('onnxruntime', '?')}",
        f"- generated {meta.get('updated', '?')}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    ap.add_argument("--results", default=str(DEFAULT_RESULTS))
    ap.add_argument("--markdown", default=str(DEFAULT_MD))
    ap.add_argument("--only", default="", help="comma-separated model or entry names")
    ap.add_argument(
        "--exporter", default="", help="only this exporter (torchscript, dynamo, onnxzoo)"
    )
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--groups", type=float, default=0.3)
    ap.add_argument("--units", type=float, default=0.3)
    ap.add_argument("--branches", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-depth", action="store_true")
    ap.add_argument("--depth-only", action="store_true")
    ap.add_argument("--markdown-only", action="store_true")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--worker", choices=["lossless", "depth"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)

    results = Path(args.results)
    data = {"lossless": {}, "depth": {}} if args.fresh else load(results)
    if not args.markdown_only:
        import onnx
        import onnxruntime

        manifest_path = Path(args.manifest)
        manifest = json.loads(manifest_path.read_text())
        entries = [e for e in manifest["entries"] if e.get("status") == "ok"]
        if args.only:
            wanted = {w.strip() for w in args.only.split(",") if w.strip()}
            entries = [e for e in entries if e["name"] in wanted or e["model"] in wanted]
        if args.exporter:
            entries = [e for e in entries if e["exporter"] == args.exporter]
        data["meta"] = {
            "groups": args.groups,
            "units": args.units,
            "branches": args.branches,
            "seed": args.seed,
            "runs": args.runs,
            "warmup": args.warmup,
            "updated": time.strftime("%Y-%m-%d %H:%M"),
            "env": {
                "machine": platform.machine(),
                "cpus": __import__("os").cpu_count(),
                "python": platform.python_version(),
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
        }
        if not args.depth_only:

            def task(entry: dict) -> None:
                row = run_sub("lossless", entry["name"], manifest_path.parent / entry["path"], args)
                data["lossless"][entry["name"]] = row
                print(
                    f"{entry['name']:45s} {row.get('removed_units', '?')}/{row.get('planted_units', '?')} units, "
                    f"{row.get('removed_branches', '?')}/{row.get('planted_branches', '?')} branches, "
                    f"rel {row.get('max_rel_diff')}, {row.get('wall_seconds')} s {row.get('error', '')[:120]}",
                    flush=True,
                )
                save(results, data)

            with ThreadPoolExecutor(max(1, args.jobs)) as pool:
                list(pool.map(task, entries))
        if not args.no_depth:
            for name in DEPTH_MODELS:
                entry = next((e for e in manifest["entries"] if e["name"] == name), None)
                if entry is None:
                    continue
                row = run_sub("depth", name, manifest_path.parent / entry["path"], args)
                data["depth"][name] = row
                print(
                    f"{name:45s} depth: {json.dumps({k: row.get(k) for k in ('latency_ratio', 'max_rel_diff_vs_zeroed', 'error')})}",
                    flush=True,
                )
                save(results, data)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(render_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
