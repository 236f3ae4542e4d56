"""An embedding is not class scores. A sentence encoder's mean-pooled ``[1, 384]`` output
(paraphrase-MiniLM-L3) was reported with a ``top1_agreement`` of 0.75: the arg-max of an
embedding names no class. An output computed from a normalisation (LayerNorm, BatchNorm, L2)
with no linear layer after it scores no class; a classifier's head after a LayerNorm does."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.calibration.fidelity import feature_outputs, fidelity


def _encoder(with_head: bool) -> onnx.ModelProto:
    """tokens [1, 6, 8] -> MatMul -> LayerNorm -> mask -> mean pool -> [1, 8]
    (and, ``with_head``, a linear classifier [1, 5] after the pooled vector)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "head"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1),
        helper.make_node("Unsqueeze", ["mask", "axes_last"], ["m3"]),
        helper.make_node("Mul", ["n", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axes"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
    ]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes_last"))
    outputs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 8])]
    if with_head:
        nodes.append(helper.make_node("MatMul", ["pooled", "head"], ["logits"]))
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 6])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 6, 8)).astype(np.float32),
             "mask": np.ones((1, 6), np.float32)} for _ in range(n)]


def _moved(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with its first weight perturbed: a pruned stand-in whose outputs differ."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    w = numpy_helper.to_array(out.graph.initializer[0])
    out.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        (w + 0.5 * np.random.default_rng(2).standard_normal(w.shape)).astype(np.float32), "w"))
    return out


def test_a_pooled_embedding_reports_no_top1_agreement():
    model = _encoder(with_head=False)
    assert feature_outputs(model) == {"pooled"}
    report = fidelity(model, _moved(model), _feeds(8))
    entry = report["outputs"]["pooled"]
    assert "top1_agreement" not in entry and report["top1_agreement"] is None
    assert entry["cosine"] is not None and entry["cosine"] < 1.0


def test_a_classifier_head_after_the_norm_still_scores_classes():
    model = _encoder(with_head=True)
    assert feature_outputs(model) == set()
    report = fidelity(model, _moved(model), _feeds(8))
    assert report["outputs"]["logits"]["top1_agreement"] is not None
    assert report["top1_agreement"] == report["outputs"]["logits"]["top1_agreement"]
