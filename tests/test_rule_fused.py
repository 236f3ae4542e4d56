"""ONNX Runtime's fused kernels (``graphprune/rules/fused.py``) and local functions
(``graphprune/io/lowering.py``): written as standard ops before the analysis.

Each fused kernel is run by ONNX Runtime itself, before and after the lowering, on the same
inputs; the end-to-end cases take models that ONNX Runtime optimised and saved, and torch
exports with functions, and prune them as far as their plain exports.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model, run_ort
from onnx import helper

import graphprune
from graphprune.io.ir import prepare

OPS_UNDER_TEST = ["com.microsoft::FusedConv", "com.microsoft::FusedGemm", "com.microsoft::FusedMatMul"]
MS = "com.microsoft"


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def _same_after_lowering(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    lowered = prepare(model)
    assert not any(n.domain == MS for n in lowered.graph.node), _ops(lowered)
    onnx.checker.check_model(lowered, full_check=True)
    for want, got in zip(run_ort(model, feeds), run_ort(lowered, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return lowered


@pytest.mark.parametrize(("activation", "params"), [
    ("Relu", []), ("Sigmoid", []), ("Tanh", []), ("LeakyRelu", [0.2]), ("Clip", [-0.5, 0.7]),
    ("HardSigmoid", [0.3, 0.4]),
])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_conv_lowers_to_the_same_function(activation, params, residual):
    inputs = ["x", "W", "B", "z"] if residual else ["x", "W", "B"]
    extra = {"activation_params": params} if params else {}
    node = helper.make_node("FusedConv", inputs, ["y"], name="fc", domain="com.microsoft", activation=activation,
                            kernel_shape=[3, 3], pads=[1, 1, 1, 1], **extra)
    shapes = {"x": [1, 4, 6, 6], "z": [1, 8, 6, 6]} if residual else {"x": [1, 4, 6, 6]}
    model = make_model([node], shapes, {"y": [1, 8, 6, 6]}, {"W": (8, 4, 3, 3), "B": (8,)},
                       extra_opsets={MS: 1}, check=False)
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    lowered = _same_after_lowering(model, feeds)
    assert _ops(lowered)["Conv"] == 1 and _ops(lowered)[activation] == 1
    assert _ops(lowered)["Add"] == int(residual)


@pytest.mark.parametrize(("activation", "attrs"), [
    ("Relu", {}), ("LeakyRelu", {"activation_alpha": 0.1}), ("HardSigmoid", {"activation_alpha": 0.3,
                                                                             "activation_beta": 0.4}),
    ("Elu", {"activation_alpha": 0.7}), ("Tanh", {}),
])
def test_fused_gemm_lowers_to_the_same_function(activation, attrs):
    node = helper.make_node("FusedGemm", ["x", "W", "B"], ["y"], name="fg", domain="com.microsoft", transB=1,
                            alpha=0.5, beta=2.0, activation=activation, **attrs)
    model = make_model([node], {"x": [3, 5]}, {"y": [3, 7]}, {"W": (7, 5), "B": (7,)},
                       extra_opsets={MS: 1}, check=False)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)}
    lowered = _same_after_lowering(model, feeds)
    assert _ops(lowered)["Gemm"] == 1 and _ops(lowered)[activation] == 1


@pytest.mark.parametrize(("trans_a", "trans_b", "alpha"), [(0, 0, 1.0), (0, 1, 0.125), (1, 1, 2.0)])
def test_fused_matmul_lowers_to_the_same_function(trans_a, trans_b, alpha):
    a_shape = [2, 3, 6, 4] if trans_a else [2, 3, 4, 6]
    b_shape = [2, 3, 5, 6] if trans_b else [2, 3, 6, 5]
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], name="fm", domain="com.microsoft", transA=trans_a,
                            transB=trans_b, alpha=alpha)
    model = make_model([node], {"a": a_shape, "b": b_shape}, {"y": [2, 3, 4, 5]}, extra_opsets={MS: 1},
                       check=False)
    rng = np.random.default_rng(2)
    feeds = {"a": rng.standard_normal(a_shape).astype(np.float32),
             "b": rng.standard_normal(b_shape).astype(np.float32)}
    lowered = _same_after_lowering(model, feeds)
    assert _ops(lowered)["Transpose"] == trans_a + trans_b
    assert _ops(lowered)["Mul"] == int(alpha != 1.0)


def test_a_fused_kernel_without_a_standard_form_stays_and_freezes():
    """``transBatchA`` (batch axes transposed) is not lowered: the kernel stays and the
    groups it touches freeze with the reason; the prune still verifies."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="up"),
        helper.make_node("FusedMatMul", ["h", "h2"], ["y"], name="fm", domain="com.microsoft", transBatchA=1),
    ]
    model = make_model(nodes, {"x": [2, 3, 4], "h2": [3, 8, 5]}, {"y": [3, 2, 5]}, {"W": (4, 8)},
                       extra_opsets={MS: 1}, check=False, value_info={"h": [2, 3, 8]})
    analysis = graphprune.analyze(model)
    reasons = [r for g in analysis.groups for r in g.frozen]
    assert any("FusedMatMul 'fm'" in r and "no standard form" in r for r in reasons), reasons
    res = graphprune.prune(model, ratio=0.5)
    assert res.report["verification"]["ok"] and "normalised" not in res.report


def test_a_lowered_classifier_keeps_its_sequence_of_maps_output():
    """ONNX Runtime's saved scikit-learn MLP: FusedGemm layers and a ZipMap output (a
    sequence of maps). The lowering's export kept only tensor types, the prepared model
    declared the output as a tensor of no type, and it no longer ran."""
    from onnx import TensorProto

    nodes = [helper.make_node("FusedGemm", ["x", "W1", "B1"], ["h"], name="fg", domain="com.microsoft",
                              activation="Relu"),
             helper.make_node("Gemm", ["h", "W2", "B2"], ["p"]),
             helper.make_node("ZipMap", ["p"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])]
    model = make_model(nodes, {"x": [1, 8]}, {}, {"W1": (8, 16), "B1": (16,), "W2": (16, 3), "B2": (3,)},
                       extra_opsets={"ai.onnx.ml": 3, MS: 1}, check=False)
    probs = helper.make_tensor_sequence_value_info("probs", TensorProto.FLOAT, None)
    probs.type.sequence_type.elem_type.Clear()
    probs.type.sequence_type.elem_type.map_type.key_type = TensorProto.INT64
    probs.type.sequence_type.elem_type.map_type.value_type.tensor_type.elem_type = TensorProto.FLOAT
    model.graph.output.append(probs)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["normalised"]["lowered_ops"] == {"FusedGemm": 1}
    assert result.report["params_after"] < result.report["params_before"]
    assert result.model.graph.output[0].type.sequence_type.elem_type.map_type.key_type == TensorProto.INT64


# --------------------------------------------------------------------------- saved by ORT
torch = pytest.importorskip("torch")


class _Net(torch.nn.Module):
    """Conv + BN + Relu, a residual Clip, a Sigmoid, an MLP with Gelu, and attention-style
    scaled products: ONNX Runtime fuses them into FusedConv, FusedGemm and FusedMatMul."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.l1, self.l2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 10)
        self.q, self.k = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = x + torch.clamp(self.c2(x), 0, 6)
        x = torch.sigmoid(self.c3(x))
        t = x.flatten(2).transpose(1, 2)  # [N, 64, 32] tokens
        att = torch.softmax(self.q(t) @ self.k(t).transpose(1, 2) * 0.25, -1) @ t
        return self.l2(torch.relu(self.l1(att.mean(1))))


def _exported(tmp_path, **kwargs) -> str:
    torch.manual_seed(0)
    net = _Net().eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], **kwargs)
    return str(path)


def _saved_by_ort(source: str, target: str, level: ort.GraphOptimizationLevel) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = target
    ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return onnx.load(target)


def test_a_model_saved_by_onnx_runtime_prunes_like_its_export(tmp_path):
    plain = _exported(tmp_path)
    optimised = str(tmp_path / "net.opt.onnx")
    ops = _ops(_saved_by_ort(plain, optimised, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED))
    assert ops["com.microsoft::FusedConv"] and ops["com.microsoft::FusedMatMul"], ops
    want = graphprune.prune(plain, ratio=0.5)
    got = graphprune.prune(optimised, ratio=0.5)
    assert got.report["verification"]["ok"]
    assert got.report["params_after"] == want.report["params_after"] < 0.6 * got.report["params_before"]
    lowered = got.report["normalised"]["lowered_ops"]
    assert lowered["FusedConv"] == ops["com.microsoft::FusedConv"]
    assert not any(n.domain == MS for n in got.model.graph.node)
    # and the calibrated path reads and refits the lowered layers
    calibrated = graphprune.prune(optimised, ratio=0.5, calibration="random:16")
    fidelity = calibrated.report["fidelity"]
    assert calibrated.report["pass_stats"]["RefitPass"]["layers"] >= 3
    assert fidelity["rel_l2"] < 0.5 * fidelity["without_reconstruction"]["rel_l2"]


def test_a_float16_model_saved_by_onnx_runtime_for_the_cpu_prunes_and_refits_in_float16(tmp_path):
    """ONNX Runtime computes float16 layers in float32 on the CPU: the saved model casts every
    float16 weight (``InsertedPrecisionFreeCast``). The cast weights are the weights (their
    float16 constants are sliced), and the refit writes float16 values back."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    plain = _exported(tmp_path)
    half = tmp_path / "net16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(plain), keep_io_types=True), half)
    optimised = str(tmp_path / "net16.opt.onnx")
    ops = _ops(_saved_by_ort(str(half), optimised, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED))
    assert ops["Cast"] >= 10, ops
    want = graphprune.prune(plain, ratio=0.5)
    got = graphprune.prune(optimised, ratio=0.5, calibration="random:16")
    assert got.report["verification"]["ok"]
    assert got.report["params_after"] == want.report["params_after"]
    assert got.report["pass_stats"]["RefitPass"]["layers"] >= 3
    fidelity = got.report["fidelity"]
    assert fidelity["rel_l2"] < 0.5 * fidelity["without_reconstruction"]["rel_l2"]
    large = [i for i in got.model.graph.initializer if int(np.prod(i.dims)) >= 64]
    assert large and all(i.data_type == onnx.TensorProto.FLOAT16 for i in large)  # the weights stay float16


def test_a_model_saved_with_the_cpu_layout_says_how_to_save_it(tmp_path):
    """At ORT_ENABLE_ALL, ONNX Runtime writes its NCHWc layout for this CPU (where the CPU
    has the kernels): nothing prunes, and the reason says what to save instead."""
    plain = _exported(tmp_path)
    optimised = str(tmp_path / "net.all.onnx")
    ops = _ops(_saved_by_ort(plain, optimised, ort.GraphOptimizationLevel.ORT_ENABLE_ALL))
    if not any(op.startswith("com.microsoft.nchwc::") for op in ops):
        pytest.skip(f"ONNX Runtime wrote no NCHWc layout on this CPU: {dict(ops)}")
    res = graphprune.prune(optimised, ratio=0.5)
    assert res.report["verification"]["ok"]
    assert "ORT_ENABLE_EXTENDED" in res.report["nothing_prunable"]
    assert any(op.startswith("com.microsoft.nchwc::") for op in res.report["unsupported_ops"])


def test_a_torch_export_with_local_functions_prunes_like_the_plain_export(tmp_path):
    """``export_modules_as_functions``: every Conv2d and Linear is a call of a local
    function; the calls are inlined, and the prune equals the plain export's."""
    plain = _exported(tmp_path)
    functions = _exported(tmp_path / "f" if (tmp_path / "f").mkdir() is None else tmp_path,
                          export_modules_as_functions={torch.nn.Conv2d, torch.nn.Linear})
    model = onnx.load(functions)
    assert model.functions and {"Conv2d", "Linear"} <= {f.name for f in model.functions}
    want = graphprune.prune(plain, ratio=0.5)
    got = graphprune.prune(functions, ratio=0.5)
    assert got.report["verification"]["ok"]
    assert got.report["params_after"] == want.report["params_after"]
    # one function per module signature (Linear, Linear.1, ...)
    inlined = {n.partition("::")[2].partition(".")[0] for n in got.report["normalised"]["inlined_functions"]}
    assert inlined == {"Conv2d", "Linear"}
    assert not got.model.functions
