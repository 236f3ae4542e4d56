"""Lossless pruning, zero-invariance analysis, operator erasure and depth pruning.

The passes these modes are made of (fold constants, drop concat inputs, erase blocks) have
their own contract tests in ``tests/test_lossless_passes.py``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    conv_node,
    default_feeds,
    make_model,
    nodes_of,
    positive,
    relative_difference,
    run_ort,
)
from graphprune.passes.base import PassContext
from graphprune.passes.erase_operators import EraseOperatorsPass
from onnx import helper, numpy_helper

import graphprune
from graphprune.analysis.blocks import branch_scale, find_residual_blocks
from graphprune.analysis.zero_analysis import analyze_constants
from graphprune.errors import UsageError, VerificationError
from graphprune.pipeline.depth import erase_blocks
from graphprune.pipeline.lossless import prune_lossless
from graphprune.pipeline.session import Session
from graphprune.testing import plant_zeros

ZOO = Path(__file__).resolve().parent.parent / "bench" / "cache"


# --------------------------------------------------------------------------- helpers
def weight(cout: int, cin: int, k: int = 3, *, zero_rows=(), seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((cout, cin, k, k)).astype(np.float32)
    w[list(zero_rows)] = 0
    return w


def vector(n: int, *, zero=(), value=None, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    if value is not None:
        v[:] = value
    v[list(zero)] = 0
    return v


def graph_of(model: onnx.ModelProto):
    session = Session(model)
    return session.import_graph(), session.opset


def states(model: onnx.ModelProto):
    graph, opset = graph_of(model)
    return analyze_constants(graph, opset).states


def assert_same_function(original: onnx.ModelProto, pruned: onnx.ModelProto, tol: float = 1e-5) -> None:
    for seed in range(2):
        feeds = default_feeds(original, seed=seed, batch=1)
        diff = relative_difference(run_ort(original, feeds), run_ort(pruned, feeds))
        assert diff <= tol, diff


def conv_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in nodes_of(model, "Conv")}


def bn_node(x: str, p: str, y: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{p}.s", f"{p}.b", f"{p}.m", f"{p}.v"], [y], name=y)


def bn_params(p: str, c: int, *, zero=(), seed: int = 3) -> dict[str, np.ndarray]:
    s, b = positive(c, seed=seed), vector(c, seed=seed)
    s[list(zero)] = 0
    b[list(zero)] = 0
    return {f"{p}.s": s, f"{p}.b": b, f"{p}.m": vector(c, seed=seed + 1) * 0.1, f"{p}.v": positive(c, seed=seed + 2)}


# --------------------------------------------------------------------------- zero analysis
def test_zero_output_of_unary_bn_and_conv():
    model = make_model(
        [
            conv_node("x", "w", "y", "b", k=1, pads=[0, 0, 0, 0]),
            helper.make_node("Relu", ["y"], ["r"]),
            helper.make_node("Sigmoid", ["y"], ["s"]),
            bn_node("y", "bn", "n"),
            helper.make_node("Concat", ["r", "s", "n"], ["out"], axis=1),
        ],
        {"x": [1, 4, 5, 5]},
        {"out": None},
        {"w": weight(6, 4, 1, zero_rows=(0, 1, 2)), "b": vector(6, zero=(0,), value=-2.0), **bn_params("bn", 6)},
    )
    found = states(model)
    assert np.array_equal(found["y"].values[:3], [0, -2, -2]) and np.isnan(found["y"].values[3:]).all()
    assert np.array_equal(found["r"].values[:3], [0, 0, 0])
    assert found["s"].values[0] == 0.5
    assert found["s"].values[1] == pytest.approx(1 / (1 + math.e**2))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    s, b, m, v = (inits[f"bn.{k}"] for k in "sbmv")
    expect = (0 - m[0]) / np.sqrt(v[0] + 1e-5) * s[0] + b[0]
    assert found["n"].values[0] == pytest.approx(expect, rel=1e-6)
    assert found["out"].axis == 1 and found["out"].values.size == 18
    assert np.isnan(found["out"].values[3:6]).all()


def test_padding_hides_a_constant_but_not_a_zero():
    params = {"w0": weight(4, 3, 1, zero_rows=(0, 1)), "b0": vector(4, zero=(0,), value=2.0), "w1": weight(5, 4), "w2": weight(5, 4, 1)}
    params["w1"][:, 2:] = 0  # the padded conv reads only the zero and the constant channel
    params["w2"][:, 2:] = 0
    model = make_model(
        [
            conv_node("x", "w0", "y", "b0", k=1, pads=[0, 0, 0, 0]),
            conv_node("y", "w1", "padded"),
            conv_node("y", "w2", "valid", k=1, pads=[0, 0, 0, 0]),
            helper.make_node("Concat", ["padded", "valid"], ["out"], axis=1),
        ],
        {"x": [1, 3, 6, 6]},
        {"out": None},
        params,
    )
    found = states(model)
    assert "padded" not in found  # 2.0 * kernel sum only inside the image: nothing known
    w2 = params["w2"].reshape(5, 4)
    assert np.allclose(found["valid"].values, 2.0 * w2[:, 1], rtol=1e-6)
    params["b0"][1] = 0  # both read channels zero now: the padded conv is zero too
    model = make_model(model.graph.node, {"x": [1, 3, 6, 6]}, {"out": None}, params)
    assert np.array_equal(states(model)["padded"].values, np.zeros(5))


def test_mul_by_an_all_zero_tensor_is_zero_and_data_movement_keeps_channels():
    model = make_model(
        [
            helper.make_node("Mul", ["x", "zeros"], ["m"]),
            helper.make_node("Split", ["m"], ["a", "b"], axis=1, num_outputs=2),
            helper.make_node("Transpose", ["b", ], ["t"], perm=[0, 2, 3, 1]),
            helper.make_node("Flatten", ["a"], ["f"], axis=1),
        ],
        {"x": [1, 4, 3, 3]},
        {"t": None, "f": None},
        {"zeros": np.zeros((1, 4, 1, 1), np.float32)},
        opset=18,
    )
    found = states(model)
    assert found["m"].all_zero
    assert found["t"].axis == 3 and found["t"].all_zero
    assert found["f"].all_zero and found["f"].values.size == 18


# --------------------------------------------------------------------------- erasure pass
def residual_model(*, branch_bias: float | None = 0.0, zero_branch: bool = True) -> onnx.ModelProto:
    w2 = weight(4, 4, zero_rows=range(4) if zero_branch else ())
    b2 = vector(4, value=branch_bias if branch_bias is not None else 0.5)
    return make_model(
        [
            conv_node("x", "w0", "s", "b0"),
            helper.make_node("Relu", ["s"], ["r"]),
            conv_node("r", "w1", "h", "b1"),
            helper.make_node("Relu", ["h"], ["hr"]),
            conv_node("hr", "w2", "branch", "b2"),
            helper.make_node("Add", ["r", "branch"], ["sum"], name="add"),
            conv_node("sum", "w3", "out", "b3"),
        ],
        {"x": [1, 3, 6, 6]},
        {"out": None},
        {"w0": weight(4, 3), "b0": vector(4), "w1": weight(4, 4), "b1": vector(4), "w2": w2, "b2": b2, "w3": weight(2, 4), "b3": vector(2)},
    )


def test_erase_pass_removes_a_zero_branch_and_second_run_is_a_no_op():
    model = residual_model()
    session = Session(model)
    graph, opset = session.import_graph(), session.opset
    ctx = PassContext(opset=opset)
    first = EraseOperatorsPass().run(graph, ctx)
    assert first.modified
    assert first.stats["bypassed"] == 1
    assert {"add", "h", "branch"} <= set(first.stats["erased"])
    assert [n.op for n in graph.nodes] == ["Conv", "Relu", "Conv"]
    second = EraseOperatorsPass().run(graph, ctx)
    assert not second.modified and second.stats["nodes_erased"] == 0
    assert repr(EraseOperatorsPass()) == "EraseOperatorsPass()"
    assert_same_function(model, session.store.materialize(session.export()))


def test_a_constant_branch_becomes_a_per_channel_constant():
    model = residual_model(branch_bias=0.5)
    result = prune_lossless(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Conv", "Relu", "Add", "Conv"], ops
    assert_same_function(model, result.model)


def test_conv_with_no_live_input_becomes_its_bias():
    # conv 'h' reads only zero channels: it is its bias; the padded conv after it is not a
    # constant (border), so it reads Expand(bias) and the dead producers disappear
    params = {"w0": weight(4, 3), "b0": vector(4), "wz": weight(4, 4, zero_rows=range(4)), "bz": np.zeros(4, np.float32), "w1": weight(4, 4), "b1": vector(4), "w3": weight(2, 4), "b3": vector(2)}
    model = make_model(
        [
            conv_node("x", "w0", "s", "b0"),
            conv_node("s", "wz", "z", "bz"),
            helper.make_node("Relu", ["z"], ["zr"]),
            conv_node("zr", "w1", "h", "b1"),  # input all zero -> output b1
            helper.make_node("Relu", ["h"], ["hr"]),
            conv_node("hr", "w3", "out", "b3"),  # padded: relu(b1) is not a constant after it
        ],
        {"x": [1, 3, 6, 6]},
        {"out": None},
        params,
    )
    result = prune_lossless(model)
    names = {n.name for n in result.model.graph.node}
    assert not {"s", "z", "h"} & names, names
    assert "out" in names and any(n.op_type == "Expand" for n in result.model.graph.node)
    assert_same_function(model, result.model)


def test_a_concat_input_with_no_channels_is_dropped():
    model = make_model(
        [
            conv_node("x", "wa", "a", "ba"),
            conv_node("x", "wb", "b", "bb"),
            helper.make_node("Relu", ["b"], ["br"]),
            helper.make_node("Concat", ["a", "br"], ["c"], axis=1),
            conv_node("c", "wc", "out", "bc"),
        ],
        {"x": [1, 3, 6, 6]},
        {"out": None},
        {"wa": weight(4, 3), "ba": vector(4), "wb": weight(3, 3, zero_rows=range(3)), "bb": np.zeros(3, np.float32), "wc": weight(2, 7), "bc": vector(2)},
    )
    result = prune_lossless(model)
    assert conv_shapes(result.model)["out"] == [2, 4, 3, 3]
    assert "b" not in {n.name for n in result.model.graph.node}
    concat = nodes_of(result.model, "Concat")
    assert not concat or len(concat[0].input) == 1
    assert_same_function(model, result.model)


# --------------------------------------------------------------------------- lossless mode
def small_cnn(zero: tuple[int, ...] = (1, 3), act: str = "Relu", k2: int = 3) -> onnx.ModelProto:
    return make_model(
        [
            conv_node("x", "w1", "c1", "b1"),
            bn_node("c1", "bn", "n1"),
            helper.make_node(act, ["n1"], ["a1"]),
            conv_node("a1", "w2", "c2", "b2", k=k2, pads=[k2 // 2] * 4),
            helper.make_node("Relu", ["c2"], ["a2"]),
            helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "fc", "fb"], ["out"], transB=1),
        ],
        {"x": [1, 3, 8, 8]},
        {"out": None},
        {
            "w1": weight(6, 3, zero_rows=zero), "b1": vector(6, zero=zero), **bn_params("bn", 6, zero=zero),
            "w2": weight(5, 6, k2), "b2": vector(5), "fc": np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32), "fb": vector(3),
        },
    )


def test_lossless_removes_zero_channels_exactly():
    model = small_cnn()
    result = prune_lossless(model)
    assert conv_shapes(result.model) == {"c1": [4, 3, 3, 3], "c2": [5, 4, 3, 3]}
    report = result.report
    assert report["channels"]["removed"] == 2
    assert report["params_after"] < report["params_before"]
    assert report["verification"]["ok"] and report["verification"]["max_rel_diff"] <= 1e-5
    assert report["verification"]["reference"] == "the original"
    assert_same_function(model, result.model)


def test_lossless_does_nothing_without_zeros():
    model = small_cnn(zero=())
    result = prune_lossless(model)
    assert result.report["channels"]["removed"] == 0
    assert conv_shapes(result.model) == {"c1": [6, 3, 3, 3], "c2": [5, 6, 3, 3]}


def test_constant_channels_fold_into_an_unpadded_consumer():
    model = small_cnn(act="Sigmoid", k2=1)  # sigmoid(0) = 0.5 read by a 1x1 conv
    result = prune_lossless(model)
    assert result.report["lossless"]["constants_folded"] >= 1
    assert conv_shapes(result.model) == {"c1": [4, 3, 3, 3], "c2": [5, 4, 1, 1]}
    assert_same_function(model, result.model)


def test_constant_channels_before_a_padded_consumer_are_left():
    model = small_cnn(act="Sigmoid", k2=3)
    result = prune_lossless(model)
    assert result.report["channels"]["removed"] == 0
    assert_same_function(model, result.model)


def test_constants_fold_into_gemm():
    model = make_model(
        [
            conv_node("x", "w1", "c1", "b1"),
            helper.make_node("Sigmoid", ["c1"], ["s"]),
            helper.make_node("GlobalAveragePool", ["s"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "fc"], ["out"], transB=1, alpha=0.5),
        ],
        {"x": [1, 3, 6, 6]},
        {"out": None},
        {"w1": weight(4, 3, zero_rows=(2,)), "b1": vector(4, zero=(2,)), "fc": np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)},
    )
    result = prune_lossless(model)
    assert conv_shapes(result.model) == {"c1": [3, 3, 3, 3]}
    gemm = nodes_of(result.model, "Gemm")[0]
    assert len(gemm.input) == 3  # the folded constant became a bias
    assert_same_function(model, result.model)


def test_lossless_accepts_paths_and_never_touches_the_input(tmp_path):
    model = small_cnn()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    result = prune_lossless(str(path))
    assert path.read_bytes() == before
    assert result.plan.meta["mode"] == "lossless"
    assert result.plan.groups and result.plan.groups[0].remove


def test_lossless_fails_loudly_when_the_function_changes(monkeypatch):
    import graphprune.pipeline.lossless as lossless_module

    real = lossless_module.find_zero_groups

    def lying(analysis, constants):
        found = real(analysis, constants)
        for info in found:
            if not info.skipped:
                info.zero_units = [0]  # claim a live channel is zero
        return found

    monkeypatch.setattr(lossless_module, "find_zero_groups", lying)
    with pytest.raises(VerificationError) as caught:
        prune_lossless(small_cnn(zero=()))
    assert caught.value.result.report["verification"]["ok"] is False


def test_lossless_rejects_a_bad_tolerance():
    with pytest.raises(UsageError):
        prune_lossless(small_cnn(), tolerance=-1)


# --------------------------------------------------------------------------- depth pruning
def resnet_like(blocks: int = 3) -> onnx.ModelProto:
    nodes = [conv_node("x", "w0", "s0", "b0"), helper.make_node("Relu", ["s0"], ["r0"])]
    params = {"w0": weight(4, 3), "b0": vector(4)}
    for i in range(blocks):
        prev = f"r{i}"
        nodes += [
            conv_node(prev, f"w{i}a", f"h{i}", f"b{i}a"),
            helper.make_node("Relu", [f"h{i}"], [f"hr{i}"]),
            conv_node(f"hr{i}", f"w{i}b", f"o{i}", f"b{i}b"),
            helper.make_node("Add", [prev, f"o{i}"], [f"sum{i}"], name=f"add{i}"),
            helper.make_node("Relu", [f"sum{i}"], [f"r{i + 1}"]),
        ]
        scale = 0.1 * (i + 1)  # block i's branch is (i + 1) times as large as block 0's
        params.update({
            f"w{i}a": weight(4, 4, seed=i), f"b{i}a": vector(4, seed=i),
            f"w{i}b": weight(4, 4, seed=10 + i) * scale, f"b{i}b": vector(4, seed=10 + i) * scale,
        })
    # a downsample-style Add of two branches of the same input is not a residual block
    nodes += [
        conv_node(f"r{blocks}", "wd1", "d1", "bd1"),
        conv_node(f"r{blocks}", "wd2", "d2", "bd2"),
        helper.make_node("Add", ["d1", "d2"], ["out"], name="two_branches"),
    ]
    params.update({"wd1": weight(2, 4), "bd1": vector(2), "wd2": weight(2, 4), "bd2": vector(2)})
    return make_model(nodes, {"x": [1, 3, 6, 6]}, {"out": None}, params)


def test_find_residual_blocks_and_scores():
    graph, _ = graph_of(resnet_like())
    blocks = find_residual_blocks(graph)
    assert [b.add for b in blocks] == ["add0", "add1", "add2"]
    assert blocks[0].skip == "r0" and len(blocks[0].nodes) == 3 and blocks[0].nodes[0] == "h0"
    scales = [branch_scale(graph, b) for b in blocks]
    assert scales[0] < scales[1] < scales[2]


def test_erase_blocks_erases_the_weakest_and_verifies_by_construction():
    model = resnet_like()
    result = erase_blocks(model, 1)
    report = result.report
    depth = report["depth"]
    assert depth["blocks_found"] == 3 and depth["blocks_erased"] == ["add0"]
    names = {n.name for n in result.model.graph.node}
    assert not {"add0", "h0", "o0"} & names and {"add1", "add2"} <= names
    assert report["verification"]["ok"] and report["verification"]["max_rel_diff"] == 0.0
    assert depth["max_rel_diff_vs_original"] > 0
    assert result.plan.meta["blocks"] == ["add0"]
    assert [b["erased"] for b in depth["blocks"]] == [True, False, False]
    assert report["mode"] == "erase_blocks" and report["erased_nodes"] == sorted(["add0", *find_residual_blocks(graph_of(model)[0])[0].nodes])


def test_erase_blocks_with_lossless_reports_the_model_given_as_before() -> None:
    """``--erase-blocks 1 --lossless``: the table's "before" was the model with the block
    erased (ratio 1.000 where a block had gone) and the check said "against the original"."""
    model = resnet_like()
    depth = erase_blocks(model, 1).report
    both = graphprune.prune(model, erase_blocks=1, lossless=True).report
    assert both["mode"] == "erase_blocks+lossless"
    for key in ("params_before", "macs_before", "nodes_before"):
        assert both[key] == depth[key], key
    assert both["params_after"] <= depth["params_after"] < both["params_before"]
    assert both["verification"]["reference"] == "the model with the blocks erased"


def test_erase_blocks_counts_fractions_and_refuses_too_many():
    model = resnet_like()
    assert len(erase_blocks(model, 0.5).report["depth"]["blocks_erased"]) == 2
    assert erase_blocks(model, 0).report["depth"]["blocks_erased"] == []
    with pytest.raises(UsageError, match="erases no block of 3"):  # a fraction that rounds to none: not a copy
        erase_blocks(model, 0.1)
    with pytest.raises(UsageError):
        erase_blocks(model, 4)
    with pytest.raises(UsageError):
        erase_blocks(model, -1)


def test_erase_blocks_takes_a_scorer():
    result = erase_blocks(resnet_like(), 1, scorer=lambda graph, block: -int(block.add[-1]))
    assert result.report["depth"]["blocks_erased"] == ["add2"]


# --------------------------------------------------------------------------- planting
def test_plant_zeros_and_measure():
    model = resnet_like()
    planted, record = plant_zeros(model, groups=1.0, units=0.5, branches=1, seed=0)
    assert record.branches and record.groups and record.planted_units > 0
    result = prune_lossless(planted)
    measured = record.measure(result.model)
    assert measured["removed_units"] == measured["planted_units"]
    assert measured["removed_branches"] == 1
    assert_same_function(planted, result.model)


@pytest.mark.slow
@pytest.mark.skipif(not (ZOO / "resnet18__dynamo.onnx").exists(), reason="bench zoo not exported")
def test_zoo_resnet18_planted_zeros_are_all_removed():
    planted, record = plant_zeros(ZOO / "resnet18__dynamo.onnx", groups=0.3, units=0.3, branches=2)
    result = prune_lossless(planted)
    measured = record.measure(result.model)
    assert measured["removed_units"] == measured["planted_units"] > 0
    assert measured["removed_branches"] == measured["planted_branches"] == 2
    assert result.report["verification"]["max_rel_diff"] <= 1e-5


def test_public_entry_points_reach_the_drivers():
    result = graphprune.prune(small_cnn(), lossless=True)
    assert result.report["mode"] == "lossless" and result.report["channels"]["removed"] == 2
    assert graphprune.erase_blocks is erase_blocks


def test_kept_nodes_survive_erasure():
    model = residual_model()
    result = prune_lossless(model, keep=["h"])
    names = {n.name for n in result.model.graph.node}
    assert {"h", "add"} <= names  # erasing the branch would erase the kept node
    assert_same_function(model, result.model)


def zero_channel_source(channels: int = 4, zero=(0, 1), value=None):
    """A conv whose output channels ``zero`` are 0 (or ``value``) for every input."""
    b = vector(channels, zero=zero) if value is None else vector(channels, value=value)
    w = weight(channels, 3, 1, zero_rows=zero)
    if value is not None:
        w[list(zero)] = 0
    return conv_node("x", "w", "y", "b", k=1, pads=[0, 0, 0, 0]), {"w": w, "b": b}


@pytest.mark.parametrize(
    ("nodes", "params", "output", "axis", "expect"),
    [
        ([helper.make_node("Slice", ["y", "st", "en", "ax"], ["o"])], {"st": np.array([1]), "en": np.array([3]), "ax": np.array([1])}, "o", 1, [0, np.nan]),
        ([helper.make_node("Unsqueeze", ["y", "ax"], ["o"])], {"ax": np.array([0])}, "o", 2, [0, 0, np.nan, np.nan]),
        ([helper.make_node("ReduceMean", ["y", "ax"], ["o"], keepdims=0)], {"ax": np.array([2, 3])}, "o", 1, [0, 0, np.nan, np.nan]),
        ([helper.make_node("Reshape", ["y", "sh"], ["o"])], {"sh": np.array([1, 4, 16])}, "o", 1, [0, 0, np.nan, np.nan]),
        ([helper.make_node("Pad", ["y", "pd"], ["o"])], {"pd": np.array([0, 1, 0, 0, 0, 0, 0, 0])}, "o", 1, [0, 0, 0, np.nan, np.nan]),
        ([helper.make_node("MaxPool", ["y"], ["o"], kernel_shape=[2, 2], pads=[1, 1, 1, 1])], {}, "o", 1, [0, 0, np.nan, np.nan]),
        ([helper.make_node("InstanceNormalization", ["y", "is", "ib"], ["o"])], {"is": positive(4), "ib": np.array([1, 2, 3, 4], np.float32)}, "o", 1, [1, 2, np.nan, np.nan]),
    ],
    ids=["Slice", "Unsqueeze", "ReduceMean", "Reshape", "Pad", "MaxPool", "InstanceNormalization"],
)
def test_zero_output_of_shape_ops(nodes, params, output, axis, expect):
    source, source_params = zero_channel_source()
    params = {k: (v.astype(np.int64) if v.dtype.kind == "i" else v) for k, v in params.items()}
    model = make_model([source, *nodes], {"x": [1, 3, 4, 4]}, {output: None}, {**source_params, **params}, opset=18)
    state = states(model)[output]
    assert state.axis == axis
    np.testing.assert_array_equal(state.values, np.array(expect, dtype=np.float64))


def test_matmul_and_gemm_of_a_zero_input_give_the_bias():
    model = make_model(
        [
            helper.make_node("Mul", ["x", "zero"], ["z"]),
            helper.make_node("MatMul", ["z", "w"], ["m"]),
            helper.make_node("Gemm", ["m", "w2", "c"], ["out"]),
        ],
        {"x": [2, 5]},
        {"out": None},
        {"zero": np.zeros(5, np.float32), "w": weight(5, 3, 1).reshape(5, 3), "w2": weight(3, 4, 1).reshape(3, 4), "c": np.arange(4, dtype=np.float32)},
    )
    found = states(model)
    assert found["m"].all_zero
    np.testing.assert_array_equal(found["out"].values, np.arange(4))


def test_erase_blocks_finds_pre_norm_transformer_mlp_blocks():
    nodes, params, x = [], {}, "x"
    rng = np.random.default_rng(0)
    for i in range(2):
        nodes += [
            helper.make_node("LayerNormalization", [x, f"g{i}", f"be{i}"], [f"ln{i}"], axis=-1),
            helper.make_node("MatMul", [f"ln{i}", f"up{i}"], [f"u{i}"]),
            helper.make_node("Relu", [f"u{i}"], [f"a{i}"]),
            helper.make_node("MatMul", [f"a{i}", f"down{i}"], [f"d{i}"]),
            helper.make_node("Add", [x, f"d{i}"], [f"y{i}"], name=f"block{i}"),
        ]
        params.update({
            f"g{i}": positive(8), f"be{i}": vector(8) * 0.1,
            f"up{i}": rng.standard_normal((8, 16)).astype(np.float32) * (0.1 if i == 0 else 1.0),
            f"down{i}": rng.standard_normal((16, 8)).astype(np.float32),
        })
        x = f"y{i}"
    model = make_model(nodes, {"x": [1, 4, 8]}, {x: None}, params)
    result = erase_blocks(model, 1)
    assert result.report["depth"]["blocks_found"] == 2
    assert result.report["depth"]["blocks_erased"] == ["block0"]  # the block with the small up-projection
    assert result.report["verification"]["ok"]


def test_dynamic_batch_zero_branch_and_channels():
    w2 = weight(4, 4, zero_rows=range(4))
    model = make_model(
        [
            conv_node("x", "w0", "s", "b0"),
            helper.make_node("Relu", ["s"], ["r"]),
            conv_node("r", "w1", "h", "b1"),
            helper.make_node("Relu", ["h"], ["hr"]),
            conv_node("hr", "w2", "branch", "b2"),
            helper.make_node("Add", ["r", "branch"], ["sum"], name="add"),
            helper.make_node("GlobalAveragePool", ["sum"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "fc", "fb"], ["out"], transB=1),
        ],
        {"x": ["N", 3, 6, 6]},
        {"out": ["N", 2]},
        {
            "w0": weight(4, 3, zero_rows=(1,)), "b0": vector(4, zero=(1,)), "w1": weight(4, 4), "b1": vector(4),
            "w2": w2, "b2": np.zeros(4, np.float32), "fc": weight(2, 4, 1).reshape(2, 4), "fb": vector(2),
        },
    )
    result = prune_lossless(model)
    names = {n.name for n in result.model.graph.node}
    assert "add" not in names and "h" not in names
    assert conv_shapes(result.model)["s"] == [3, 3, 3, 3]
    feeds = default_feeds(model, batch=3)
    assert relative_difference(run_ort(model, feeds), run_ort(result.model, feeds)) <= 1e-5


@pytest.mark.parametrize("cast", [False, True])
def test_weights_behind_a_pruning_mask_are_folded_and_their_zeros_removed(cast: bool) -> None:
    """``torch.nn.utils.prune`` keeps ``weight_orig * weight_mask``; the dynamo exporter leaves
    the product unfolded above its size limit, so every layer read a computed weight:
    lossless mode found none of the channels the masks zero, the file kept both tensors, and
    calibration refit no layer it could not write. The mask is applied to the weight now (as
    ``prune.remove`` does): the masked channels go, the outputs stay the same. ``cast``: the
    masks read through a ``Cast`` to their own type, as TorchScript writes them without
    constant folding (that cast was kept unfolded as if it changed the type)."""
    rng = np.random.default_rng(0)
    mask1 = np.ones((16, 3, 3, 3), np.float32)
    mask1[::2] = 0  # structured: every other output channel of the first conv
    mask2 = (rng.random((8, 16, 3, 3)) > 0.3).astype(np.float32)  # unstructured
    bias1 = rng.standard_normal(16).astype(np.float32)
    bias1[::2] = 0
    casts = [helper.make_node("Cast", [f"w{i}_mask"], [f"m{i}"], to=onnx.TensorProto.FLOAT) for i in (1, 2)]
    m1, m2 = ("m1", "m2") if cast else ("w1_mask", "w2_mask")
    nodes = [*(casts if cast else []), helper.make_node("Mul", ["w1_orig", m1], ["w1"]), conv_node("x", "w1", "a", "b1"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Mul", ["w2_orig", m2], ["w2"]), conv_node("r", "w2", "y", "b2")]
    model = make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 8, 8, 8]},
                       {"w1_orig": (16, 3, 3, 3), "w1_mask": mask1, "b1": bias1,
                        "w2_orig": (8, 16, 3, 3), "w2_mask": mask2, "b2": (8,)})
    result = graphprune.prune(model, lossless=True)
    weights = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert not any("mask" in name or "orig" in name for name in weights), sorted(weights)
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    assert weights[conv.input[1]].shape[0] == 8  # the 8 masked channels are gone
    feed = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(result.model, feed)[0], run_ort(model, feed)[0], rtol=1e-5, atol=1e-5)



def test_a_buffer_read_through_static_slices_shrinks_beside_a_computed_layer_weight() -> None:
    """The dynamo exporter's nn.Transformer: a 5,000-row positional buffer of which static
    slices are read, and packed projections split in the graph. The optional fold (kept where
    the constants shrink) was rejected whole because a layer then read a folded weight; the
    layer weights' computations are held out of it now, and the buffer's unread rows go (a
    quarter of the parameters, even under ``--lossless``), the layer still reading its stored
    weight through the exporter's computation."""
    rng = np.random.default_rng(9)
    graph = helper.make_graph(
        [helper.make_node("Slice", ["pe", "s0", "s1", "ax"], ["pos"]),
         helper.make_node("Add", ["x", "pos"], ["h"]),
         helper.make_node("Split", ["packed"], ["wq", "wk"], axis=0, num_outputs=2),
         helper.make_node("Transpose", ["wq"], ["wqt"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "wqt"], ["q"]), helper.make_node("Transpose", ["wk"], ["wkt"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "wkt"], ["k"]), helper.make_node("Add", ["q", "k"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 6, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 6, 8])],
        [numpy_helper.from_array(rng.standard_normal((1, 500, 8)).astype(np.float32), "pe"),
         numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([6], np.int64), "s1"),
         numpy_helper.from_array(np.array([1], np.int64), "ax"),
         numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "packed")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = graphprune.prune(model, lossless=True)
    assert result.report["verification"]["ok"] and result.report["verification"]["max_abs_diff"] == 0.0
    assert result.report["params_after"] == 6 * 8 + 16 * 8 < result.report["params_before"]
    stored = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert stored.get("packed") == (16, 8) and "pe" not in stored
    assert [n.op_type for n in result.model.graph.node].count("Split") == 1
