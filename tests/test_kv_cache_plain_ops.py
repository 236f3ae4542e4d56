"""Decoders exported for generation with the KV cache in plain ops (PyTorch, Optimum).

The cache is a graph input (``past_k``) concatenated with the new keys and a graph output
(``present_k``): its KV head count is the model's interface. Grouped-query attention then
repeats each KV head as HF's ``repeat_kv`` does (``k[:, :, None].expand(B, KV, n_rep, T, D)
.reshape(B, KV * n_rep, T, D)``), so query head ``h`` reads KV head ``h // n_rep``. A unit is
one position within the KV groups (query heads ``r, n_rep + r, ...``): removing it keeps the
cache whole. Exported with both torch exporters, dynamic batch, sequence and past length,
and compared with the zeroed original at decode steps of other sizes than the export's.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from conftest import relative_difference, run_ort, zeroed_original

import graphprune
from graphprune.analysis import targets
from graphprune.tables import prune_summary

HIDDEN, HEAD_DIM, MLP, LAYERS, VOCAB = 32, 8, 48, 2, 50

pytestmark = pytest.mark.torch


def _decoder(heads: int, kv_heads: int):
    torch = pytest.importorskip("torch")
    nn, functional = torch.nn, torch.nn.functional
    n_rep = heads // kv_heads

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(HIDDEN, heads * HEAD_DIM)
            self.k = nn.Linear(HIDDEN, kv_heads * HEAD_DIM)
            self.v = nn.Linear(HIDDEN, kv_heads * HEAD_DIM)
            self.o = nn.Linear(heads * HEAD_DIM, HIDDEN, bias=False)
            self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
            self.up, self.down = nn.Linear(HIDDEN, MLP), nn.Linear(MLP, HIDDEN)

        def forward(self, x, past_k, past_v):
            b, s, _ = x.shape
            h = self.norm1(x)
            q = self.q(h).view(b, s, heads, HEAD_DIM).transpose(1, 2)
            k = self.k(h).view(b, s, kv_heads, HEAD_DIM).transpose(1, 2)
            v = self.v(h).view(b, s, kv_heads, HEAD_DIM).transpose(1, 2)
            k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
            t = k.shape[2]
            kk = k[:, :, None].expand(b, kv_heads, n_rep, t, HEAD_DIM).reshape(b, heads, t, HEAD_DIM)
            vv = v[:, :, None].expand(b, kv_heads, n_rep, t, HEAD_DIM).reshape(b, heads, t, HEAD_DIM)
            scores = q @ kk.transpose(-1, -2) / HEAD_DIM ** 0.5
            causal = torch.ones(s, t, dtype=torch.bool).tril(t - s)
            attention = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ vv
            x = x + self.o(attention.transpose(1, 2).reshape(b, s, heads * HEAD_DIM))
            return x + self.down(functional.gelu(self.up(self.norm2(x)))), k, v

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, HIDDEN)
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
            self.head = nn.Linear(HIDDEN, VOCAB)

        def forward(self, ids, *past):
            x, present = self.embed(ids), []
            for i, layer in enumerate(self.layers):
                x, k, v = layer(x, past[2 * i], past[2 * i + 1])
                present += [k, v]
            return (self.head(x), *present)

    torch.manual_seed(0)
    return Decoder().eval()


CACHE = [f"past_{kind}{i}" for i in range(LAYERS) for kind in ("k", "v")]
PRESENT = [name.replace("past", "present") for name in CACHE]
_MODELS: dict[tuple[int, int, bool], onnx.ModelProto] = {}


def _export(heads: int, kv_heads: int, dynamo: bool) -> onnx.ModelProto:
    key = (heads, kv_heads, dynamo)
    if key in _MODELS:
        return _MODELS[key]
    torch = pytest.importorskip("torch")
    module = _decoder(heads, kv_heads)
    feeds = _feeds(kv_heads, batch=2, seq=3, past=5)
    args = (torch.from_numpy(feeds["ids"]), *(torch.from_numpy(feeds[n]) for n in CACHE))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq, past = (torch.export.Dim(n, max=64) for n in ("batch", "seq", "past"))
            shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in CACHE))
            torch.onnx.export(module, args, buffer, dynamo=True, input_names=["ids", *CACHE],
                              output_names=["logits", *PRESENT], dynamic_shapes=shapes, verbose=False)
        else:
            axes = {"ids": {0: "batch", 1: "seq"}, **{n: {0: "batch", 2: "past"} for n in CACHE},
                    **{n: {0: "batch", 2: "total"} for n in PRESENT}, "logits": {0: "batch", 1: "seq"}}
            torch.onnx.export(module, args, buffer, dynamo=False, input_names=["ids", *CACHE],
                              output_names=["logits", *PRESENT], dynamic_axes=axes, opset_version=17)
    model = onnx.load_from_string(buffer.getvalue())
    with torch.no_grad():
        expected = module(*args)[0].numpy()
    np.testing.assert_allclose(run_ort(model, feeds)[0], expected, rtol=1e-4, atol=1e-4)
    _MODELS[key] = model
    return model


def _feeds(kv_heads: int, batch: int, seq: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 * batch + 10 * seq + past)
    cache = (batch, kv_heads, past, HEAD_DIM)
    return {"ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
            **{n: rng.standard_normal(cache).astype(np.float32) for n in CACHE}}


def _dims(values) -> list[tuple]:
    return [tuple(d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim) for v in values]


EXPORTERS = pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])


@EXPORTERS
def test_query_heads_prune_by_position_in_their_kv_group(dynamo):
    heads, kv_heads = 6, 2
    model = _export(heads, kv_heads, dynamo)
    analysis = graphprune.analyze(model)
    kinds = targets.classify_groups(analysis)
    query = [g for g in analysis.groups if kinds[g.id] == "head" and g.prunable]
    assert [g.num_units for g in query] == [heads // kv_heads] * LAYERS
    # the KV heads are the cache's: frozen, and the reason names the cache
    kv = [g for g in analysis.groups if not g.prunable and g.num_units == kv_heads]
    assert len(kv) == 2 * LAYERS and all(kinds[g.id] == "head" for g in kv)
    assert all(any(name in " ".join(g.frozen) for name in CACHE + PRESENT) for g in kv), [g.frozen for g in kv]

    res = graphprune.prune(model, plan=targets.plan_targets(analysis, head_ratio=0.5, mlp_ratio=0.5))
    assert res.report["verification"]["ok"], res.report["verification"]
    onnx.checker.check_model(res.model, full_check=True)
    assert _dims(res.model.graph.input) == _dims(model.graph.input)
    assert _dims(res.model.graph.output) == _dims(model.graph.output)
    # one position of 3 removed in every layer: 2 of 6 query heads, q columns and o rows
    square = [t.name for t in res.model.graph.initializer if list(t.dims) == [HIDDEN, 4 * HEAD_DIM]]
    assert len(square) == 2 * LAYERS, square  # q and o of every layer: [32, 48] and [48, 32] before
    reference = zeroed_original(model, res.plan)
    for batch, seq, past in [(1, 1, 7), (3, 4, 2), (2, 1, 0)]:
        feeds = _feeds(kv_heads, batch, seq, past)
        got = run_ort(res.model, feeds)
        assert relative_difference(run_ort(reference, feeds), got) < 1e-5
        assert relative_difference(run_ort(model, feeds), got) > 1e-4
        assert got[1].shape == (batch, kv_heads, past + seq, HEAD_DIM)


@EXPORTERS
def test_one_query_head_per_kv_head_keeps_its_heads(dynamo):
    """Multi-head attention with the cache in the interface: each query head has its own KV
    head, so no head can go; the MLP still prunes."""
    model = _export(4, 4, dynamo)
    analysis = graphprune.analyze(model)
    kinds = targets.classify_groups(analysis)
    assert not [g for g in analysis.groups if kinds[g.id] == "head" and g.prunable]
    res = graphprune.prune(model, head_ratio=0.5, mlp_ratio=0.5)
    assert res.report["verification"]["ok"]
    assert res.report["params_after"] < res.report["params_before"]
    # the CLI says why no head went
    assert "attention heads: none prunable, 2 head group(s) frozen (first reason: graph " \
        in prune_summary(res.report)
