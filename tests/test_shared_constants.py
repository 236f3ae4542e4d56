"""Constants that several nodes read: exporters' de-duplication is untied, purposeful sharing is not.

Both torch exporters store equal tensors once: every all-zero bias of one width, every fresh
norm weight, a Reshape target that each attention layer uses. Read by several layers, such a
vector used to couple their channels into one group: a random-initialised HF BERT/ViT export
had no prunable head (heads, residual stream and the output were one frozen group), and two
convolutions with zero biases pruned as one. Each reader now gets its own copy; copies that
are still equal after the rewrite are one initializer again in the written model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import group_with, make_model, run_ort
from graphprune.frontends import torch as gpt
from onnx import helper
from torch import nn

import graphprune
from graphprune.io.shared_constants import SHARED_KEY, TIE, mark_shared


def convs_sharing(bias: str = "b", shared_weight: bool = False) -> onnx.ModelProto:
    """``x -> Conv(W1, b) -> Relu -> Conv(W2, b) -> Relu -> Conv(W3, b3)``: both hidden convs
    read one zero bias (as the TorchScript exporter writes them)."""
    w2 = "W1b" if shared_weight else "W2"
    nodes = [
        helper.make_node("Conv", ["x", "W1", bias], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", w2, bias], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "W3", "b3"], ["y"], pads=[1, 1, 1, 1], name="conv3"),
    ]
    params = {"W1": (8, 3, 3, 3), "W3": (4, 8, 3, 3), "b3": (4,),
              "b": np.zeros(8, dtype=np.float32)}
    params["W1b" if shared_weight else "W2"] = (8, 8, 3, 3)
    return make_model(nodes, {"x": ("N", 3, 8, 8)}, {"y": None}, params)


def test_a_bias_two_convs_share_no_longer_couples_them() -> None:
    model = convs_sharing()
    analysis = graphprune.analyze(model)
    first, second = group_with(analysis, "W1", 0), group_with(analysis, "W2", 0)
    assert first is not second  # before: one group, conv1 and conv2 cut alike
    assert first.prunable and second.prunable
    assert first.anchor[0] == "W1" and second.anchor[0] == "W2"  # not a copy's name

    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    assert result.report["untied_constants"] == 1  # conv2's copy of conv1's bias
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert run_ort(result.model, feeds)[0].shape == run_ort(model, feeds)[0].shape
    # both copies lost the same (zero) values: one initializer again, no copy's name left
    names = [t.name for t in result.model.graph.initializer]
    assert not any(TIE in n for n in names)
    assert names.count("b") == 1


def test_keeping_a_shared_constant_keeps_every_reader() -> None:
    analysis = graphprune.analyze(convs_sharing(), keep=["b"])
    for weight in ("W1", "W2"):
        group = group_with(analysis, weight, 0)
        assert not group.prunable and any("protected by keep: tensor 'b'" in r for r in group.frozen)


def test_lossless_output_keeps_one_shared_initializer() -> None:
    model = convs_sharing()
    result = graphprune.prune(model, lossless=True)
    assert sorted(t.name for t in result.model.graph.initializer) == sorted(
        t.name for t in model.graph.initializer)
    conv_biases = [n.input[2] for n in result.model.graph.node if n.op_type == "Conv"]
    assert conv_biases[:2] == ["b", "b"]
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(result.model, feeds)[0], run_ort(model, feeds)[0])


def test_copies_cut_differently_stay_apart() -> None:
    """Group sizes differ (a budget allocates per group): each reader keeps its own slice."""
    model = convs_sharing()
    model.graph.initializer[[t.name for t in model.graph.initializer].index("b")].CopyFrom(
        onnx.numpy_helper.from_array(np.arange(8, dtype=np.float32) / 8, "b"))
    result = graphprune.prune(model, target_macs=0.5)
    assert result.report["verification"]["ok"] is True
    biases = {n.name: n.input[2] for n in result.model.graph.node if n.op_type == "Conv"}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    weights = {n.name: n.input[1] for n in result.model.graph.node if n.op_type == "Conv"}
    for conv in ("conv1", "conv2"):
        assert inits[biases[conv]].shape[0] == inits[weights[conv]].shape[0]


def test_constants_shared_on_purpose_stay_coupled() -> None:
    marked = convs_sharing()
    mark_shared(marked, ["b"])
    assert any(p.key == SHARED_KEY for p in marked.metadata_props)
    analysis = graphprune.analyze(marked)
    assert group_with(analysis, "W1", 0) is group_with(analysis, "W2", 0)
    # a weight matrix read twice is tied on purpose far more often than by an exporter
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "V"], ["y"]),
    ]
    tied = make_model(nodes, {"x": ("N", 8)}, {"y": None}, {"W": (8, 8), "V": (8, 2)})
    analysis = graphprune.analyze(tied)
    assert group_with(analysis, "W", 1) is group_with(analysis, "W", 0)


class SharedNorm(nn.Module):
    """One BatchNorm applied after two convolutions: its parameters are one tensor each."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        with torch.no_grad():
            self.norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
            self.norm.bias.copy_(torch.linspace(-1, 1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.c1(x)))
        return self.c3(torch.relu(self.norm(self.c2(x))))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_module_parameter_read_twice_prunes_as_one_tensor(exporter: str) -> None:
    module = SharedNorm().eval()
    inputs = (torch.randn(1, 3, 8, 8),)
    exported = gpt.to_onnx(module, inputs, exporter=exporter)
    assert any(p.key == SHARED_KEY and "norm.weight" in p.value for p in exported.metadata_props)
    result = gpt.prune_module(module, inputs, ratio=0.5, exporter=exporter)
    pruned = gpt.apply_plan(module, result.plan)
    assert pruned.norm.num_features == pruned.c1.out_channels == pruned.c2.out_channels < 8
    gpt.check_module(pruned, result.model, inputs, tolerance=1e-4)


def test_concat_of_unknown_sizes_freezes_only_its_axis() -> None:
    """``k = MatMul(x, W)`` joined with a cache along the (dynamic) sequence axis: the
    feature axis is joined element by element and stays prunable (a key cache
    concatenated by a decoder keeps its heads prunable)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["k"]),
        helper.make_node("MatMul", ["past", "P"], ["p"]),
        helper.make_node("Concat", ["p", "k"], ["kv"], axis=1),
        helper.make_node("Concat", ["kv"], ["kv1"], axis=1),  # one input: the tensor itself
        helper.make_node("Relu", ["kv1"], ["r"]),
        helper.make_node("MatMul", ["r", "V"], ["y"]),
    ]
    model = make_model(nodes, {"x": (1, "S", 8), "past": (1, "T", 8)}, {"y": None},
                       {"W": (8, 6), "P": (8, 6), "V": (6, 3)})
    analysis = graphprune.analyze(model)
    group = group_with(analysis, "W", 1)
    assert group.prunable and ("P", 1) in group.dims
    assert any("input size unknown at Concat" in r for r in analysis.context.dim_freeze[("kv", 1)])
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    assert result.plan.units_removed == 3


def test_a_weight_split_and_transposed_in_the_graph_produces_its_channels() -> None:
    """The dynamo exporter splits ``nn.MultiheadAttention``'s packed ``in_proj_weight`` in the
    graph when query and key differ (``Split`` then ``Transpose`` of the constant, as in DETR's
    decoder or a Perceiver): no constant produced the projected channels, and the heads were
    left "fixed" (nothing to remove). The constant takes the roles its views' readers give
    them, axis by axis through the transposes (not folded: folding would also materialise
    every other constant subgraph, and grew a WavLM export 1.9x)."""
    nodes = [
        helper.make_node("Split", ["W", "sizes"], ["W0", "W1"], axis=0),
        helper.make_node("Transpose", ["W0"], ["W0t"], perm=[1, 0]),
        helper.make_node("Transpose", ["W1"], ["W1t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W0t"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "W_out"], ["y1"]),
        helper.make_node("MatMul", ["x", "W1t"], ["b"]),
        helper.make_node("Relu", ["b"], ["s"]),
        helper.make_node("MatMul", ["s", "W_out2"], ["y2"]),
    ]
    params = {"W": (24 + 16, 6), "sizes": np.array([24, 16], np.int64), "W_out": (24, 3), "W_out2": (16, 2)}
    model = make_model(nodes, {"x": ("N", 6)}, {"y1": None, "y2": None}, params)
    analysis = graphprune.analyze(model)
    packed = group_with(analysis, "W", 0)  # both parts' rows: one tensor, one group
    assert packed.prunable and packed.num_units == 40 and ("W", 0) in packed.producers
    assert ("W", 1) in group_with(analysis, "x", 1).dims
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"]
    assert result.report["params_after"] < 0.6 * result.report["params_before"]


def _layers_sharing_a_quantized_bias() -> onnx.ModelProto:
    """``x -> MatMul(W1) + b -> Relu -> MatMul(W2) + b -> Relu -> MatMul(W3)``, ``b`` one int8
    vector behind one ``DequantizeLinear`` that both layers read through an ``Identity`` each:
    ONNX Runtime's ``quantize_static`` of a TorchScript export whose zero biases were stored
    once (a random-initialised BERT)."""
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"], name="b_dq"),
             helper.make_node("Identity", ["b"], ["b1"]), helper.make_node("Identity", ["b"], ["b2"]),
             helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "W2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["a2"]), helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "W3"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W1", (8, 16)), ("W2", (16, 16)), ("W3", (16, 4)))]
    inits += [numpy_helper.from_array(rng.integers(-20, 20, 16).astype(np.int8), "bq"),
              numpy_helper.from_array(np.array(0.05, np.float32), "bs"), numpy_helper.from_array(np.array(0, np.int8), "bz")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_quantized_vector_two_layers_share_no_longer_couples_them() -> None:
    """The ``DequantizeLinear`` of a shared vector coupled every layer that reads it (a QDQ
    BERT's heads, an MLP and its residual stream were one group). Each reader gets its own
    ``DequantizeLinear`` of its own copy; equal copies are one node and one constant again in
    the written model (no more ``DequantizeLinear`` nodes than the file had)."""
    model = _layers_sharing_a_quantized_bias()
    analysis = graphprune.analyze(model)
    first, second = group_with(analysis, "W1", 1), group_with(analysis, "W2", 1)
    assert first is not second and first.prunable and second.prunable

    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["verification"]["max_abs_diff"] == 0
    onnx.checker.check_model(result.model, full_check=True)
    weights = {t.name: t for t in result.model.graph.initializer}
    assert list(weights["W1"].dims) == [8, 8] and list(weights["W2"].dims) == [8, 8]

    lossless = graphprune.prune(model, lossless=True).model
    dequantized = [n for n in lossless.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantized) == 1 and not any(TIE in n.name or TIE in n.output[0] for n in lossless.graph.node)
    assert sorted(t.name for t in lossless.graph.initializer) == sorted(t.name for t in model.graph.initializer)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(lossless, feeds)[0], run_ort(model, feeds)[0])
