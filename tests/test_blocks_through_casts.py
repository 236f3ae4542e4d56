"""Residual blocks whose skip or branch reads ``x`` through ops that carry it unchanged.

A PyTorch 2.13 export of ResNet-50 (yahoo open_nsfw) has 309 float->float ``Cast`` nodes:
the skip of every block is ``Cast(Cast(x))`` while the branch reads ``Cast(x)``, and
``--erase-blocks 1`` found no block at all ("the model has 0"). A ``Cast`` to the type a tensor
already has, an ``Identity`` (or a ``Dropout`` at inference) leave the value as it is, so the
sum is still ``x + branch(x)``; erasing it leaves the skip as the sum's readers read it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import conv_node, make_model
from onnx import TensorProto, helper

import graphprune
from graphprune.analysis.blocks import find_residual_blocks
from graphprune.pipeline.depth import erase_blocks
from graphprune.pipeline.session import Session

FLOAT = TensorProto.FLOAT
BLOCKS = ["skip_cast", "branch_cast", "both_cast"]


def _conv_branch(x: str, tag: str) -> list[onnx.NodeProto]:
    return [
        conv_node(x, f"w{tag}a", f"h{tag}", f"b{tag}a"),
        helper.make_node("Relu", [f"h{tag}"], [f"r{tag}"]),
        conv_node(f"r{tag}", f"w{tag}b", f"o{tag}", f"b{tag}b"),
    ]


def casts_model() -> onnx.ModelProto:
    """Three blocks after a stem conv:

    - ``skip_cast``: ``Identity(Cast(s)) + branch(s)`` (the skip goes through the no-ops);
    - ``branch_cast``: ``y1 + branch(Identity(Cast(y1)))`` (the branch input does);
    - ``both_cast``: ``z = Cast(y2)``; ``Identity(Cast(z)) + branch(Cast(z))`` (both, with the
      Cast ``z`` shared by the skip and the branch), a graph output.
    """
    rng = np.random.default_rng(3)

    def w(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    nodes = [
        conv_node("x", "w0", "s", "b0"),
        # skip through Cast(float->float) and Identity, branch from s itself
        helper.make_node("Cast", ["s"], ["s_cast"], to=FLOAT),
        helper.make_node("Identity", ["s_cast"], ["s_id"]),
        *_conv_branch("s", "1"),
        helper.make_node("Add", ["s_id", "o1"], ["y1"], name="skip_cast"),
        # branch input through Cast and Identity, skip y1 itself
        helper.make_node("Cast", ["y1"], ["y1_cast"], to=FLOAT),
        helper.make_node("Identity", ["y1_cast"], ["y1_id"]),
        *_conv_branch("y1_id", "2"),
        helper.make_node("Add", ["y1", "o2"], ["y2"], name="branch_cast"),
        # both: a shared Cast, then the skip through Cast + Identity and the branch through a Cast
        helper.make_node("Cast", ["y2"], ["z"], to=FLOAT),
        helper.make_node("Cast", ["z"], ["z_skip"], to=FLOAT),
        helper.make_node("Identity", ["z_skip"], ["z_skip_id"]),
        helper.make_node("Cast", ["z"], ["z_branch"], to=FLOAT),
        *_conv_branch("z_branch", "3"),
        helper.make_node("Add", ["z_skip_id", "o3"], ["y3"], name="both_cast"),
    ]
    params = {"w0": w(4, 3, 3, 3), "b0": w(4)}
    for tag in "123":
        params |= {f"w{tag}a": w(4, 4, 3, 3), f"b{tag}a": w(4), f"w{tag}b": w(4, 4, 3, 3), f"b{tag}b": w(4)}
    return make_model(nodes, {"x": [1, 3, 6, 6]}, {"y3": None}, params)


def test_blocks_are_found_through_casts_and_identities() -> None:
    graph = Session(casts_model()).import_graph()
    blocks = {b.add: b for b in find_residual_blocks(graph)}
    assert sorted(blocks) == sorted(BLOCKS)
    # the skip is the sum's own operand; the no-op Casts and Identities are no part of a branch
    ops = {n.name: n.op for n in graph.nodes}
    for block in blocks.values():
        assert [ops[name] for name in block.nodes] == ["Conv", "Relu", "Conv"], block
    assert blocks["skip_cast"].skip != "s" and blocks["branch_cast"].skip == "y1"


def test_a_cast_to_another_type_is_not_the_same_value() -> None:
    """``Cast(float->float16->float)`` rounds: the branch reads another value than the skip."""
    nodes = [
        conv_node("x", "w0", "s", "b0"),
        helper.make_node("Cast", ["s"], ["s16"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["s16"], ["s32"], to=FLOAT),
        *_conv_branch("s", "1"),
        helper.make_node("Add", ["s32", "o1"], ["y"], name="rounded"),
    ]
    rng = np.random.default_rng(4)
    params = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
              {"w0": (4, 3, 3, 3), "b0": (4,), "w1a": (4, 4, 3, 3), "b1a": (4,), "w1b": (4, 4, 3, 3),
               "b1b": (4,)}.items()}
    model = make_model(nodes, {"x": [1, 3, 6, 6]}, {"y": None}, params)
    assert find_residual_blocks(Session(model).import_graph()) == []


def test_a_dropout_at_inference_carries_the_skip() -> None:
    """``Dropout(s) + branch(s)``: a Dropout without a training mode leaves its input as it is."""
    rng = np.random.default_rng(6)
    nodes = [
        conv_node("x", "w0", "s", "b0"),
        helper.make_node("Dropout", ["s"], ["s_drop"]),
        *_conv_branch("s", "1"),
        helper.make_node("Add", ["s_drop", "o1"], ["y"], name="dropout_skip"),
    ]
    params = {name: (rng.standard_normal(shape) * 0.2).astype(np.float32) for name, shape in
              {"w0": (4, 3, 3, 3), "b0": (4,), "w1a": (4, 4, 3, 3), "b1a": (4,), "w1b": (4, 4, 3, 3),
               "b1b": (4,)}.items()}
    model = make_model(nodes, {"x": [1, 3, 6, 6]}, {"y": None}, params)
    result = graphprune.prune(model, erase_blocks=1)
    assert result.report["depth"]["blocks_erased"] == ["dropout_skip"]
    assert result.report["verification"]["ok"]
    _check(result.model, model, ["w1b", "b1b"])


def _check(model: onnx.ModelProto, original: onnx.ModelProto, zeroed: list[str]) -> None:
    """The checker (full), an ONNX Runtime run, and the result against the original with the
    named branch weights zeroed (computed by ONNX Runtime, independently of graphprune)."""
    onnx.checker.check_model(model, full_check=True)
    reference = onnx.ModelProto()
    reference.CopyFrom(original)
    for init in reference.graph.initializer:
        if init.name in zeroed:
            shape = tuple(init.dims)
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros(shape, np.float32), init.name))
    feed = {"x": np.random.default_rng(5).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    got, want = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                 for m in (model, reference))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", BLOCKS)
def test_erasing_a_block_through_casts_is_valid(block: str) -> None:
    """Each block erased on its own (chosen by the scorer): a valid graph, verified, equal
    to the original with that branch's last conv zeroed (its bias too)."""
    model = casts_model()
    result = erase_blocks(model, 1, scorer=lambda graph, b: 0.0 if b.add == block else 1.0)
    assert result.report["depth"]["blocks_found"] == 3
    assert result.report["depth"]["blocks_erased"] == [block]
    assert result.report["verification"]["ok"]
    tag = str(BLOCKS.index(block) + 1)
    _check(result.model, model, [f"w{tag}b", f"b{tag}b"])
    ops = {n.name: n.op_type for n in result.model.graph.node}
    assert f"h{tag}" not in ops and f"o{tag}" not in ops
    assert ops.get(block, "Identity") == "Identity"  # a sum that is a graph output: Identity(skip)


def test_prune_erases_a_block_through_casts() -> None:
    """The public API: ``graphprune.prune(model, erase_blocks=1)`` erases one block (the
    data-free score picks it) and verifies; erasing all three leaves the stem."""
    model = casts_model()
    result = graphprune.prune(model, erase_blocks=1)
    erased = result.report["depth"]["blocks_erased"]
    assert result.report["depth"]["blocks_found"] == 3 and len(erased) == 1 and erased[0] in BLOCKS
    assert result.report["verification"]["ok"]
    tag = str(BLOCKS.index(erased[0]) + 1)
    _check(result.model, model, [f"w{tag}b", f"b{tag}b"])

    every = graphprune.prune(model, erase_blocks=3)
    assert sorted(every.report["depth"]["blocks_erased"]) == sorted(BLOCKS)
    assert every.report["verification"]["ok"]
    _check(every.model, model, [f"w{t}b" for t in "123"] + [f"b{t}b" for t in "123"])
    assert not any(n.op_type == "Conv" and n.input[1] != "w0" for n in every.model.graph.node)
