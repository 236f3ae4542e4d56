"""Heads merged with the batch by a computed Reshape target: ``batch * H`` and ``size // H``.

BLOOM as the TorchScript exporter writes it: the ALiBi bias ``[B, H, T]`` becomes ``[B*H, 1, T]``
with the target ``batch_size * num_heads``, read from the mask's shape times the literal
``H``; the merged scores come back as ``[B, H, ...]`` with ``size(0) // H``. The read batch
used to be coupled to the merged axis (``b <-> b*H .. b*H+H-1``), which put the heads and the
graph input's batch in one group: no head prunable. Now the literal ``H`` is recorded with the
head axis (the rewrite writes the new count) and the batch stays out of the group. Such
models verify at batch 2: at batch 1 the layout ``b*H + h`` cannot be told from another.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import group_with, make_model, run_ort
from onnx import helper

import graphprune

OPS_UNDER_TEST = ["Reshape"]

I64 = np.int64


def alibi_attention() -> onnx.ModelProto:
    """``x [N, T, 64]``, ``m [N, T]``: 4 heads of 16 merged with the batch, a per-head
    bias ``slopes [4, 1] * m`` merged alike, attention, split back, a MatMul."""
    nodes = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "i0"], ["n"], axis=0),
        helper.make_node("Gather", ["xs", "i1"], ["t"], axis=0),
        helper.make_node("Unsqueeze", ["t", "ax0"], ["t1"]),
        helper.make_node("Mul", ["n", "heads"], ["nh"], name="batch_times_heads"),
        helper.make_node("Unsqueeze", ["nh", "ax0"], ["nh1"]),
        helper.make_node("MatMul", ["x", "Wq"], ["p"]),
        helper.make_node("Reshape", ["p", "split_heads"], ["p4"]),
        helper.make_node("Transpose", ["p4"], ["q4"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["nh1", "t1", "c16"], ["merge_q"], axis=0),
        helper.make_node("Reshape", ["q4", "merge_q"], ["q"]),  # [N*4, T, 16]
        helper.make_node("Unsqueeze", ["m", "ax1"], ["m1"]),  # [N, 1, T]
        helper.make_node("Mul", ["slopes", "m1"], ["bias4"]),  # [N, 4, T]
        helper.make_node("Concat", ["nh1", "one1", "t1"], ["merge_b"], axis=0),
        helper.make_node("Reshape", ["bias4", "merge_b"], ["bias"]),  # [N*4, 1, T]
        helper.make_node("Transpose", ["q"], ["qT"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "qT"], ["s"]),
        helper.make_node("Add", ["s", "bias"], ["sb"]),
        helper.make_node("Softmax", ["sb"], ["a"], axis=-1),
        helper.make_node("MatMul", ["a", "q"], ["c"]),  # [N*4, T, 16]
        helper.make_node("Shape", ["c"], ["cs"]),
        helper.make_node("Gather", ["cs", "i0"], ["bh"], axis=0),
        helper.make_node("Div", ["bh", "heads"], ["b"], name="merged_by_heads"),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
        helper.make_node("Concat", ["b1", "c4", "t1", "c16"], ["split_c"], axis=0),
        helper.make_node("Reshape", ["c", "split_c"], ["c4h"]),  # [N, 4, T, 16]
        helper.make_node("Transpose", ["c4h"], ["ct"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ct", "flat"], ["f"]),
        helper.make_node("MatMul", ["f", "Wo"], ["y"]),
    ]
    params = {
        "Wq": (64, 64), "Wo": (64, 16),
        "slopes": np.array([[0.5], [0.25], [0.125], [0.0625]], np.float32),
        "split_heads": np.array([0, 0, 4, 16], I64), "flat": np.array([0, 0, 64], I64),
        "i0": np.array(0, I64), "i1": np.array(1, I64), "heads": np.array(4, I64),
        "ax0": np.array([0], I64), "ax1": np.array([1], I64), "one1": np.array([1], I64),
        "c4": np.array([4], I64), "c16": np.array([16], I64),
    }
    return make_model(nodes, {"x": ("N", "T", 64), "m": ("N", "T")}, {"y": None}, params)


def _feeds(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"x": rng.standard_normal((batch, 6, 64)).astype(np.float32),
            "m": rng.standard_normal((batch, 6)).astype(np.float32)}


def test_batch_times_heads_keeps_the_batch_out_of_the_heads_group() -> None:
    model = alibi_attention()
    analysis = graphprune.analyze(model)
    heads = group_with(analysis, "Wq", 1)
    assert heads.prunable and heads.num_units == 4  # before: frozen with the graph inputs' batch
    assert group_with(analysis, "slopes", 0) is heads
    assert analysis.merges_batch

    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    onnx.checker.check_model(result.model, full_check=True)
    literals = {n.name: n.input[1] for n in result.model.graph.node
                if n.name in ("batch_times_heads", "merged_by_heads")}
    values = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert {name: int(values[v]) for name, v in literals.items()} == {
        "batch_times_heads": 2, "merged_by_heads": 2}  # the head count, rewritten
    batch = run_ort(result.model, _feeds(3))[0]
    for b in range(3):
        single = {k: v[b:b + 1] for k, v in _feeds(3).items()}
        np.testing.assert_allclose(run_ort(result.model, single)[0], batch[b:b + 1], rtol=1e-5, atol=1e-5)


def _batches_verified(monkeypatch: pytest.MonkeyPatch, model: onnx.ModelProto) -> set[int]:
    from graphprune.pipeline import session

    seen: set[int] = set()
    real = session.make_feeds

    def spy(*args: object, **kwargs: object) -> list[dict[str, np.ndarray]]:
        feeds = real(*args, **kwargs)
        seen.update(v.shape[0] for f in feeds for v in f.values())
        return feeds

    monkeypatch.setattr(session, "make_feeds", spy)
    assert graphprune.prune(model, ratio=0.5).report["verification"]["ok"] is True
    return seen


def test_models_without_merged_axes_verify_at_batch_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decided when the groups form: the rewrite clears intermediate shapes later, which
    once made every model look merged (and cost LLaMA-125M an extra 130 MB run)."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    model = make_model(nodes, {"x": ("N", 8)}, {"y": None}, {"W1": (8, 16), "W2": (16, 4)})
    assert not graphprune.analyze(model).merges_batch
    assert _batches_verified(monkeypatch, model) == {1}
    assert _batches_verified(monkeypatch, alibi_attention()) == {2}


def test_a_model_that_runs_only_at_batch_one_is_verified_at_batch_one() -> None:
    """A declared dynamic batch the graph cannot take (it squeezes the batch away): batch 2
    does not run, so verification keeps batch 1 rather than failing the prune."""
    base = alibi_attention()
    graph = base.graph
    graph.node[-1].output[0] = "y4"
    graph.node.append(helper.make_node("Squeeze", ["y4", "ax0"], ["y"], name="drop_batch"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None))
    model = onnx.shape_inference.infer_shapes(base)
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    assert run_ort(result.model, _feeds(1))[0].shape == (6, 16)


def test_one_batch_times_heads_literal_read_by_two_blocks_is_copied_for_each() -> None:
    """``batch * 4`` computed once and read by the query Reshapes of two attention blocks
    (BLOOM computes its ALiBi target once for all layers, torch.export the ``batch * H`` of
    ``nn.MultiheadAttention``): the preparation gives each reader its own copy of the scaling
    node (``untie_shared_shapes``), so each block's heads are a group of their own; keeping
    one block's heads leaves the other free, and the rewrite writes each block's count into
    its own copy. (Before the copies the literal tied both blocks to one count.)"""
    one = alibi_attention()
    shared = {"x", "m", "xs", "n", "t", "t1", "nh", "nh1", "i0", "i1", "heads", "ax0", "ax1", "one1",
              "c4", "c16", "split_heads", "flat", "slopes", ""}

    def renamed(name: str) -> str:
        return name if name in shared else f"{name}_2"

    nodes = list(one.graph.node)
    params = {t.name: onnx.numpy_helper.to_array(t) for t in one.graph.initializer}
    second = []
    for node in nodes:
        if node.output[0] in ("xs", "n", "t", "t1", "nh", "nh1"):
            continue  # the shared size computations
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{node.name}_2"
        copy.input[:] = [renamed(i) for i in node.input]
        copy.output[:] = [renamed(o) for o in node.output]
        second.append(copy)
    extra = {f"{k}_2": v for k, v in params.items() if renamed(k) != k}
    total = helper.make_node("Add", ["y", "y_2"], ["out"])
    model = make_model([*nodes, *second, total], {"x": ("N", "T", 64), "m": ("N", "T")},
                       {"out": None}, {**params, **extra})
    analysis = graphprune.analyze(model)
    first, second_group = group_with(analysis, "Wq", 1), group_with(analysis, "Wq_2", 1)
    assert first is not second_group and first.prunable and second_group.prunable
    kept = graphprune.prune(model, ratio=0.5, keep=["Wq_2"])
    assert kept.report["verification"]["ok"] is True
    widths = {t.name: tuple(t.dims) for t in kept.model.graph.initializer}
    assert widths["Wq_2"] == (64, 64) and widths["Wq"] == (64, 32)  # only the first block lost heads
    for n in (1, 3):
        assert run_ort(kept.model, _feeds(n))[0].shape[0] == n  # each copy scales the batch it reads
    pruned = graphprune.prune(model, ratio=0.5)
    assert pruned.report["verification"]["ok"] is True


def test_a_reshape_of_an_input_with_an_open_batch_is_understood():
    """tf2onnx's Dense on a 3-D input: ``[N, 8, 16] -> [-1, 16]``, then MatMul. The input
    has no shape in the probes' inferred tensors; it now takes the probes' sizes, so the
    features are frozen as the graph input's (not as a Reshape "not understood")."""
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["f"]),
        helper.make_node("MatMul", ["f", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    model = make_model(nodes, {"x": ["N", 8, 16]}, {"y": None},
                       {"flat": np.array([-1, 16], I64), "W1": [16, 24], "W2": [24, 4]})
    analysis = graphprune.analyze(model)
    features = group_with(analysis, "W1", 0)
    assert any("graph input 'x'" in r for r in features.frozen)
    assert not any("not understood" in r for r in features.frozen)
    assert group_with(analysis, "W1", 1).prunable


def windowed_attention(*, keys_first: bool = False) -> onnx.ModelProto:
    """``x [1, 16, 16]``: 4 windows of 4 tokens, 2 heads of 8, attention per window. The keys
    are transposed the way the dynamo exporter writes SDPA (Swin): ``[nW, H, S, D] -> [-1, S, D]
    -> Transpose -> [nW, H, D, S]``; windows times heads in one axis, split back behind.
    ``keys_first``: the merge's Reshape comes before any op that marks heads in graph order."""
    key_nodes = [
        helper.make_node("MatMul", ["w", "Wk"], ["k"]),
        helper.make_node("Reshape", ["k", "split"], ["k4"]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 1, 3]),  # [4, 2, 4, 8]
        helper.make_node("Reshape", ["kt", "merge"], ["km"], name="merge_windows_heads"),  # [8, 4, 8]
        helper.make_node("Transpose", ["km"], ["kmt"], perm=[0, 2, 1]),  # [8, 8, 4]
        helper.make_node("Reshape", ["kmt", "unmerge"], ["kT"], name="split_windows_heads"),
        helper.make_node("Mul", ["kT", "scale"], ["kTs"]),
    ]
    nodes = [helper.make_node("Reshape", ["x", "windows"], ["w"])]  # [4, 4, 16]
    query_nodes = [
        helper.make_node("MatMul", ["w", "Wq"], ["q"]),
        helper.make_node("Reshape", ["q", "split"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
    ]
    nodes += key_nodes + query_nodes if keys_first else query_nodes + key_nodes
    nodes += [
        helper.make_node("MatMul", ["qt", "kTs"], ["s"]),  # [4, 2, 4, 4]
        helper.make_node("Add", ["s", "bias"], ["sb"]),  # a relative position bias per head
        helper.make_node("Softmax", ["sb"], ["a"], axis=-1),
        helper.make_node("MatMul", ["w", "Wv"], ["v"]),
        helper.make_node("Reshape", ["v", "split"], ["v4"]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["a", "vt"], ["c"]),  # [4, 2, 4, 8]
        helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ct", "join"], ["cj"]),  # [4, 4, 16]
        helper.make_node("MatMul", ["cj", "Wo"], ["o"]),
        helper.make_node("Reshape", ["o", "tokens"], ["y"]),
    ]
    params = {
        "Wq": (16, 16), "Wk": (16, 16), "Wv": (16, 16), "Wo": (16, 16), "bias": (1, 2, 4, 4),
        "scale": np.array(0.35, np.float32), "windows": np.array([4, 4, 16], I64),
        "split": np.array([4, 4, -1, 8], I64), "merge": np.array([-1, 4, 8], I64),
        "unmerge": np.array([4, 2, 8, 4], I64), "join": np.array([4, 4, -1], I64),
        "tokens": np.array([1, 16, 16], I64),
    }
    return make_model(nodes, {"x": [1, 16, 16]}, {"y": None}, params)


@pytest.mark.parametrize("keys_first", [False, True])
def test_heads_merged_with_the_windows_of_windowed_attention_prune(keys_first: bool) -> None:
    """Swin's dynamo SDPA export: the merge Reshape ``[nW, H] -> [nW*H]`` sees no head fact
    on its own side (the heads are marked behind the Reshape that splits it back), and chose
    the windows as the channel factor, freezing the heads ("inner factor of a reshaped
    axis"). It now takes the factor the undoing Reshape knows as heads."""
    model = windowed_attention(keys_first=keys_first)
    analysis = graphprune.analyze(model)
    heads = group_with(analysis, "Wk", 1)
    assert heads.prunable and heads.num_units == 2, heads.frozen
    assert group_with(analysis, "Wq", 1) is heads and group_with(analysis, "bias", 1) is heads

    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    onnx.checker.check_model(result.model, full_check=True)
    widths = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert widths["Wk"] == (16, 8) and widths["bias"] == (1, 1, 4, 4)
    literals = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in result.model.graph.initializer}
    unmerge = next(n.input[1] for n in result.model.graph.node if n.name == "split_windows_heads")
    assert literals[unmerge] == [4, 1, 8, 4]  # the head count, rewritten
    x = np.random.default_rng(0).standard_normal((1, 16, 16)).astype(np.float32)
    assert run_ort(result.model, {"x": x})[0].shape == (1, 16, 16)

    kept = graphprune.prune(model, ratio=0.5, keep=["Wk"])  # the report says which kind froze
    frozen = {f["kind"] for f in kept.report["frozen"] if any("protected by keep" in r for r in f["reasons"])}
    assert "head" in frozen
