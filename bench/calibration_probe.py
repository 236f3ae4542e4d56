#!/usr/bin/env python3
"""Calibrated pruning of every real-model corpus entry: does ``--calibration`` run everywhere?

For each entry of ``bench/real_corpus.py`` (fetched into ``bench/cache/real/``), in its own
``nice``d subprocess with a timeout::

    graphprune.prune(path, ratio=0.5, calibration=feeds)

with ``--samples`` (16) feeds made the way the entry is meant to be fed (its probe shapes and
value kinds, random values: ``real_corpus.probe_feeds``). A row records whether the prune
returned and verified, the parameter ratio, the criteria chosen, how many layers the refit
changed and the first reason it gives for a layer it did not refit, and the held-out fidelity.
The corpus ships no real inputs, so the fidelity here is measured on random feeds: a
robustness figure, not a quality one (a text detector sees no text in noise and its output is
~0 everywhere, so its cosine means nothing).

    python bench/calibration_probe.py                    # ~5 min on 2 CPU cores
    python bench/calibration_probe.py --only sklearn_digits_mlp,ppocrv4_rec
    python bench/calibration_probe.py --target-macs 0.6  # the calibrated budget path instead:
                                                         # sensitivity, candidates, search

Results: ``bench/results/calibration_probe.json`` (``calibration_probe_budget.json`` with
``--target-macs``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the checkout's graphprune, whatever is installed
from real_corpus import BY_NAME, CORPUS, model_path, probe_feeds  # noqa: E402

RESULTS = HERE / "results" / "calibration_probe.json"


def worker(name: str, samples: int, target_macs: float | None = None) -> dict:
    import onnx

    import graphprune

    path = model_path(name)
    feeds = probe_feeds(onnx.load(str(path), load_external_data=False), BY_NAME[name].probe, seed=1, count=samples)
    started = time.perf_counter()
    row: dict = {"entry": name}
    try:
        how = {"ratio": 0.5} if target_macs is None else {"target_macs": target_macs}
        report = graphprune.prune(str(path), calibration=feeds, **how).report
    except Exception as exc:  # a GraphPruneError is a clean refusal, anything else a crash
        row.update(ok=False, crash=not isinstance(exc, graphprune.GraphPruneError),
                   error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
        return row
    calibration = report.get("calibration") or {}
    refit = (calibration.get("passes") or {}).get("RefitPass", {})
    fidelity = report.get("fidelity") or {}
    row.update(
        ok=True, verified=bool((report.get("verification") or {}).get("ok")),
        params_ratio=round(report["params_after"] / max(report["params_before"], 1), 3),
        criteria=calibration.get("criteria_chosen"), refit_layers=refit.get("layers", 0),
        not_refit=refit.get("not_refit", 0), first_not_refit=(refit.get("skipped") or [None])[0],
        held_out=fidelity.get("samples"), cosine=fidelity.get("cosine"), top1=fidelity.get("top1_agreement"),
        seconds=round(time.perf_counter() - started, 1),
    )
    budget = report.get("budget")
    if budget:
        row.update(macs_achieved=budget.get("achieved"), met=budget.get("met"), chosen=budget.get("chosen"),
                   candidates=len(budget.get("candidates") or []))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated entry names")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--target-macs", type=float, default=None,
                        help="prune to this MAC fraction (calibrated budget path) instead of ratio 0.5")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    results = RESULTS if args.target_macs is None else RESULTS.with_name("calibration_probe_budget.json")
    if args.worker:
        print("ROW " + json.dumps(worker(args.worker, args.samples, args.target_macs), default=str))
        return 0
    names = [n for n in args.only.split(",") if n] or [e.name for e in CORPUS if model_path(e.name).exists()]
    rows = []
    for name in names:
        cmd = ["nice", "-n", "10", sys.executable, __file__, "--worker", name, "--samples", str(args.samples)]
        if args.target_macs is not None:
            cmd += ["--target-macs", str(args.target_macs)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout).stdout
            found = [line[4:] for line in out.splitlines() if line.startswith("ROW ")]
            row = json.loads(found[-1]) if found else {"entry": name, "ok": False, "crash": True,
                                                       "error": "no result (the worker died)"}
        except subprocess.TimeoutExpired:
            row = {"entry": name, "ok": False, "crash": False, "error": f"timeout {args.timeout} s"}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    if args.only and results.exists():  # a partial run replaces its entries' rows, keeps the others
        fresh = {r["entry"]: r for r in rows}
        kept = [fresh.pop(r["entry"], r) for r in json.loads(results.read_text()).get("rows", [])]
        rows = kept + list(fresh.values())
    ok = sum(bool(r.get("ok") and r.get("verified")) for r in rows)
    summary = {"entries": len(rows), "ok_and_verified": ok, "crashes": sum(bool(r.get("crash")) for r in rows),
               "refit_somewhere": sum(bool(r.get("refit_layers")) for r in rows)}
    if args.target_macs is not None:
        summary["target_met"] = sum(bool(r.get("met")) for r in rows)
    print(json.dumps(summary))
    results.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/calibration_probe.py" + (f" --target-macs {args.target_macs}" if args.target_macs else "")
    results.write_text(json.dumps({"command": command, "samples": args.samples,
                                   "summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
