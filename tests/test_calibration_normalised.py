"""Refit rows weighted as a normalisation sees them: a layer whose residual sum feeds a
LayerNorm is fitted to the error after the norm, so outlier positions (a transformer's
large-norm tokens) do not dominate the least squares."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.calibration import residual, runner
from graphprune.calibration.linear import linear_view
from graphprune.pipeline.session import Session

TOKENS, WIDTH, HIDDEN = 6, 8, 32


def block(norm: str = "LayerNormalization", opset: int = 17) -> onnx.ModelProto:
    """``y = norm(x + W2 relu(W1 x + b1) + b2)`` over ``[1, 6, 8]`` tokens."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)
             for name, shape, scale in (("w1", (WIDTH, HIDDEN), 0.5), ("b1", (HIDDEN,), 0.3),
                                        ("w2", (HIDDEN, WIDTH), 0.3), ("b2", (WIDTH,), 0.3))]
    inits.append(numpy_helper.from_array(np.ones(WIDTH, np.float32), "gamma"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["u"], name="up"),
             helper.make_node("Add", ["u", "b1"], ["ub"], name="up_bias"),
             helper.make_node("Relu", ["ub"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["d"], name="down"),
             helper.make_node("Add", ["d", "b2"], ["db"], name="down_bias"),
             helper.make_node("Add", ["db", "x"], ["s"], name="residual"),
             helper.make_node(norm, ["s", "gamma"], ["y"], name="norm", axis=-1)]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def samples() -> np.ndarray:
    """Tokens of unit scale, the first of each sample 30x larger (an outlier token)."""
    data = np.random.default_rng(11).standard_normal((48, 1, TOKENS, WIDTH)).astype(np.float32)
    data[:, :, 0] *= 30.0
    return data


def test_a_sum_read_by_a_layernorm_is_normalised():
    s = Session(block())
    s.analyze()
    down = residual.residual_of(linear_view(next(n for n in s.graph.nodes if n.name == "down"), s.opset), s.opset)
    assert down is not None and down.total == "s" and down.normalised is True
    total = np.array([[1.0, -1.0, 1.0, -1.0], [30.0, -30.0, 30.0, -30.0]])
    np.testing.assert_allclose(down.row_weights(total), [1.0, 1.0 / 900.0])
    down.normalised = False  # RMS: mean square instead of variance
    np.testing.assert_allclose(down.row_weights(total + 1.0), [1.0 / 2.0, 1.0 / 901.0])


def test_a_sum_read_by_something_else_is_not():
    model = block()
    model.graph.node[-1].CopyFrom(helper.make_node("Relu", ["s"], ["y"], name="norm"))
    s = Session(model)
    s.analyze()
    down = residual.residual_of(linear_view(next(n for n in s.graph.nodes if n.name == "down"), s.opset), s.opset)
    assert down is not None and down.normalised is None and down.row_weights(np.ones((2, 4))) is None


def _error_after_norm(weighted: bool, monkeypatch) -> float:
    if not weighted:
        monkeypatch.setattr(residual, "_normalised", lambda *args: None)
    from test_calibration_cache import prune_and_refit

    model, data = block(), samples()
    out, stats = prune_and_refit(model, data, ridge=1e-6)
    assert stats["residual_targets"] == 1
    feeds = [{"x": d} for d in data]
    ref = np.concatenate([v[0] for v in runner.outputs(model, feeds)]).reshape(-1, WIDTH)
    got = np.concatenate([v[0] for v in runner.outputs(out, feeds)]).reshape(-1, WIDTH)
    ordinary = np.arange(len(ref)) % TOKENS != 0
    return float(np.linalg.norm((got - ref)[ordinary]) / np.linalg.norm(ref[ordinary]))


def test_weighted_refit_matches_the_normalised_output_better(monkeypatch):
    """Unweighted, the outlier tokens (900x the squared norm) decide the fit; weighted by the
    norm's 1/variance, the ordinary tokens' output after the LayerNorm is matched better."""
    weighted = _error_after_norm(True, monkeypatch)
    plain = _error_after_norm(False, monkeypatch)
    assert weighted < 0.8 * plain, (weighted, plain)


@pytest.mark.parametrize("op", ["LayerNormalization", "RMSNormalization"])
def test_registry_says_how_a_norm_normalises(op):
    from graphprune.rules import registry

    opset = 23 if op == "RMSNormalization" else 17
    import onnx_graphsurgeon as gs

    node = next(n for n in gs.import_onnx(block(op, opset)).nodes if n.op == op)
    rule = registry.lookup("", op, opset)
    assert rule is not None and rule.normalisation(node) == (-1, op == "LayerNormalization")
    relu = registry.lookup("", "Relu", opset)
    assert relu is not None and relu.normalisation(node) is None
