"""A mixture of experts whose stacked expert weights are picked per token at run time.

Hugging Face's MoE layers (Mixtral, Qwen2-MoE, OLMoE, ...) keep every expert's weights in one
tensor, ``gate_up [experts, 2 * inner, hidden]`` and ``down [experts, hidden, inner]``, and
(with ``experts_implementation="batched_mm"``, the one that exports) read the expert each token
was routed to with ``weight[expert_index]``. The dynamo exporter writes that as a ``GatherND``
with the router's ``TopK`` indices, followed by a batched ``MatMul``; the TorchScript exporter
as a ``Gather``. The expert axis is indexed at computed positions and freezes; the inner axis
passes through the lookup and is the MLP width of every expert at once (one unit is the same
neuron in each expert). Before, the ``GatherND`` path left that group without a producer, so
it was neither pruned nor reported as frozen.
"""

from __future__ import annotations

import numpy as np
import onnx
from conftest import assert_prunes_exactly, group_with, make_model
from onnx import helper

import graphprune
from graphprune.analysis.roles import CONSUMER, PRODUCER

OPS_UNDER_TEST = ["GatherND", "Gather"]

TOKENS, HIDDEN, INNER, EXPERTS = 6, 8, 16, 4
#: what the zeroed original zeroes (the test's own role table reads weights used directly only)
ROLES = {("gate_up", 1): PRODUCER, ("down", 2): CONSUMER}


def moe(lookup: str = "GatherND") -> onnx.ModelProto:
    """``x [tokens, hidden]`` routed to one expert per token (``TopK`` of a router), a
    SwiGLU expert MLP with the picked expert's weights, added to ``x``."""
    if lookup == "GatherND":
        pick = [helper.make_node("GatherND", ["gate_up", "expert"], ["w1"], name="pick_gate_up"),
                helper.make_node("GatherND", ["down", "expert"], ["w2"], name="pick_down")]
    else:
        pick = [helper.make_node("Squeeze", ["expert", "last"], ["expert_1d"]),
                helper.make_node("Gather", ["gate_up", "expert_1d"], ["w1"], axis=0, name="pick_gate_up"),
                helper.make_node("Gather", ["down", "expert_1d"], ["w2"], axis=0, name="pick_down")]
    nodes = [
        helper.make_node("MatMul", ["x", "router"], ["logits"]),
        helper.make_node("TopK", ["logits", "one"], ["score", "expert"], axis=-1, name="route"),
        *pick,
        helper.make_node("Unsqueeze", ["x", "last"], ["x_col"]),
        helper.make_node("MatMul", ["w1", "x_col"], ["h_col"], name="expert_up"),
        helper.make_node("Squeeze", ["h_col", "last"], ["h"]),
        helper.make_node("Split", ["h"], ["gate", "up"], axis=-1, num_outputs=2),
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["act"]),
        helper.make_node("Unsqueeze", ["act", "last"], ["act_col"]),
        helper.make_node("MatMul", ["w2", "act_col"], ["y_col"], name="expert_down"),
        helper.make_node("Squeeze", ["y_col", "last"], ["y"]),
        helper.make_node("Mul", ["y", "score"], ["weighted"]),
        helper.make_node("Add", ["x", "weighted"], ["out"]),
    ]
    params = {
        "router": (HIDDEN, EXPERTS),
        "gate_up": (EXPERTS, 2 * INNER, HIDDEN),
        "down": (EXPERTS, HIDDEN, INNER),
        "one": np.array([1], np.int64),
        "last": np.array([-1], np.int64),
    }
    return make_model(nodes, {"x": (TOKENS, HIDDEN)}, {"out": None}, params, opset=18)


def test_the_experts_inner_width_prunes_through_a_computed_lookup() -> None:
    model = moe("GatherND")
    analysis = graphprune.analyze(model)
    group = group_with(analysis, "gate_up", 1)
    assert group.prunable and group.num_units == INNER, (group.frozen, group.num_units)
    assert group is group_with(analysis, "down", 2)
    # the expert axis is read at the router's positions: frozen, with the node named
    expert_axis = group_with(analysis, "gate_up", 0)
    assert expert_axis.frozen and "indexed axis at GatherND 'pick_gate_up'" in expert_axis.frozen[0]
    feeds = {"x": np.random.default_rng(1).standard_normal((TOKENS, HIDDEN)).astype(np.float32)}
    result = assert_prunes_exactly(model, 0.5, feeds=feeds, roles=ROLES)
    weights = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert weights["gate_up"] == [EXPERTS, INNER, HIDDEN]  # half of each half of the packed axis
    assert weights["down"] == [EXPERTS, HIDDEN, INNER // 2]


def test_gather_and_gathernd_lookups_prune_alike() -> None:
    """The TorchScript exporter's ``Gather`` form and the dynamo exporter's ``GatherND`` form
    of the same layer give the same group and remove the same neurons."""
    feeds = {"x": np.random.default_rng(2).standard_normal((TOKENS, HIDDEN)).astype(np.float32)}
    kept = []
    for lookup in ("Gather", "GatherND"):
        result = assert_prunes_exactly(moe(lookup), 0.25, feeds=feeds, roles=ROLES)
        kept.append({t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer
                     if t.name in ("gate_up", "down")})
    for name in ("gate_up", "down"):
        np.testing.assert_array_equal(kept[0][name], kept[1][name])


def token_split() -> onnx.ModelProto:
    """JetMoE's form: the tokens are split by the number routed to each expert (sizes known
    only at run time: here the count of tokens whose first feature is positive), each part
    runs through its expert's MLP, and the parts are joined again."""
    nodes = [
        helper.make_node("Gather", ["x", "zero"], ["first"], axis=1),
        helper.make_node("Greater", ["first", "zero_f"], ["positive"]),
        helper.make_node("Cast", ["positive"], ["flags"], to=onnx.TensorProto.INT64),
        helper.make_node("ReduceSum", ["flags", "zero_1d"], ["count"], keepdims=1),
        helper.make_node("Sub", ["tokens", "count"], ["rest"]),
        helper.make_node("Concat", ["count", "rest"], ["sizes"], axis=0),
        helper.make_node("Split", ["x", "sizes"], ["part_a", "part_b"], axis=0, name="by_expert"),
        helper.make_node("MatMul", ["part_a", "up_a"], ["ha"]),
        helper.make_node("Relu", ["ha"], ["ra"]),
        helper.make_node("MatMul", ["ra", "down_a"], ["ya"]),
        helper.make_node("MatMul", ["part_b", "up_b"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["rb"]),
        helper.make_node("MatMul", ["rb", "down_b"], ["yb"]),
        helper.make_node("Concat", ["ya", "yb"], ["out"], axis=0),
    ]
    params = {
        "up_a": (HIDDEN, INNER), "down_a": (INNER, HIDDEN), "up_b": (HIDDEN, INNER), "down_b": (INNER, HIDDEN),
        "zero": np.array(0, np.int64), "zero_f": np.array(0.0, np.float32),
        "zero_1d": np.array([0], np.int64), "tokens": np.array([TOKENS], np.int64),
    }
    return make_model(nodes, {"x": (TOKENS, HIDDEN)}, {"out": None}, params, opset=18,
                      value_info={"part_a": ("a", HIDDEN), "part_b": ("b", HIDDEN)})


def test_a_split_of_the_tokens_at_run_time_freezes_only_the_token_axis() -> None:
    """Before, a ``Split`` whose sizes are computed froze every axis of its input and
    outputs, and with them the experts' widths (JetMoE: nothing prunable)."""
    model = token_split()
    analysis = graphprune.analyze(model)
    for expert in ("a", "b"):
        group = group_with(analysis, f"up_{expert}", 1)
        assert group.prunable and group.num_units == INNER, group.frozen
    assert any("output size unknown at Split 'by_expert'" in r
               for r in analysis.context.dim_freeze.get(("x", 0), []))
    x = np.random.default_rng(3).standard_normal((TOKENS, HIDDEN)).astype(np.float32)
    x[:2, 0], x[2:, 0] = 1.0, -1.0  # both experts get tokens
    assert_prunes_exactly(model, 0.5, feeds={"x": x})
