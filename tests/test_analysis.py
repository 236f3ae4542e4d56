"""Dependency analysis: index maps, units of channel groups, keep=, the rule registry and
user rules for custom ops."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import (
    assert_prunes_exactly,
    conv_node,
    group_with,
    initializer,
    make_model,
    member_tensors,
)
from onnx import helper

import graphprune
from graphprune.analysis.index_maps import Digit, GroupTie, Identity, IndexMap, Modulo, Offset
from graphprune.errors import UsageError
from graphprune.rules import OpRule, lookup, register, registered_ops, unregister
from graphprune.rules.registry import RuleRegistryError

C = 8
HW = 8


def pair_set(imap: IndexMap, n_a: int, n_b: int) -> set[tuple[int, int]]:
    a, b = imap.pairs(n_a, n_b)
    return set(zip(a.tolist(), b.tolist(), strict=True))


# --------------------------------------------------------------------------- index maps


def test_identity_map():
    imap = Identity()
    assert imap.is_identity
    assert pair_set(imap, 4, 4) == {(0, 0), (1, 1), (2, 2), (3, 3)}
    assert imap.check(4, 4) is None
    assert "4" in imap.check(4, 5) and "5" in imap.check(4, 5)


def test_offset_map():
    # a Concat output of 10 (a) and its second input of 4 starting at 6 (b)
    assert pair_set(Offset(6), 10, 4) == {(6, 0), (7, 1), (8, 2), (9, 3)}
    assert pair_set(Offset(1, step=2), 8, 3) == {(1, 0), (3, 1), (5, 2)}
    assert Offset(6).check(10, 4) is None
    assert Offset(7).check(10, 4) is not None  # runs past the end
    assert Offset(-1).check(10, 4) is not None
    assert Offset(3).check(10, 0) is None  # an empty slice fits anywhere
    assert not Offset(0).is_identity


def test_digit_map():
    # NCHW flatten: channel c (a, 3 channels) owns features c*4 .. c*4+3 of b (12 features)
    assert pair_set(Digit(4), 3, 12) == {(f // 4, f) for f in range(12)}
    # NHWC flatten: channel c owns every 3rd feature
    assert pair_set(Digit(1), 3, 12) == {(f % 3, f) for f in range(12)}
    assert Digit(4).check(3, 12) is None
    assert Digit(4).check(3, 10) is not None
    assert Digit(0).check(3, 12) is not None


def test_group_tie_map_joins_whole_conv_groups():
    # 4 inputs and 6 outputs in 2 conv groups
    pairs = pair_set(GroupTie(2), 4, 6)
    assert all(a // 2 == b // 3 for a, b in pairs), "pairs never cross conv groups"
    # union-find over the pairs: every index of a group ends up connected
    parent = list(range(10))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in pairs:
        parent[find(a)] = find(4 + b)
    components = {find(i) for i in range(10)}
    assert len(components) == 2
    assert GroupTie(2).check(4, 6) is None
    assert GroupTie(3).check(4, 6) is not None
    assert GroupTie(0).check(4, 6) is not None


def test_modulo_map_ties_positions_across_groups():
    assert pair_set(Modulo(3), 6, 3) == {(i, i % 3) for i in range(6)}
    assert Modulo(3).check(6, 3) is None
    assert Modulo(4).check(6, 4) is not None


def test_index_maps_are_hashable_values():
    assert Offset(2) == Offset(2) and hash(Offset(2)) == hash(Offset(2))
    assert Digit(4) != Digit(2)
    assert "GroupTie(groups=2)" in repr(GroupTie(2))


# --------------------------------------------------------------------------- groups and units


def _concat_model(first: int = 3, second: int = 5, *, head_bias: bool = False) -> onnx.ModelProto:
    nodes = [
        conv_node("x", "W_a", "a", "B_a", name="conv_a"),
        conv_node("x", "W_b", "b", name="conv_b"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
        helper.make_node("Relu", ["cat"], ["r"], name="relu"),
        conv_node("r", "W_head", "y", "B_head" if head_bias else None, name="head"),
    ]
    params = {
        "W_a": (first, 3, 3, 3), "B_a": (first,), "W_b": (second, 3, 3, 3),
        "W_head": (4, first + second, 3, 3),
    }
    if head_bias:
        params["B_head"] = (4,)
    return make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None}, params)


def test_units_of_a_concat_group():
    analysis = graphprune.analyze(_concat_model())
    group = group_with(analysis, "W_a", 0)
    assert group.num_units == 8
    assert member_tensors(group) == {"W_a", "B_a", "W_b", "a", "b", "cat", "r", "W_head"}
    assert sorted(group.producers) == [("B_a", 0), ("W_a", 0), ("W_b", 0)]
    units_a = group.unit_of[("W_a", 0)]
    units_b = group.unit_of[("W_b", 0)]
    assert len(set(units_a.tolist()) | set(units_b.tolist())) == 8, "inputs share no unit"
    np.testing.assert_array_equal(group.unit_of[("W_head", 1)], np.concatenate([units_a, units_b]))
    np.testing.assert_array_equal(group.unit_of[("B_a", 0)], units_a)
    # removing the unit of b's first channel touches b, the concat, the head — not a
    unit = int(units_b[0])
    removed = group.removed_elements([unit])
    assert set(removed) == {("W_b", 0), ("b", 1), ("cat", 1), ("r", 1), ("W_head", 1)}
    np.testing.assert_array_equal(removed[("W_head", 1)], [3])
    assert group.units_of_elements(("cat", 1), [0, 3]) == sorted({int(units_a[0]), unit})
    assert analysis.group_of(("cat", 1)) is group


def test_group_and_analysis_summaries():
    analysis = graphprune.analyze(_concat_model())
    summary = analysis.summary()
    assert {k: summary[k] for k in ("groups", "prunable", "frozen", "inexact")} == {
        "groups": 3, "prunable": 1, "frozen": 2, "inexact": 0,
    }
    assert summary["unsupported_ops"] == {}
    group = group_with(analysis, "W_a", 0)
    s = group.summary()
    assert s["size"] == 8 and s["prunable"] is True and s["frozen"] == []
    assert s["anchor"] == f"{group.anchor[0]}:{group.anchor[1]}"
    assert {"concat", "relu", "head", "conv_a", "conv_b"} <= set(s["ops"])


def test_keep_protects_a_node():
    """``--keep conv_b``: conv_b's five channels are pinned in the Concat group, conv_a's three
    still prune (before pinning, the whole group froze); the reason is reported."""
    m = _concat_model()
    analysis = graphprune.analyze(m, keep=["conv_b"])
    group = group_with(analysis, "W_a", 0)
    assert group.prunable and group.num_units == 3 and group.pinned_units == 5
    assert any("protected by keep" in r and "conv_b" in r for r in group.pinned)
    assert (group.unit_of[("W_b", 0)] == -1).all()
    res = graphprune.prune(m, ratio=0.5, keep=["conv_b"])
    assert res.report["verification"]["ok"] is True
    assert initializer(res.model, "W_b").shape[0] == 5  # kept whole
    assert initializer(res.model, "W_a").shape[0] == 2  # 3 units, ratio 0.5, one floor: one goes
    assert res.report["pinned"][0]["pinned_units"] == 5


def test_keep_of_every_member_freezes_the_group():
    m = _concat_model()
    analysis = graphprune.analyze(m, keep=["conv_a", "conv_b"])
    group = group_with(analysis, "W_a", 0)
    assert not group.prunable and group.pinned_units == 0
    assert any("protected by keep" in r for r in group.frozen)
    assert graphprune.prune(m, ratio=0.5, keep=["conv_a", "conv_b"]).plan.units_removed == 0


def test_keep_protects_a_tensor():
    m = _concat_model()
    analysis = graphprune.analyze(m, keep=["r"])
    group = group_with(analysis, "W_a", 0)
    assert not group.prunable
    assert any("protected by keep: tensor 'r'" in r for r in group.frozen)
    assert group_with(graphprune.analyze(m), "W_a", 0).prunable
    # a name that names nothing in the model is a usage error, never silently ignored
    with pytest.raises(UsageError, match="nothing"):
        graphprune.analyze(m, keep=["nothing"])


def test_unsupported_ops_are_keyed_as_onnx_spells_them():
    """A default-domain op is keyed by its name alone ("Mystery" is no ONNX op, so it never
    gets a rule; the analysis needs no schema), a custom-domain op as ``domain::Op``."""
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Mystery", ["a"], ["m"], name="mystery"),
        helper.make_node("Mystery", ["m"], ["b"], name="custom", domain="com.example"),
        conv_node("b", "W_head", "y", name="head"),
    ]
    params = {"W_stem": (C, 3, 3, 3), "W_head": (4, C, 3, 3)}
    m = make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": [1, 4, HW, HW]}, params,
                   extra_opsets={"com.example": 1}, value_info={"m": [1, C, HW, HW],
                                                                "b": [1, C, HW, HW]}, check=False)
    assert graphprune.analyze(m).unsupported == {"Mystery": ["mystery"],
                                                 "com.example::Mystery": ["custom"]}


# --------------------------------------------------------------------------- registry


def test_registry_refuses_a_duplicate_registration():
    before = registered_ops()
    builtin = lookup("", "Conv", 17)

    class AnotherConvRule(OpRule):
        op_types = ("Conv",)

        def couple(self, node, ctx):  # pragma: no cover - never registered
            raise AssertionError

    with pytest.raises(RuleRegistryError, match="Conv"):
        register(AnotherConvRule)
    assert registered_ops() == before
    assert lookup("", "Conv", 17) is builtin
    assert lookup("ai.onnx", "Conv", 17) is builtin, "'ai.onnx' is the default domain"


def test_registry_accepts_disjoint_opset_ranges():
    class OldFoo(OpRule):
        op_types = ("Foo",)
        domain = "com.example"
        until_opset = 9

        def couple(self, node, ctx):
            return

    class NewFoo(OldFoo):
        since_opset = 10
        until_opset = 10_000

    register(OldFoo)
    try:
        register(NewFoo)
        try:
            assert isinstance(lookup("com.example", "Foo", 5), OldFoo)
            assert type(lookup("com.example", "Foo", 17)) is NewFoo
        finally:
            unregister(NewFoo)
    finally:
        unregister(OldFoo)
    assert lookup("com.example", "Foo", 17) is None
    assert "com.example::Foo" not in registered_ops()


def test_registered_ops_cover_the_issue_list():
    ops = set(registered_ops())
    wanted = {
        "Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization",
        "GroupNormalization", "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Elu", "Selu", "Softplus", "Mish", "Gelu", "Erf", "Sqrt", "Exp",
        "Log", "Neg", "Abs", "Reciprocal", "Add", "Sub", "Mul", "Div", "Max", "Min", "Pow",
        "Where", "Concat", "Split", "Slice", "MaxPool", "AveragePool", "GlobalAveragePool",
        "GlobalMaxPool", "ReduceMean", "ReduceSum", "Flatten", "Reshape", "Gemm", "MatMul",
        "Resize", "Pad", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Cast",
        "Softmax", "Constant",
    }
    assert wanted <= ops, sorted(wanted - ops)


FOO = helper.make_function(
    "com.example", "Foo", ["X"], ["Y"],
    [helper.make_node("Relu", ["X"], ["R"]), helper.make_node("Mul", ["R", "R"], ["Y"])],
    [helper.make_opsetid("", 17)],
)


def _foo_model(function: bool = True) -> onnx.ModelProto:
    """stem -> com.example::Foo (a model-local function: ORT can run it; without
    ``function``, an op the file does not define) -> head."""
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Foo", ["a"], ["b"], name="foo", domain="com.example"),
        conv_node("b", "W_head", "y", name="head"),
    ]
    return make_model(
        nodes, {"x": [1, 3, HW, HW]}, {"y": None}, {"W_stem": (C, 3, 3, 3), "W_head": (4, C, 3, 3)},
        extra_opsets={"com.example": 1}, functions=[FOO] if function else [],
        value_info=None if function else {"b": [1, C, HW, HW]}, check=function,
    )


class FooRule(OpRule):
    """A user's rule: Foo is elementwise."""

    op_types = ("Foo",)
    domain = "com.example"

    def couple(self, node, ctx):
        ctx.couple_all_axes(node.inputs[0], node.outputs[0])


@pytest.fixture
def foo_rule():
    register(FooRule)
    yield FooRule
    unregister(FooRule)


def test_custom_op_is_frozen_without_a_rule():
    analysis = graphprune.analyze(_foo_model(function=False))
    group = group_with(analysis, "W_stem", 0)
    assert not group.prunable
    assert group.frozen and all("Foo 'foo'" in r for r in group.frozen)
    assert analysis.unsupported == {"com.example::Foo": ["foo"]}


def test_a_function_op_without_a_rule_is_inlined_and_prunes():
    """A call of a model-local function that no rule covers is inlined
    (:mod:`graphprune.io.lowering`): its body's ops have rules, and the group prunes."""
    analysis = graphprune.analyze(_foo_model())
    assert analysis.unsupported == {}
    assert group_with(analysis, "W_stem", 0).prunable
    res = assert_prunes_exactly(_foo_model())
    assert not res.model.functions and not any(n.op_type == "Foo" for n in res.model.graph.node)
    assert res.report["normalised"] == {"inlined_functions": ["com.example::Foo"]}
    assert initializer(res.model, "W_stem").shape[0] < C


def test_user_rule_for_a_custom_op_makes_it_prunable(foo_rule):
    analysis = graphprune.analyze(_foo_model())
    assert analysis.unsupported == {}
    group = group_with(analysis, "W_stem", 0)
    assert group.prunable and group.num_units == C
    assert {("a", 1), ("b", 1), ("W_head", 1)} <= set(group.dims)


def test_user_rule_for_a_custom_function_op_prunes_and_verifies(foo_rule):
    res = assert_prunes_exactly(_foo_model())
    assert len(res.model.functions) == 1


# --------------------------------------------------------------------------- shape tracing
#: a custom op that passes a shape tensor through (a model-local function: ORT can run it)
SHAPE_PASS = helper.make_function(
    "com.example", "ShapePass", ["X"], ["Y"], [helper.make_node("Identity", ["X"], ["Y"])],
    [helper.make_opsetid("", 17)],
)


def _shape_pass_model(function: bool = True) -> onnx.ModelProto:
    """stem -> Reshape(a, ShapePass(Shape(a))) -> head; the batch is dynamic, so the shape is
    computed at run time (never folded) and the Reshape target must be traced."""
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Shape", ["a"], ["s"], name="shape"),
        helper.make_node("ShapePass", ["s"], ["t"], name="pass", domain="com.example"),
        helper.make_node("Reshape", ["a", "t"], ["b"], name="reshape"),
        conv_node("b", "W_head", "y", name="head"),
    ]
    model = make_model(
        nodes, {"x": ["N", 3, HW, HW]}, {"y": ["N", 4, HW, HW]},
        {"W_stem": (C, 3, 3, 3), "W_head": (4, C, 3, 3)},
        extra_opsets={"com.example": 1}, functions=[SHAPE_PASS] if function else [],
        value_info={"b": ["N", C, HW, HW]}, check=False,
    )
    if not function:  # what inference found through the function body
        model.graph.value_info.append(helper.make_tensor_value_info("t", onnx.TensorProto.INT64, [4]))
    return model


class ShapePassRule(OpRule):
    """A user's rule for a custom op on shape tensors: the elements pass through."""

    op_types = ("ShapePass",)
    domain = "com.example"

    def couple(self, node, ctx):
        return  # a shape tensor has no channels

    def trace_shape(self, node, output, trace):
        return trace.input(node, 0)


def test_a_shape_computed_by_an_op_without_a_rule_freezes_what_it_sizes():
    group = group_with(graphprune.analyze(_shape_pass_model(function=False)), "W_stem", 0)
    assert not group.prunable
    assert group.frozen == ["shape element computed by arithmetic at Reshape 'reshape'"]


def test_a_rule_that_traces_its_shape_output_lets_the_reshape_prune():
    register(ShapePassRule)
    try:
        m = _shape_pass_model()
        group = group_with(graphprune.analyze(m), "W_stem", 0)
        assert group.prunable and group.num_units == C
        assert {("a", 1), ("b", 1), ("W_head", 1)} <= set(group.dims)
        assert not group.shape_elements  # the target is read at run time: nothing to rewrite
        res = assert_prunes_exactly(m)
    finally:
        unregister(ShapePassRule)
    assert initializer(res.model, "W_stem").shape[0] < C


#: a custom op whose body works over (H, W) (a model-local function: ORT can run it)
MYSTERY = helper.make_function(
    "com.example", "Mystery", ["X"], ["Y"], [helper.make_node("Trilu", ["X"], ["Y"], upper=1)],
    [helper.make_opsetid("", 17)],
)


class MysteryRule(OpRule):
    """A user's rule for a custom op: channels pass through, (H, W) are spatial."""

    op_types = ("Mystery",)
    domain = "com.example"

    def couple(self, node, ctx):
        x, y = node.inputs[0], node.outputs[0]
        ctx.couple(x, 0, y, 0)
        ctx.couple(x, 1, y, 1)
        ctx.spatial(x, [2, 3])
        ctx.spatial(y, [2, 3])


@pytest.fixture
def mystery_rule():
    register(MysteryRule)
    yield MysteryRule
    unregister(MysteryRule)


def _mystery_model(function: bool = True) -> onnx.ModelProto:
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Mystery", ["a"], ["b"], name="mystery", domain="com.example"),
        conv_node("b", "W_head", "y", name="head"),
    ]
    return make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None},
                      {"W_stem": (C, 3, 3, 3), "W_head": (4, C, 3, 3)},
                      extra_opsets={"com.example": 1}, functions=[MYSTERY] if function else [],
                      value_info=None if function else {"b": [1, C, HW, HW]}, check=function)


def test_user_rule_with_spatial_axes_prunes_exactly(mystery_rule):
    m = _mystery_model()
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W_stem").shape[0] == 4


def test_without_the_user_rule_the_op_freezes():
    group = group_with(graphprune.analyze(_mystery_model(function=False)), "W_stem", 0)
    assert group.frozen and any("Mystery 'mystery'" in r for r in group.frozen)


def test_an_index_map_that_does_not_fit_the_sizes_freezes():
    class MisfitRule(OpRule):
        op_types = ("Mystery",)
        domain = "com.example"

        def couple(self, node, ctx):
            ctx.couple(node.inputs[0], 1, node.outputs[0], 1, Offset(5))

    register(MisfitRule)
    try:
        group = group_with(graphprune.analyze(_mystery_model()), "W_stem", 0)
    finally:
        unregister(MisfitRule)
    assert not group.prunable
    assert any("offset map" in r and "Mystery 'mystery'" in r for r in group.frozen), group.frozen


def test_a_rule_that_raises_freezes_instead_of_guessing():
    class BrokenRule(OpRule):
        op_types = ("Mystery",)
        domain = "com.example"

        def couple(self, node, ctx):
            raise ValueError("boom")

    register(BrokenRule)
    try:
        group = group_with(graphprune.analyze(_mystery_model()), "W_stem", 0)
    finally:
        unregister(BrokenRule)
    assert not group.prunable
    assert any("Mystery 'mystery'" in r and "boom" in r for r in group.frozen)


@pytest.mark.parametrize("read", [True, False])
def test_coupling_with_an_unknown_rank_freezes_the_known_side(read: bool) -> None:
    """A rule that couples an axis with a tensor of unknown rank (behind an op shape inference
    does not know) cannot join the two dimensions: the known side is frozen, or pruning it
    would change a tensor that something reads; an output nothing reads does not matter."""
    import onnx_graphsurgeon as gs

    from graphprune.analysis.coupling import CouplingContext

    x = gs.Variable("x", np.float32, [1, 4])
    y = gs.Variable("y", np.float32, None)
    nodes = [gs.Node("Relu", "relu", inputs=[x], outputs=[y])]
    outputs = [y]
    if read:
        z = gs.Variable("z", np.float32, None)
        nodes.append(gs.Node("Identity", "identity", inputs=[y], outputs=[z]))
        outputs = [z]
    else:
        w = gs.Variable("w", np.float32, [1, 4])
        nodes.append(gs.Node("Identity", "identity", inputs=[x], outputs=[w]))
        outputs = [w]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=17)
    ctx = CouplingContext(graph, 17, lambda node: lookup("", node.op, 17))
    ctx.node = nodes[0]
    ctx.couple(x, 1, y, 1)
    reasons = ctx.dim_freeze.get(("x", 1), [])
    if read:
        assert any("coupled with an axis of unknown rank at" in r for r in reasons), reasons
    else:
        assert not reasons, reasons
