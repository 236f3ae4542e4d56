"""The passes lossless and depth pruning are made of, and the rule knowledge they ask for.

Each pass runs through a :class:`PassManager` on a real graph: the rewritten model must
compute what the reference computes (ONNX Runtime), and a second run must be a no-op.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import (
    conv_node,
    default_feeds,
    group_with,
    initializer,
    make_model,
    relative_difference,
    run_ort,
)
from graphprune.passes.base import PassContext, PassManager
from graphprune.passes.cleanup import DeadCodeEliminationPass
from graphprune.passes.drop_concat_inputs import DropConcatInputsPass
from graphprune.passes.erase_blocks import EraseBlocksPass
from graphprune.passes.erase_operators import EraseOperatorsPass
from graphprune.passes.fold_constants import ConstantFold, FoldConstantsPass, constant_folds
from graphprune.passes.prune_channels import PruneChannelsPass
from onnx import helper
from test_lossless import resnet_like, vector, weight

from graphprune.analysis import analyze_graph
from graphprune.analysis.blocks import find_residual_blocks, propagate_rms
from graphprune.analysis.zero_analysis import analyze_constants, find_zero_groups
from graphprune.io import model_io
from graphprune.pipeline.depth import zeroed_branches
from graphprune.pipeline.session import Session
from graphprune.planning.plan import Plan
from graphprune.planning.planner import group_plan
from graphprune.verify.metrics import count_macs


def session_graph(model: onnx.ModelProto) -> tuple[Session, gs.Graph]:
    session = Session(model)
    return session, session.import_graph()


def run_twice(p, graph: gs.Graph, opset: int) -> tuple[bool, bool, dict]:
    """``modified`` of a first and a second run, and the first run's stats."""
    ctx = PassContext(opset=opset)
    first = PassManager([p]).run_one(p, graph, ctx)
    second = PassManager([p]).run_one(p, graph, PassContext(opset=opset))
    return first.modified, second.modified, first.stats


def exported(session: Session, graph: gs.Graph) -> onnx.ModelProto:
    """The rewritten graph as a self-contained model that passes the full checker."""
    session.graph = graph
    model = session.store.materialize(session.export())
    onnx.checker.check_model(model, full_check=True)
    return model


def difference(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> float:
    feeds = default_feeds(reference, seed=3, batch=1)
    return relative_difference(run_ort(reference, feeds), run_ort(candidate, feeds))


# --------------------------------------------------------------------------- FoldConstantsPass
def sigmoid_into_1x1() -> onnx.ModelProto:
    """Channels 1 and 2 of ``c1`` are zero, so ``Sigmoid`` makes them 0.5 everywhere."""
    return make_model(
        [
            conv_node("x", "w1", "c1", "b1"),
            helper.make_node("Sigmoid", ["c1"], ["s"]),
            conv_node("s", "w2", "out", "b2", k=1, pads=[0, 0, 0, 0]),
        ],
        {"x": [1, 3, 6, 6]},
        {"out": None},
        {"w1": weight(4, 3, zero_rows=(1, 2)), "b1": vector(4, zero=(1, 2)), "w2": weight(5, 4, 1), "b2": vector(5)},
    )


def test_fold_constants_pass_folds_into_the_bias_exactly_and_once():
    model = sigmoid_into_1x1()
    session, graph = session_graph(model)
    analysis = analyze_graph(graph, session.opset)
    folds = constant_folds(find_zero_groups(analysis, analyze_constants(graph, session.opset)))
    assert [(f.node, f.weight, f.axis, f.channels) for f in folds] == [("out", "w2", 1, (1, 2))]
    assert folds[0].values == pytest.approx((0.5, 0.5))
    fold = FoldConstantsPass(folds)
    assert repr(fold) == "FoldConstantsPass(folds=1)"
    first, second, stats = run_twice(fold, graph, session.opset)
    assert first and not second and stats == {"constants_folded": 1}
    w2 = graph.tensors()["w2"].values
    assert not w2[:, 1:3].any() and w2[:, [0, 3]].all()
    assert difference(model, exported(session, graph)) <= 1e-6


def test_fold_constants_pass_creates_a_gemm_bias_and_honours_alpha():
    # x[:, 1] is always 2.5 and x[:, 2] always -1: Mul by a 0/1 mask, then Add a constant
    mask = np.array([[1, 0, 0, 1]], np.float32)
    shift = np.array([[0, 2.5, -1, 0]], np.float32)
    model = make_model(
        [
            helper.make_node("Mul", ["x", "mask"], ["m"]),
            helper.make_node("Add", ["m", "shift"], ["a"]),
            helper.make_node("Gemm", ["a", "w"], ["out"], name="fc", transB=1, alpha=0.5),
        ],
        {"x": [1, 4]},
        {"out": None},
        {"mask": mask, "shift": shift, "w": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)},
    )
    session, graph = session_graph(model)
    folds = [ConstantFold("fc", "w", 1, (1, 2), (2.5, -1.0))]
    first, second, _ = run_twice(FoldConstantsPass(folds), graph, session.opset)
    assert first and not second
    fc = next(n for n in graph.nodes if n.name == "fc")
    assert len(fc.inputs) == 3 and isinstance(fc.inputs[2], gs.Constant)
    assert difference(model, exported(session, graph)) <= 1e-6


def test_fold_constants_pass_refuses_a_padded_conv():
    model = sigmoid_into_1x1()
    session, graph = session_graph(model)
    conv = next(n for n in graph.nodes if n.name == "out")
    conv.attrs["pads"] = [1, 1, 1, 1]  # a border reads 0, not 0.5: folding would not be exact
    first, _, stats = run_twice(FoldConstantsPass([ConstantFold("out", "w2", 1, (1,), (0.5,))]), graph, session.opset)
    assert not first and stats == {"constants_folded": 0}
    np.testing.assert_array_equal(graph.tensors()["w2"].values, initializer(model, "w2"))


# --------------------------------------------------------------------------- DropConcatInputsPass
def test_drop_concat_inputs_pass_with_channel_removal_keeps_the_function():
    model = make_model(
        [
            conv_node("x", "wa", "a", "ba"),
            conv_node("x", "wb", "b", "bb"),
            helper.make_node("Relu", ["b"], ["br"]),
            helper.make_node("Concat", ["a", "br"], ["c"], name="cat", axis=1),
            conv_node("c", "wc", "out", "bc"),
        ],
        {"x": [1, 3, 6, 6]},
        {"out": None},
        {"wa": weight(4, 3), "ba": vector(4), "wb": weight(3, 3, zero_rows=range(3)),
         "bb": np.zeros(3, np.float32), "wc": weight(2, 7), "bc": vector(2)},
    )
    session, graph = session_graph(model)
    analysis = analyze_graph(graph, session.opset)
    group = group_with(analysis, "br", 1)
    units = sorted({int(u) for u in group.unit_of[("br", 1)]})
    plan = Plan(groups=[group_plan(group, units, analysis.context.tensors)])
    drop = DropConcatInputsPass({("cat", "br")})
    assert repr(drop) == "DropConcatInputsPass(drops=1)"
    ctx = PassContext(opset=session.opset)
    PassManager([drop, DeadCodeEliminationPass(), PruneChannelsPass(analysis, plan)]).run(graph, ctx)
    assert ctx.stats["DropConcatInputsPass"] == {"concat_inputs_dropped": 1}
    assert not {"b", "Relu_2"} & {n.name for n in graph.nodes}
    assert graph.tensors()["wc"].values.shape == (2, 4, 3, 3)
    assert difference(model, exported(session, graph)) <= 1e-6
    assert PassManager([drop]).run(graph, PassContext(opset=session.opset)).modified is False


def test_drop_concat_inputs_pass_never_empties_a_concat_and_ignores_other_ops():
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Concat", ["r"], ["out"], name="cat", axis=1),
        ],
        {"x": [1, 3, 4, 4]},
        {"out": None},
    )
    session, graph = session_graph(model)
    first, _, _ = run_twice(DropConcatInputsPass({("cat", "r"), ("relu", "x")}), graph, session.opset)
    assert not first
    assert [len(n.inputs) for n in graph.nodes] == [1, 1]


# --------------------------------------------------------------------------- EraseBlocksPass
def test_erase_blocks_pass_equals_the_zeroed_branch_original():
    session, graph = session_graph(resnet_like())
    blocks = find_residual_blocks(graph)
    erase = EraseBlocksPass([blocks[1]])
    assert repr(erase) == "EraseBlocksPass(blocks=['add1'])"
    first, second, stats = run_twice(erase, graph, session.opset)
    assert first and not second and stats == {"blocks_erased": 1}
    names = {n.name for n in graph.nodes}
    assert not ({"add1", *blocks[1].nodes} & names) and {"add0", "add2"} <= names
    reference = session.store.materialize(zeroed_branches(session, [blocks[1]]))
    assert difference(reference, exported(session, graph)) == 0.0


def test_erase_blocks_pass_keeps_a_graph_output_sum_as_identity():
    model = make_model(
        [
            conv_node("x", "w0", "s", "b0"),
            conv_node("s", "w1", "h", "b1"),
            helper.make_node("Add", ["s", "h"], ["out"], name="add"),
        ],
        {"x": [1, 3, 6, 6]},
        {"out": None},
        {"w0": weight(4, 3), "b0": vector(4), "w1": weight(4, 4), "b1": vector(4)},
    )
    session, graph = session_graph(model)
    blocks = find_residual_blocks(graph)
    assert [b.add for b in blocks] == ["add"]
    first, second, _ = run_twice(EraseBlocksPass(blocks), graph, session.opset)
    assert first and not second
    assert [(n.name, n.op) for n in graph.nodes] == [("s", "Conv"), ("add", "Identity")]
    reference = session.store.materialize(zeroed_branches(session, blocks))
    assert difference(reference, exported(session, graph)) == 0.0


# --------------------------------------------------------------------------- rule knowledge
def test_erase_pass_bypasses_only_a_neutral_operand():
    # Sub(x, 0) is x, but Sub(0, x) is -x: only the second operand of Sub is neutral at 0
    zero = {"wz": weight(4, 3, zero_rows=range(4)), "bz": np.zeros(4, np.float32)}
    for inputs, bypassed in ((["x2", "z"], 1), (["z", "x2"], 0)):
        model = make_model(
            [
                conv_node("x", "wz", "z", "bz"),
                conv_node("x", "w", "x2", "b"),
                helper.make_node("Sub", inputs, ["d"], name="sub"),
                conv_node("d", "w3", "out", "b3"),
            ],
            {"x": [1, 3, 6, 6]},
            {"out": None},
            {**zero, "w": weight(4, 3, seed=1), "b": vector(4), "w3": weight(2, 4), "b3": vector(2)},
        )
        session, graph = session_graph(model)
        first, second, stats = run_twice(EraseOperatorsPass(), graph, session.opset)
        assert first and not second
        assert stats["bypassed"] == bypassed and stats["constant_operands"] == 1 - bypassed
        assert ("sub" in {n.name for n in graph.nodes}) is (bypassed == 0)
        assert difference(model, exported(session, graph)) <= 1e-6


def test_macs_come_from_the_rules_and_unknown_ops_count_nothing():
    model = make_model(
        [
            conv_node("x", "w", "c", k=3),                                    # 4*8*8 * 3*3*3
            helper.make_node("ConvTranspose", ["c", "wt"], ["t"], kernel_shape=[2, 2], strides=[2, 2]),  # 4*8*8 * 2*2*2
            helper.make_node("GlobalAveragePool", ["t"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Transpose", ["f"], ["ft"], perm=[1, 0]),
            helper.make_node("Gemm", ["ft", "fc"], ["y"], transA=1),          # 1*5 * 2
            helper.make_node("MatMul", ["y", "m"], ["z"]),                    # 1*6 * 5
            helper.make_node("Unknown", ["z"], ["out"], domain="custom.test"),
        ],
        {"x": [1, 3, 8, 8]},
        {"out": [1, 6]},
        {"w": (4, 3, 3, 3), "wt": (4, 2, 2, 2), "fc": (2, 5), "m": (5, 6)},
        extra_opsets={"custom.test": 1},
        value_info={"out": [1, 6]},
        check=False,
    )
    model = model_io.infer_shapes(model)
    assert count_macs(model) == 4 * 64 * 27 + 4 * 64 * 8 + 5 * 2 + 6 * 5


def test_rms_estimates_follow_the_rules_and_pass_through_unknown_ops():
    x = gs.Variable("x", np.float32, [1, 2, 4, 4])
    w = gs.Constant("w", np.array([[[[3.0]], [[4.0]]]], np.float32))  # one output: 3 x0 + 4 x1
    c, r, u = (gs.Variable(n, np.float32) for n in ("c", "r", "u"))
    nodes = [
        gs.Node("Conv", "conv", inputs=[x, w], outputs=[c]),
        gs.Node("Relu", "relu", inputs=[c], outputs=[r]),
        gs.Node("Unknown", "custom", inputs=[r], outputs=[u], domain="custom.test"),
    ]
    rms = propagate_rms(nodes, {"x": np.ones(2)}, 17)
    np.testing.assert_allclose(rms["c"], [5.0])
    np.testing.assert_allclose(rms["r"], [5.0 / np.sqrt(2)])
    np.testing.assert_allclose(rms["u"], rms["r"])
