"""A product of two activations summed over their channels (``A @ B^T`` of two biased
projections: trueocr's reading-order head, SAGAN-style attention, biaffine scorers).

Removing channel k drops ``A[:, k] * B[:, k]`` from the sum. The zeroed original zeroed the
projections' weights but kept their biases, so channel k still added ``b1[k] * b2[k]`` there, and
every prune exited 3 ("max relative difference 0.051"): a false alarm. The rule for ``MatMul``
now has the reference zero the left operand on the summed axis, and lossless mode removes only a
channel that is exactly 0 there (a channel that is only constant is not dead in such a sum)."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphprune


def _bilinear(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a0"]), helper.make_node("Add", ["a0", "b1"], ["a"]),
             helper.make_node("MatMul", ["x", "w2"], ["c0"]), helper.make_node("Add", ["c0", "b2"], ["c"]),
             helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["a", "ct"], ["y"])]
    graph = helper.make_graph(nodes, "bilinear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32),
            rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal(32).astype(np.float32))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_a_prune_of_the_summed_channels_verifies():
    result = graphprune.prune(_bilinear(*_weights()), ratio=0.5)
    assert result.report["verification"]["ok"]
    assert result.report["groups"]["pruned"] == 1


def test_lossless_keeps_a_channel_whose_bias_still_counts_in_the_sum():
    w1, b1, w2, b2 = _weights(1)
    w1[:, 3] = w2[:, 3] = 0.0  # channel 3: constant b1[3] * b2[3] in every entry of the sum
    w1[:, 5] = w2[:, 5] = 0.0
    b1[5] = b2[5] = 0.0  # channel 5: exactly 0 on both sides, dead
    model = _bilinear(w1, b1, w2, b2)
    result = graphprune.prune(model, lossless=True)
    assert result.report["verification"]["ok"]
    kept = next(t for t in result.model.graph.initializer if t.name == "w1").dims[1]
    assert kept >= 31  # channel 5 at most: channel 3 adds b1[3] * b2[3] to every entry
    x = np.random.default_rng(2).standard_normal((1, 10, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(model, x), rtol=1e-5, atol=1e-5)
