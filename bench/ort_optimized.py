#!/usr/bin/env python3
"""The real-model corpus as ONNX Runtime saves it after its graph optimisations.

Many published ONNX files are not an exporter's output but what ONNX Runtime wrote back
(``SessionOptions.optimized_model_filepath``): at the extended level its fused kernels
(``FusedConv``, ``FusedGemm``, ``FusedMatMul``, ...) replace ordinary layers; at the default
level (``ORT_ENABLE_ALL``) also its NCHWc layout for the CPU at hand. This script saves every
cached corpus model (``bench/real_corpus.py --fetch``) through ONNX Runtime at ``--level``,
into ``bench/cache/ort_optimized/``, and prunes the saved file and the original side by side
with ``bench/real_models.py``'s worker (the same independent checks: full ``onnx.checker``, an
ONNX Runtime run on the entry's probe, output shapes; weights counted independently).

    python bench/ort_optimized.py                    # extended level, ratio 0.5
    python bench/ort_optimized.py --only open_nsfw,ppocrv5_det --level all
    python bench/ort_optimized.py --hf 40            # 40 cached Hugging Face exports instead
                                                     # (bench/hf_architectures.py builds them)

Results: ``bench/results/ort_optimized.json`` (``--out``), a table on stdout.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from real_corpus import CORPUS, model_path  # noqa: E402
from real_models import run_one  # noqa: E402

CACHE = HERE / "cache" / "ort_optimized"
OUT = HERE / "results" / "ort_optimized.json"
LEVELS = {"extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL", "basic": "ORT_ENABLE_BASIC"}

SAVE = """
import sys, onnxruntime as ort
options = ort.SessionOptions()
options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, sys.argv[3])
options.optimized_model_filepath = sys.argv[2]
options.log_severity_level = 3
ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
"""


def save_optimised(name: str, level: str) -> tuple[Path | None, str]:
    """The entry's model saved by ONNX Runtime at ``level`` (cached), or why not."""
    target = CACHE / level / f"{name}.onnx"
    if target.exists():
        return target, ""
    target.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", SAVE, str(model_path(name)), str(target), LEVELS[level]],
                          capture_output=True, text=True, timeout=600)
    if done.returncode or not target.exists():
        target.unlink(missing_ok=True)
        return None, (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300]
    return target, ""


def op_counts(path: Path) -> collections.Counter:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                               for n in model.graph.node)


HF_CACHE = HERE / "cache" / "hf_architectures"
PRUNE = """
import json, sys, graphprune
try:
    report = graphprune.prune(sys.argv[1], ratio=float(sys.argv[2])).report
    print(json.dumps({"valid": bool(report["verification"]["ok"]), "params_before": report["params_before"],
                      "params_after": report["params_after"], "normalised": report.get("normalised"),
                      "unsupported_ops": report.get("unsupported_ops")}))
except Exception as exc:
    print(json.dumps({"valid": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}))
"""


def prune_file(path: Path, ratio: float, timeout: int) -> dict:
    """``graphprune.prune`` of a file in a fresh process (its own verification decides ``valid``)."""
    try:
        done = subprocess.run([sys.executable, "-c", PRUNE, str(path), str(ratio)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"valid": False, "error": f"no result within {timeout} s"}
    lines = done.stdout.strip().splitlines()
    row = json.loads(lines[-1]) if lines else {"valid": False, "error": (done.stderr.strip().splitlines()
                                                                         or ["no output"])[-1][:300]}
    if row.get("params_before"):
        row["params_ratio"] = round(row["params_after"] / row["params_before"], 3)
    return row


def run_hf(count: int, seed: int, level: str, timeout: int) -> dict:
    """``count`` cached Hugging Face exports (drawn with ``seed``), each saved by ONNX Runtime
    and pruned at ratio 0.5 beside the export itself."""
    import random

    files = sorted(p for p in HF_CACHE.glob("*.onnx")
                   if not any(k in p.name for k in (".int4", ".pruned", ".int8", ".qdq")))
    rows: dict = {}
    for source in sorted(random.Random(seed).sample(files, min(count, len(files)))):
        target = CACHE / level / "hf" / source.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-c", SAVE, str(source), str(target), LEVELS[level]],
                           capture_output=True, text=True, timeout=600)
        if not target.exists():
            rows[source.stem] = {"saved": False}
            continue
        before, after = op_counts(source), op_counts(target)
        row = {"saved": True, "new_ops": {op: n for op, n in sorted(after.items()) if "::" in op and op not in before},
               "original": prune_file(source, 0.5, timeout), "optimised": prune_file(target, 0.5, timeout)}
        rows[source.stem] = row
        print(f"{source.stem:44s} {json.dumps(row['new_ops'])[:60]:60s} original {row['original'].get('valid')} "
              f"{row['original'].get('params_ratio')}  optimised {row['optimised'].get('valid')} "
              f"{row['optimised'].get('params_ratio')}", flush=True)
    return rows


def _weights_ratio(row: dict) -> float | None:
    before, after = row.get("weights_before"), row.get("weights_after")
    return round(after / before, 3) if before and after is not None else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated entry names")
    parser.add_argument("--level", choices=sorted(LEVELS), default="extended")
    parser.add_argument("--mode", default="r0.5", help="a mode of bench/real_models.py")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--hf", type=int, default=0, help="this many cached Hugging Face exports instead")
    parser.add_argument("--seed", type=int, default=1, help="which Hugging Face exports (--hf)")
    args = parser.parse_args()
    if args.hf:
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        rows = results.setdefault(f"hf_{args.level}", {})
        rows.update(run_hf(args.hf, args.seed, args.level, args.timeout))
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        ok = [r for r in rows.values() if r.get("saved")]
        same = sum(1 for r in ok if (r["optimised"].get("params_ratio") or 1) <= (r["original"].get("params_ratio") or 1) + 0.02)
        print(json.dumps({"level": args.level, "hf_saved": len(ok),
                          "optimised_valid": sum(bool(r["optimised"].get("valid")) for r in ok),
                          "pruned_within_0.02_of_original": same}))
        return 0
    names = args.only.split(",") if args.only else [e.name for e in CORPUS if model_path(e.name).exists()]
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = results.setdefault(args.level, {})
    for name in names:
        path, why = save_optimised(name, args.level)
        row: dict = {"saved": path is not None}
        if path is None:
            row["error"] = why
        else:
            before, after = op_counts(model_path(name)), op_counts(path)
            row["new_ops"] = {op: n for op, n in sorted(after.items()) if "::" in op and op not in before}
            row["nodes"] = [sum(before.values()), sum(after.values())]
            row["original"] = run_one(name, args.mode, args.timeout)
            row["optimised"] = run_one(name, args.mode, args.timeout, path)
        runs[name] = row
        o, p = row.get("original", {}), row.get("optimised", {})
        print(f"{name:34s} {json.dumps(row.get('new_ops', row.get('error')))[:70]:70s} "
              f"original {o.get('valid')} {_weights_ratio(o)}  optimised {p.get('valid')} {_weights_ratio(p)}",
              flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    rows = [r for n, r in runs.items() if n in names and r.get("saved")]
    valid = sum(bool(r["optimised"].get("valid")) for r in rows)
    fused = [r for r in rows if r["new_ops"]]
    close = sum(1 for r in rows if (_weights_ratio(r["optimised"]) or 1) <= (_weights_ratio(r["original"]) or 1) + 0.02)
    print(json.dumps({"level": args.level, "saved": len(rows), "optimised_valid": valid,
                      "with_new_ops": len(fused), "pruned_within_0.02_of_original": close}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
