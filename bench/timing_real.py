#!/usr/bin/env python3
"""Can each model of the real corpus be timed with no sizes given?

For every entry of ``bench/real_corpus.py`` (fetched into ``bench/cache/real/``), in its own
process: does the original run on the guessed feed (batch 1, images 224, sequences 8, integers
0 or 1 — what timing fed before round 32), and does ``graphprune.verify.timing.time_models``
time it now (it feeds a mode switch the value the graph tests for and chooses sizes the model
runs at where the guess does not run)? ``graphprune bench``, ``prune --latency`` and ``--html``
time this way.

    python bench/timing_real.py            # ~5 min on 2 CPU cores

Results: ``bench/results/timing_real.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_corpus import CORPUS, model_path  # noqa: E402

RESULTS = HERE / "results" / "timing_real.json"
WORKER = r"""
import json, sys
import onnxruntime as ort
from graphprune.verify import timing
path, row = sys.argv[1], {}
try:
    session = ort.InferenceSession(path, sess_options=timing._session_options(None),
                                   providers=["CPUExecutionProvider"])
    session.run(None, timing._feeds(timing._specs(session, path), {}, seed=0, batch=1))
    row["guess_runs"] = True
except Exception:
    row["guess_runs"] = False
try:
    (result,) = timing.time_models([path], warmup=1, runs=3)
    row.update(timed=True, median_ms=round(result.median_ms, 3))
except Exception as exc:
    row.update(timed=False, error=(str(exc).splitlines() or [""])[0][:300])
print("ROW " + json.dumps(row))
"""


def main() -> int:
    rows = []
    for entry in CORPUS:
        path = model_path(entry.name)
        if not path.exists():
            continue
        try:
            done = subprocess.run([sys.executable, "-c", WORKER, str(path)], capture_output=True, text=True,
                                  timeout=600, cwd=HERE.parent)
            found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
            row = json.loads(found[-1]) if found else {"timed": False, "error": "the worker died"}
        except subprocess.TimeoutExpired:
            row = {"timed": False, "error": "timeout 600 s"}
        rows.append({"entry": entry.name, **row})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"entries": len(rows), "guess_runs": sum(r.get("guess_runs", False) for r in rows),
               "timed": sum(r["timed"] for r in rows)}
    print(json.dumps(summary))
    RESULTS.write_text(json.dumps({"command": "python bench/timing_real.py", "summary": summary, "rows": rows},
                                  indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
