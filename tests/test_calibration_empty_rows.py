"""Calibration samples on which a layer has no rows (a graph without edges, a sequence of
length 0): pymupdf-layout's GNN crashed with ``cannot reshape array of size 0`` under
``--calibration random:16`` where a random graph left an edge layer empty. Such a sample
adds nothing to a layer's statistics and the prune goes on."""

import numpy as np
from conftest import make_model
from onnx import helper

import graphprune


def test_samples_with_no_rows_add_nothing_and_do_not_crash() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = make_model(nodes, {"x": ["n", 8]}, {"y": ["n", 4]},
                       {"w1": rng.standard_normal((8, 32)).astype(np.float32),
                        "w2": rng.standard_normal((32, 4)).astype(np.float32)})
    feeds = [{"x": rng.standard_normal((0 if i % 4 == 1 else 6, 8)).astype(np.float32)} for i in range(16)]
    result = graphprune.prune(model, ratio=0.5, calibration=feeds)
    assert result.report["verification"]["ok"] is True
    without_empty = graphprune.prune(model, ratio=0.5, calibration=[f for f in feeds if len(f["x"])])
    # the empty samples change nothing the fit sees: the same layers refit to the same fidelity
    assert abs(result.report["fidelity"]["cosine"] - without_empty.report["fidelity"]["cosine"]) < 0.05
    assert result.report["fidelity"]["cosine"] > 0.9
