"""The ridge strength of a refit: chosen by two-fold validation, also for well-determined layers.

A layer with more than CV_RICH_INPUTS inputs and at least ROWS_PER_INPUT rows per input used
to take the default ridge without validation. Its rows are output positions of a few samples,
correlated within a sample, and on a real model (Magika's 960-input convolution) the default
over-fitted: validation chose a 100x stronger ridge and the pruned classifier kept 1-3 points
more of its labels. Such layers now choose from COARSE_GRID (one direct solve per fold and
strength); the full grid stays for the narrower layers.
"""

from __future__ import annotations

import numpy as np

from graphprune.calibration import ridge as ridge_mod
from graphprune.calibration import sequential
from graphprune.calibration.ridge import COARSE_GRID, DEFAULT_RIDGE, Accumulator
from graphprune.calibration.sequential import Reconstructor

INPUTS, OUTPUTS = 600, 4


def _accumulator(rng: np.random.Generator, noise: float, shift: float) -> tuple[Accumulator, np.ndarray]:
    """A rich layer (600 inputs, 4 rows per input) whose targets are the anchor weights plus
    ``shift`` (a real change the fit should make), with ``noise`` in the targets that is
    independent between the folds (what a fit must not learn)."""
    anchor = rng.standard_normal((INPUTS + 1, OUTPUTS)) / np.sqrt(INPUTS)
    moved = anchor + shift * rng.standard_normal(anchor.shape) / np.sqrt(INPUTS)
    acc = Accumulator.empty(1, INPUTS, OUTPUTS)
    for batch in range(8):
        x = rng.standard_normal((INPUTS // 2, 1, INPUTS))
        xt = np.concatenate([x, np.ones((len(x), 1, 1))], axis=2)
        y = np.einsum("rgk,ko->rgo", xt, moved) + noise * rng.standard_normal((len(x), 1, OUTPUTS))
        acc.add(batch % 2, xt, y)
    acc.flush()
    return acc, anchor[None]


def _choose(acc: Accumulator, anchor: np.ndarray) -> tuple[float, bool]:
    """The ridge chosen and whether the fit beats the anchor on held-out rows."""
    reconstructor = Reconstructor.__new__(Reconstructor)
    reconstructor.ridge = None
    scale = [float(np.mean(np.diag(acc.gram.sum(0)[0])[:INPUTS]))]
    return reconstructor._choose_ridge(acc, anchor, scale)


def test_a_rich_layer_is_in_the_rich_regime() -> None:
    acc, _ = _accumulator(np.random.default_rng(0), 0.0, 1.0)
    assert INPUTS > ridge_mod.CV_RICH_INPUTS and acc.rows >= sequential.ROWS_PER_INPUT * INPUTS


def test_noisy_targets_choose_a_strong_ridge() -> None:
    """Targets that are the anchor plus fold-independent noise: the validated choice stays
    near the anchor (the strongest coarse ridge), where the default fitted the noise; and even
    that fit does not beat the anchor on the rows it was not fitted on, so the layer keeps its
    weights."""
    acc, anchor = _accumulator(np.random.default_rng(1), noise=3.0, shift=0.0)
    assert _choose(acc, anchor) == (max(COARSE_GRID), False)


def test_a_real_change_keeps_the_default_ridge() -> None:
    """Noise-free targets far from the anchor: the weakest ridge fits them best."""
    acc, anchor = _accumulator(np.random.default_rng(2), noise=0.0, shift=3.0)
    assert _choose(acc, anchor) == (DEFAULT_RIDGE, True) and DEFAULT_RIDGE == min(COARSE_GRID)


def test_a_given_ridge_is_used_as_given() -> None:
    acc, anchor = _accumulator(np.random.default_rng(3), noise=3.0, shift=0.0)
    reconstructor = Reconstructor.__new__(Reconstructor)
    reconstructor.ridge = 0.5
    assert reconstructor._choose_ridge(acc, anchor, [1.0]) == (0.5, True)  # not validated


def test_a_fit_with_the_bias_held_recovers_the_weights_under_that_bias() -> None:
    """``fit_fixed_bias``: data made by ``y = W x + b0`` with ``b0`` the anchor's bias row gives
    back ``W`` (a free-bias fit on data without a bias column would absorb a mean instead)."""
    from graphprune.calibration.ridge import fit_fixed_bias

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 5)) + 2.0  # not centred: the bias matters
    w, b0 = rng.standard_normal((5, 3)), np.array([0.5, -1.0, 2.0])
    y = x @ w + b0
    xt = np.concatenate([x, np.ones((400, 1))], axis=1)
    anchor = np.concatenate([np.zeros((5, 3)), b0[None]], axis=0)
    solved = fit_fixed_bias(xt.T @ xt, xt.T @ y, anchor, 1e-9)
    np.testing.assert_allclose(solved[:5], w, atol=1e-6)
    np.testing.assert_array_equal(solved[5], b0)


def test_a_refit_that_does_not_generalise_is_not_written() -> None:
    """A random Tanh MLP (64 inputs, 32 hidden) loses half its hidden neurons with 6
    calibration samples (20 rows fitted for a 17-input refit; independent Gaussian inputs, so
    what the removed neurons added, zero-mean, is not predictable from the kept ones). Fitted on
    half the rows, the refit does not beat the current weights on the other half, so the layer
    keeps them: the model equals the same plan without reconstruction, and the report and the
    CLI lines say so. (With 40 samples the same refit is written and helps: 0.628 -> 0.625.)"""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import graphprune
    from graphprune.tables import calibration_lines

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Tanh", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(6)]
    refit = graphprune.prune(model, ratio=0.5, criterion="l2", calibration=feeds)
    plain = graphprune.prune(model, ratio=0.5, criterion="l2", calibration=feeds, reconstruction="none")
    stats = refit.report["calibration"]["passes"]["RefitPass"]
    assert stats["kept_weights"] == stats["layers"] == 1, stats
    assert any("1 kept their weights" in line for line in calibration_lines(refit.report["calibration"]))
    x = rng.standard_normal((4, 64)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_array_equal(run(refit.model), run(plain.model))


def test_layers_reading_one_input_share_its_eigen_decomposition() -> None:
    """Three layers reading one input at the same rows (a transformer's query, key and value
    projections) have equal Grams: the validation decomposes them once, and chooses what it
    chose with a decomposition per layer."""
    from graphprune.calibration.ridge import GramBases, choose_ridge

    rng = np.random.default_rng(4)
    k = 40
    x = [rng.standard_normal((60, 1, k)) for _ in range(4)]
    xt = [np.concatenate([b, np.ones((len(b), 1, 1))], axis=2) for b in x]
    bases = GramBases()
    for layer in range(3):
        anchor = rng.standard_normal((1, k + 1, 6)) / np.sqrt(k)
        moved = anchor[0] + (layer + 1) * 0.2 * rng.standard_normal(anchor[0].shape) / np.sqrt(k)
        acc = Accumulator.empty(1, k, 6)
        for batch, rows in enumerate(xt):
            acc.add(batch % 2, rows, np.einsum("rgk,ko->rgo", rows, moved) + 0.5 * rng.standard_normal((60, 1, 6)))
        acc.flush()
        scale = [float(np.mean(np.diag(acc.gram.sum(0)[0])[:k]))]
        assert choose_ridge(acc, anchor, scale, None, 4, bases) == choose_ridge(acc, anchor, scale, None, 4)
    assert bases.hits == 4  # the second and third layer, each fold
