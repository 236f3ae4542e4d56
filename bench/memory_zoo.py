"""Peak memory of ``graphprune prune --ratio 0.5`` on the model zoo, against the model's size.

Each model is pruned (verification on) by the CLI in a fresh process whose peak RSS
(``ru_maxrss``) is recorded, next to the peak RSS of the same process that only imports
graphprune and ONNX Runtime and loads nothing (the interpreter's own floor). Results:
``bench/results/memory_zoo.json`` and a section of ``docs/large_models.md``.

    python bench/memory_zoo.py                       # every bench/cache/*.onnx (export_zoo.py)
    python bench/memory_zoo.py --only resnet50,vit_b_16
    python bench/memory_zoo.py --stages bench/cache/resnet18__dynamo.onnx   # where it goes

``--stages`` prunes one model in this process and prints the peak RSS of each stage (Linux:
the process's high-water mark ``VmHWM`` is reset at each stage start by writing 5 to
``/proc/self/clear_refs``), the verification split into its ONNX Runtime runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
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


def _status() -> dict[str, int]:
    found = {}
    with open("/proc/self/status") as stream:
        for line in stream:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0]) * 1024
    return found


def stages(model: str, extra: list[str]) -> list[tuple[str, int, int]]:
    """Peak RSS of each stage of ``graphprune prune MODEL`` run in this process:
    ``(stage, peak bytes, bytes at its end)``."""
    import graphprune.cli_commands as commands
    from graphprune.cli import main as cli_main
    from graphprune.io import model_io
    from graphprune.verify import validate

    rows: list[tuple[str, int, int]] = []
    current = ["start"]

    def mark(name: str) -> None:
        status = _status()
        rows.append((current[0], status["VmHWM"], status["VmRSS"]))
        current[0] = name
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")

    class Progress:
        def __init__(self, *_args: object) -> None:
            pass

        def __call__(self, name: str) -> None:
            mark(name)

    def wrapped(function, label):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            name = label(*args, **kwargs) if callable(label) else label
            mark(name)
            try:
                return function(*args, **kwargs)
            finally:
                mark(f"(after {name})")
        return call

    commands._Progress = Progress
    model_io.save_model = wrapped(model_io.save_model, "save")
    validate.run_many = wrapped(validate.run_many, lambda _m, _f, what, *a, **k: f"verify: run {what}")
    out = Path(tempfile.mkdtemp(prefix="memory-zoo-")) / "pruned.onnx"
    mark("cli")
    cli_main(["prune", model, "-o", str(out), "--ratio", "0.5", "-q", *extra])
    mark("end")
    shutil.rmtree(out.parent, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma list of model name prefixes")
    ap.add_argument("--stages", metavar="MODEL", help="per-stage peak RSS of one model")
    args, extra = ap.parse_known_args()
    if args.stages:
        size = _size(Path(args.stages))
        print(f"{'stage':44s} {'peak MiB':>9s} {'end MiB':>8s} {'peak/size':>9s}")
        for name, peak, end in stages(args.stages, extra):
            print(f"{name:44s} {peak / 2**20:9.1f} {end / 2**20:8.1f} {peak / size:9.2f}")
        return
    if extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
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
    if args.only and RESULTS.exists():
        # a partial run replaces its models' rows in the recorded results
        fresh = {r["model"] for r in rows}
        rows = [r for r in json.loads(RESULTS.read_text())["rows"] if r["model"] not in fresh] + rows
        rows.sort(key=lambda r: r["model"])
    summary = summarize(rows, floor)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary))


def summarize(rows: list[dict], floor: int) -> dict:
    ok = [r for r in rows if r["ok"]]
    raw = sorted(r["x_model"] for r in ok)
    return {
        "floor_rss": floor,
        "models": len(rows), "ok": len(ok),
        "median_x_model": statistics.median(raw) if ok else None,
        "quartiles_x_model": [round(q, 2) for q in statistics.quantiles(raw, n=4)] if len(ok) > 1 else None,
        "min_max_x_model": [raw[0], raw[-1]] if ok else None,
        "within_2x": sum(x <= 2 for x in raw),
        "median_x_model_above_floor":
            statistics.median(r["x_model_above_floor"] for r in ok) if ok else None,
        "max_x_model_above_floor": max((r["x_model_above_floor"] for r in ok), default=None),
        "within_2x_above_floor": sum(r["x_model_above_floor"] <= 2 for r in ok),
    }


if __name__ == "__main__":
    main()
