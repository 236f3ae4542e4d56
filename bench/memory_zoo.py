"""Peak memory of ``graphprune prune --ratio 0.5`` on the model zoo, against the model's size.

Each model is pruned (verification on) by the CLI in a fresh process whose peak RSS
(``ru_maxrss``) is recorded, next to the peak RSS of the same process that only imports
graphprune and ONNX Runtime and loads nothing (the interpreter's own floor). Results:
``bench/results/memory_zoo.json`` and a section of ``docs/large_models.md``.

    python bench/memory_zoo.py                       # every bench/cache/*.onnx (export_zoo.py)
    python bench/memory_zoo.py --only resnet50,vit_b_16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RESULTS = HERE / "results" / "memory_zoo.json"

FLOOR = ("import resource, graphprune.cli, graphprune.pipeline.ratio, onnxruntime;"
         "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def _peak(stdout: str) -> int:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("PEAK_RSS_KIB ")]
    return int(lines[-1].split()[1]) * 1024 if lines else 0


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))


def measure(path: Path, out: Path) -> dict:
    cmd = [sys.executable, str(HERE / "llm_scale.py"), "--measure", "prune", str(path),
           "-o", str(out), "--ratio", "0.5", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    size = _size(path)
    peak = _peak(done.stdout)
    return {"model": path.stem, "bytes": size, "peak_rss": peak,
            "ok": "RC 0" in done.stderr,
            "error": "" if "RC 0" in done.stderr else done.stderr.strip().splitlines()[-2:-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma list of model name prefixes")
    args = ap.parse_args()
    models = sorted(CACHE.glob("*.onnx"))
    if args.only:
        keys = args.only.split(",")
        models = [m for m in models if any(m.stem.startswith(k) for k in keys)]
    floor = _peak(subprocess.run([sys.executable, "-c", FLOOR], capture_output=True, text=True).stdout)
    out_dir = CACHE / "memory_out"
    out_dir.mkdir(exist_ok=True)
    rows = []
    for model in models:
        row = measure(model, out_dir / "pruned.onnx")
        row["x_model"] = round(row["peak_rss"] / row["bytes"], 2)
        row["x_model_above_floor"] = round(max(0, row["peak_rss"] - floor) / row["bytes"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in rows if r["ok"]]
    summary = {
        "floor_rss": floor,
        "models": len(rows), "ok": len(ok),
        "median_x_model": statistics.median(r["x_model"] for r in ok) if ok else None,
        "median_x_model_above_floor":
            statistics.median(r["x_model_above_floor"] for r in ok) if ok else None,
        "max_x_model_above_floor": max((r["x_model_above_floor"] for r in ok), default=None),
        "within_2x_above_floor": sum(r["x_model_above_floor"] <= 2 for r in ok),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
