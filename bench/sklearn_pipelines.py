"""scikit-learn pipelines through skl2onnx: a projection read by a linear model or an SVM.

``StandardScaler + PCA + LogisticRegression / SVC / Ridge`` export as ``Scaler``, ``Sub``,
``MatMul`` (the components) and an ONNX-ML model (``LinearClassifier``, ``SVMClassifier``,
``LinearRegressor``) that holds its coefficients or support vectors in attributes. Until round
61 those ops had no rule: the components were frozen and nothing was pruned. Each pipeline is
trained here on a scikit-learn data set (a fixed split: training rows, the first 600 of them as
calibration, and test rows no run saw), pruned data-free and with calibration at ratios 0.3
and 0.5, and judged on the test rows (accuracy or R^2, and agreement with the original's
predictions); onnxsim 0.8's L2 and Wanda pruning beside it where onnxsim is installed.

Run in the benchmark environment (scikit-learn, skl2onnx): ``python bench/sklearn_pipelines.py``;
results in ``bench/results/sklearn_pipelines.json``, table in ``docs/calibration.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sklearn_pipelines.json"
RATIOS = (0.3, 0.5)


def pipelines() -> list[tuple[str, object, str]]:
    """(name, unfitted pipeline, data set)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    def pca(n: int, model: object) -> object:
        return make_pipeline(StandardScaler(), PCA(n, random_state=0), model)

    return [
        ("digits PCA(30) + LogisticRegression", pca(30, LogisticRegression(max_iter=2000)), "digits"),
        ("digits PCA(30) + SVC (RBF)", pca(30, SVC(random_state=0)), "digits"),
        ("digits PCA(30) + SVC (linear)", pca(30, SVC(kernel="linear", random_state=0)), "digits"),
        ("wine PCA(10) + LogisticRegression", pca(10, LogisticRegression(max_iter=2000)), "wine"),
        ("diabetes PCA(8) + Ridge", pca(8, Ridge()), "diabetes"),
    ]


def dataset(name: str) -> tuple[np.ndarray, np.ndarray, bool]:
    from sklearn import datasets

    loader = {"digits": datasets.load_digits, "wine": datasets.load_wine, "diabetes": datasets.load_diabetes}[name]
    x, y = loader(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order].astype(np.float32), y[order], name != "diabetes"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import onnxruntime as ort
    from skl2onnx import to_onnx

    import graphprune
    from graphprune.verify.metrics import count_params

    try:
        import onnxsim.pruning as osim
    except ImportError:
        osim = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, pipeline, data in pipelines():
            x, y, classify = dataset(data)
            train = int(0.7 * len(x))
            pipeline.fit(x[:train], y[:train])
            options = {"zipmap": False} if classify else {}
            model = to_onnx(pipeline, x[:1], options={id(pipeline.steps[-1][1]): options} if options else None)
            path = Path(tmp) / "model.onnx"
            path.write_bytes(model.SerializeToString())
            calib = Path(tmp) / "calib.npz"
            np.savez(calib, **{model.graph.input[0].name: x[: min(train, 600), None]})
            test_x, test_y = x[train:], y[train:]

            def predict(m: object, test_x: np.ndarray = test_x) -> np.ndarray:
                sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                out = sess.run(None, {sess.get_inputs()[0].name: test_x})[0]
                return np.asarray(out).reshape(len(test_x), -1)[:, 0]

            reference = predict(model)

            def judge(run: str, ratio: float, m: object, seconds: float, name: str = name, test_y: np.ndarray = test_y,
                      reference: np.ndarray = reference, base: int = count_params(model), classify: bool = classify,
                      **extra: object) -> None:
                p = predict(m)
                if classify:
                    score = {"accuracy": round(float((p == test_y).mean()), 4),
                             "agreement": round(float((p == reference).mean()), 4)}
                else:
                    r2 = 1 - float(np.sum((p - test_y) ** 2) / np.sum((test_y - test_y.mean()) ** 2))
                    r2_orig = 1 - float(np.sum((p - reference) ** 2) / np.sum((reference - reference.mean()) ** 2))
                    score = {"r2": round(r2, 4), "r2_vs_original": round(r2_orig, 4)}
                row = {"pipeline": name, "run": run, "ratio": ratio, "params_ratio": round(count_params(m) / base, 4),
                       **score, "seconds": round(seconds, 2), **extra}
                print(json.dumps(row), flush=True)
                rows.append(row)

            judge("original", 0.0, model, 0.0)
            for ratio in RATIOS:
                for run, kwargs in (("graphprune data-free", {}), ("graphprune calibrated", {"calibration": str(calib)})):
                    started = time.perf_counter()
                    result = graphprune.prune(str(path), ratio=ratio, **kwargs)
                    judge(run, ratio, result.model, time.perf_counter() - started,
                          verified=bool(result.report["verification"]["ok"]))
                if osim is not None:
                    feeds = [{model.graph.input[0].name: x[i: i + 1]} for i in range(min(train, 600))]
                    for run, function, extra in (("onnxsim l2", osim.apply_structured_pruning, {}),
                                                 ("onnxsim wanda", osim.apply_structured_wanda_pruning,
                                                  {"calibration_data": feeds})):
                        started = time.perf_counter()
                        try:
                            pruned = function(model, sparsity=ratio, **extra)
                        except Exception as exc:  # noqa: BLE001 - said in the row
                            rows.append({"pipeline": name, "run": run, "ratio": ratio, "error": str(exc)[:200]})
                            continue
                        judge(run, ratio, pruned, time.perf_counter() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
