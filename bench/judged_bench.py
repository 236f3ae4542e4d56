"""A corpus model pruned several ways and judged by what its outputs mean (shared by the
``calibration_*`` benchmarks that decode a model's output: text, pitch).

A subclass says how to judge a model (:meth:`JudgedBench.judge`, against the original's
reading) and how to feed it; this class prunes it data-free, calibrated, optionally with global
allocation at the calibrated prune's MACs, and side by side with onnxsim 0.8's structured L2 and
calibrated Wanda pruning (and graphprune at the MACs onnxsim reached, with and without data).
MACs and parameters are counted the same way for every output (``vs_onnxsim._cost``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from real_corpus import model_path
from vs_onnxsim import _cost


@contextmanager
def without_softmax_head() -> Iterator[None]:
    """Calibrated prunes as before round 25, without the softmax-head distillation
    (``passes/softmax_head.py``): no head is found. For side-by-side measurement only."""
    from graphprune.calibration import softmax_head

    saved = softmax_head.candidates
    softmax_head.candidates = lambda graph, opset: []
    try:
        yield
    finally:
        softmax_head.candidates = saved


class JudgedBench:
    #: the graph input the calibration samples feed, and the shapes MACs are counted at
    input_name = "x"
    shapes: dict[str, tuple[int, ...]] = {}
    #: also run each calibrated ratio prune without the softmax-head distillation
    ablate_head = False

    def __init__(self, name: str, calib: np.ndarray) -> None:
        import onnx

        self.name, self.calib = name, calib
        self.base = _cost(onnx.load(str(model_path(name))), self.shapes)

    def judge(self, model: Any) -> dict:
        """Figures of ``model`` on the evaluation data (against the original's reading)."""
        raise NotImplementedError

    def row(self, ratio: float, kind: str, model: Any, started: float, **extra: Any) -> dict:
        macs, params = _cost(model, self.shapes)
        row = {"model": self.name, "ratio": ratio, "run": kind,
               "macs_ratio": round(macs / self.base[0], 4), "params_ratio": round(params / self.base[1], 4),
               **self.judge(model), "seconds": round(time.perf_counter() - started, 1), **extra}
        print(json.dumps(row), flush=True)
        return row

    def graphprune(self, level: float, kind: str, calibrated: bool, **options: Any) -> dict:
        import graphprune

        started = time.perf_counter()
        if calibrated:
            options["calibration"] = {self.input_name: self.calib}
        result = graphprune.prune(str(model_path(self.name)), **options)
        report = result.report
        extra: dict = {"verified": bool(report["verification"]["ok"])}
        if "budget" in report:
            extra["allocation"] = report["budget"].get("chosen")
        if calibrated:
            refit = report["calibration"].get("passes", {}).get("RefitPass", {})
            extra.update(criteria=report["calibration"].get("criteria_chosen"),
                         refit_layers=refit.get("layers"), holdout_cosine=report["fidelity"].get("cosine"))
            heads = report["calibration"].get("passes", {}).get("SoftmaxHeadPass", {}).get("heads")
            if heads:
                extra["softmax_head"] = [{k: h.get(k) for k in ("classes", "active_classes", "rows", "lambda",
                                                                "cv_cross_entropy", "written", "seconds")}
                                         for h in heads]
        return self.row(level, kind, result.model, started, **extra)

    def run(self, ratio: float, onnxsim: bool, *, global_allocation: bool = False) -> list[dict]:
        rows = [self.graphprune(ratio, "data-free", False, ratio=ratio),
                self.graphprune(ratio, "calibrated", True, ratio=ratio)]
        if self.ablate_head:
            with without_softmax_head():
                rows.append(self.graphprune(ratio, "calibrated, no softmax head", True, ratio=ratio))
        if global_allocation:  # non-uniform allocation at the uniform prune's MACs, same data
            rows.append(self.graphprune(ratio, "calibrated, global at the same MACs", True,
                                        target_macs=rows[-1]["macs_ratio"]))
        if not onnxsim:
            return rows
        import onnx
        import onnxsim.pruning as pruning

        original = onnx.load(str(model_path(self.name)))
        feeds = [{self.input_name: x} for x in self.calib]
        for kind, call in (
                ("onnxsim l2", lambda: pruning.apply_structured_pruning(original, sparsity=ratio)),
                ("onnxsim wanda", lambda: pruning.apply_structured_wanda_pruning(
                    original, calibration_data=feeds, sparsity=ratio))):
            started = time.perf_counter()
            row = self.row(ratio, kind, call(), started)
            rows.append(row)
            if row["macs_ratio"] < 0.9999:  # graphprune at the same cost, with and without data
                for label, calibrated in (("data-free", False), ("calibrated", True)):
                    rows.append(self.graphprune(ratio, f"{label} at {kind}'s MACs", calibrated,
                                                target_macs=row["macs_ratio"]))
        return rows
