#!/usr/bin/env python3
"""Calibrated pruning of every Hugging Face architecture export: does ``--calibration`` run?

For each export of ``bench/hf_architectures.py`` (``bench/cache/hf_architectures/``, made by
that script; 81 architectures x 2 exporters), in a fresh process::

    graphprune prune M.onnx -o P.onnx --ratio 0.5 --calibration M.npz --report R.json

with ``--samples`` (12) random feeds (token ids in 5..900 with a full attention mask and
sequence 16, or standard-normal pixels / audio / features at the export's shape). The weights
are HF's random initialisation and the feeds random, so the held-out fidelity (3 samples) is
a robustness figure, not a quality one. Recorded per export: exit code, held-out cosine with
and without the reconstruction, layers refit, and whether the refit made the held-out samples
worse (then the model written is the one without it: ``reverted``).

    python bench/hf_architectures.py           # once: the exports
    python bench/calibration_hf.py             # ~6 min on 2 CPU cores
    python bench/calibration_hf.py --only bert,gpt2
    python bench/calibration_hf.py --int4      # the MatMulNBits copies of bench/int4_architectures.py

Results: ``bench/results/calibration_hf.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "hf_architectures"
RESULTS = HERE / "results" / "calibration_hf.json"


def feeds(path: Path, samples: int) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    out = {}
    for i in ort.InferenceSession(str(path)).get_inputs():
        shape = [samples] + [d if isinstance(d, int) else (16 if k else 1) for k, d in enumerate(i.shape)]
        if "int" in i.type:
            out[i.name] = (np.ones(shape, np.int64) if i.name == "attention_mask"
                           else rng.integers(5, 900, shape).astype(np.int64))
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def run_one(path: Path, samples: int, timeout: float, work: Path) -> dict:
    calib, report = work / f"{path.stem}.npz", work / f"{path.stem}.json"
    np.savez(calib, **feeds(path, samples))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(work / "out.onnx"),
                           "--ratio", "0.5", "--calibration", str(calib), "--report", str(report)],
                          capture_output=True, text=True, timeout=timeout)
    row: dict = {"export": path.stem, "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    rep = json.loads(report.read_text())
    fid, passes = rep.get("fidelity", {}), rep.get("calibration", {}).get("passes", {})
    reverted = bool(fid.get("reconstruction_reverted"))  # the model written is the one without
    row.update(cosine=fid.get("cosine"),
               cosine_without=fid.get("cosine") if reverted else (fid.get("without_reconstruction") or {}).get("cosine"),
               cosine_with=(fid.get("with_reconstruction") or {}).get("cosine") if reverted else fid.get("cosine"),
               refit_layers=(passes.get("RefitPass") or {}).get("layers"), warning=bool(fid.get("warning")),
               reverted=reverted, allocation=(rep.get("allocation") or {}).get("mode"),
               allocation_why=(rep.get("allocation") or {}).get("why"))
    final = rep.get("calibration", {}).get("final_refit") or {}
    row["final_refit"] = ("kept" if final.get("kept") else
                          f"{'not kept' if final.get('ran') else 'not run'}: {final.get('why')}" if final else None)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated model types")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--int4", action="store_true",
                    help="the 4-bit MatMulNBits copies that bench/int4_architectures.py made instead "
                         "(results: calibration_hf_int4.json)")
    args = ap.parse_args(argv)
    if args.results is None:
        args.results = RESULTS.with_name("calibration_hf_int4.json") if args.int4 else RESULTS
    only = [o for o in args.only.split(",") if o]
    paths = sorted(p for p in CACHE.glob("*.onnx") if ".pruned" not in p.name and "_sdpa" not in p.name
                   and p.name.endswith(".int4.onnx") == args.int4
                   and (not only or any(p.stem.rsplit("_", 1)[0] == o for o in only)))
    if not paths:
        print(f"no exports in {CACHE}: run bench/hf_architectures.py first", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            row = run_one(path, args.samples, args.timeout, Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
    if only and args.results.exists():  # an --only run replaces its rows and keeps the others
        ran = {r["export"] for r in rows}
        earlier = json.loads(args.results.read_text()).get("rows", [])
        rows = sorted([r for r in earlier if r.get("export") not in ran] + rows, key=lambda r: r["export"])
    done = [r for r in rows if r["rc"] == 0]
    summary = {"exports": len(rows), "ok": len(done),
               "refit_somewhere": sum(1 for r in done if r.get("refit_layers")),
               "warnings": sum(1 for r in done if r.get("warning")),
               "reverted": sum(1 for r in done if r.get("reverted")),
               "final_refit_kept": sum(1 for r in done if r.get("final_refit") == "kept"),
               "failed": {r["export"]: r.get("error", "") for r in rows if r["rc"] != 0}}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/calibration_hf.py" + (" --int4" if args.int4 else "")
    args.results.write_text(json.dumps({"command": command, "samples": args.samples,
                                        "summary": summary, "rows": rows}, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
