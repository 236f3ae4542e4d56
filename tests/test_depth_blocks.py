"""Which ``Add(x, branch(x))`` are residual blocks that depth pruning may erase.

- A branch without a weighted layer is part of an activation, not a block: the
  ``x + 0.044715 x**3`` sum inside a tanh-GELU (tf2onnx, GPT-2 exports) was erased *first* by
  ``--erase-blocks`` (its RMS is small), instead of a real block.
- A branch may read context that does not depend on ``x`` (an attention mask, position
  tables): attention blocks of transformers were never found because their branch reads the
  mask; erasing one is still exactly the original with the branch zeroed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from conftest import conv_node, make_model, positive
from onnx import helper

from graphprune.analysis.blocks import find_residual_blocks
from graphprune.errors import UsageError
from graphprune.pipeline.depth import erase_blocks
from graphprune.pipeline.session import Session
from graphprune.tables import prune_summary


def _blocks(model: onnx.ModelProto) -> list[str]:
    return [b.add for b in find_residual_blocks(Session(model).import_graph())]


def test_a_branch_without_a_weight_is_not_a_block() -> None:
    """``g = r + 0.044715 * r**3`` has the shape of a residual block but no layer; the conv
    block after it is one."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    nodes = [
        conv_node("x", "w0", "r", "b0"),
        helper.make_node("Mul", ["r", "r"], ["r2"]),
        helper.make_node("Mul", ["r2", "r"], ["r3"]),
        helper.make_node("Mul", ["c", "r3"], ["cube"]),
        helper.make_node("Add", ["r", "cube"], ["g"], name="gelu_sum"),
        conv_node("g", "w1", "h", "b1"),
        helper.make_node("Relu", ["h"], ["hr"]),
        conv_node("hr", "w2", "o", "b2"),
        helper.make_node("Add", ["g", "o"], ["out"], name="block"),
    ]
    params = {"w0": w(4, 3, 3, 3), "b0": w(4), "w1": w(4, 4, 3, 3), "b1": w(4), "w2": w(4, 4, 3, 3),
              "b2": w(4), "c": np.array(0.044715, dtype=np.float32)}
    assert _blocks(make_model(nodes, {"x": [1, 3, 6, 6]}, {"out": None}, params)) == ["block"]


def attention_model() -> onnx.ModelProto:
    """Two pre-norm blocks ``y = x + attention(LN(x), mask)`` and ``z = y + mlp(LN(y))``; the
    attention branch reads the additive mask (a graph input) besides ``x``."""
    rng = np.random.default_rng(1)

    def w(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    nodes = [
        helper.make_node("LayerNormalization", ["x", "g0", "be0"], ["n0"], axis=-1),
        helper.make_node("MatMul", ["n0", "wq"], ["q"]),
        helper.make_node("MatMul", ["n0", "wk"], ["k"]),
        helper.make_node("MatMul", ["n0", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Add", ["s", "mask"], ["sm"], name="mask_add"),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["a"]),
        helper.make_node("MatMul", ["a", "wo"], ["ao"]),
        helper.make_node("Add", ["x", "ao"], ["y"], name="attention_block"),
        helper.make_node("LayerNormalization", ["y", "g1", "be1"], ["n1"], axis=-1),
        helper.make_node("MatMul", ["n1", "up"], ["u"]),
        helper.make_node("Relu", ["u"], ["ur"]),
        helper.make_node("MatMul", ["ur", "down"], ["d"]),
        helper.make_node("Add", ["y", "d"], ["z"], name="mlp_block"),
    ]
    params = {"g0": positive(8), "be0": w(8), "wq": w(8, 8), "wk": w(8, 8), "wv": w(8, 8), "wo": w(8, 8),
              "g1": positive(8), "be1": w(8), "up": w(8, 16), "down": w(16, 8)}
    return make_model(nodes, {"x": [1, 5, 8], "mask": [1, 5, 5]}, {"z": None}, params)


def test_a_branch_that_reads_a_mask_is_a_block() -> None:
    assert _blocks(attention_model()) == ["attention_block", "mlp_block"]


def test_erasing_an_attention_block_equals_the_zeroed_branch() -> None:
    """Erase the attention block (scored first by a scorer): the result keeps the mask input
    and computes ``z = x + mlp(LN(x))``, checked here against ONNX Runtime on the original
    with ``wo`` zeroed (the branch multiplied by zero)."""
    model = attention_model()
    result = erase_blocks(model, 1, scorer=lambda graph, block: 0.0 if block.add == "attention_block" else 1.0)
    assert result.report["depth"]["blocks_erased"] == ["attention_block"]
    assert result.report["verification"]["ok"]
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for init in zeroed.graph.initializer:
        if init.name == "wo":
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros((8, 8), np.float32), "wo"))
    rng = np.random.default_rng(2)
    feed = {"x": rng.standard_normal((1, 5, 8)).astype(np.float32),
            "mask": rng.standard_normal((1, 5, 5)).astype(np.float32)}
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
           for m in (result.model, zeroed)]
    pruned_feed = {k: v for k, v in feed.items() if k in {i.name for i in result.model.graph.input}}
    np.testing.assert_allclose(run[0].run(None, pruned_feed)[0], run[1].run(None, feed)[0], rtol=1e-5, atol=1e-5)
    assert not {"wq", "wk", "wv", "wo"} & {i.name for i in result.model.graph.initializer}


def test_an_operand_that_does_not_depend_on_the_other_is_no_branch() -> None:
    """The mask addition ``s + mask`` is a sum of two variables, neither computed from the
    other: not a block (and neither is the sum of two convolutions of one input)."""
    assert "mask_add" not in _blocks(attention_model())


def test_two_consecutive_blocks_erase_together() -> None:
    """TF.js MobileFaceNet with ``--erase-blocks 2``: the two chosen blocks follow each other; the
    first one's sum was bypassed, so the second's skip input had a new name, it was left in place
    (its nodes reported erased) and the self-check failed (relative difference 0.45). Both go now,
    and the result is the original with both branches zeroed."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    nodes = [conv_node("x", "w0", "s0", "b0")]
    params = {"w0": w(4, 3, 3, 3), "b0": w(4)}
    for k in range(3):
        nodes += [conv_node(f"s{k}", f"wa{k}", f"h{k}", f"ba{k}"), helper.make_node("Relu", [f"h{k}"], [f"r{k}"]),
                  conv_node(f"r{k}", f"wb{k}", f"o{k}", f"bb{k}"),
                  helper.make_node("Add", [f"o{k}", f"s{k}"], [f"s{k + 1}"], name=f"block{k}")]
        params.update({f"wa{k}": w(4, 4, 3, 3), f"ba{k}": w(4), f"wb{k}": w(4, 4, 3, 3), f"bb{k}": w(4)})
    model = make_model(nodes, {"x": [1, 3, 6, 6]}, {"s3": None}, params)
    order = {"block0": 0.0, "block1": 0.1, "block2": 1.0}
    result = erase_blocks(model, 2, scorer=lambda graph, block: order[block.add])
    assert result.report["depth"]["blocks_erased"] == ["block0", "block1"]
    assert result.report["verification"]["ok"], result.report["verification"]
    kept = {n.name for n in result.model.graph.node}
    assert not {"block0", "block1"} & kept and "block2" in kept
    assert not {"wa0", "wb0", "wa1", "wb1"} & {i.name for i in result.model.graph.initializer}


def test_a_skip_whose_open_dims_have_other_names_is_a_block() -> None:
    """TF.js MoveNet MultiPose (tf2onnx): every tensor of an image-sized graph names its open
    dims afresh (``unk__10`` on the skip, ``unk__18`` on the sum), so no block was found and
    ``--erase-blocks`` had nothing to erase. The declared shapes disagree only in open dims:
    the concrete shapes at the verification sizes decide (equal: a block, also where the
    branch is the broadcast operand: a per-channel ``1x1`` map added to its own input)."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    nodes = [conv_node("x", "w0", "s0", "b0"),
             conv_node("s0", "wa", "h", "ba"), helper.make_node("Relu", ["h"], ["r"]),
             conv_node("r", "wb", "o", "bb"),
             helper.make_node("Add", ["o", "s0"], ["s1"], name="block"),
             helper.make_node("ReduceMean", ["s1"], ["m"], axes=[2, 3], keepdims=1),
             conv_node("m", "wc", "g", "bc", k=1),
             helper.make_node("Add", ["g", "s1"], ["out"], name="broadcast")]
    params = {"w0": w(4, 3, 3, 3), "b0": w(4), "wa": w(4, 4, 3, 3), "ba": w(4), "wb": w(4, 4, 3, 3),
              "bb": w(4), "wc": w(4, 4, 1, 1), "bc": w(4)}
    named = {"s0": [1, 4, "unk__1", "unk__2"], "h": [1, 4, "unk__3", "unk__4"], "r": [1, 4, "unk__5", "unk__6"],
             "o": [1, 4, "unk__7", "unk__8"], "s1": [1, 4, "unk__9", "unk__10"], "g": [1, 4, 1, 1]}
    model = make_model(nodes, {"x": [1, 3, "height", "width"]}, {"out": [1, 4, "unk__11", "unk__12"]}, params,
                       value_info=named, opset=17)
    assert _blocks(model) == []  # the declared shapes alone cannot tell
    result = erase_blocks(model, 1, scorer=lambda graph, block: 0.0 if block.add == "block" else 1.0)
    assert [b["add"] for b in result.report["depth"]["blocks"]] == ["block", "broadcast"]
    assert result.report["depth"]["blocks_erased"] == ["block"]
    assert result.report["verification"]["ok"], result.report["verification"]
    assert not {"wa", "wb"} & {i.name for i in result.model.graph.initializer}


def test_undeclared_shapes_are_compared_at_the_verification_sizes() -> None:
    """paddle2onnx declares no intermediate shapes, and ONNX inference stops at a computed
    ``Reshape`` (PP-OCRv4's recogniser: its four SVTR sums had no shape, no block was found).
    The concrete shapes decide: equal is a block, a broadcast skip (fewer positions) is not,
    and without concrete shapes nothing is guessed."""
    from graphprune.analysis.blocks import _same_shape

    skip, y = gs.Variable("skip", np.float32, None), gs.Variable("y", np.float32, None)
    sizes = {"skip": [1, 112, 120], "y": [1, 112, 120]}
    assert _same_shape(skip, y, lambda t: sizes.get(t.name))
    assert not _same_shape(skip, y, None)
    sizes["skip"] = [1, 1, 120]
    assert not _same_shape(skip, y, lambda t: sizes.get(t.name))
    declared = gs.Variable("skip", np.float32, [1, "a", 120])
    assert not _same_shape(declared, gs.Variable("y", np.float32, [1, "b", 121]), lambda t: [1, 112, 120])


def _squaring_blocks(count: int, gain: float) -> onnx.ModelProto:
    """``count`` blocks ``x + Mul(c, c)`` with ``c = Atan(x @ W)`` (``|W|`` scaled by
    ``gain``): the values stay small, but the data-free RMS estimate (which does not bound
    ``Atan``) squares at every block and overflows after a few."""
    rng = np.random.default_rng(0)
    nodes, x = [], "x"
    params = {}
    for k in range(count):
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"h{k}"]),
                  helper.make_node("Atan", [f"h{k}"], [f"c{k}"]),
                  helper.make_node("Mul", [f"c{k}", f"c{k}"], [f"sq{k}"]),
                  helper.make_node("Add", [x, f"sq{k}"], [f"x{k}"], name=f"add{k}")]
        params[f"w{k}"] = (rng.standard_normal((8, 8)) * gain / 8).astype(np.float32)
        x = f"x{k}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    return make_model(nodes, {"x": [1, 8]}, {"y": [1, 8]}, params)


def test_blocks_whose_estimate_overflows_are_not_ranked() -> None:
    """A network whose data-free RMS estimate overflows (scales multiplied layer after layer:
    PP-OCRv4's recogniser, TF.js selfie segmentation) scored those blocks inf or NaN, chose
    among them, and wrote NaN into the report. Such a block's score is now unknown (``None`` in
    the report) and only ranked blocks are erased; none ranked is a usage error."""
    import json

    result = erase_blocks(_squaring_blocks(12, 40.0), 1)
    scores = [b["score"] for b in result.report["depth"]["blocks"]]
    assert scores[0] is not None and None in scores, scores
    json.dumps(result.report["depth"], allow_nan=False)  # (strict JSON; the model's values stay finite)
    erased = result.report["depth"]["blocks_erased"]
    assert all(b["score"] is not None for b in result.report["depth"]["blocks"] if b["add"] in erased)
    with pytest.raises(UsageError, match="can be ranked"):
        erase_blocks(_squaring_blocks(12, 40.0), 11)


def _activation(kind: str, h: str, out: str) -> list:
    """``out = act(h)`` written as exporters write it (see the test below)."""
    if kind == "hardswish":  # paddle2onnx, TF.js
        return [helper.make_node("Add", [h, "three"], [f"{h}_p"]), helper.make_node("Clip", [f"{h}_p", "zero", "six"], [f"{h}_c"]),
                helper.make_node("Mul", [h, f"{h}_c"], [f"{h}_m"]), helper.make_node("Div", [f"{h}_m", "six"], [out])]
    if kind == "gelu":  # PaddleOCR v6, TorchScript
        return [helper.make_node("Div", [h, "sqrt2"], [f"{h}_d"]), helper.make_node("Erf", [f"{h}_d"], [f"{h}_e"]),
                helper.make_node("Add", [f"{h}_e", "one"], [f"{h}_a"]), helper.make_node("Mul", [h, f"{h}_a"], [f"{h}_m"]),
                helper.make_node("Mul", [f"{h}_m", "half"], [out])]
    # prelu, TF.js: Min(0, x) * a + Max(0, x)
    return [helper.make_node("Min", ["zero", h], [f"{h}_n"]), helper.make_node("Mul", [f"{h}_n", "slope"], [f"{h}_s"]),
            helper.make_node("Max", ["zero", h], [f"{h}_x"]), helper.make_node("Add", [f"{h}_s", f"{h}_x"], [out])]


@pytest.mark.parametrize("kind", ["hardswish", "gelu", "prelu"])
def test_activations_written_as_products_keep_the_estimate_finite(kind) -> None:
    """Exporters write activations as a tensor times a bounded function of itself: HardSwish
    ``x * Clip(x + 3, 0, 6) / 6`` (paddle2onnx), GELU ``x * (1 + Erf(x / sqrt 2)) / 2``
    (PaddleOCR v6), PReLU ``Min(0, x) a + Max(0, x)`` (TF.js). The estimate took the ``Clip``
    and ``Erf`` as unbounded, so the product squared the stream's scale at every layer (all of
    PP-OCRv4's recogniser blocks scored ``inf``), and read ``Min`` / ``Max`` as their constant
    0 (every MobileFaceNet block 0/0). Now every block of 40 is ranked, within a small range."""
    rng = np.random.default_rng(0)
    nodes, x = [], "x"
    params = {"three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32),
              "six": np.array(6.0, np.float32), "sqrt2": np.array(np.sqrt(2), np.float32),
              "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32),
              "slope": np.full((8,), 0.25, np.float32)}
    for k in range(40):
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"h{k}"]), *_activation(kind, f"h{k}", f"a{k}"),
                  helper.make_node("MatMul", [f"a{k}", f"v{k}"], [f"o{k}"]),
                  helper.make_node("Add", [x, f"o{k}"], [f"x{k}"], name=f"add{k}")]
        params[f"w{k}"] = (rng.standard_normal((8, 8)) * 4 / np.sqrt(8)).astype(np.float32)
        params[f"v{k}"] = (rng.standard_normal((8, 8)) / np.sqrt(8) / (1 + k % 3)).astype(np.float32)
        x = f"x{k}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    result = erase_blocks(make_model(nodes, {"x": [1, 8]}, {"y": [1, 8]}, params), 1)
    scores = [b["score"] for b in result.report["depth"]["blocks"]]
    assert len(scores) == 40 and all(s is not None and 0.01 < s < 10 for s in scores), scores


def test_int8_and_masked_blocks_score_as_their_float_model(tmp_path) -> None:
    """The data-free block scores of a dynamic-int8 model (``DynamicQuantizeLinear`` ->
    ``MatMulInteger`` -> rescaling ``Mul``s) are those of its float model: the run-time scale
    counted as the input's RMS squared the estimate at every layer (a T5's int8 FFN blocks
    scored 1e-92 and were always erased first). An additive mask of -1e30 before a Softmax no
    longer swamps the stream (the Softmax bounds its output)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from graphprune.analysis.blocks import relative_branch_scales

    rng = np.random.default_rng(0)
    nodes, x = [], "x"
    params: dict = {"mask": np.full((1, 16), -1e30, np.float32)}
    for k in range(3):
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"h{k}"]), helper.make_node("Relu", [f"h{k}"], [f"r{k}"]),
                  helper.make_node("MatMul", [f"r{k}", f"v{k}"], [f"o{k}"]),
                  helper.make_node("Add", [x, f"o{k}"], [f"x{k}"], name=f"add{k}")]
        params[f"w{k}"] = (rng.standard_normal((16, 64)) / 4).astype(np.float32)
        params[f"v{k}"] = (rng.standard_normal((64, 16)) / (8 * (k + 1))).astype(np.float32)
        x = f"x{k}"
    nodes += [helper.make_node("Add", [x, "mask"], ["masked"]), helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "pv"], ["po"]), helper.make_node("Add", [x, "po"], ["y"], name="add_attn")]
    params["pv"] = (rng.standard_normal((16, 16))).astype(np.float32)
    model = make_model(nodes, {"x": [4, 16]}, {"y": [4, 16]}, params)
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)

    def scores(path) -> list[float]:
        graph = Session(str(path)).import_graph()
        return relative_branch_scales(graph, find_residual_blocks(graph))

    floats, ints = scores(tmp_path / "f.onnx"), scores(tmp_path / "q.onnx")
    assert len(floats) == len(ints) == 4, (floats, ints)
    assert all(0.05 < f < 20 for f in floats), floats  # (the mask's -1e30 does not reach the stream)
    assert all(abs(np.log(i / f)) < np.log(1.5) for f, i in zip(floats, ints, strict=True)), (floats, ints)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_static_int8_blocks_score_as_their_float_model_and_erase(tmp_path, fmt) -> None:
    """ONNX Runtime's static int8 models: in QDQ form the weights are ``DequantizeLinear``s of
    integer constants, which the estimate read as the integers (an FFN block of a QDQ MiniLM
    scored 1e11, its attention blocks 1.3); in QOperator form the residual sums are
    ``QLinearAdd``s, which depth pruning did not see ("the model has 0" blocks). Both now score
    as the float model, and an erased ``QLinearAdd`` block reads its zero point where the
    branch was: the original with the branch zeroed, exactly."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from graphprune.analysis.blocks import relative_branch_scales

    rng = np.random.default_rng(1)
    nodes, x, params = [], "x", {}
    for k in range(3):
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"h{k}"]), helper.make_node("Add", [f"h{k}", f"b{k}"], [f"hb{k}"]),
                  helper.make_node("Relu", [f"hb{k}"], [f"r{k}"]),
                  helper.make_node("MatMul", [f"r{k}", f"v{k}"], [f"o{k}"]),
                  helper.make_node("Add", [x, f"o{k}"], [f"x{k}"], name=f"add{k}")]
        params[f"w{k}"] = (rng.standard_normal((16, 64)) / 4).astype(np.float32)
        params[f"b{k}"] = (rng.standard_normal(64) / 10).astype(np.float32)
        params[f"v{k}"] = (rng.standard_normal((64, 16)) / (8 * (k + 1))).astype(np.float32)
        x = f"x{k}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    onnx.save(make_model(nodes, {"x": [4, 16]}, {"y": [4, 16]}, params), tmp_path / "f.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    if fmt == "qoperator":
        assert "QLinearAdd" in {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}

    def scores(path) -> list[float]:
        graph = Session(str(path)).import_graph()
        return relative_branch_scales(graph, find_residual_blocks(graph))

    floats, ints = scores(tmp_path / "f.onnx"), scores(tmp_path / "q.onnx")
    assert len(floats) == len(ints) == 3, (floats, ints)
    assert all(abs(np.log(i / f)) < np.log(1.2) for f, i in zip(floats, ints, strict=True)), (floats, ints)

    result = erase_blocks(str(tmp_path / "q.onnx"), 1)
    assert result.report["depth"]["blocks_erased"] == [result.report["depth"]["blocks"][int(np.argmin(ints))]["add"]]
    assert result.report["verification"]["ok"], result.report["verification"]
    if fmt == "qoperator":  # the same QLinearAdd on the same integers (QDQ fuses otherwise after the erase)
        assert result.report["verification"]["max_abs_diff"] == 0
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("MatMul" if fmt == "qdq" else "QLinearMatMul") == 4  # one block's two layers gone
    feed = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    again = erase_blocks(result.model, 1)  # the QLinearAdd that reads its zero point is no block
    assert len(again.report["depth"]["blocks"]) == 2


def test_a_skip_over_blocks_is_a_stage_not_a_block() -> None:
    """``y = x + backbone(x)`` whose backbone holds residual blocks (MAXIM's global skip; an
    attention mask added to a later layer's scores, whose "branch" is every layer before, in
    chython-rxnmap) was a block too, scored lowest, and erased: the whole network went (22.2 M
    parameters -> 0), exit 0. Such a sum is a stage: listed, never erased; the inner blocks are
    the ones to erase."""
    rng = np.random.default_rng(0)
    nodes, x, params = [], "x", {}
    for k in range(3):
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"h{k}"]), helper.make_node("Relu", [f"h{k}"], [f"r{k}"]),
                  helper.make_node("MatMul", [f"r{k}", f"v{k}"], [f"o{k}"]),
                  helper.make_node("Add", [x, f"o{k}"], [f"x{k}"], name=f"add{k}")]
        params[f"w{k}"] = (rng.standard_normal((8, 8)) / 3).astype(np.float32)
        params[f"v{k}"] = (rng.standard_normal((8, 8)) / 3).astype(np.float32)
        x = f"x{k}"
    nodes += [helper.make_node("MatMul", [x, "head"], ["tail"]), helper.make_node("Mul", ["tail", "tiny"], ["small"]),
              helper.make_node("Add", ["x", "small"], ["y"], name="global_skip")]
    params["head"] = (rng.standard_normal((8, 8)) / 3).astype(np.float32)
    params["tiny"] = np.array(1e-3, np.float32)  # the backbone adds little: the lowest score
    model = make_model(nodes, {"x": [2, 8]}, {"y": [2, 8]}, params)
    stages: list = []
    blocks = find_residual_blocks(Session(model).import_graph(), stages=stages)
    assert [b.add for b in blocks] == ["add0", "add1", "add2"]
    assert [s.add for s in stages] == ["global_skip"] and sorted(stages[0].contains) == ["add0", "add1", "add2"]
    result = erase_blocks(model, 1)
    depth = result.report["depth"]
    assert depth["blocks_erased"][0] in ("add0", "add1", "add2")
    assert depth["stages_not_erased"] == [{"add": "global_skip", "skip": "x", "num_nodes": len(stages[0].nodes),
                                           "contains": 3}]
    assert result.report["params_after"] > 0.7 * result.report["params_before"]


def test_a_fraction_of_no_block_is_a_usage_error() -> None:
    """``--erase-blocks 0.5`` on a model with weights and no residual block said
    ``ZeroDivisionError`` (the hint divided by the number of blocks); now exit 2 with why."""
    import graphprune

    rng = np.random.default_rng(0)
    nodes = [conv_node("x", "w0", "a", "b0"), helper.make_node("Relu", ["a"], ["r"]), conv_node("r", "w1", "y", "b1")]
    params = {"w0": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "b0": np.zeros(4, np.float32),
              "w1": rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "b1": np.zeros(4, np.float32)}
    model = make_model(nodes, {"x": [1, 3, 6, 6]}, {"y": None}, params)
    with pytest.raises(UsageError, match="the model has 0 residual blocks"):
        graphprune.prune(model, erase_blocks=0.5)


def _gated_and_conv_blocks() -> onnx.ModelProto:
    """Two squeeze-and-excitation gates ``s + s * sigmoid(conv(GAP(s)))`` (PP-OCR's detector
    neck has eight) around one block of two 3x3 convs."""
    rng = np.random.default_rng(3)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    def gate(k: int) -> list:
        params.update({f"wg{k}": w(8, 8, 1, 1), f"bg{k}": w(8)})
        return [helper.make_node("GlobalAveragePool", [f"s{k}"], [f"p{k}"]),
                conv_node(f"p{k}", f"wg{k}", f"g{k}", f"bg{k}", k=1),
                helper.make_node("Sigmoid", [f"g{k}"], [f"sg{k}"]),
                helper.make_node("Mul", [f"s{k}", f"sg{k}"], [f"m{k}"]),
                helper.make_node("Add", [f"s{k}", f"m{k}"], [f"s{k + 1}"], name=f"gate{k}")]

    params = {"w0": w(8, 3, 3, 3), "b0": w(8), "wa": w(8, 8, 3, 3), "ba": w(8), "wb": w(8, 8, 3, 3), "bb": w(8)}
    nodes = [conv_node("x", "w0", "s0", "b0"), *gate(0),
             conv_node("s1", "wa", "h", "ba"), helper.make_node("Relu", ["h"], ["r"]),
             conv_node("r", "wb", "o", "bb"), helper.make_node("Add", ["o", "s1"], ["s2"], name="convblock"),
             *gate(2)]
    return make_model(nodes, {"x": [1, 3, 16, 16]}, {"s3": None}, params)


def test_a_gate_that_computes_nearly_nothing_is_erased_after_blocks_that_do() -> None:
    """PP-OCR's detector with ``--erase-blocks 2`` erased two gates ``x + x * gate(x)`` (MACs
    1.000 after, the output 0.645 away): blocks are ranked by importance, and the gates ranked
    lowest. A block whose branch computes under NEAR_FREE_SHARE of the MACs now comes after
    every block that saves compute, and erasing only such blocks is warned about."""
    model = _gated_and_conv_blocks()
    order = {"gate0": 0.0, "gate2": 0.1, "convblock": 1.0}
    result = erase_blocks(model, 1, scorer=lambda graph, block: order[block.add])
    depth = result.report["depth"]
    assert depth["blocks_erased"] == ["convblock"]
    shares = {b["add"]: b["macs_share"] for b in depth["blocks"]}
    assert shares["gate0"] < 1e-3 and shares["gate2"] < 1e-3 and shares["convblock"] > 0.5
    assert depth["macs_share_erased"] == pytest.approx(shares["convblock"], rel=1e-4)
    assert "warning" not in depth and result.report["verification"]["ok"]
    assert result.report["macs_after"] < 0.5 * result.report["macs_before"]

    both = erase_blocks(model, 2, scorer=lambda graph, block: order[block.add]).report
    assert both["depth"]["blocks_erased"] == ["convblock", "gate0"]
    gates = erase_blocks(_gated_and_conv_blocks(), 3, scorer=lambda graph, block: order[block.add]).report
    assert "warning" not in gates["depth"]  # a block that computes was among them
    only = erase_blocks(_gates_only(), 1).report
    assert only["depth"]["macs_share_erased"] < 1e-3 and "saves nearly nothing" in only["depth"]["warning"]
    assert "saves nearly nothing" in prune_summary(only)


def _gates_only() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    nodes = [conv_node("x", "w0", "s0", "b0"), helper.make_node("GlobalAveragePool", ["s0"], ["p"]),
             conv_node("p", "wg", "g", "bg", k=1), helper.make_node("Sigmoid", ["g"], ["sg"]),
             helper.make_node("Mul", ["s0", "sg"], ["m"]), helper.make_node("Add", ["s0", "m"], ["y"], name="gate")]
    params = {k: (rng.standard_normal(s) * 0.3).astype(np.float32)
              for k, s in {"w0": (8, 3, 3, 3), "b0": (8,), "wg": (8, 8, 1, 1), "bg": (8,)}.items()}
    return make_model(nodes, {"x": [1, 3, 32, 32]}, {"y": None}, params)
