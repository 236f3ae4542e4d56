"""The heads of ``nn.MultiheadAttention`` (``torch.nn.functional.multi_head_attention_forward``).

PyTorch's own attention views the projected queries as ``[S, B, H*D] -> [S, B*H, D]``: the head
factor moves from the outer digit of the width to the inner digit of ``batch x heads``. The
Reshape rule coupled the width with the head size there (a unit of ``D`` positions, one in each
head) and froze the heads, so no ``nn.TransformerEncoderLayer`` (nor torchvision's ViT) exported
with fixed shapes had prunable heads, through either exporter. The width and ``B*H`` are now
coupled by the shared head digit (``SharedDigit``) where the reshape that splits ``B*H`` again
leads to the attention product's head axis. With a dynamic batch, TorchScript computes
``B*H`` as ``batch * H`` in the view's shape (the literal ``H`` is rewritten with the new head
count) and the dynamo export infers it (``-1``); the heads were frozen there ("dynamic axes
re-factored") until the moved heads were read from the two shape probes too.
"""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from graphprune.frontends.torch import apply_plan, check_module, prune_module
from graphprune.frontends.torch.export import to_onnx
from torch import nn

import graphprune
from graphprune.analysis.index_maps import SharedDigit

WIDTH, HEADS, LAYERS = 32, 4, 2


class Encoder(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 64, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        torch.manual_seed(0)
        for p in self.parameters():  # the layers are copies of one: make them differ
            nn.init.normal_(p, std=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def _example(batch_first: bool) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 6, WIDTH) if batch_first else torch.randn(6, 2, WIDTH)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multi_head_attention_heads_are_prunable_and_verified(exporter, batch_first):
    model: onnx.ModelProto = to_onnx(Encoder(batch_first).eval(), (_example(batch_first),), exporter=exporter)
    analysis = graphprune.analyze(model)
    heads = [g for g in analysis.groups if g.num_units == HEADS and g.prunable]
    assert len(heads) == LAYERS, [(g.anchor, g.num_units, g.frozen[:1]) for g in analysis.groups]
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"]
    assert result.report["kinds"]["head"]["prunable"] == LAYERS


def test_prune_module_removes_multi_head_attention_heads():
    model = Encoder(batch_first=True).eval()
    x = _example(True)
    result = prune_module(model, (x,), ratio=0.5, exporter="torchscript")
    pruned = apply_plan(copy.deepcopy(model), result.plan)
    assert check_module(pruned, result.model, (x,)) < 1e-4
    attention = pruned.encoder.layers[0].self_attn
    assert attention.num_heads < HEADS and attention.out_proj.in_features == attention.num_heads * WIDTH // HEADS


def _dynamic_batch(exporter: str, batch_first: bool) -> dict:
    axis = 0 if batch_first else 1
    if exporter == "torchscript":
        return {"dynamic_axes": {"x": {axis: "batch"}}}  # TorchScript names inputs as forward does
    return {"dynamic_shapes": ({axis: torch.export.Dim("batch", min=1, max=64)},)}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_heads_prune_with_a_dynamic_batch(exporter, batch_first):
    model = Encoder(batch_first).eval()
    x = _example(batch_first)
    result = prune_module(model, (x,), ratio=0.5, exporter=exporter, **_dynamic_batch(exporter, batch_first))
    assert result.report["verification"]["ok"]
    assert result.report["kinds"]["head"]["prunable"] == LAYERS
    pruned = apply_plan(copy.deepcopy(model), result.plan)
    assert pruned.encoder.layers[0].self_attn.num_heads < HEADS
    torch.manual_seed(2)
    for batch in (1, 5):  # batch sizes the export never saw: B*H is rewritten, not fixed
        other = torch.randn(batch, 6, WIDTH) if batch_first else torch.randn(6, batch, WIDTH)
        assert check_module(pruned, result.model, (other,)) < 1e-4


def test_shared_digit_pairs_a_head_with_its_rows_and_columns():
    a, b = SharedDigit(4, 8, 1).pairs(32, 8)  # width H*D = 4*8, batch x heads = 2*4
    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        assert i // 8 == j % 4
    assert SharedDigit(4, 8, 1).check(32, 8) is None
    assert SharedDigit(4, 8, 1).check(30, 8) is not None


def test_each_layer_keeps_its_own_heads_in_an_optimised_dynamo_export(tmp_path):
    """torch.export computes ``batch * H`` once for every layer (and the optimiser reshapes it
    to ``[1]`` once): the copies per reader (``untie_shared_shapes``) keep the layers' head
    groups apart, and the pruned model runs at other batch sizes and lengths."""
    import numpy as np
    import onnxruntime as ort

    path = tmp_path / "encoder.onnx"
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("sequence", min=2, max=64)}
    torch.onnx.export(Encoder(True).eval(), (_example(True),), str(path), dynamo=True, external_data=False,
                      dynamic_shapes=(dims,))
    analysis = graphprune.analyze(str(path))
    assert len([g for g in analysis.groups if g.num_units == HEADS and g.prunable]) == LAYERS
    result = graphprune.prune(str(path), ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["kinds"]["head"]["prunable"] == LAYERS
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 9, WIDTH)).astype(np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (3, 9, WIDTH)


class MaskedEncoder(Encoder):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=mask)


def test_a_padding_mask_expanded_once_for_every_layer_ties_no_heads(tmp_path):
    """torch.export expands an ``nn.TransformerEncoder``'s padding mask to ``[B, H, 1, T]`` once
    and every layer adds it to its scores: its head axis tied all layers' heads into one group.
    Each reader gets its own copy of the expansion (``untie_shared_broadcasts``); copies that
    still compute the same are one node again in the written file, and the pruned model runs
    at other batch sizes and lengths with the mask."""
    import collections

    import numpy as np
    import onnxruntime as ort

    path = tmp_path / "masked.onnx"
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("sequence", min=2, max=64)}
    x, mask = _example(True), torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    torch.onnx.export(MaskedEncoder(True).eval(), (x, mask), str(path), dynamo=True, external_data=False,
                      dynamic_shapes=(dims, dims), input_names=["x", "mask"])
    original = onnx.load(str(path))
    expands = collections.Counter(n.op_type for n in original.graph.node)["Expand"]
    analysis = graphprune.analyze(str(path))
    assert len([g for g in analysis.groups if g.num_units == HEADS and g.prunable]) == LAYERS
    uniform = graphprune.prune(str(path), head_ratio=0.5, mlp_ratio=0.0)
    assert uniform.report["verification"]["ok"] and uniform.report["kinds"]["head"]["prunable"] == LAYERS
    # every layer lost the same heads' count: its copy of the mask's expansion merged again
    assert collections.Counter(n.op_type for n in uniform.model.graph.node)["Expand"] == expands
    first = next(g for g in analysis.groups if g.num_units == HEADS and g.prunable)
    apart = graphprune.prune(str(path), head_ratio=0.5, mlp_ratio=0.0, keep=[first.anchor[0]])
    assert apart.report["verification"]["ok"]
    assert collections.Counter(n.op_type for n in apart.model.graph.node)["Expand"] == expands + 1
    # a QDQ copy reads the expanded mask through one QuantizeLinear / DequantizeLinear pair
    readers = collections.Counter(i for n in original.graph.node if n.op_type == "Add" for i in n.input)
    shared = next(name for name, count in readers.items() if count == LAYERS)
    for node in original.graph.node:
        if node.op_type == "Add":
            node.input[:] = ["mask_dq" if i == shared else i for i in node.input]
    original.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0.5, np.float32), "mask_scale"),
                                       onnx.numpy_helper.from_array(np.array(0, np.int8), "mask_zero")])
    original.graph.node.extend([onnx.helper.make_node("QuantizeLinear", [shared, "mask_scale", "mask_zero"], ["mask_q"]),
                                onnx.helper.make_node("DequantizeLinear", ["mask_q", "mask_scale", "mask_zero"],
                                                      ["mask_dq"])])
    onnx.save(original, str(tmp_path / "qdq.onnx"))
    quantized = graphprune.analyze(str(tmp_path / "qdq.onnx"))
    assert len([g for g in quantized.groups if g.num_units == HEADS and g.prunable]) == LAYERS
    rng = np.random.default_rng(0)
    for model in (uniform.model, apart.model):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {"x": rng.standard_normal((3, 9, WIDTH)).astype(np.float32), "mask": np.zeros((3, 9), bool)}
        feed["mask"][2, 5:] = True
        out = session.run(None, feed)[0]
        assert out.shape == (3, 9, WIDTH) and np.isfinite(out).all()


class FairseqAttention(nn.Module):
    """fairseq's (and FSMT's) self-attention: the ``[T, B*H, D]`` views are multiplied as
    they are (``bmm``), so ``B*H`` is itself the attention product's head axis, and no
    reshape splits it again before the product."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.q, self.k, self.v, self.out = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.heads, self.size = HEADS, WIDTH // HEADS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b, c = x.shape
        q = (self.q(x) * self.size**-0.5).contiguous().view(t, b * self.heads, self.size).transpose(0, 1)
        k = self.k(x).contiguous().view(-1, b * self.heads, self.size).transpose(0, 1)
        v = self.v(x).contiguous().view(-1, b * self.heads, self.size).transpose(0, 1)
        weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        return self.out(torch.bmm(weights, v).transpose(0, 1).contiguous().view(t, b, c))


def test_fairseq_attention_heads_prune_with_a_dynamic_batch_and_length(tmp_path):
    path = tmp_path / "fairseq.onnx"
    torch.onnx.export(FairseqAttention().eval(), (torch.randn(6, 2, WIDTH),), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "length", 1: "batch"}})
    result = graphprune.prune(str(path), ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["kinds"]["head"]["prunable"] == 1
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 3, WIDTH)).astype(np.float32)
    assert session.run(None, {"x": x})[0].shape == reference.run(None, {"x": x})[0].shape == (5, 3, WIDTH)
