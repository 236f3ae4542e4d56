"""Per-rule tests: for each op family a tiny model, the groups the analysis finds, the
rewritten shapes and attributes, and ONNX Runtime agreement with the zeroed original.

Most models are a *sandwich*: ``x -> Conv 'stem' -> a -> (ops under test) -> b -> Conv
'head' -> y``. The stem's output channels are the group under test; the head reads them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import (
    assert_prunes_exactly,
    attr,
    const_input,
    conv_node,
    group_with,
    initializer,
    initializers,
    ints,
    make_model,
    member_tensors,
    node,
    nodes_of,
    param_members,
    positive,
)
from onnx import helper, numpy_helper

import graphprune

C = 8  # stem channels
HW = 8


def sandwich(
    middle: list[onnx.NodeProto],
    params: dict | None = None,
    *,
    channels: int = C,
    head_in: int | None = None,
    out: str = "b",
    hw: int = HW,
    opset: int = 17,
    head_k: int = 3,
    value_info: dict | None = None,
) -> onnx.ModelProto:
    """``x[1,3,hw,hw] -> Conv 'stem' -> a[1,channels,hw,hw] -> middle -> out -> Conv 'head' -> y``."""
    head_in = channels if head_in is None else head_in
    nodes = [
        conv_node("x", "W_stem", "a", "B_stem", name="stem"),
        *middle,
        conv_node(out, "W_head", "y", "B_head", k=head_k, name="head"),
    ]
    all_params = {
        "W_stem": (channels, 3, 3, 3),
        "B_stem": (channels,),
        "W_head": (4, head_in, head_k, head_k),
        "B_head": (4,),
        **(params or {}),
    }
    return make_model(
        nodes, {"x": [1, 3, hw, hw]}, {"y": None}, all_params, opset=opset, value_info=value_info
    )


def stem_group(model: onnx.ModelProto):
    return group_with(graphprune.analyze(model), "W_stem", 0)


def assert_stem_group(model: onnx.ModelProto, members: set[str], units: int = C):
    """The stem's channels form one prunable group with ``members`` (tensor names) in it."""
    group = stem_group(model)
    assert group.prunable, group.frozen
    assert group.num_units == units
    missing = {"W_stem", "B_stem", "W_head", *members} - member_tensors(group)
    assert not missing, f"{missing} not in {sorted(member_tensors(group))}"
    assert ("W_head", 1) in param_members(group)
    return group


def kept_stem(result) -> int:
    return initializer(result.model, "W_stem").shape[0]


# --------------------------------------------------------------------------- Conv


def test_conv_plain_groups_and_rewrite():
    m = sandwich([helper.make_node("Relu", ["a"], ["b"], name="relu")])
    analysis = graphprune.analyze(m)
    group = group_with(analysis, "W_stem", 0)
    assert set(group.dims) == {("W_stem", 0), ("B_stem", 0), ("a", 1), ("b", 1), ("W_head", 1)}
    assert group.roles == {
        ("W_stem", 0): "producer", ("B_stem", 0): "producer", ("W_head", 1): "consumer",
    }
    assert group.prunable and group.is_exact and group.num_units == C
    assert len(analysis.prunable_groups) == 1
    # the head's outputs are a graph output, the stem's inputs a graph input
    assert any("graph output 'y'" in r for r in group_with(analysis, "W_head", 0).frozen)
    assert any("graph input 'x'" in r for r in group_with(analysis, "W_stem", 1).frozen)

    res = assert_prunes_exactly(m)
    shapes = {k: v.shape for k, v in initializers(res.model).items()}
    assert shapes == {
        "W_stem": (4, 3, 3, 3), "B_stem": (4,), "W_head": (4, 4, 3, 3), "B_head": (4,),
    }
    # the kept rows are the original rows, in order
    kept = [c for c in range(C) if c not in res.plan.groups[0].channels["W_stem"]["0"]]
    np.testing.assert_array_equal(initializer(res.model, "W_stem"), initializer(m, "W_stem")[kept])
    np.testing.assert_array_equal(
        initializer(res.model, "W_head"), initializer(m, "W_head")[:, kept]
    )


def test_conv_depthwise_ties_input_and_output_channels():
    m = sandwich(
        [conv_node("a", "W_dw", "b", "B_dw", group=C, name="dw")],
        {"W_dw": (C, 1, 3, 3), "B_dw": (C,)},
    )
    group = assert_stem_group(m, {"W_dw", "B_dw", "b"})
    assert ("W_dw", 0) in group.params and ("W_dw", 1) not in group.dims
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W_dw").shape == (4, 1, 3, 3)
    assert attr(node(res.model, "dw"), "group") == 4


def test_conv_grouped_units_are_conv_groups():
    # 8 -> 12 channels in 4 conv groups: 2 inputs and 3 outputs per group
    m = sandwich(
        [conv_node("a", "W_g", "b", "B_g", group=4, name="grouped")],
        {"W_g": (12, 2, 3, 3), "B_g": (12,)},
        head_in=12,
    )
    group = assert_stem_group(m, {"W_g", "B_g", "b"}, units=4)
    np.testing.assert_array_equal(group.unit_of[("a", 1)], [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(group.unit_of[("b", 1)], [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    res = assert_prunes_exactly(m)
    assert len(res.plan.groups[0].remove) == 2
    assert initializer(res.model, "W_stem").shape[0] == 4
    assert initializer(res.model, "W_g").shape == (6, 2, 3, 3)
    assert initializer(res.model, "W_head").shape == (4, 6, 3, 3)
    assert attr(node(res.model, "grouped"), "group") == 2


def test_conv_transpose_plain():
    nodes = [
        helper.make_node(
            "ConvTranspose", ["a", "W_t", "B_t"], ["b"], name="up", kernel_shape=[2, 2],
            strides=[2, 2],
        )
    ]
    m = sandwich(nodes, {"W_t": (C, 6, 2, 2), "B_t": (6,)}, head_in=6)
    analysis = graphprune.analyze(m)
    into = group_with(analysis, "W_stem", 0)
    assert ("W_t", 0) in into.dims and into.roles[("W_t", 0)] == "consumer"
    out = group_with(analysis, "W_t", 1)
    assert out.roles[("W_t", 1)] == "producer" and ("W_head", 1) in out.dims
    assert out.prunable and out.num_units == 6
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W_t").shape == (4, 3, 2, 2)
    assert initializer(res.model, "B_t").shape == (3,)


def test_conv_transpose_grouped():
    nodes = [
        helper.make_node(
            "ConvTranspose", ["a", "W_t"], ["b"], name="up", kernel_shape=[2, 2], strides=[2, 2],
            group=4,
        )
    ]
    # 8 inputs, 4 groups, 3 outputs per group -> 12 outputs
    m = sandwich(nodes, {"W_t": (C, 3, 2, 2)}, head_in=12)
    assert_stem_group(m, {"W_t", "b"}, units=4)
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W_t").shape == (4, 3, 2, 2)
    assert attr(node(res.model, "up"), "group") == 2
    assert initializer(res.model, "W_head").shape[1] == 6


# --------------------------------------------------------------------------- normalisations


def test_batch_normalization():
    bn = helper.make_node(
        "BatchNormalization", ["a", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"], name="bn"
    )
    m = sandwich(
        [bn],
        {"bn.scale": positive(C), "bn.bias": (C,), "bn.mean": (C,), "bn.var": positive(C, seed=2)},
    )
    group = assert_stem_group(m, {"bn.scale", "bn.bias", "bn.mean", "bn.var"})
    assert group.roles[("bn.var", 0)] == "channelwise"
    res = assert_prunes_exactly(m)
    for name in ("bn.scale", "bn.bias", "bn.mean", "bn.var"):
        assert initializer(res.model, name).shape == (4,)


def test_instance_normalization():
    norm = helper.make_node("InstanceNormalization", ["a", "in.scale", "in.bias"], ["b"], name="in")
    m = sandwich([norm], {"in.scale": positive(C), "in.bias": (C,)})
    assert_stem_group(m, {"in.scale", "in.bias"})
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "in.scale").shape == (4,)
    assert initializer(res.model, "in.bias").shape == (4,)


def _group_norm_model(shape_known: bool) -> onnx.ModelProto:
    norm = helper.make_node(
        "GroupNormalization", ["a", "gn.scale", "gn.bias"], ["b"], name="gn", num_groups=4
    )
    # ONNX shape inference gives GroupNormalization no output shape (onnx 1.23)
    return sandwich(
        [norm], {"gn.scale": positive(C), "gn.bias": (C,)}, opset=21,
        value_info={"b": [1, C, HW, HW]} if shape_known else None,
    )


def test_group_normalization_op_without_value_info():
    """onnx 1.23 infers no output shape for GroupNormalization-21: the rule takes the input's
    shape instead of freezing, and the pruned model still verifies (non-strict check, since
    the original itself fails strict inference)."""
    norm = helper.make_node(
        "GroupNormalization", ["a", "gn.scale", "gn.bias"], ["b"], name="gn", num_groups=4
    )
    m = make_model(
        [conv_node("x", "W_stem", "a", "B_stem", name="stem"), norm,
         conv_node("b", "W_head", "y", "B_head", name="head")],
        {"x": [1, 3, HW, HW]}, {"y": [1, 4, HW, HW]},
        {"W_stem": (C, 3, 3, 3), "B_stem": (C,), "W_head": (4, C, 3, 3), "B_head": (4,),
         "gn.scale": positive(C), "gn.bias": (C,)},
        opset=21, check=False,
    )
    group = stem_group(m)
    assert group.prunable, group.frozen
    res = graphprune.prune(m, ratio=0.5)
    assert res.report["verification"]["ok"]
    assert attr(node(res.model, "gn"), "num_groups") == 2


def test_group_normalization_op_prunes_whole_groups():
    m = _group_norm_model(shape_known=True)
    group = assert_stem_group(m, {"gn.scale", "gn.bias"}, units=4)
    np.testing.assert_array_equal(group.unit_of[("gn.scale", 0)], [0, 0, 1, 1, 2, 2, 3, 3])
    res = assert_prunes_exactly(m)
    assert attr(node(res.model, "gn"), "num_groups") == 2
    assert initializer(res.model, "gn.scale").shape == (4,)
    removed = res.plan.groups[0].channels["W_stem"]["0"]
    assert sorted({c // 2 for c in removed}) == sorted(res.plan.groups[0].remove)  # whole pairs
    assert len(removed) == 4


def test_group_normalization_decomposed_reshape_instance_norm_reshape():
    """The TorchScript form: Reshape [1, G, -1] -> InstanceNorm -> Reshape back -> Mul -> Add."""
    nodes = [
        helper.make_node("Reshape", ["a", "shape_in"], ["g"], name="to_groups"),
        helper.make_node("InstanceNormalization", ["g", "ones", "zeros"], ["gn"], name="in"),
        helper.make_node("Reshape", ["gn", "shape_out"], ["r"], name="from_groups"),
        helper.make_node("Mul", ["r", "gamma"], ["s"], name="scale"),
        helper.make_node("Add", ["s", "beta"], ["b"], name="shift"),
    ]
    params = {
        "shape_in": ints(1, 4, -1),
        "ones": np.ones(4, np.float32),
        "zeros": np.zeros(4, np.float32),
        "shape_out": ints(1, C, HW, HW),
        "gamma": positive(C, 1, 1),
        "beta": (C, 1, 1),
    }
    m = sandwich(nodes, params)
    group = assert_stem_group(m, {"gamma", "beta", "ones", "zeros", "g", "r"}, units=4)
    np.testing.assert_array_equal(group.unit_of[("a", 1)], [0, 0, 1, 1, 2, 2, 3, 3])
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "gamma").shape == (4, 1, 1)
    assert initializer(res.model, "ones").shape == (2,)
    pruned_nodes = {n.name: n for n in res.model.graph.node}
    assert list(const_input(res.model, pruned_nodes["to_groups"], 1)) == [1, 2, -1]
    assert list(const_input(res.model, pruned_nodes["from_groups"], 1)) == [1, 4, HW, HW]


# --------------------------------------------------------------------------- unary activations


def _unary(op: str, **attrs):
    return [helper.make_node(op, ["a"], ["b"], name=op.lower(), **attrs)]


def _abs_then(op: str, plus_one: bool = False):
    nodes = [helper.make_node("Abs", ["a"], ["abs"], name="abs")]
    src = "abs"
    if plus_one:
        nodes.append(helper.make_node("Add", ["abs", "one"], ["abs1"], name="plus_one"))
        src = "abs1"
    nodes.append(helper.make_node(op, [src], ["b"], name=op.lower()))
    return nodes


ACTIVATIONS = {
    "Relu": (_unary("Relu"), {}, 17),
    "LeakyRelu": (_unary("LeakyRelu", alpha=0.1), {}, 17),
    "Clip": ([helper.make_node("Clip", ["a", "lo", "hi"], ["b"], name="clip")],
             {"lo": np.array(-0.5, np.float32), "hi": np.array(0.5, np.float32)}, 17),
    "Sigmoid": (_unary("Sigmoid"), {}, 17),
    "HardSigmoid": (_unary("HardSigmoid"), {}, 17),
    "HardSwish": (_unary("HardSwish"), {}, 17),
    "Tanh": (_unary("Tanh"), {}, 17),
    "Elu": (_unary("Elu"), {}, 17),
    "Selu": (_unary("Selu"), {}, 17),
    "Softplus": (_unary("Softplus"), {}, 17),
    "Mish": (_unary("Mish"), {}, 18),
    "Gelu": (_unary("Gelu", approximate="tanh"), {}, 20),
    "Erf": (_unary("Erf"), {}, 17),
    "Sqrt(Abs)": (_abs_then("Sqrt"), {}, 17),
    "Exp": (_unary("Exp"), {}, 17),
    "Log(Abs+1)": (_abs_then("Log", plus_one=True), {"one": np.ones(1, np.float32)}, 17),
    "Neg": (_unary("Neg"), {}, 17),
    "Abs": (_unary("Abs"), {}, 17),
    "Reciprocal(Abs+1)": (_abs_then("Reciprocal", plus_one=True),
                          {"one": np.ones(1, np.float32)}, 17),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_unary_activation_passes_channels_through(name):
    nodes, params, opset = ACTIVATIONS[name]
    m = sandwich(nodes, params, opset=opset)
    group = assert_stem_group(m, {n.output[0] for n in nodes})
    assert group.is_exact
    # scalar constants (Clip bounds, the +1) are not members
    assert not set(params) & member_tensors(group)
    res = assert_prunes_exactly(m)
    assert kept_stem(res) == 4
    for pname, value in params.items():
        np.testing.assert_array_equal(initializer(res.model, pname), value)


def test_prelu_with_per_channel_slope():
    m = sandwich(
        [helper.make_node("PRelu", ["a", "slope"], ["b"], name="prelu")],
        {"slope": np.random.default_rng(3).uniform(0, 0.5, (C, 1, 1)).astype(np.float32)},
    )
    group = assert_stem_group(m, {"slope"})
    assert group.roles[("slope", 0)] == "channelwise"
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "slope").shape == (4, 1, 1)


def test_clip_with_per_channel_bound_freezes():
    m = sandwich(
        [helper.make_node("Clip", ["a", "lo"], ["b"], name="clip")],
        {"lo": np.zeros((C, 1, 1), np.float32)},
    )
    group = stem_group(m)
    assert not group.prunable
    assert any("Clip 'clip'" in r for r in group.frozen)


# --------------------------------------------------------------------------- binary ops


def _binary(op: str, const_first: bool = False):
    inputs = ["k", "a"] if const_first else ["a", "k"]
    return [helper.make_node(op, inputs, ["b"], name=op.lower())]


BINARY = {
    "Add": (_binary("Add"), (C, 1, 1)),
    "Sub(const, x)": (_binary("Sub", const_first=True), (C, 1, 1)),
    "Mul": (_binary("Mul"), (C, 1, 1)),
    "Div": (_binary("Div"), positive(C, 1, 1)),
    "Max": (_binary("Max"), (C, 1, 1)),
    "Min": (_binary("Min"), (1, C, 1, 1)),
    "Pow": (_binary("Pow"), np.array([2.0, 3.0] * (C // 2), np.float32).reshape(C, 1, 1)),
}


@pytest.mark.parametrize("name", list(BINARY))
def test_binary_op_with_per_channel_constant(name):
    nodes, const = BINARY[name]
    m = sandwich(nodes, {"k": const})
    group = assert_stem_group(m, {"k"})
    k_axis = 1 if len(np.shape(const) if isinstance(const, np.ndarray) else const) == 4 else 0
    assert group.roles[("k", k_axis)] == "channelwise"
    res = assert_prunes_exactly(m)
    new = initializer(res.model, "k")
    assert new.shape[k_axis] == 4
    kept = [c for c in range(C) if c not in res.plan.groups[0].channels["W_stem"]["0"]]
    np.testing.assert_array_equal(new, np.take(initializer(m, "k"), kept, axis=k_axis))


def test_where_with_condition_from_the_group_and_per_channel_constant():
    nodes = [
        helper.make_node("Greater", ["a", "zero"], ["cond"], name="gt"),
        helper.make_node("Where", ["cond", "a", "k"], ["b"], name="where"),
    ]
    m = sandwich(nodes, {"zero": np.zeros(1, np.float32), "k": (C, 1, 1)})
    assert_stem_group(m, {"cond", "k"})
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "k").shape == (4, 1, 1)
    assert initializer(res.model, "zero").shape == (1,)


def test_broadcast_constants_that_do_not_carry_channels_are_untouched():
    nodes = [
        helper.make_node("Add", ["a", "scalar"], ["s1"], name="add_scalar"),
        helper.make_node("Mul", ["s1", "spatial"], ["b"], name="mul_spatial"),
    ]
    m = sandwich(nodes, {"scalar": (1,), "spatial": (1, 1, HW, HW)})
    group = assert_stem_group(m, {"s1"})
    assert "scalar" not in member_tensors(group) and "spatial" not in member_tensors(group)
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "scalar").shape == (1,)
    assert initializer(res.model, "spatial").shape == (1, 1, HW, HW)


def test_residual_add_couples_two_producers():
    nodes = [
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        conv_node("r", "W_mid", "m", "B_mid", name="mid"),
        helper.make_node("Add", ["a", "m"], ["b"], name="residual"),
    ]
    m = sandwich(nodes, {"W_mid": (C, C, 3, 3), "B_mid": (C,)})
    group = assert_stem_group(m, {"W_mid", "B_mid", "m", "r"})
    assert ("W_mid", 0) in group.producers and ("W_mid", 1) in group.dims
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W_mid").shape == (4, 4, 3, 3)


# --------------------------------------------------------------------------- Concat / Split / Slice


def _two_stems_concat(first: int = 6, second: int = 10) -> onnx.ModelProto:
    nodes = [
        conv_node("x", "W_a", "a", name="conv_a"),
        conv_node("x", "W_b", "bb", name="conv_b"),
        helper.make_node("Concat", ["a", "bb"], ["cat"], name="concat", axis=1),
        conv_node("cat", "W_head", "y", name="head"),
    ]
    params = {"W_a": (first, 3, 3, 3), "W_b": (second, 3, 3, 3), "W_head": (4, first + second, 3, 3)}
    return make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None}, params)


def test_concat_units_are_input_channels():
    m = _two_stems_concat()
    group = group_with(graphprune.analyze(m), "W_a", 0)
    assert group.prunable and group.num_units == 16
    assert {("W_a", 0), ("W_b", 0), ("W_head", 1)} <= set(group.params)
    # each unit is one channel of one input; the concat output holds all of them in order
    np.testing.assert_array_equal(group.unit_of[("cat", 1)][:6], group.unit_of[("a", 1)])
    np.testing.assert_array_equal(group.unit_of[("cat", 1)][6:], group.unit_of[("bb", 1)])
    res = assert_prunes_exactly(m)
    a, b = initializer(res.model, "W_a").shape[0], initializer(res.model, "W_b").shape[0]
    assert a + b == 8 and a >= 1 and b >= 1
    assert initializer(res.model, "W_head").shape[1] == 8


def test_concat_of_one_tensor_twice():
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Concat", ["a", "a"], ["cat"], name="concat", axis=1),
        conv_node("cat", "W_head", "y", name="head"),
    ]
    m = make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None},
                   {"W_stem": (C, 3, 3, 3), "W_head": (4, 2 * C, 3, 3)})
    group = group_with(graphprune.analyze(m), "W_stem", 0)
    assert group.num_units == C
    np.testing.assert_array_equal(group.unit_of[("cat", 1)], list(range(C)) * 2)
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W_head").shape[1] == C


@pytest.mark.parametrize("opset", [13, 18])
def test_split_sizes_are_rewritten(opset):
    if opset == 13:
        split = helper.make_node("Split", ["a", "sizes"], ["s0", "s1"], name="split", axis=1)
        params = {"sizes": ints(6, 10)}
        first = 6
    else:
        split = helper.make_node("Split", ["a"], ["s0", "s1"], name="split", axis=1, num_outputs=2)
        params = {}
        first = 8
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        split,
        conv_node("s0", "W_h0", "h0", name="head0"),
        conv_node("s1", "W_h1", "h1", name="head1"),
        helper.make_node("Add", ["h0", "h1"], ["y"], name="add"),
    ]
    params |= {"W_stem": (16, 3, 3, 3), "W_h0": (4, first, 3, 3), "W_h1": (4, 16 - first, 3, 3)}
    m = make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None}, params, opset=opset)
    group = group_with(graphprune.analyze(m), "W_stem", 0)
    assert group.prunable and group.num_units == 16
    assert {("W_h0", 1), ("W_h1", 1)} <= set(group.params)
    res = assert_prunes_exactly(m, criterion="random", seed=3)
    n0 = initializer(res.model, "W_h0").shape[1]
    n1 = initializer(res.model, "W_h1").shape[1]
    assert n0 + n1 == 8 and n0 >= 1 and n1 >= 1
    split_node = nodes_of(res.model, "Split")[0]
    assert list(const_input(res.model, split_node, 1)) == [n0, n1]


def _slice_model(starts, ends, channels: int = 16, head_in: int = 8, steps=None):
    inputs = ["a", "starts", "ends", "axes"] + (["steps"] if steps else [])
    params = {"starts": ints(*starts), "ends": ints(*ends), "axes": ints(1)}
    if steps:
        params["steps"] = ints(*steps)
    return sandwich(
        [helper.make_node("Slice", inputs, ["b"], name="slice")],
        params, channels=channels, head_in=head_in,
    )


@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_slice_on_channels_moves_its_bounds(criterion):
    """Slice takes channels [4:12] of 16; channels removed before 4 move the start."""
    m = _slice_model([4], [12])
    group = group_with(graphprune.analyze(m), "W_stem", 0)
    assert group.prunable and group.num_units == 16 and ("W_head", 1) in group.params
    np.testing.assert_array_equal(group.unit_of[("b", 1)], np.arange(4, 12))
    res = assert_prunes_exactly(m, criterion=criterion, seed=1)
    removed = np.array(res.plan.groups[0].channels["W_stem"]["0"])
    before = int(np.sum(removed < 4))
    inside = int(np.sum((removed >= 4) & (removed < 12)))
    sliced = nodes_of(res.model, "Slice")[0]
    start, end = const_input(res.model, sliced, 1)[0], const_input(res.model, sliced, 2)[0]
    assert start == 4 - before
    assert end - start == 8 - inside == initializer(res.model, "W_head").shape[1]
    if criterion == "random":
        assert before > 0, "seed chosen so that channels before the slice are removed"


def test_slice_to_the_end_with_negative_start():
    m = _slice_model([-12], [np.iinfo(np.int64).max], head_in=12)
    res = assert_prunes_exactly(m, criterion="random", seed=2)
    sliced = nodes_of(res.model, "Slice")[0]
    start = int(const_input(res.model, sliced, 1)[0])
    kept = initializer(res.model, "W_stem").shape[0]
    assert start % kept == (kept - initializer(res.model, "W_head").shape[1]) % kept


def test_slice_with_step_over_whole_blocks_prunes_blocks():
    """Every second channel of 16 from the first: each picked channel stands for its block of
    two (the other one is read by nothing), so a removed unit takes the block and the slice
    keeps its start and step (``tests/test_rule_slice_lattice.py`` has the interleaved case)."""
    m = _slice_model([0], [16], head_in=8, steps=[2])
    group = group_with(graphprune.analyze(m), "W_stem", 0)
    assert group.prunable and group.num_units == 8
    np.testing.assert_array_equal(group.unit_of[("W_stem", 0)], np.arange(16) // 2)
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W_stem").shape[0] == 2 * initializer(res.model, "W_head").shape[1]


def test_slice_with_step_that_skips_a_block_freezes():
    m = _slice_model([2], [16], head_in=7, steps=[2])  # starts in the second block of two
    group = group_with(graphprune.analyze(m), "W_stem", 0)
    assert not group.prunable
    assert any("Slice 'slice'" in r for r in group.frozen)


# --------------------------------------------------------------------------- pooling, reductions


POOLS = {
    "MaxPool": helper.make_node("MaxPool", ["a"], ["b"], name="pool", kernel_shape=[2, 2],
                                strides=[2, 2]),
    "AveragePool": helper.make_node("AveragePool", ["a"], ["b"], name="pool",
                                    kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "GlobalAveragePool": helper.make_node("GlobalAveragePool", ["a"], ["b"], name="pool"),
    "GlobalMaxPool": helper.make_node("GlobalMaxPool", ["a"], ["b"], name="pool"),
}


@pytest.mark.parametrize("op", list(POOLS))
def test_pooling_passes_channels_through(op):
    m = sandwich([POOLS[op]], head_k=1)
    assert_stem_group(m, {"b"})
    res = assert_prunes_exactly(m)
    assert kept_stem(res) == 4 and initializer(res.model, "W_head").shape[1] == 4


@pytest.mark.parametrize("keepdims", [1, 0])
def test_reduce_mean_over_spatial_axes(keepdims):
    reduce = helper.make_node("ReduceMean", ["a", "axes"], ["b"], name="mean", keepdims=keepdims)
    if keepdims:
        m = sandwich([reduce], {"axes": ints(2, 3)}, opset=18, head_k=1)
    else:
        nodes = [
            conv_node("x", "W_stem", "a", "B_stem", name="stem"),
            reduce,
            helper.make_node("Gemm", ["b", "W_head", "B_head"], ["y"], name="head", transB=1),
        ]
        params = {"W_stem": (C, 3, 3, 3), "B_stem": (C,), "W_head": (4, C), "B_head": (4,),
                  "axes": ints(2, 3)}
        m = make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None}, params, opset=18)
    group = assert_stem_group(m, {"b"})
    assert group.is_exact
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W_head").shape[1] == 4


# --------------------------------------------------------------------------- into linear layers


def _flatten_into(linear: str, reshape: bool = False, hw: int = 4):
    features = C * hw * hw
    if reshape:
        view = helper.make_node("Reshape", ["a", "target"], ["f"], name="view")
        params = {"target": ints(1, features)}
    else:
        view = helper.make_node("Flatten", ["a"], ["f"], name="view", axis=1)
        params = {}
    if linear == "Gemm":
        head = helper.make_node("Gemm", ["f", "W_fc", "B_fc"], ["y"], name="fc", transB=1)
        params |= {"W_fc": (10, features), "B_fc": (10,)}
        axis = 1
    else:
        head = helper.make_node("MatMul", ["f", "W_fc"], ["y"], name="fc")
        params |= {"W_fc": (features, 10)}
        axis = 0
    nodes = [conv_node("x", "W_stem", "a", "B_stem", name="stem"), view, head]
    params |= {"W_stem": (C, 3, 3, 3), "B_stem": (C,)}
    return make_model(nodes, {"x": [1, 3, hw, hw]}, {"y": None}, params), axis


@pytest.mark.parametrize("linear", ["Gemm", "MatMul"])
@pytest.mark.parametrize("reshape", [False, True], ids=["Flatten", "Reshape"])
def test_nchw_flatten_into_linear_channel_owns_consecutive_features(linear, reshape):
    m, axis = _flatten_into(linear, reshape)
    group = group_with(graphprune.analyze(m), "W_stem", 0)
    assert group.prunable and group.num_units == C
    assert group.roles[("W_fc", axis)] == "consumer"
    np.testing.assert_array_equal(group.unit_of[("W_fc", axis)], np.repeat(np.arange(C), 16))
    res = assert_prunes_exactly(m)
    removed = res.plan.groups[0].channels["W_stem"]["0"]
    kept = [c for c in range(C) if c not in removed]
    features = np.concatenate([np.arange(c * 16, (c + 1) * 16) for c in kept])
    np.testing.assert_array_equal(
        initializer(res.model, "W_fc"), np.take(initializer(m, "W_fc"), features, axis=axis)
    )
    if reshape:
        view = node(res.model, "view")
        assert list(const_input(res.model, view, 1)) == [1, 4 * 16]


def test_nhwc_transpose_then_flatten_channel_owns_every_cth_feature():
    nodes = [
        conv_node("x", "W_stem", "a", "B_stem", name="stem"),
        helper.make_node("Transpose", ["a"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["nhwc"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "W_fc", "B_fc"], ["y"], name="fc", transB=1),
    ]
    params = {"W_stem": (C, 3, 3, 3), "B_stem": (C,), "W_fc": (10, 16 * C), "B_fc": (10,)}
    m = make_model(nodes, {"x": [1, 3, 4, 4]}, {"y": None}, params)
    group = group_with(graphprune.analyze(m), "W_stem", 0)
    assert group.prunable and group.num_units == C
    np.testing.assert_array_equal(group.unit_of[("W_fc", 1)], np.tile(np.arange(C), 16))
    res = assert_prunes_exactly(m)
    removed = set(res.plan.groups[0].channels["W_stem"]["0"])
    features = [f for f in range(16 * C) if f % C not in removed]
    np.testing.assert_array_equal(initializer(res.model, "W_fc"), initializer(m, "W_fc")[:, features])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_hidden_features(trans_b):
    w1 = (32, 16) if trans_b else (16, 32)
    w2 = (10, 32) if trans_b else (32, 10)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="fc1", transB=trans_b),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2", "B2"], ["y"], name="fc2", transB=trans_b),
    ]
    m = make_model(nodes, {"x": [2, 16]}, {"y": None},
                   {"W1": w1, "B1": (32,), "W2": w2, "B2": (10,)})
    group = group_with(graphprune.analyze(m), "B1", 0)
    out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    assert group.roles[("W1", out_axis)] == "producer"
    assert group.roles[("W2", in_axis)] == "consumer"
    assert group.prunable and group.num_units == 32
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W1").shape[out_axis] == 16
    assert initializer(res.model, "W2").shape[in_axis] == 16
    assert initializer(res.model, "B1").shape == (16,)


def test_matmul_with_constant_weights():
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "B1"], ["hb"], name="bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    m = make_model(nodes, {"x": [2, 5, 16]}, {"y": None}, {"W1": (16, 32), "B1": (32,), "W2": (32, 10)})
    group = group_with(graphprune.analyze(m), "W1", 1)
    assert group.prunable and group.num_units == 32 and ("W2", 0) in group.params
    assert ("B1", 0) in group.params
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W1").shape == (16, 16)
    assert initializer(res.model, "W2").shape == (16, 10)


# --------------------------------------------------------------------------- re-views and copies


def test_resize_with_scales():
    resize = helper.make_node("Resize", ["a", "", "scales"], ["b"], name="up", mode="nearest")
    m = sandwich([resize], {"scales": np.array([1, 1, 2, 2], np.float32)})
    assert_stem_group(m, {"b"})
    res = assert_prunes_exactly(m)
    np.testing.assert_array_equal(initializer(res.model, "scales"), [1, 1, 2, 2])


def test_resize_with_sizes_rewrites_the_channel_literal():
    resize = helper.make_node("Resize", ["a", "", "", "sizes"], ["b"], name="up", mode="nearest")
    m = sandwich([resize], {"sizes": ints(1, C, 2 * HW, 2 * HW)})
    assert_stem_group(m, {"b"})
    res = assert_prunes_exactly(m)
    assert list(const_input(res.model, node(res.model, "up"), 3)) == [1, 4, 2 * HW, 2 * HW]


def test_pad_spatial_passes_channels():
    pad = helper.make_node("Pad", ["a", "pads"], ["b"], name="pad", mode="constant")
    m = sandwich([pad], {"pads": ints(0, 0, 1, 1, 0, 0, 1, 1)}, head_k=1)
    assert_stem_group(m, {"b"})
    res = assert_prunes_exactly(m)
    assert list(initializer(res.model, "pads")) == [0, 0, 1, 1, 0, 0, 1, 1]


def test_constant_pad_of_channels_offsets_them_and_shrinks_with_its_fill():
    """Channels padded with a constant: the input's channels sit at an offset of the output's;
    the fill channels are units of their own (no producer) and removing one shrinks the pad."""
    pad = helper.make_node("Pad", ["a", "pads"], ["b"], name="pad", mode="constant")
    m = sandwich([pad], {"pads": ints(0, 1, 0, 0, 0, 3, 0, 0)}, head_in=C + 4)
    group = assert_stem_group(m, {"b"}, units=C + 4)
    res = assert_prunes_exactly(m)
    pads = const_input(res.model, node(res.model, "pad"), 1)
    kept = initializer(res.model, "W_head").shape[1]
    assert pads[1] + pads[5] + initializer(res.model, "W_stem").shape[0] == kept < C + 4
    assert group.num_units == C + 4

    reflect = helper.make_node("Pad", ["a", "pads"], ["b"], name="pad", mode="reflect")
    frozen = stem_group(sandwich([reflect], {"pads": ints(0, 1, 0, 0, 0, 1, 0, 0)}, head_in=C + 2))
    assert not frozen.prunable and any("Pad 'pad'" in r for r in frozen.frozen)


@pytest.mark.parametrize("opset", [10, 17])
def test_blazeblock_shortcut_padded_to_the_block_width(opset):
    """MediaPipe's BlazeFace/face-mesh blocks (TFLite -> tf2onnx): ``relu(conv1x1(dw(x)) +
    pad_channels(x))``; the shortcut's fill channels go with the block's extra outputs, the
    input's channels with the stream. Before, the padded axis froze every group."""
    wide = C + 4
    pad_args = {"pads": [0, 0, 0, 0, 0, 4, 0, 0]} if opset < 11 else {}
    pad_inputs = ["a"] if opset < 11 else ["a", "pads"]
    nodes = [
        conv_node("x", "W_stem", "a", "B_stem", name="stem"),
        helper.make_node("Conv", ["a", "W_dw", "B_dw"], ["d"], name="dw", group=C,
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "W_pw", "B_pw"], ["p"], name="pw", kernel_shape=[1, 1]),
        helper.make_node("Pad", pad_inputs, ["s"], name="pad", mode="constant", **pad_args),
        helper.make_node("Add", ["p", "s"], ["r"], name="add"),
        helper.make_node("Relu", ["r"], ["b"], name="relu"),
        conv_node("b", "W_head", "y", "B_head", k=1, name="head"),
    ]
    params = {"W_stem": (C, 3, 3, 3), "B_stem": (C,), "W_dw": (C, 1, 3, 3), "B_dw": (C,),
              "W_pw": (wide, C, 1, 1), "B_pw": (wide,), "W_head": (4, wide, 1, 1), "B_head": (4,)}
    if opset >= 11:
        params["pads"] = ints(0, 0, 0, 0, 0, 4, 0, 0)
    m = make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None}, params, opset=opset)
    analysis = graphprune.analyze(m)
    group = group_with(analysis, "W_pw", 0)
    assert group.prunable, group.frozen
    assert group is group_with(analysis, "W_stem", 0)
    res = assert_prunes_exactly(m)
    n = node(res.model, "pad")
    attrs = {a.name for a in n.attribute}  # an opset-10 model may come back upgraded
    pads = list(attr(n, "pads")) if "pads" in attrs else list(const_input(res.model, n, 1))
    stem = initializer(res.model, "W_stem").shape[0]
    assert stem < C and pads[5] < 4
    assert stem + pads[5] == initializer(res.model, "W_pw").shape[0] == initializer(res.model, "W_head").shape[1]


def test_transpose_to_nhwc_and_back_with_last_axis_constant():
    nodes = [
        helper.make_node("Transpose", ["a"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["t", "k"], ["tk"], name="scale"),
        helper.make_node("Transpose", ["tk"], ["b"], name="to_nchw", perm=[0, 3, 1, 2]),
    ]
    m = sandwich(nodes, {"k": (C,)})
    group = assert_stem_group(m, {"t", "tk", "k"})
    assert ("t", 3) in group.dims
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "k").shape == (4,)


def test_squeeze_unsqueeze_squeeze_excitation():
    nodes = [
        conv_node("x", "W_stem", "a", "B_stem", name="stem"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="gap"),
        helper.make_node("Squeeze", ["p", "hw_axes"], ["s"], name="squeeze"),
        helper.make_node("Gemm", ["s", "W_fc1", "B_fc1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "W_fc2", "B_fc2"], ["g"], name="fc2", transB=1),
        helper.make_node("Unsqueeze", ["g", "hw_axes"], ["g4"], name="unsqueeze"),
        helper.make_node("Sigmoid", ["g4"], ["gate"], name="sigmoid"),
        helper.make_node("Mul", ["a", "gate"], ["b"], name="excite"),
        conv_node("b", "W_head", "y", name="head"),
    ]
    params = {
        "W_stem": (C, 3, 3, 3), "B_stem": (C,), "hw_axes": ints(2, 3),
        "W_fc1": (4, C), "B_fc1": (4,), "W_fc2": (C, 4), "B_fc2": (C,), "W_head": (4, C, 3, 3),
    }
    m = make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None}, params)
    analysis = graphprune.analyze(m)
    group = group_with(analysis, "W_stem", 0)
    assert {("W_fc1", 1), ("W_fc2", 0), ("B_fc2", 0), ("W_head", 1), ("s", 1), ("g4", 1)} <= set(
        group.dims
    )
    hidden = group_with(analysis, "W_fc1", 0)
    assert hidden.prunable and hidden.num_units == 4
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W_fc2").shape == (4, 2)  # transB: [C, hidden]
    np.testing.assert_array_equal(initializer(res.model, "hw_axes"), [2, 3])


def test_expand_shape_literal_is_rewritten():
    nodes = [
        helper.make_node("Expand", ["k", "shape"], ["ke"], name="expand"),
        helper.make_node("Add", ["a", "ke"], ["b"], name="add"),
    ]
    m = sandwich(nodes, {"k": (C, 1, 1), "shape": ints(1, C, HW, HW)})
    group = assert_stem_group(m, {"k", "ke"})
    assert [(s.node_name, s.element) for s in group.shape_elements] == [("expand", 1)]
    res = assert_prunes_exactly(m)
    assert list(const_input(res.model, node(res.model, "expand"), 1)) == [1, 4, HW, HW]
    assert initializer(res.model, "k").shape == (4, 1, 1)


def test_identity_on_an_initializer_torchscript_style():
    """The TorchScript exporter routes shared weights through Identity nodes: the conv reads
    the weight itself (no folded copy under the Identity's output name)."""
    nodes = [
        helper.make_node("Identity", ["W_raw"], ["W_mid"], name="weight_identity"),
        conv_node("a", "W_mid", "b", name="mid"),
    ]
    m = sandwich(nodes, {"W_raw": (C, C, 3, 3)})
    analysis = graphprune.analyze(m)
    assert ("W_raw", 1) in group_with(analysis, "W_stem", 0).params
    assert group_with(analysis, "W_raw", 0).prunable
    res = assert_prunes_exactly(m)
    assert not nodes_of(res.model, "Identity")
    mid = node(res.model, "mid")
    assert initializer(res.model, mid.input[1]).shape == (4, 4, 3, 3)


def test_identity_dropout_cast_pass_channels_through():
    nodes = [
        helper.make_node("Identity", ["a"], ["i"], name="identity"),
        helper.make_node("Dropout", ["i"], ["d"], name="dropout"),
        helper.make_node("Cast", ["d"], ["c64"], name="to_double", to=onnx.TensorProto.DOUBLE),
        helper.make_node("Cast", ["c64"], ["b"], name="to_float", to=onnx.TensorProto.FLOAT),
    ]
    m = sandwich(nodes)
    assert_stem_group(m, {"d", "c64", "b"})
    res = assert_prunes_exactly(m)
    assert kept_stem(res) == 4


def test_softmax_over_channels_is_inexact_and_exact_groups_still_verify():
    nodes = [
        helper.make_node("Softmax", ["a"], ["sm"], name="softmax", axis=1),
        conv_node("sm", "W_mid", "mid", "B_mid", name="mid"),
        helper.make_node("Relu", ["mid"], ["b"], name="relu"),
    ]
    m = sandwich(nodes, {"W_mid": (6, C, 3, 3), "B_mid": (6,)}, head_in=6)
    analysis = graphprune.analyze(m)
    soft = group_with(analysis, "W_stem", 0)
    assert soft.prunable and not soft.is_exact
    assert any("Softmax" in r for r in soft.inexact)
    exact = group_with(analysis, "W_mid", 0)
    assert exact.prunable and exact.is_exact

    res = graphprune.prune(m, ratio=0.5)
    onnx.checker.check_model(res.model, full_check=True)
    verification = res.report["verification"]
    assert verification["ok"] is True
    assert verification["exact_groups_checked"] == 1
    assert [g["anchor"] for g in verification["inexact_groups"]] == [
        f"{soft.anchor[0]}:{soft.anchor[1]}"
    ]
    assert res.report["groups"]["inexact"] == 1
    assert initializer(res.model, "W_stem").shape[0] == 4
    assert initializer(res.model, "W_mid").shape == (3, 4, 3, 3)


def test_a_prune_of_inexact_groups_only_says_nothing_pruned_was_compared():
    """Every pruned group inexact (DTLN's 256 channels feed an instant LayerNorm): the exact
    check compares none of what was pruned, and said 'ok against the zeroed original (exact
    groups only)' while the denoiser fell below its noisy input. It says so now, and where to
    measure it."""
    from graphprune.tables import verification_lines

    nodes = [helper.make_node("Softmax", ["a"], ["sm"], name="softmax", axis=1),
             helper.make_node("Relu", ["sm"], ["b"], name="relu")]
    m = sandwich(nodes)
    res = graphprune.prune(m, ratio=0.5)
    verification = res.report["verification"]
    assert verification["ok"] is True and verification["exact_groups_checked"] == 0
    assert len(verification["inexact_groups"]) == res.report["groups"]["pruned"] == 1
    assert verification["reference"].startswith("the original (every pruned group is inexact")
    lines = verification_lines(res.report)
    assert "none of what was pruned was compared" in lines[0] and "--calibration" in lines[-1]
    onnx.checker.check_model(res.model, full_check=True)


def test_constant_nodes_are_lifted_and_sliced():
    k = np.random.default_rng(5).standard_normal((C, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["k"], name="k_const",
                         value=numpy_helper.from_array(k, "k")),
        helper.make_node("Constant", [], ["target"], name="target_const",
                         value=numpy_helper.from_array(ints(1, C * 16), "target")),
        conv_node("x", "W_stem", "a", "B_stem", name="stem"),
        helper.make_node("Mul", ["a", "k"], ["ak"], name="scale"),
        helper.make_node("Reshape", ["ak", "target"], ["f"], name="view"),
        helper.make_node("Gemm", ["f", "W_fc"], ["y"], name="fc", transB=1),
    ]
    params = {"W_stem": (C, 3, 3, 3), "B_stem": (C,), "W_fc": (10, C * 16)}
    m = make_model(nodes, {"x": [1, 3, 4, 4]}, {"y": None}, params)
    group = group_with(graphprune.analyze(m), "W_stem", 0)
    assert group.prunable and ("k", 0) in group.params
    res = assert_prunes_exactly(m)
    kept = [c for c in range(C) if c not in res.plan.groups[0].channels["W_stem"]["0"]]
    np.testing.assert_array_equal(const_input(res.model, node(res.model, "scale"), 1), k[kept])
    assert list(const_input(res.model, node(res.model, "view"), 1)) == [1, 4 * 16]


def _channel_shuffle(groups: int = 2):
    per = C // groups
    return [
        helper.make_node("Reshape", ["a", "split_shape"], ["r5"], name="shuffle_split"),
        helper.make_node("Transpose", ["r5"], ["t5"], name="shuffle_swap", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "merge_shape"], ["b"], name="shuffle_merge"),
    ], {"split_shape": ints(1, groups, per, HW, HW), "merge_shape": ints(1, C, HW, HW)}


def test_channel_shuffle_prunes_the_same_position_in_every_group():
    """Reshape [1, 2, 4, H, W] -> Transpose(g <-> C/g) -> Reshape [1, 8, H, W]: a unit is one
    position inside the groups, so the shuffle stays a permutation of the kept channels."""
    nodes, params = _channel_shuffle()
    m = sandwich(nodes, params)
    group = stem_group(m)
    assert group.prunable and group.num_units == 4, group.frozen
    np.testing.assert_array_equal(group.unit_of[("a", 1)], [0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(group.unit_of[("b", 1)], [0, 0, 1, 1, 2, 2, 3, 3])
    res = assert_prunes_exactly(m)
    removed = res.plan.groups[0].channels["W_stem"]["0"]
    assert len(removed) == 4 and sorted(c % 4 for c in removed)[::2] == res.plan.groups[0].remove
    assert list(const_input(res.model, node(res.model, "shuffle_split"), 1)) == [1, 2, 2, HW, HW]
    assert list(const_input(res.model, node(res.model, "shuffle_merge"), 1)) == [1, 4, HW, HW]


def test_channel_shuffle_after_a_concat_of_two_branches():
    """ShuffleNet v2: concat two branches, then shuffle."""
    nodes, params = _channel_shuffle()
    nodes = [
        conv_node("x", "W_l", "l", name="left"),
        conv_node("x", "W_r", "r", name="right"),
        helper.make_node("Concat", ["l", "r"], ["a"], name="concat", axis=1),
        *nodes,
        conv_node("b", "W_head", "y", name="head"),
    ]
    params |= {"W_l": (C // 2, 3, 3, 3), "W_r": (C // 2, 3, 3, 3), "W_head": (4, C, 3, 3)}
    m = make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None}, params)
    group = group_with(graphprune.analyze(m), "W_l", 0)
    assert group.prunable and group.num_units == 4
    res = assert_prunes_exactly(m)
    assert initializer(res.model, "W_l").shape[0] == initializer(res.model, "W_r").shape[0] == 2


def test_channel_shuffle_between_grouped_convs():
    """ShuffleNet v1: grouped 1x1 conv -> shuffle -> grouped 1x1 conv (position by position)."""
    shuffle, params = _channel_shuffle()
    nodes = [
        conv_node("a", "W_g1", "g1", name="gconv1", group=2, k=1),
        helper.make_node("Reshape", ["g1", "split_shape"], ["r5"], name="shuffle_split"),
        shuffle[1],
        helper.make_node("Reshape", ["t5", "merge_shape"], ["s"], name="shuffle_merge"),
        conv_node("s", "W_g2", "b", name="gconv2", group=2, k=1),
    ]
    params |= {"W_g1": (C, C // 2, 1, 1), "W_g2": (C, C // 2, 1, 1)}
    m = sandwich(nodes, params)
    analysis = graphprune.analyze(m)
    assert len(analysis.prunable_groups) == 3
    res = assert_prunes_exactly(m)
    assert attr(node(res.model, "gconv1"), "group") == 2
    assert attr(node(res.model, "gconv2"), "group") == 2
    w1, w2 = initializer(res.model, "W_g1"), initializer(res.model, "W_g2")
    assert w1.shape[0] % 2 == 0 and w2.shape[0] % 2 == 0


def test_op_without_a_rule_freezes_the_groups_it_touches():
    """DFT has no rule (ONNX Runtime runs it, so the prune verifies)."""
    nodes = [
        conv_node("x", "W_stem", "a", "B_stem", name="stem"),
        helper.make_node("Unsqueeze", ["a", "last"], ["a1"], name="to_real"),
        helper.make_node("DFT", ["a1", "", "width"], ["f"], name="mystery"),  # [1, C, HW, HW, 2]
        helper.make_node("ReduceSum", ["f", "last"], ["b"], name="parts", keepdims=0),
        conv_node("b", "W_head", "y", "B_head", name="head"),
    ]
    m = make_model(
        nodes, {"x": [1, 3, HW, HW]}, {"y": None},
        {"W_stem": (C, 3, 3, 3), "B_stem": (C,), "W_head": (4, C, 3, 3), "B_head": (4,),
         "last": np.array([-1], np.int64), "width": np.array(3, np.int64)},
        opset=20, value_info={"f": [1, C, HW, HW, 2], "b": [1, C, HW, HW]},
    )
    analysis = graphprune.analyze(m)
    assert analysis.unsupported == {"DFT": ["mystery"]}
    group = group_with(analysis, "W_stem", 0)
    assert not group.prunable
    assert any("DFT 'mystery'" in r for r in group.frozen)
    res = graphprune.prune(m, ratio=0.5)
    assert res.plan.units_removed == 0
    assert res.report["unsupported_ops"] == {"DFT": 1}


def test_custom_domain_op_without_a_rule_freezes():
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Foo", ["a"], ["b"], name="foo", domain="com.example"),
        conv_node("b", "W_head", "y", name="head"),
    ]
    m = make_model(
        nodes, {"x": [1, 3, HW, HW]}, {"y": [1, 4, HW, HW]},
        {"W_stem": (C, 3, 3, 3), "W_head": (4, C, 3, 3)},
        extra_opsets={"com.example": 1}, value_info={"b": [1, C, HW, HW]},
    )
    analysis = graphprune.analyze(m)
    assert analysis.unsupported == {"com.example::Foo": ["foo"]}
    group = group_with(analysis, "W_stem", 0)
    assert not group.prunable
    assert any("Foo 'foo'" in r for r in group.frozen)


def test_graph_inputs_and_outputs_are_never_pruned():
    """An intermediate tensor that is also a graph output freezes its whole group."""
    nodes = [
        conv_node("x", "W_stem", "a", "B_stem", name="stem"),
        helper.make_node("Relu", ["a"], ["feat"], name="relu"),
        conv_node("feat", "W_head", "y", name="head"),
    ]
    m = make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None, "feat": None},
                   {"W_stem": (C, 3, 3, 3), "B_stem": (C,), "W_head": (4, C, 3, 3)})
    analysis = graphprune.analyze(m)
    assert analysis.prunable_groups == []
    assert any("graph output 'feat'" in r for r in group_with(analysis, "W_stem", 0).frozen)
    res = graphprune.prune(m, ratio=0.5)
    assert res.plan.units_removed == 0
    assert [(o.name, o.type) for o in res.model.graph.output] == [
        (o.name, o.type) for o in m.graph.output
    ]


def test_a_graph_input_read_by_a_per_channel_op_is_not_pruned():
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Add", ["a", "side"], ["b"], name="add_side_input"),
        conv_node("b", "W_head", "y", name="head"),
    ]
    m = make_model(nodes, {"x": [1, 3, HW, HW], "side": [1, C, 1, 1]}, {"y": None},
                   {"W_stem": (C, 3, 3, 3), "W_head": (4, C, 3, 3)})
    group = group_with(graphprune.analyze(m), "W_stem", 0)
    assert not group.prunable and any("graph input 'side'" in r for r in group.frozen)


# --------------------------------------------------------------------------- variants: axes, ranks, opsets


def _negative_axes():
    nodes = [
        helper.make_node("Slice", ["a", "starts", "ends", "axes"], ["s"], name="slice"),
        helper.make_node("Concat", ["s", "s"], ["b"], name="concat", axis=-3),
    ]
    return sandwich(nodes, {"starts": ints(2), "ends": ints(6), "axes": ints(-3)}, head_in=8)


def _split_negative_axis():
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Split", ["a", "sizes"], ["s0", "s1"], name="split", axis=-3),
        conv_node("s0", "W_h0", "h0", name="head0"),
        conv_node("s1", "W_h1", "h1", name="head1"),
        helper.make_node("Add", ["h0", "h1"], ["y"], name="add"),
    ]
    return make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None},
                      {"W_stem": (C, 3, 3, 3), "sizes": ints(3, 5), "W_h0": (4, 3, 3, 3),
                       "W_h1": (4, 5, 3, 3)})


def _conv_rank(spatial: int):
    k = [3] * spatial
    nodes = [
        helper.make_node("Conv", ["x", "W_stem", "B_stem"], ["a"], name="stem", kernel_shape=k,
                         pads=[1] * 2 * spatial),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W_head"], ["y"], name="head", kernel_shape=[1] * spatial),
    ]
    return make_model(nodes, {"x": [1, 3, *[4] * spatial]}, {"y": None},
                      {"W_stem": (C, 3, *k), "B_stem": (C,), "W_head": (4, C, *[1] * spatial)})


def _opset9_flatten_gemm():
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "W_fc", "B_fc"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, {"x": [1, 3, 4, 4]}, {"y": None},
                      {"W_stem": (C, 3, 3, 3), "W_fc": (10, C * 16), "B_fc": (10,)}, opset=9)


def _opset11_squeeze_attribute():
    nodes = [
        conv_node("x", "W_stem", "a", name="stem"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="gap"),
        helper.make_node("Squeeze", ["p"], ["s"], name="squeeze", axes=[2, 3]),
        helper.make_node("Gemm", ["s", "W_fc"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None},
                      {"W_stem": (C, 3, 3, 3), "W_fc": (10, C)}, opset=11)


def _opset10_pad_attribute():
    pad = helper.make_node("Pad", ["a"], ["b"], name="pad", pads=[0, 0, 1, 1, 0, 0, 1, 1])
    return sandwich([pad], opset=10, head_k=1)


def _gemm_trans_a():
    nodes = [
        helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1", transA=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2"),
    ]
    return make_model(nodes, {"x": [16, 2]}, {"y": None}, {"W1": (16, 32), "W2": (32, 10)})


def _per_width_constant_when_channels_equal_width():
    # k [8] broadcasts over W (8 == C): it must not be taken for a per-channel constant
    return sandwich([helper.make_node("Mul", ["a", "k"], ["b"], name="mul_w")], {"k": (HW,)})


def _conv_transpose_output_shape():
    up = helper.make_node("ConvTranspose", ["a", "W_t"], ["b"], name="up", kernel_shape=[2, 2],
                          strides=[2, 2], output_shape=[2 * HW, 2 * HW])
    return sandwich([up], {"W_t": (C, 6, 2, 2)}, head_in=6)


def _reshape_with_zero_copies():
    nodes = [
        helper.make_node("Reshape", ["a", "flat"], ["f"], name="view"),
        helper.make_node("Reshape", ["f", "back"], ["b"], name="back"),
    ]
    return sandwich(nodes, {"flat": ints(0, 0, -1), "back": ints(0, 0, HW, HW)})


VARIANTS = {
    "negative_axes": _negative_axes,
    "split_negative_axis": _split_negative_axis,
    "conv1d": lambda: _conv_rank(1),
    "conv3d": lambda: _conv_rank(3),
    "opset9_upgraded": _opset9_flatten_gemm,
    "opset11_squeeze_attribute": _opset11_squeeze_attribute,
    "opset10_pad_attribute": _opset10_pad_attribute,
    "gemm_transA": _gemm_trans_a,
    "per_width_constant": _per_width_constant_when_channels_equal_width,
    "conv_transpose_output_shape": _conv_transpose_output_shape,
    "reshape_zero_copies": _reshape_with_zero_copies,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_prune_exactly(variant):
    m = VARIANTS[variant]()
    res = assert_prunes_exactly(m, criterion="random", seed=4)
    if variant == "per_width_constant":
        assert initializer(res.model, "k").shape == (HW,)
    if variant == "opset9_upgraded":
        assert max(o.version for o in res.model.opset_import if o.domain in ("", "ai.onnx")) >= 11


def test_matmul_with_the_constant_first():
    nodes = [
        helper.make_node("MatMul", ["W1", "x"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["W2", "r"], ["y"], name="mm2"),
    ]
    m = make_model(nodes, {"x": [16, 5]}, {"y": None}, {"W1": (32, 16), "W2": (10, 32)})
    group = group_with(graphprune.analyze(m), "W1", 0)
    assert group.prunable and group.num_units == 32
    assert group.roles == {("W1", 0): "producer", ("W2", 1): "consumer"}
    res = assert_prunes_exactly(m, roles=group.roles)
    assert initializer(res.model, "W1").shape == (16, 16)
    assert initializer(res.model, "W2").shape == (10, 16)
