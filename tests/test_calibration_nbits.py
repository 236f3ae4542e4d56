"""Calibration through ``MatMulNBits`` (4/8-bit weights packed in blocks): the data-aware
criteria read the decoded float weight, and the refit writes its least-squares weights back on
fresh per-block scales and zero points, rounded with error feedback from the input statistics
(graphprune/io/block_quant.py). Checked against ONNX Runtime's own kernel, not against our
decoding alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from test_rule_matmul_nbits import _hand_built, _nbits_mlp, _run

import graphprune
from graphprune.calibration.linear import linear_view
from graphprune.io.block_quant import dequantize_blocks, quantize_blocks


def _views(model: onnx.ModelProto) -> list:
    graph = gs.import_onnx(model)
    return [v for n in graph.nodes if (v := linear_view(n, 17)) is not None], graph


def _first_layer_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The first ``MatMulNBits`` of ``model`` with its output as the graph output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    first = out.graph.node[0]
    del out.graph.node[1:]
    out.graph.output[0].name = first.output[0]
    out.graph.output[0].type.tensor_type.shape.dim[1].dim_value = first.attribute[[a.name for a in first.attribute].index("N")].i
    used = set(first.input)
    keep = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


@pytest.mark.parametrize("build", [
    lambda: _nbits_mlp(4, False), lambda: _nbits_mlp(4, True), lambda: _nbits_mlp(8, False), lambda: _hand_built(),
], ids=["ort-4bit", "ort-4bit-symmetric", "ort-8bit", "flattened-with-bias"])
def test_the_decoded_weight_is_what_onnxruntime_computes(build) -> None:
    model = _first_layer_only(build())
    (view,), _ = _views(model)
    assert view.weight_shape == (view.out_channels(), 64) and view.in_block == 32
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    bias = view.bias_values()
    want = x.astype(np.float64) @ view.matrices()[0].T + (0.0 if bias is None else bias)
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_re_encoded_weight_runs_in_onnxruntime_as_decoded(symmetric: bool) -> None:
    """New float values go back on fresh block scales (symmetric: the default zero point
    kept): the layer then computes what the new decoding says, close to the values given."""
    model = _first_layer_only(_nbits_mlp(4, symmetric))
    (view,), graph = _views(model)
    rng = np.random.default_rng(1)
    values = rng.standard_normal(view.weight_shape) * np.linspace(0.1, 2.0, 64)
    assert view.store(values[None]) == 0.0
    decoded = view.matrices()[0]
    step = np.abs(values).reshape(-1, 2, 32).max(axis=2) / 7  # at most a 4-bit step per block
    assert np.all(np.abs(decoded - values).reshape(-1, 2, 32).max(axis=2) <= step * 0.51 + 1e-6)
    rewritten = gs.export_onnx(graph)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(rewritten, x), x @ decoded.T, rtol=1e-4, atol=1e-4)


def test_a_rejected_store_restores_every_constant() -> None:
    model = _first_layer_only(_hand_built())
    (view,), _ = _views(model)
    before = [np.array(c.values) for c in view.stored.constants()]
    assert len(before) == 3  # packed weight, scales, zero points
    assert view.store(np.zeros((1, *view.weight_shape)), accept=lambda stored: False) is None
    for constant, values in zip(view.stored.constants(), before, strict=True):
        np.testing.assert_array_equal(constant.values, values)


def test_error_feedback_rounds_better_than_nearest_under_correlated_inputs() -> None:
    """The output error ``(w - q)^T H (w - q)`` of 4-bit blocks, with ``H`` the second
    moments of strongly correlated inputs: GPTQ's sweep beats rounding to nearest."""
    rng = np.random.default_rng(2)
    mix = rng.standard_normal((128, 128)) + 3.0 * np.eye(128)
    x = rng.standard_normal((2048, 128)) @ mix
    gram = x.T @ x / len(x)
    w = rng.standard_normal((48, 128))

    def error(gram_used):
        q, scale, zero = quantize_blocks(w, 4, 32, gram=gram_used)
        d = dequantize_blocks(q, scale, zero, 32) - w
        return float(np.einsum("ij,jk,ik->", d, gram, d))

    assert error(gram) < 0.7 * error(None)


@pytest.mark.parametrize("size", [5, 300])
def test_the_error_feedback_factor_is_the_cholesky_factor_of_the_inverse(size: int) -> None:
    """The sweep's factor from one Cholesky and a triangular inverse by halves (300 inputs:
    two levels of halves) equals ``cholesky(inv(H)).T``, upper triangular."""
    from graphprune.io.block_quant import inverse_cholesky_upper

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3 * size, size)) * np.exp(rng.uniform(-2, 2, size))
    h = x.T @ x / len(x) + 1e-3 * np.eye(size)
    u = inverse_cholesky_upper(h)
    assert np.array_equal(u, np.triu(u)) and (np.diag(u) > 0).all()
    expected = np.linalg.cholesky(np.linalg.inv(h)).T
    np.testing.assert_allclose(u, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


def test_a_calibrated_prune_of_a_4bit_mlp_refits_its_packed_layers() -> None:
    """ONNX Runtime's 4-bit MLP loses a block of 32 hidden neurons: with calibration data
    the blocks are chosen from the activations and the second layer is refit and re-packed;
    on held-out inputs the result is nearer the original than the data-free prune."""
    model = _nbits_mlp(4, False)
    rng = np.random.default_rng(3)
    basis = rng.standard_normal((8, 64)).astype(np.float32)  # inputs near an 8-dimensional subspace

    def sample() -> np.ndarray:
        return (rng.standard_normal((4, 8)).astype(np.float32) @ basis
                + 0.1 * rng.standard_normal((4, 64)).astype(np.float32))

    calibration = [{"x": sample()} for _ in range(96)]
    held_out = [sample() for _ in range(16)]
    free = graphprune.prune(model, ratio=0.25, criterion="l1")
    calibrated = graphprune.prune(model, ratio=0.25, calibration=calibration)
    report = calibrated.report["calibration"]
    assert "data-free" not in " ".join(report["criteria_chosen"])
    refit = report["passes"]["RefitPass"]
    assert refit["quantized_layers"] >= 1 and refit["rel_error_after"] < refit["rel_error_before"]
    assert refit.get("kept_weights", 0) == refit["layers"] - refit["quantized_layers"]  # only packed layers here
    onnx.checker.check_model(calibrated.model)
    # the refit's bias goes in an Add after the layer (a MatMulNBits bias input needs ORT 1.19+)
    assert [n.op_type for n in calibrated.model.graph.node] == ["MatMulNBits", "Relu", "MatMulNBits", "Add"]
    assert calibrated.report["params_after"] == free.report["params_after"] + 64  # the bias

    def error(pruned) -> float:
        return float(np.mean([np.linalg.norm(_run(pruned, x) - _run(model, x)) / np.linalg.norm(_run(model, x))
                              for x in held_out]))

    assert error(calibrated.model) < 0.7 * error(free.model)
