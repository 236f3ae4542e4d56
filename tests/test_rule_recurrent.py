"""LSTM / GRU / RNN (graphprune/rules/recurrent.py): ``MatMul 'proj' -> <recurrent> -> MatMul 'head'``.

The projection makes the recurrent layer's input features, the recurrent layer has ``H``
hidden units, the head reads them (both directions, after a Transpose and a Reshape, when
bidirectional). A hidden unit owns rows ``g*H + h`` of W, R and B for every gate, column
``h`` of R and channel ``h`` of Y, Y_h and the initial states; pruning it must equal zeroing
those weights, and the input features of the layer form a group with the projection.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from conftest import (
    assert_prunes_exactly,
    attr,
    group_with,
    initializer,
    ints,
    make_model,
    node,
    parameter_roles,
)
from onnx import helper

import graphprune
from graphprune.analysis.roles import CONSUMER, PRODUCER

#: the op types this file covers (tests/test_op_coverage.py counts them)
OPS_UNDER_TEST = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
SEQ, BATCH, IN, FEAT, H, OUT = 5, 2, 6, 16, 12, 4


def recurrent_node(op: str, inputs: list[str], outputs: list[str], **attrs: object) -> onnx.NodeProto:
    """The recurrent node, named 'rec'."""
    if op == "LSTM":
        return helper.make_node("LSTM", inputs, outputs, name="rec", **attrs)
    if op == "GRU":
        return helper.make_node("GRU", inputs, outputs, name="rec", **attrs)
    return helper.make_node("RNN", inputs, outputs, name="rec", **attrs)


def model(op: str, direction: str = "forward", *, states: bool = False, layout: int = 0,
          state_inputs: bool = False, opset: int = 17) -> onnx.ModelProto:
    """``x [SEQ, BATCH, IN] -> MatMul 'proj' -> op -> (Transpose, Reshape) -> MatMul 'head'``.

    ``states``: initial states (constants, or graph inputs with ``state_inputs``) and the
    Y_h output feeding the output too; ``layout=1``: batch-first tensors (opset 14+)."""
    dirs = 2 if direction == "bidirectional" else 1
    gates = GATES[op]
    rng = np.random.default_rng(3)
    params: dict = {
        "W_proj": (IN, FEAT),
        "W": (rng.standard_normal((dirs, gates * H, FEAT)) * 0.3).astype(np.float32),
        "R": (rng.standard_normal((dirs, gates * H, H)) * 0.3).astype(np.float32),
        "B": (rng.standard_normal((dirs, 2 * gates * H)) * 0.3).astype(np.float32),
        "W_head": (dirs * H, OUT),
        "shape": np.array([0, 0, dirs * H], dtype=np.int64),
    }
    state_shape = (dirs, BATCH, H) if layout == 0 else (BATCH, dirs, H)
    rec_inputs = ["p", "W", "R", "B", "", "", ""]
    inputs = {"x": (SEQ, BATCH, IN) if layout == 0 else (BATCH, SEQ, IN)}
    if states:
        names = ["h0", "c0"] if op == "LSTM" else ["h0"]
        for k, name in enumerate(names):
            rec_inputs[5 + k] = name
            if state_inputs:
                inputs[name] = state_shape
            else:
                params[name] = (rng.standard_normal(state_shape) * 0.5).astype(np.float32)
    rec_inputs = rec_inputs[:7] if op == "LSTM" else rec_inputs[:6]
    while rec_inputs and not rec_inputs[-1]:
        rec_inputs.pop()
    attrs = {"hidden_size": H, "direction": direction}
    if layout:
        attrs["layout"] = layout
    rec_outputs = ["y", "y_h"] if states else ["y"]
    # Y: [SEQ, dirs, BATCH, H] (layout 0) or [BATCH, SEQ, dirs, H] (layout 1)
    perm = [0, 2, 1, 3] if layout == 0 else [0, 1, 2, 3]
    nodes = [
        helper.make_node("MatMul", ["x", "W_proj"], ["p"], name="proj"),
        recurrent_node(op, rec_inputs, rec_outputs, **attrs),
        helper.make_node("Transpose", ["y"], ["yt"], perm=perm),
        helper.make_node("Reshape", ["yt", "shape"], ["yr"]),
        helper.make_node("MatMul", ["yr", "W_head"], ["out"], name="head"),
    ]
    outputs: dict = {"out": None}
    if states:
        # the final state also reaches the output: Y_h [.., H] -> ReduceSum over dirs/batch
        params["W_state"] = (H, OUT)
        nodes += [
            helper.make_node("MatMul", ["y_h", "W_state"], ["s"], name="state_head"),
        ]
        outputs["s"] = None
    return make_model(nodes, inputs, outputs, params, opset=opset)


def roles(m: onnx.ModelProto) -> dict:
    """Producer/consumer axes from the ONNX definitions of the ops (independent of the
    rule): the gate rows of W, R and B create a hidden unit, R's columns read it."""
    out = parameter_roles(m)
    out.update({("W", 1): PRODUCER, ("R", 1): PRODUCER, ("B", 1): PRODUCER,
                ("R", 2): CONSUMER, ("W", 2): CONSUMER})
    return out


def unit_rows(gates: int, units: list[int]) -> list[int]:
    return sorted(g * H + u for g in range(gates) for u in units)


@pytest.mark.parametrize("op", OPS_UNDER_TEST)
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_hidden_units_prune_exactly(op: str, direction: str) -> None:
    m = model(op, direction)
    analysis = graphprune.analyze(m)
    group = group_with(analysis, "R", 2)
    assert group.prunable and group.is_exact, group.frozen
    assert group.num_units == H  # one unit per hidden index, both directions together
    # gate rows of one unit belong to it: W rows h, H+h, ... share the unit of R column h
    labels_w, labels_r = group.unit_of[("W", 1)], group.unit_of[("R", 2)]
    for h in range(H):
        assert set(labels_w[[g * H + h for g in range(GATES[op])]]) == {labels_r[h]}
    result = assert_prunes_exactly(m, ratio=0.5, roles=roles(m))
    pruned = result.model
    rec = node(pruned, "rec")
    kept = attr(rec, "hidden_size")
    assert kept < H
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    w, r, b = (initializer(pruned, rec.input[i]) for i in (1, 2, 3))
    feat = initializer(pruned, node(pruned, "proj").input[1]).shape[1]
    assert feat < FEAT  # the projection's group, read by W's last axis
    assert w.shape == (dirs, g * kept, feat) and r.shape == (dirs, g * kept, kept)
    assert b.shape == (dirs, 2 * g * kept)
    assert initializer(pruned, node(pruned, "head").input[1]).shape == (dirs * kept, OUT)
    # the removed rows are whole units
    removed = {int(i) for i in result.plan.groups[0].channels.get("W", {}).get("1", [])}
    if removed:
        units = sorted({i % H for i in removed})
        assert sorted(removed) == unit_rows(g, units)


@pytest.mark.parametrize("op", OPS_UNDER_TEST)
def test_input_features_prune_with_the_projection(op: str) -> None:
    analysis = graphprune.analyze(model(op))
    group = group_with(analysis, "W_proj", 1)
    assert group.prunable, group.frozen
    assert ("W", 2) in group.params


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_initial_states_and_final_state_are_sliced(op: str) -> None:
    m = model(op, "bidirectional", states=True)
    result = assert_prunes_exactly(m, ratio=0.5, roles=roles(m))
    rec = node(result.model, "rec")
    kept = attr(rec, "hidden_size")
    assert kept < H
    assert initializer(result.model, rec.input[5]).shape == (2, BATCH, kept)
    assert initializer(result.model, node(result.model, "state_head").input[1]).shape == (kept, OUT)


def test_layout_one_freezes() -> None:
    """Batch-first recurrent ops (layout 1) do not run in ONNX Runtime: never rewritten."""
    analysis = graphprune.analyze(model("LSTM", "bidirectional", layout=1, states=True))
    reasons = [r for g in analysis.frozen_groups for r in g.frozen]
    assert any("LSTM 'rec' not understood" in r and "layout 1" in r for r in reasons), reasons
    assert not any("rec" in g.nodes for g in analysis.prunable_groups)


def test_states_that_are_graph_inputs_freeze_the_hidden_size() -> None:
    analysis = graphprune.analyze(model("GRU", states=True, state_inputs=True))
    group = group_with(analysis, "R", 2)
    assert group.frozen and any("graph input 'h0'" in r for r in group.frozen)
    # the input features still prune
    assert group_with(analysis, "W_proj", 1).prunable


def test_hidden_size_that_does_not_match_the_weights_freezes() -> None:
    m = model("RNN")
    for a in node(m, "rec").attribute:
        if a.name == "hidden_size":
            a.i = H + 1
    analysis = graphprune.analyze(m)
    assert any("RNN 'rec' not understood" in r for g in analysis.frozen_groups for r in g.frozen)


def test_macs_are_counted() -> None:
    result = graphprune.prune(model("LSTM"), ratio=0.5)
    report = result.report
    assert report["macs_after"] < report["macs_before"]
    # the LSTM's share: SEQ * BATCH * 4H * (FEAT + H) before pruning
    assert report["macs_before"] >= SEQ * BATCH * 4 * H * (FEAT + H)



def computed_zero_state_model() -> onnx.ModelProto:
    """Two stacked GRUs whose zero initial states are computed from the input's batch size,
    ``ConstantOfShape([2, batch, H])`` sliced per layer (PyTorch 1.6's export of ``nn.GRU``
    with ``num_layers=2``, as in the NSNet2 denoiser): ONNX shape inference cannot size the
    state, only folding the shape computation at probe sizes can."""
    rng = np.random.default_rng(5)
    g = GATES["GRU"]

    def gru(name: str, x: str, state: str, y: str) -> list[onnx.NodeProto]:
        return [helper.make_node("GRU", [x, f"W_{name}", f"R_{name}", f"B_{name}", "", state],
                                 [f"{y}4"], name=name, hidden_size=H, linear_before_reset=1),
                helper.make_node("Squeeze", [f"{y}4"], [y], axes=[1])]

    params: dict = {"W_proj": (IN, FEAT), "W_head": (H, OUT), "layers": ints(2), "hidden": ints(H),
                    "zero": ints(0), "one": ints(1), "two": ints(2)}
    for name, width in (("gru0", FEAT), ("gru1", H)):
        params[f"W_{name}"] = (rng.standard_normal((1, g * H, width)) * 0.3).astype(np.float32)
        params[f"R_{name}"] = (rng.standard_normal((1, g * H, H)) * 0.3).astype(np.float32)
        params[f"B_{name}"] = (rng.standard_normal((1, 2 * g * H)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W_proj"], ["p"], name="proj"),
        helper.make_node("Shape", ["p"], ["p_shape"]),
        helper.make_node("Gather", ["p_shape", "one"], ["batch"], axis=0),  # [T, B, F]: B
        helper.make_node("Concat", ["layers", "batch", "hidden"], ["state_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["state_shape"], ["states"]),
        helper.make_node("Slice", ["states", "zero", "one", "zero"], ["h0"]),
        helper.make_node("Slice", ["states", "one", "two", "zero"], ["h1"]),
        *gru("gru0", "p", "h0", "y0"),
        *gru("gru1", "y0", "h1", "y1"),
        helper.make_node("MatMul", ["y1", "W_head"], ["out"], name="head"),
    ]
    return make_model(nodes, {"x": ("frames", "batch", IN)}, {"out": ("frames", "batch", OUT)},
                      params, opset=11)


def test_a_computed_zero_state_does_not_freeze_the_hidden_size() -> None:
    m = computed_zero_state_model()
    analysis = graphprune.analyze(m)
    for name in ("gru0", "gru1"):
        group = group_with(analysis, f"R_{name}", 2)
        assert group.prunable, group.frozen  # before: "size of a coupled axis unknown"
    feeds = {"x": np.random.default_rng(0).standard_normal((SEQ, BATCH, IN)).astype(np.float32)}
    gru_roles = parameter_roles(m)
    for name in ("gru0", "gru1"):
        gru_roles.update({(f"W_{name}", 1): PRODUCER, (f"R_{name}", 1): PRODUCER,
                          (f"B_{name}", 1): PRODUCER, (f"R_{name}", 2): CONSUMER,
                          (f"W_{name}", 2): CONSUMER})
    result = assert_prunes_exactly(m, ratio=0.5, feeds=feeds, roles=gru_roles)
    assert attr(node(result.model, "gru1"), "hidden_size") < H


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_hidden_units_keep_the_default_rounding_to_eight(monkeypatch, op: str) -> None:
    """A unit owns rows far apart (one per gate, twice in the bias): its eight bias rows are no
    block of its own, so the default rounding of kept units to 8 applies (OSKut's BiLSTM kept
    135 of 192 hidden units at ``--ratio 0.3``; with ``--round-to 8``, 136)."""
    monkeypatch.setattr(sys.modules[__name__], "H", 48)
    result = graphprune.prune(model(op, "bidirectional"), ratio=0.3)
    sizes = [a.i for n in result.model.graph.node if n.op_type == op for a in n.attribute if a.name == "hidden_size"]
    assert sizes == [32] and result.report["verification"]["ok"]  # 48 - 14 = 34, to a multiple of 8
