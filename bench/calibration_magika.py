#!/usr/bin/env python3
"""Google's Magika file-type classifier (a trained third-party model) on real files.

Magika ``standard_v3_3`` (shipped in the ``magika`` wheel; JAX -> jax2tf -> tf2onnx): the
first and last 1,024 bytes of a file (whitespace stripped, padded with token 256) -> one of
214 content types. The data are the files of this machine (the Python installation,
``/usr/share``, ``/usr/include``, ``/usr/bin``, ``/etc``): at most PER_TYPE files per file
extension, chosen by a hash of the path, split into calibration and evaluation files that
never overlap. Fidelity is the top-1 agreement with the unpruned model's label on the
evaluation files (the model's own answer is the reference; the files carry no ground truth).

Runs at two levels each: graphprune data-free and calibrated (``ratio``; the default refit and
the statistics correction, each followed by the softmax-head distillation; with
``--ablate-head`` also without it, as before round 25), onnxsim 0.8's L2
and calibrated Wanda at the same sparsity, and graphprune at the MACs onnxsim reached.
MACs and parameters by one counter (``bench/vs_onnxsim._cost``).

    .venv-bench/bin/python bench/calibration_magika.py     # needs onnxsim==0.8.1; ~5 min
    python bench/calibration_magika.py --no-onnxsim         # graphprune rows only

Results: ``bench/results/calibration_magika.json``; table in ``docs/calibration.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
from judged_bench import without_softmax_head  # noqa: E402
from real_corpus import fetch, model_path  # noqa: E402
from vs_onnxsim import _cost  # noqa: E402

NAME = "magika_v3_3"
ROOTS = (sys.base_prefix + "/lib", "/usr/share", "/usr/include", "/usr/bin", "/etc", "/usr/lib")
PER_TYPE = 12
MAX_SCAN = 400_000
CALIBRATION = 256
BEG = END = 1024
BLOCK = 4096
PADDING = 256
LEVELS = (0.3, 0.5)


def features(path: Path) -> np.ndarray | None:
    """Magika's v2 features: the first ``BEG`` bytes of the first block, left-stripped,
    padded at the end; the last ``END`` bytes of the last block, right-stripped, padded at
    the start (as ``magika.Magika._extract_features_from_seekable`` documents)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(min(BLOCK, size))
            handle.seek(max(0, size - BLOCK))
            tail = handle.read(min(BLOCK, size))
    except OSError:
        return None
    beg = list(head.lstrip()[:BEG])
    end = list(tail.rstrip()[-END:]) if tail.rstrip() else []
    row = beg + [PADDING] * (BEG - len(beg)) + [PADDING] * (END - len(end)) + end
    return np.asarray(row, dtype=np.int32)


def file_corpus() -> list[Path]:
    """At most PER_TYPE regular files of at least 8 bytes per extension, by path hash."""
    by_type: dict[str, list[tuple[str, Path]]] = {}
    seen = 0
    for root in ROOTS:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                seen += 1
                if seen > MAX_SCAN or path.is_symlink():
                    continue
                try:
                    if not path.is_file() or path.stat().st_size < 8:
                        continue
                except OSError:
                    continue
                key = hashlib.sha256(str(path).encode()).hexdigest()
                by_type.setdefault(path.suffix.lower(), []).append((key, path))
    chosen = []
    for _, paths in sorted(by_type.items()):
        chosen += [p for _, p in sorted(paths)[:PER_TYPE]]
    return sorted(chosen, key=lambda p: hashlib.sha256(str(p).encode()).hexdigest())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-onnxsim", action="store_true", help="graphprune rows only")
    parser.add_argument("--ablate-head", action="store_true",
                        help="also run the calibrated prunes without the softmax-head distillation (round 25)")
    parser.add_argument("--out", default=str(HERE / "results" / "calibration_magika.json"))
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort

    import graphprune

    fetch([NAME])
    path = str(model_path(NAME))
    original = onnx.load(path)
    files = file_corpus()
    rows_in = [(p, features(p)) for p in files]
    data = np.stack([f for _, f in rows_in if f is not None])
    calib, held = data[:CALIBRATION], data[CALIBRATION:]
    feeds = [{"bytes": calib[i : i + 1]} for i in range(len(calib))]
    shapes = {"bytes": (1, BEG + END)}
    base = _cost(original, shapes)

    def labels(model) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"bytes": held[i : i + 256]})[0].argmax(1)
                               for i in range(0, len(held), 256)])

    reference = labels(original)
    rows: list[dict] = []
    print(json.dumps({"files": len(data), "calibration": len(calib), "evaluation": len(held),
                      "types_by_extension": len({p.suffix.lower() for p in files}),
                      "labels_of_the_original": len(set(reference.tolist())),
                      "most_common": Counter(reference.tolist()).most_common(3)}), flush=True)

    def judge(run: str, level: float, model, started: float, **extra) -> dict:
        macs, params = _cost(model, shapes)
        row = {"run": run, "level": level, "macs_ratio": round(macs / base[0], 4),
               "params_ratio": round(params / base[1], 4),
               "top1_agreement": round(float((labels(model) == reference).mean()), 4),
               "seconds": round(time.perf_counter() - started, 1), **extra}
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    def ours(run: str, level: float, **options) -> dict:
        started = time.perf_counter()
        result = graphprune.prune(path, **options)
        return judge(run, level, result.model, started,
                     verified=bool(result.report["verification"]["ok"]),
                     criterion=result.report.get("criterion") or (result.report.get("calibration") or {}).get("criterion"))

    for level in LEVELS:
        ours("graphprune data-free, ratio", level, ratio=level)
        ours("graphprune calibrated, ratio", level, ratio=level, calibration=feeds)
        ours("graphprune calibrated, ratio, reconstruction=stats", level, ratio=level, calibration=feeds,
             reconstruction="stats")
        if args.ablate_head:
            with without_softmax_head():
                ours("graphprune calibrated, ratio, no softmax head", level, ratio=level, calibration=feeds)
                ours("graphprune calibrated, ratio, reconstruction=stats, no softmax head", level, ratio=level,
                     calibration=feeds, reconstruction="stats")
        if args.no_onnxsim:
            continue
        import onnxsim.pruning as pruning

        for run, function, extra in (("onnxsim l2", pruning.apply_structured_pruning, {}),
                                     ("onnxsim wanda", pruning.apply_structured_wanda_pruning,
                                      {"calibration_data": feeds})):
            started = time.perf_counter()
            row = judge(run, level, function(original, sparsity=level, **extra), started)
            if row["macs_ratio"] < 0.999:
                ours(f"graphprune data-free at {run}'s MACs", level, target_macs=row["macs_ratio"])
                ours(f"graphprune calibrated at {run}'s MACs", level, target_macs=row["macs_ratio"],
                     calibration=feeds)
    Path(args.out).write_text(json.dumps({"model": NAME, "files": len(data), "calibration": len(calib),
                                          "evaluation": len(held), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
