#!/usr/bin/env python3
"""Prune every exported zoo model with graphprune and tabulate the results.

Reads ``bench/cache/manifest.json`` (written by ``bench/export_zoo.py``), and for each entry
with status ``ok`` and each ratio runs, in a subprocess with a timeout::

    res = graphprune.prune(path, ratio=r, criterion="l1")

recording verification (``res.report["verification"]``), the prunable fraction, params and
MACs before/after, pass time and the ORT CPU latency ratio measured with
``graphprune.verify.timing.time_models([orig_path, pruned_model], runs=20, warmup=5)``.

Results go to ``bench/results/zoo.json`` (merged across runs, keyed by entry and ratio) and
the markdown table ``docs/zoo.md`` is regenerated from that file.

Needs a Python where ``graphprune`` is importable (``pip install -e .``)::

    python bench/run_zoo.py                              # all ok entries, ratios 0.3 and 0.5
    python bench/run_zoo.py --only resnet18 --ratios 0.5 --jobs 1
    python bench/run_zoo.py --markdown-only              # rebuild docs/zoo.md from zoo.json

``--jobs`` > 1 runs entries in parallel; latency numbers are only trustworthy with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MANIFEST = HERE / "cache" / "manifest.json"
DEFAULT_RESULTS = HERE / "results" / "zoo.json"
DEFAULT_MD = ROOT / "docs" / "zoo.md"
DEFAULT_RATIOS = (0.3, 0.5)


# --------------------------------------------------------------------------------------
# Worker: one (model file, ratio) in its own process.
# --------------------------------------------------------------------------------------


def _median_seconds(t) -> float:
    """Median from whatever one element of ``time_models`` turns out to be."""
    if isinstance(t, (int, float)):
        return float(t)
    if isinstance(t, dict):
        for key in ("median", "median_s", "median_ms", "p50"):
            if key in t:
                return float(t[key]) / (1000.0 if key.endswith("_ms") else 1.0)
        for key in ("times", "samples", "runs"):
            if key in t:
                return float(statistics.median(t[key]))
    for attr in ("median", "median_s", "p50"):
        if hasattr(t, attr):
            v = getattr(t, attr)
            return float(v() if callable(v) else v)
    if hasattr(t, "median_ms"):
        return float(t.median_ms) / 1000.0
    if isinstance(t, (list, tuple)) and t and all(isinstance(v, (int, float)) for v in t):
        return float(statistics.median(t))
    raise TypeError(f"cannot read a median from {type(t).__name__}: {t!r}"[:300])


def _fallback_time_models(models, runs: int, warmup: int) -> list[float]:
    """Local ORT CPU timing, used only if graphprune.verify.timing is not there yet."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    out = []
    for m in models:
        proto = m if isinstance(m, onnx.ModelProto) else onnx.load(str(m))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(
            proto.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        feeds = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for _ in range(warmup):
            sess.run(None, feeds)
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            ts.append(time.perf_counter() - t0)
        out.append(statistics.median(ts))
    return out


def _jsonable(obj, limit: int = 50_000):
    try:
        text = json.dumps(obj, default=str)
    except (TypeError, ValueError):
        return str(obj)[:limit]
    if len(text) > limit:
        return {"truncated": True, "keys": sorted(obj) if isinstance(obj, dict) else None}
    return json.loads(text)


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def worker_main(
    path: str, ratio: float, result: str, runs: int, warmup: int, latency: bool, save: str
) -> int:
    row: dict = {"status": "failed"}
    try:
        import graphprune

        t0 = time.perf_counter()
        try:
            res = graphprune.prune(path, ratio=ratio, criterion="l1")
        except graphprune.GraphPruneError as exc:
            res = getattr(exc, "result", None)  # VerificationError carries the result
            if res is None:
                row.update(
                    status="error",
                    error_type=type(exc).__name__,
                    error=str(exc)[:4000],
                    wall_prune_s=round(time.perf_counter() - t0, 3),
                )
                Path(result).write_text(json.dumps(row, default=str))
                return 0
            row.update(error_type=type(exc).__name__, error=str(exc)[:4000])
        row["wall_prune_s"] = round(time.perf_counter() - t0, 3)
        rep = res.report
        ver = rep.get("verification") or {}
        row.update(
            status="ok",
            groups=rep.get("groups"),
            unsupported_ops=rep.get("unsupported_ops"),
            valid=bool(ver.get("ok")),
            max_rel_diff=ver.get("max_rel_diff"),
            prunable_fraction=rep.get("prunable_fraction"),
            params_before=rep.get("params_before"),
            params_after=rep.get("params_after"),
            macs_before=rep.get("macs_before"),
            macs_after=rep.get("macs_after"),
            pass_time_s=_get(rep, "timings", "total"),
        )
        try:
            import onnx

            onnx.checker.check_model(res.model, full_check=True)
            row["checker_ok"] = True
        except Exception as exc:  # noqa: BLE001
            row["checker_ok"] = False
            row["checker_error"] = f"{type(exc).__name__}: {exc}"[:1000]
        if save:
            try:
                import onnx

                onnx.save(res.model, save)
                row["saved"] = save
            except Exception as exc:  # noqa: BLE001
                row["save_error"] = f"{type(exc).__name__}: {exc}"[:500]
        if latency:
            try:
                try:
                    from graphprune.verify import timing

                    times = timing.time_models([path, res.model], runs=runs, warmup=warmup)
                    row["latency_source"] = "graphprune.verify.timing.time_models"
                except (ImportError, AttributeError) as exc:
                    times = _fallback_time_models([path, res.model], runs, warmup)
                    row["latency_source"] = f"bench fallback ({type(exc).__name__})"
                t_orig, t_pruned = _median_seconds(times[0]), _median_seconds(times[1])
                row.update(
                    latency_orig_s=t_orig,
                    latency_pruned_s=t_pruned,
                    latency_ratio=t_pruned / t_orig if t_orig else None,
                )
            except Exception as exc:  # noqa: BLE001
                row["latency_error"] = f"{type(exc).__name__}: {exc}"[:1000]
        row["report"] = _jsonable(rep)
    except BaseException as exc:  # noqa: BLE001 - a crash of the library is a result too
        row.update(
            status="crash",
            error_type=type(exc).__name__,
            error=str(exc)[:4000],
            traceback=traceback.format_exc()[-6000:],
        )
    Path(result).write_text(json.dumps(row, default=str))
    return 0


# --------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------


def run_one(entry: dict, path: Path, ratio: float, args, logs: Path) -> dict:
    tag = f"{entry['name']}__r{ratio:g}"
    fd, result = tempfile.mkstemp(prefix=tag, suffix=".json", dir=logs)
    os.close(fd)
    save = ""
    if args.save_dir:
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
        save = str(Path(args.save_dir).resolve() / f"{tag}.onnx")
    cmd = [
        args.python,
        str(Path(__file__).resolve()),
        "--_worker",
        str(path),
        str(ratio),
        result,
        str(args.runs),
        str(args.warmup),
        "1" if args.latency else "0",
        save,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    with open(logs / f"{tag}.log", "w") as log:
        try:
            p = subprocess.run(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.timeout,
                env=env,
                cwd=str(ROOT),
            )
            rc: int | str = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    try:
        row = json.loads(Path(result).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        row = {}
    finally:
        Path(result).unlink(missing_ok=True)
    if not row:
        tail = (logs / f"{tag}.log").read_text(errors="replace")[-1500:]
        if rc == "timeout":
            row = {
                "status": "timeout",
                "error_type": "Timeout",
                "error": f"no result within {args.timeout:.0f} s",
            }
        else:
            row = {
                "status": "crash",
                "error_type": f"exit {rc}",
                "error": f"worker died without a result; log tail: {tail}",
            }
    return {
        "name": entry["name"],
        "model": entry["model"],
        "exporter": entry["exporter"],
        "family": entry.get("family"),
        "ratio": ratio,
        "path": str(path),
        "wall_s": round(wall, 2),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **row,
    }


def load_results(path: Path) -> dict:
    if path.exists():
        data = json.loads(path.read_text())
    else:
        data = {}
    data.setdefault("format", 1)
    data.setdefault("rows", [])
    return data


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _m(v, scale):
    return f"{v / scale:.2f}" if isinstance(v, (int, float)) else "–"


def _f(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) else "–"


def verified_ok(row: dict) -> bool:
    return row.get("status") == "ok" and bool(row.get("valid")) and row.get("checker_ok", True)


def render_markdown(data: dict, summary_ratio: float = 0.5) -> str:
    rows = sorted(data["rows"], key=lambda r: (r["model"], r["exporter"], r["ratio"]))
    env = data.get("env", {})
    lines = [
        "# graphprune benchmark zoo",
        "",
        "Generated by `bench/run_zoo.py` from `bench/results/zoo.json` — do not edit by hand.",
        "Models are exported with random weights by `bench/export_zoo.py` (see `bench/README.md`);",
        "`onnxzoo` rows are the ONNX model-zoo topologies shipped with the `onnx` wheel, with",
        'random weights filled in. Pruning: `graphprune.prune(path, ratio, criterion="l1")`.',
        '*valid* is `report["verification"]["ok"]` (and the pruned model passes',
        "`onnx.checker`); latency ratio is median pruned / median original ORT CPU latency",
        f"(`graphprune.verify.timing.time_models`, runs={data.get('config', {}).get('runs', 20)}, "
        f"warmup={data.get('config', {}).get('warmup', 5)}).",
        "",
    ]
    if env:
        lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    at = [r for r in rows if abs(r["ratio"] - summary_ratio) < 1e-9]
    n_ok = sum(1 for r in at if verified_ok(r))
    lines += [f"**Summary: {n_ok}/{len(at)} entries valid and verified at {summary_ratio:g}.**", ""]
    lines += [
        "| model | exporter | ratio | valid | verified max rel diff | prunable conv-channel "
        "fraction | params before→after (M) | MACs before→after (G) | MAC ratio | "
        "latency ratio | pass time s |",
        "|---|---|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    failures = []
    for r in rows:
        if r.get("status") == "ok":
            valid = "✓" if verified_ok(r) else "✗"
            mb, ma = r.get("macs_before"), r.get("macs_after")
            mac_ratio = (
                ma / mb
                if isinstance(mb, (int, float)) and mb and isinstance(ma, (int, float))
                else None
            )
            lines.append(
                f"| {r['model']} | {r['exporter']} | {r['ratio']:g} | {valid} | "
                f"{_f(r.get('max_rel_diff'), '.2e')} | {_f(r.get('prunable_fraction'), '.2f')} | "
                f"{_m(r.get('params_before'), 1e6)}→{_m(r.get('params_after'), 1e6)} | "
                f"{_m(mb, 1e9)}→{_m(ma, 1e9)} | {_f(mac_ratio, '.2f')} | "
                f"{_f(r.get('latency_ratio'), '.2f')} | {_f(r.get('pass_time_s'), '.2f')} |"
            )
            if not verified_ok(r):
                why = r.get("checker_error") or r.get("error") or "verification failed"
                failures.append((r, why))
        else:
            lines.append(
                f"| {r['model']} | {r['exporter']} | {r['ratio']:g} | "
                f"{r.get('status')}: {r.get('error_type')} | – | – | – | – | – | – | – |"
            )
            failures.append((r, r.get("error", "")))
    if failures:
        lines += ["", "## Failures", ""]
        for r, why in failures:
            first = str(why).strip().splitlines()[0] if str(why).strip() else ""
            first = first.replace("|", "\\|")[:300]
            status = "not verified" if r.get("status") == "ok" else r.get("status")
            lines.append(
                f"- `{r['name']}` @ {r['ratio']:g}: {status} {r.get('error_type') or ''} — {first}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    ap.add_argument(
        "--only", default="", help="comma-separated model names or entry names (model__exporter)"
    )
    ap.add_argument("--exporter", default="", help="comma-separated exporters to keep")
    ap.add_argument("--ratios", default=",".join(str(r) for r in DEFAULT_RATIOS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per (model, ratio)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-latency", dest="latency", action="store_false")
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for the workers (must import graphprune)",
    )
    ap.add_argument("--results", default=str(DEFAULT_RESULTS))
    ap.add_argument("--markdown", default=str(DEFAULT_MD))
    ap.add_argument("--save-dir", default="", help="also save pruned models here (bench/out)")
    ap.add_argument("--fresh", action="store_true", help="drop earlier rows from zoo.json")
    ap.add_argument("--markdown-only", action="store_true")
    ap.add_argument("--_worker", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        path, ratio, result, runs, warmup, lat, save = args._worker
        return worker_main(path, float(ratio), result, int(runs), int(warmup), lat == "1", save)

    results_path = Path(args.results).resolve()
    data = load_results(results_path)
    if args.fresh:
        data["rows"] = []

    if not args.markdown_only:
        manifest_path = Path(args.manifest).resolve()
        if not manifest_path.exists():
            ap.error(f"{manifest_path} not found: run bench/export_zoo.py first")
        manifest = json.loads(manifest_path.read_text())
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        exporters = {s.strip() for s in args.exporter.split(",") if s.strip()}
        entries = [
            e
            for e in manifest["entries"]
            if e.get("status") == "ok"
            and (not only or e["model"] in only or e["name"] in only)
            and (not exporters or e["exporter"] in exporters)
        ]
        if only:
            known = {e["model"] for e in manifest["entries"]} | {
                e["name"] for e in manifest["entries"]
            }
            for name in sorted(only - known):
                print(f"warning: {name} is not in the manifest")
        jobs = [(e, manifest_path.parent / e["path"], r) for e in entries for r in ratios]
        if args.latency and args.jobs > 1:
            print("warning: --jobs > 1 makes the latency ratios noisy")
        check = subprocess.run(
            [args.python, "-c", "import graphprune; graphprune.prune"],
            capture_output=True,
            text=True,
            cwd=str(ROOT),
        )
        if check.returncode != 0:
            print(
                f"warning: graphprune.prune is not importable with {args.python}: "
                f"{check.stderr.strip().splitlines()[-1:]} (rows will record the crash)"
            )
        data["env"] = {"python": platform.python_version(), **_versions(args.python)}
        data["config"] = {
            "ratios": ratios,
            "runs": args.runs,
            "warmup": args.warmup,
            "criterion": "l1",
            "timeout_s": args.timeout,
            "jobs": args.jobs,
            "manifest": str(manifest_path),
        }
        logs = results_path.parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        lock = threading.Lock()
        by_key = {(r["name"], r["ratio"]): r for r in data["rows"]}
        done = [0]
        print(
            f"{len(jobs)} runs ({len(entries)} entries x {ratios}), {args.jobs} job(s)", flush=True
        )

        def task(job):
            e, path, r = job
            row = run_one(e, path, r, args, logs)
            with lock:
                by_key[(row["name"], row["ratio"])] = row
                data["rows"] = sorted(by_key.values(), key=lambda x: (x["name"], x["ratio"]))
                save_json(results_path, data)
                done[0] += 1
            if row.get("status") == "ok":
                msg = (
                    f"valid={row.get('valid')} rel={_f(row.get('max_rel_diff'), '.1e')} "
                    f"prunable={_f(row.get('prunable_fraction'), '.2f')} "
                    f"params {_m(row.get('params_before'), 1e6)}->"
                    f"{_m(row.get('params_after'), 1e6)}M "
                    f"lat={_f(row.get('latency_ratio'), '.2f')} "
                    f"pass={_f(row.get('pass_time_s'), '.1f')}s"
                )
            else:
                msg = (
                    f"{row.get('status')} {row.get('error_type')}: "
                    f"{str(row.get('error', '')).strip()[:200]}"
                )
            print(f"[{done[0]}/{len(jobs)}] {row['name']} r={r:g}: {msg}", flush=True)

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(task, jobs))
        save_json(results_path, data)

    md = render_markdown(data)
    md_path = Path(args.markdown).resolve()
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    summary = next(line for line in md.splitlines() if line.startswith("**Summary"))
    print(summary.strip("*"))
    print(f"wrote {results_path} and {md_path}")
    return 0


def _versions(python: str) -> dict:
    code = (
        "import json,importlib\nv={}\n"
        "for m in ['graphprune','onnx','onnxruntime','numpy']:\n"
        "    try: v[m]=importlib.import_module(m).__version__\n"
        "    except Exception as e: v[m]='missing'\n"
        "print(json.dumps(v))"
    )
    try:
        p = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT)
        )
        return json.loads(p.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001
        return {}


if __name__ == "__main__":
    sys.exit(main())
