"""Every registered op type has a test case: one small real ONNX graph per op (or per op
with the helpers it needs), analysed and pruned through the public API.

Most cases put the op between a producer and a consumer, so that a channel group crosses it:

- ``cnn``: ``x[1,3,4,4] -> Conv 'stem' (1x1) -> a[1,C,4,4] -> (op) -> b -> Conv 'head' -> y``;
  the group under test is the stem's output channels ``("W_stem", 0)``;
- ``mlp``: ``x[1,4,8] -> MatMul W_in -> a[1,4,H] -> (op) -> b -> MatMul W_out -> y``; the
  group under test is ``("W_in", 1)``.

What a case expects:

- ``PRUNES``: the group is prunable and exact; ``graphprune.prune`` at ratio 0.5 removes
  channels and its own verification (ONNX checker, an ORT run, output shapes, the pruned
  model against the original with the removed channels zeroed) passes;
- ``INEXACT``: prunable but not exact (a normalisation over the channels), with ``reason``;
  pruning still verifies;
- ``FROZEN``: the rule fails closed: the group is frozen and a reason contains ``reason``.

A case with ``runs=False`` is analysed only: its op is one that ONNX Runtime's CPU build or
the ONNX checker does not know (``Relu6`` from converters, ORT-internal fused ops).

``test_every_registered_op_type_has_a_case`` fails for any op type in the registry with no
case: a case here, or a rule's own test file ``tests/test_rule_<op>.py`` that lists the op in
``OPS_UNDER_TEST`` (and builds it). A new rule file thus comes with its test file.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import group_with, ints, make_model, positive
from onnx import TensorProto, helper

import graphprune
from graphprune.analysis import analyze_graph
from graphprune.io.ir import import_graph
from graphprune.rules import registered_ops

PRUNES, INEXACT, FROZEN = "prunes", "inexact", "frozen"
MS = "com.microsoft"
C, HW = 4, 4  # cnn channels and spatial size
H = 16  # mlp hidden size


@dataclass(frozen=True)
class Case:
    ops: tuple[str, ...]  # the op types under test, "domain::Op" outside the default domain
    build: Callable[[], onnx.ModelProto]
    expect: str = PRUNES
    reason: str = ""
    anchor: tuple[str, int] = ("W_stem", 0)
    prune: dict | None = None  # extra keyword arguments for graphprune.prune
    runs: bool = True  # False: the checker or ORT's CPU build does not know the op
    #: analyse the model as written (shape inference only): no constant lifting, no opset
    #: conversion (they would remove the op under test); implies ``runs=False``
    raw: bool = False


# --------------------------------------------------------------------------- builders


def n(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
    """A node named after the op (``reason`` texts name it: "Size 'Size'")."""
    return helper.make_node(op, inputs, outputs, name=attrs.pop("name", op), **attrs)


def cnn(
    middle: list[onnx.NodeProto],
    params: dict | None = None,
    *,
    head_in: int = C,
    opset: int = 17,
    value_info: dict | None = None,
    ms: bool = False,
    check: bool = True,
    width: int | str = HW,
) -> onnx.ModelProto:
    """``width`` a name: a dynamic width, so that the loader cannot fold shape computations."""
    nodes = [
        helper.make_node("Conv", ["x", "W_stem", "B_stem"], ["a"], name="stem", kernel_shape=[1, 1]),
        *middle,
        helper.make_node("Conv", ["b", "W_head", "B_head"], ["y"], name="head", kernel_shape=[1, 1]),
    ]
    params = {"W_stem": (C, 3, 1, 1), "B_stem": (C,), "W_head": (2, head_in, 1, 1), "B_head": (2,),
              **(params or {})}
    return make_model(
        nodes, {"x": [1, 3, HW, width]}, {"y": None}, params, opset=opset, value_info=value_info,
        extra_opsets={MS: 1} if ms else None, check=check,
    )


def mlp(
    middle: list[onnx.NodeProto],
    params: dict | None = None,
    *,
    out: int = H,
    opset: int = 17,
    ms: bool = False,
) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W_in"], ["a"], name="in"),
        *middle,
        helper.make_node("MatMul", ["b", "W_out"], ["y"], name="out"),
    ]
    params = {"W_in": (8, H), "W_out": (out, 8), **(params or {})}
    return make_model(
        nodes, {"x": [1, 4, 8]}, {"y": [1, 4, 8]}, params, opset=opset,
        extra_opsets={MS: 1} if ms else None, value_info={"b": [1, 4, out]}, check=not ms,
    )


def unary(op: str, *, before: list[onnx.NodeProto] = (), src: str = "a", opset: int = 17,
          params: dict | None = None, **attrs) -> Callable[[], onnx.ModelProto]:
    return lambda: cnn([*before, n(op, [src], ["b"], **attrs)], params, opset=opset)


def to_float(op: str, inputs: list[str], params: dict | None = None, *, before=(), opset: int = 17,
             **attrs) -> Callable[[], onnx.ModelProto]:
    """``op`` gives a bool or integer tensor: a Cast brings it back for the head."""
    nodes = [*before, n(op, inputs, ["o"], **attrs), n("Cast", ["o"], ["b"], to=TensorProto.FLOAT)]
    return lambda: cnn(nodes, params, opset=opset)


def per_channel(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((C, 1, 1)).astype(np.float32)


TANH = [n("Tanh", ["a"], ["t"])]  # into (-1, 1)
SIGMOID = [n("Sigmoid", ["a"], ["t"])]  # into (0, 1)
HALF = {"half": np.array(0.5, np.float32)}
ZERO = {"zero": np.array(0.0, np.float32)}
AS_INT = [n("Cast", ["a"], ["i"], to=TensorProto.INT32)]
INT_K = {"k": np.arange(1, C + 1, dtype=np.int32).reshape(C, 1, 1)}
K = {"k": per_channel()}
K_POSITIVE = {"k": positive(C, 1, 1)}


def logic(op: str) -> Callable[[], onnx.ModelProto]:
    before = [n("Greater", ["a", "zero"], ["p"]), n("Less", ["a", "k"], ["q"])]
    return to_float(op, ["p", "q"], {**ZERO, **K}, before=before)


def bitwise(op: str) -> Callable[[], onnx.ModelProto]:
    return to_float(op, ["i", "k"], INT_K, before=AS_INT, opset=18)


def reduce(op: str, *, before: list[onnx.NodeProto] = (), src: str = "a"):
    return lambda: cnn([*before, n(op, [src, "axes"], ["b"], keepdims=1)], {"axes": ints(2, 3)},
                       opset=18)


def pool(op: str, **attrs):
    return lambda: cnn([n(op, ["a"], ["b"], **attrs)])


def slice_channels() -> onnx.ModelProto:
    nodes = [n("Slice", ["a", "starts", "ends", "axes"], ["b"])]
    return cnn(nodes, {"starts": ints(1), "ends": ints(3), "axes": ints(1)}, head_in=2)


def split_concat() -> onnx.ModelProto:
    nodes = [n("Split", ["a"], ["s0", "s1"], axis=1, num_outputs=2),
             n("Concat", ["s1", "s0", "a"], ["b"], axis=1)]
    return cnn(nodes, head_in=2 * C, opset=18)


def transpose() -> onnx.ModelProto:
    nodes = [n("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1], name="to_nhwc"),
             n("Transpose", ["t"], ["b"], perm=[0, 3, 1, 2], name="to_nchw")]
    return cnn(nodes)


def squeeze_unsqueeze() -> onnx.ModelProto:
    nodes = [n("Unsqueeze", ["a", "zero_axis"], ["u"]), n("Squeeze", ["u", "zero_axis"], ["b"])]
    return cnn(nodes, {"zero_axis": ints(0)})


def reshape() -> onnx.ModelProto:
    nodes = [n("Reshape", ["a", "flat"], ["f"], name="flatten"),
             n("Reshape", ["f", "back"], ["b"], name="unflatten")]
    return cnn(nodes, {"flat": ints(1, C, HW * HW), "back": ints(1, C, HW, HW)})


def into_gemm(middle: list[onnx.NodeProto], params: dict | None = None) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "W_stem", "B_stem"], ["a"], name="stem", kernel_shape=[1, 1]),
        *middle,
        n("Gemm", ["f", "W_fc", "B_fc"], ["y"], transB=1),
    ]
    params = {"W_stem": (C, 3, 1, 1), "B_stem": (C,), "W_fc": (5, C), "B_fc": (5,), **(params or {})}
    return make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None}, params)


def mask_from_size() -> onnx.ModelProto:
    nodes = [n("Size", ["a"], ["count"]), n("Cast", ["count"], ["countf"], to=TensorProto.FLOAT),
             n("Div", ["a", "countf"], ["b"])]
    return cnn(nodes)


def shape_ops() -> onnx.ModelProto:
    """``Reshape(relu(a), Shape(a))`` and ``a * ConstantOfShape(Shape(a))``, dynamic width."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [n("Shape", ["a"], ["shape"]), n("Relu", ["a"], ["r"]),
             n("Reshape", ["r", "shape"], ["v"]), n("ConstantOfShape", ["shape"], ["ones"], value=one),
             n("Mul", ["v", "ones"], ["b"])]
    return cnn(nodes, width="W")


def constant_node() -> onnx.ModelProto:
    value = onnx.numpy_helper.from_array(per_channel(3), "k")
    return cnn([n("Constant", [], ["k"], value=value), n("Mul", ["a", "k"], ["b"])])


def range_over_width() -> onnx.ModelProto:
    """``a + Range(0, W)`` along a dynamic width (the loader cannot fold it)."""
    nodes = [n("Shape", ["a"], ["shape"]), n("Gather", ["shape", "three"], ["w"]),
             n("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
             n("Range", ["zero", "wf", "one"], ["positions"]), n("Add", ["a", "positions"], ["b"])]
    return cnn(nodes, {**ZERO, "one": np.array(1.0, np.float32), "three": np.array(3, np.int64)},
               width="W")


def gather(axis: int, indices: np.ndarray, head_in: int = C) -> Callable[[], onnx.ModelProto]:
    return lambda: cnn([n("Gather", ["a", "idx"], ["b"], axis=axis)], {"idx": indices},
                       head_in=head_in)


def index_op(op: str, inputs: list[str], params: dict, opset: int = 17, **attrs):
    return lambda: cnn([n(op, inputs, ["b"], **attrs)], params, opset=opset)


SAME_INDEX = np.zeros((1, C, HW, HW), np.int64)


def conv_transpose() -> onnx.ModelProto:
    nodes = [n("ConvTranspose", ["a", "W_t", "B_t"], ["b"], kernel_shape=[2, 2], strides=[2, 2])]
    return cnn(nodes, {"W_t": (C, 3, 2, 2), "B_t": (3,)}, head_in=3)


def roi_pool() -> onnx.ModelProto:
    rois = np.array([[0, 0, 0, 2, 2], [0, 1, 1, 3, 3]], np.float32)
    return cnn([n("MaxRoiPool", ["a", "rois"], ["b"], pooled_shape=[2, 2])], {"rois": rois})


def group_norm() -> onnx.ModelProto:
    nodes = [n("GroupNormalization", ["a", "s", "t"], ["b"], num_groups=2)]
    return cnn(nodes, {"s": positive(C), "t": (C,)}, opset=21, value_info={"b": [1, C, HW, HW]})


def upsample() -> onnx.ModelProto:
    scales = np.array([1, 1, 2, 2], np.float32)
    return cnn([n("Upsample", ["a", "scales"], ["b"], mode="nearest")], {"scales": scales}, opset=9)


def scatter_v10() -> onnx.ModelProto:
    return cnn([n("Scatter", ["a", "idx", "a"], ["b"], axis=2)], {"idx": SAME_INDEX}, opset=10)


def relu6() -> onnx.ModelProto:
    """``Relu6`` is no ONNX op (some converters write it): analysis only."""
    return cnn([n("Relu6", ["a"], ["b"])], value_info={"b": [1, C, HW, HW]}, check=False)


def ms_activation(op: str, *extra: str, **attrs) -> Callable[[], onnx.ModelProto]:
    params = {"bias": (H,)} if "bias" in extra else {}
    return lambda: mlp([n(op, ["a", *extra], ["b"], domain=MS, **attrs)], params, ms=True)


def layer_norm(op: str, inputs: tuple[str, ...] = ("a", "gamma", "beta"), *, domain: str = "",
               opset: int = 17) -> Callable[[], onnx.ModelProto]:
    params = {"gamma": positive(H), "beta": (H,)}
    node = n(op, list(inputs), ["b"], **({"domain": domain} if domain else {}))
    return lambda: mlp([node], params, opset=opset, ms=bool(domain) or op.startswith("Simplified"))


def embed_layer_norm() -> onnx.ModelProto:
    nodes = [
        n("EmbedLayerNormalization", ["ids", "", "words", "positions", "", "gamma", "beta"],
          ["a", "mask_index"], domain=MS),
        n("MatMul", ["a", "W_out"], ["y"], name="out"),
    ]
    params = {"words": (6, H), "positions": (8, H), "gamma": positive(H), "beta": (H,),
              "W_out": (H, 8)}
    m = make_model(nodes, {}, {"y": [1, 4, 8]}, params, extra_opsets={MS: 1},
                   value_info={"a": [1, 4, H]}, check=False)
    m.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 4]))
    return m


def einsum() -> onnx.ModelProto:
    nodes = [n("Einsum", ["a", "W_e"], ["e"], equation="bsh,hk->bsk"), n("Relu", ["e"], ["b"])]
    return mlp(nodes, {"W_e": (H, 12)}, out=12)


def attention_ms() -> onnx.ModelProto:
    nodes = [n("Attention", ["x", "w_qkv", "b_qkv"], ["att"], num_heads=2, domain=MS),
             n("MatMul", ["att", "w_o"], ["y"])]
    return make_model(nodes, {"x": [1, 4, 8]}, {"y": [1, 4, 8]},
                      {"w_qkv": (8, 3 * H), "b_qkv": (3 * H,), "w_o": (H, 8)},
                      extra_opsets={MS: 1}, value_info={"att": [1, 4, H]}, check=False)


def qkv(heads_q: int, heads_kv: int, head_dim: int = 8) -> tuple[list[onnx.NodeProto], dict]:
    nodes = [n("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             n("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             n("MatMul", ["x", "wv"], ["v"], name="v_proj")]
    params = {"wq": (8, heads_q * head_dim), "wk": (8, heads_kv * head_dim),
              "wv": (8, heads_kv * head_dim), "wo": (heads_q * head_dim, 8)}
    return nodes, params


def attention_model(node: onnx.NodeProto, heads_q: int, heads_kv: int, *, opset: int = 17,
                    params: dict | None = None) -> onnx.ModelProto:
    nodes, weights = qkv(heads_q, heads_kv)
    nodes += [node, n("MatMul", ["att", "wo"], ["y"], name="o_proj")]
    return make_model(nodes, {"x": [1, 4, 8]}, {"y": [1, 4, 8]}, {**weights, **(params or {})},
                      opset=opset, extra_opsets={MS: 1}, value_info={"att": [1, 4, heads_q * 8]},
                      check=False)


def multi_head_attention() -> onnx.ModelProto:
    node = n("MultiHeadAttention", ["q", "k", "v"], ["att"], num_heads=2, domain=MS)
    return attention_model(node, 2, 2)


def group_query_attention() -> onnx.ModelProto:
    node = n("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total"],
             ["att", "present_k", "present_v"], num_heads=4, kv_num_heads=2, domain=MS)
    lengths = {"seqlens_k": np.array([3], np.int32), "total": np.array(4, np.int32)}
    return attention_model(node, 4, 2, params=lengths)


def onnx_attention() -> onnx.ModelProto:
    node = n("Attention", ["q", "k", "v"], ["att"], q_num_heads=4, kv_num_heads=2)
    return attention_model(node, 4, 2, opset=23)


# --------------------------------------------------------------------------- the table


def _case_table() -> dict[str, Case]:
    cases: dict[str, Case] = {}

    def add(name: str, build, expect: str = PRUNES, reason: str = "", *, ops=None, **kw) -> None:
        assert name not in cases, name
        cases[name] = Case(tuple(ops or [name]), build, expect, reason, **kw)

    # unary maps (UnaryRule): any input, then ops that need a domain
    for op in ("Relu", "Tanh", "Elu", "Selu", "Erf", "Neg", "Abs", "HardSwish", "Identity",
               "Dropout", "Sign", "Ceil", "Floor", "Round", "Sin", "Atan", "Sinh", "Asinh",
               "Celu", "Softsign", "Sigmoid", "HardSigmoid", "Softplus", "Exp", "Cos", "Cosh"):
        add(op, unary(op))
    add("LeakyRelu", unary("LeakyRelu", alpha=0.1))
    add("ThresholdedRelu", unary("ThresholdedRelu", alpha=0.2))
    add("Shrink", unary("Shrink", lambd=0.3, bias=0.1))
    add("Mish", unary("Mish", opset=18))
    add("Swish", unary("Swish", opset=24, alpha=1.5))
    add("Gelu", unary("Gelu", opset=20, approximate="tanh"))
    for op in ("Asin", "Acos", "Tan"):
        add(op, unary(op, before=TANH, src="t"), ops=[op])
    add("Atanh", unary("Atanh", before=[*TANH, n("Mul", ["t", "half"], ["th"])], src="th",
                       params=HALF))
    for op in ("Sqrt", "Log", "Reciprocal"):
        add(op, unary(op, before=SIGMOID, src="t"))
    add("Acosh", unary("Acosh", before=[n("Cosh", ["a"], ["t"])], src="t"))  # cosh >= 1
    add("Clip", lambda: cnn([n("Clip", ["a", "lo", "hi"], ["b"])],
                            {"lo": np.array(-0.5, np.float32), "hi": np.array(0.5, np.float32)}))
    add("Cast", lambda: cnn([n("Cast", ["a"], ["d"], to=TensorProto.DOUBLE),
                             n("Cast", ["d"], ["b"], to=TensorProto.FLOAT, name="back")]))
    add("CastLike", lambda: cnn([n("CastLike", ["a", "like"], ["d"]),
                                 n("Cast", ["d"], ["b"], to=TensorProto.FLOAT)],
                                {"like": np.zeros(1, np.float64)}))
    add("Not", to_float("Not", ["p"], ZERO, before=[n("Greater", ["a", "zero"], ["p"])]),
        ops=["Not", "Greater"])
    add("IsNaN", to_float("IsNaN", ["a"]))
    add("IsInf", to_float("IsInf", ["a"]))
    add("BitwiseNot", to_float("BitwiseNot", ["i"], before=AS_INT, opset=18))
    add("Relu6", relu6, runs=False)

    # broadcasting (BroadcastRule): a per-channel constant is sliced with the channels
    for op in ("Add", "Sub", "Mul", "Max", "Min", "Mean", "PRelu"):
        add(op, lambda op=op: cnn([n(op, ["a", "k"], ["b"])], K))
    add("Div", lambda: cnn([n("Div", ["a", "k"], ["b"])], K_POSITIVE))
    add("Pow", lambda: cnn([n("Pow", ["a", "k"], ["b"])],
                           {"k": np.array([2, 3] * (C // 2), np.float32).reshape(C, 1, 1)}))
    add("Sum", lambda: cnn([n("Sum", ["a", "k", "a"], ["b"])], K))
    add("Mod", lambda: cnn([n("Mod", ["a", "k"], ["b"], fmod=1)], K_POSITIVE))
    add("Where", lambda: cnn([n("Greater", ["a", "zero"], ["p"]), n("Where", ["p", "a", "k"], ["b"])],
                             {**ZERO, **K}), ops=["Where"])
    for op in ("Equal", "Less", "LessOrEqual", "GreaterOrEqual"):
        add(op, to_float(op, ["a", "k"], K))
    for op in ("And", "Or", "Xor"):
        add(op, logic(op), ops=[op, "Less"])
    for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor"):
        add(op, bitwise(op))

    # softmax-like (SoftmaxRule): over the channels inexact, over the width exact
    add("Softmax", lambda: cnn([n("Softmax", ["a"], ["b"], axis=1)]), INEXACT, "Softmax")
    add("LogSoftmax", lambda: cnn([n("LogSoftmax", ["a"], ["b"], axis=-1)]))
    add("Hardmax", lambda: cnn([n("Hardmax", ["a"], ["b"], axis=-1)]))

    # pooling and reductions (pool.py)
    add("MaxPool", pool("MaxPool", kernel_shape=[2, 2], strides=[2, 2]))
    add("AveragePool", pool("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    add("LpPool", pool("LpPool", kernel_shape=[2, 2], p=2))
    for op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        add(op, pool(op))
    add("MaxRoiPool", roi_pool)
    for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
               "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare"):
        add(op, reduce(op))
    # exp first: a removed channel is zero in the zeroed original, and log(0) is not finite
    add("ReduceLogSum", reduce("ReduceLogSum", before=[n("Exp", ["a"], ["t"])], src="t"))
    # over the channels: the largest of values >= 0 (a Relu's) is the same with zeros among
    # them (exact: a weight's per-row quantization scale ReduceMax(Abs(W))); of any values not
    add("ReduceMax over non-negative channels", lambda: cnn(
        [n("Relu", ["a"], ["r"]), n("ReduceMax", ["r", "axes"], ["b"], keepdims=1)], {"axes": ints(1)},
        head_in=1, opset=18), ops=["ReduceMax"])
    add("ReduceMax over the channels", lambda: cnn(
        [n("ReduceMax", ["a", "axes"], ["b"], keepdims=1)], {"axes": ints(1)}, head_in=1, opset=18),
        INEXACT, "ReduceMax reduces this axis", ops=["ReduceMax"])

    # normalisations (norm.py, transformer.py)
    add("BatchNormalization", lambda: cnn(
        [n("BatchNormalization", ["a", "s", "t", "m", "v"], ["b"])],
        {"s": positive(C), "t": (C,), "m": (C,), "v": positive(C, seed=2)}))
    add("InstanceNormalization", lambda: cnn([n("InstanceNormalization", ["a", "s", "t"], ["b"])],
                                             {"s": positive(C), "t": (C,)}))
    add("GroupNormalization", group_norm)
    add("LpNormalization", lambda: cnn([n("LpNormalization", ["a"], ["b"], axis=1)]), INEXACT,
        "normalised axis")
    add("LRN", lambda: cnn([n("LRN", ["a"], ["b"], size=3)]), INEXACT, "LRN")
    add("MeanVarianceNormalization", lambda: cnn([n("MeanVarianceNormalization", ["a"], ["b"], axes=[0, 2, 3])]),
        FROZEN, "normalises to NaN")
    add("MeanVarianceNormalization over the channels",
        lambda: cnn([n("MeanVarianceNormalization", ["a"], ["b"], axes=[1, 2, 3])]), INEXACT,
        "normalised axis", ops=["MeanVarianceNormalization"])
    for name, op, domain, opset, runs in (
        ("LayerNormalization", "LayerNormalization", "", 17, True),
        ("RMSNormalization", "RMSNormalization", "", 23, True),
        ("SimplifiedLayerNormalization", "SimplifiedLayerNormalization", "", 17, False),
        (f"{MS}::LayerNormalization", "LayerNormalization", MS, 17, False),
        (f"{MS}::SimplifiedLayerNormalization", "SimplifiedLayerNormalization", MS, 17, False),
    ):
        inputs = ("a", "gamma") if "Simplified" in op or "RMS" in op else ("a", "gamma", "beta")
        add(name, layer_norm(op, inputs, domain=domain, opset=opset), INEXACT, "normalised",
            anchor=("W_in", 1), runs=runs)
    add(f"{MS}::SkipLayerNormalization",
        layer_norm("SkipLayerNormalization", ("a", "a", "gamma", "beta"), domain=MS), INEXACT,
        "SkipLayerNormalization", anchor=("W_in", 1))
    add(f"{MS}::SkipSimplifiedLayerNormalization",
        layer_norm("SkipSimplifiedLayerNormalization", ("a", "a", "gamma"), domain=MS), INEXACT,
        "SkipSimplifiedLayerNormalization", anchor=("W_in", 1))
    add(f"{MS}::EmbedLayerNormalization", embed_layer_norm, INEXACT, "EmbedLayerNormalization",
        anchor=("words", 1))

    # linear layers (conv.py, linear.py, transformer.py)
    add("Conv", lambda: cnn([n("Relu", ["a"], ["b"])]))
    add("ConvTranspose", conv_transpose)
    add("Gemm", lambda: into_gemm([n("GlobalAveragePool", ["a"], ["p"]),
                                   n("Flatten", ["p"], ["f"])]), ops=["Gemm", "Flatten"])
    add("MatMul", lambda: mlp([n("Relu", ["a"], ["b"])]), anchor=("W_in", 1))
    add("Einsum", einsum, anchor=("W_in", 1))
    prune_heads = {"head_ratio": 0.5}
    add(f"{MS}::Attention", attention_ms, anchor=("w_qkv", 1), prune=prune_heads)
    add(f"{MS}::MultiHeadAttention", multi_head_attention, anchor=("wq", 1), prune=prune_heads)
    add(f"{MS}::GroupQueryAttention", group_query_attention, anchor=("wq", 1), prune=prune_heads)
    add("Attention", onnx_attention, anchor=("wq", 1), prune=prune_heads)
    for op in ("FastGelu", "BiasGelu"):
        add(f"{MS}::{op}", ms_activation(op, "bias"), anchor=("W_in", 1))
    add(f"{MS}::Gelu", ms_activation("Gelu"), anchor=("W_in", 1))
    add(f"{MS}::QuickGelu", ms_activation("QuickGelu", alpha=1.702), anchor=("W_in", 1))
    add(f"{MS}::BiasAdd", ms_activation("BiasAdd", "bias", "a"), anchor=("W_in", 1), runs=False)
    add(f"{MS}::BiasSoftmax", ms_activation("BiasSoftmax", "a"), FROZEN, "BiasSoftmax",
        anchor=("W_in", 1))

    # moving, cutting, joining and re-viewing axes (shape_ops.py and its neighbours)
    add("Split+Concat", split_concat, ops=["Split", "Concat"])
    add("Slice", slice_channels)
    add("Transpose", transpose)
    add("Squeeze+Unsqueeze", squeeze_unsqueeze, ops=["Squeeze", "Unsqueeze"])
    add("Reshape", reshape)
    add("Expand", lambda: cnn([n("Expand", ["k", "shape"], ["ke"]), n("Add", ["a", "ke"], ["b"])],
                              {**K, "shape": ints(1, C, HW, HW)}))
    add("Tile", lambda: cnn([n("Tile", ["a", "repeats"], ["b"])], {"repeats": ints(1, 1, 2, 2)}))
    add("Pad", lambda: cnn([n("Pad", ["a", "pads"], ["b"])], {"pads": ints(0, 0, 1, 1, 0, 0, 1, 1)}))
    add("Resize", lambda: cnn([n("Resize", ["a", "", "scales"], ["b"], mode="nearest")],
                              {"scales": np.array([1, 1, 2, 2], np.float32)}))
    add("Upsample", upsample, raw=True)  # the loader converts opset 9 to 13: Resize
    add("Shape+ConstantOfShape", shape_ops, ops=["Shape", "ConstantOfShape"])
    add("Size", mask_from_size, FROZEN, "element count read by Size 'Size'")
    add("Constant", constant_node, FROZEN, "Constant node 'Constant' (not lifted)", raw=True)
    add("Range", range_over_width)
    add("Gather", gather(2, ints(0, 2)))
    add("Gather(channels)", gather(1, ints(2, 0), head_in=2), FROZEN, "gathered axis at Gather",
        ops=["Gather"])
    # along its axis a position lookup; the channel axis goes element for element (indices sliced too)
    add("GatherElements", index_op("GatherElements", ["a", "idx"], {"idx": SAME_INDEX}, axis=2))
    add("GatherElements(channels)", index_op("GatherElements", ["a", "idx"], {"idx": SAME_INDEX}, axis=1),
        FROZEN, "computed positions at GatherElements", ops=["GatherElements"])
    # the positions index the batch axis; the channel axis after it passes through
    add("GatherND", index_op("GatherND", ["a", "idx"], {"idx": ints(0).reshape(1, 1)}))
    # sampling at positions (RoiAlign, GridSample): the channel axis goes element for element
    rois = np.array([[0, 0, 3, 3], [1, 1, 3, 2]], np.float32)
    add("RoiAlign", lambda: cnn([n("RoiAlign", ["a", "rois", "roi_batch"], ["b"], output_height=2,
                                   output_width=2)], {"rois": rois, "roi_batch": ints(0, 0)}))
    grid = np.random.default_rng(3).uniform(-1, 1, (1, 3, 3, 2)).astype(np.float32)
    add("GridSample", lambda: cnn([n("GridSample", ["a", "grid"], ["b"])], {"grid": grid}))
    # selections along one axis: that axis freezes, the channel axis passes through
    add("TopK", lambda: cnn([n("TopK", ["a", "k2"], ["b", "top_i"], axis=3)], {"k2": ints(2)}))
    add("TopK(channels)", lambda: cnn([n("TopK", ["a", "k2"], ["b", "top_i"], axis=1)], {"k2": ints(2)},
                                      head_in=2), FROZEN, "selected axis at TopK 'TopK'", ops=["TopK"])
    for op in ("ArgMax", "ArgMin"):
        add(op, lambda op=op: cnn([n(op, ["a"], ["i"], axis=2),
                                   n("Cast", ["i"], ["b"], to=TensorProto.FLOAT)]), ops=[op])
    add("ArgMax(channels)", lambda: cnn([n("ArgMax", ["a"], ["i"], axis=1), n("Cast", ["i"], ["b"], to=TensorProto.FLOAT)],
                                        head_in=1), FROZEN, "selected axis at ArgMax 'ArgMax'", ops=["ArgMax"])
    add("CumSum", lambda: cnn([n("CumSum", ["a", "ax2"], ["b"])], {"ax2": np.array(2, np.int64)}))
    add("CumSum(channels)", lambda: cnn([n("CumSum", ["a", "ax1"], ["b"])], {"ax1": np.array(1, np.int64)}),
        FROZEN, "summed axis at CumSum 'CumSum'", ops=["CumSum"])
    # (the written positions are in axis 0 / axis 2: the channels pass through)
    add("ScatterND", index_op("ScatterND", ["a", "idx", "a"], {"idx": ints(0).reshape(1, 1)}))
    add("ScatterElements", index_op("ScatterElements", ["a", "idx", "a"], {"idx": SAME_INDEX}, axis=2))
    add("Scatter", scatter_v10, raw=True)
    return cases


CASES = _case_table()


def _op_types(graph: onnx.GraphProto | gs.Graph) -> set[str]:
    ops = set()
    for node in graph.node if isinstance(graph, onnx.GraphProto) else graph.nodes:
        op, domain = (node.op_type, node.domain) if isinstance(node, onnx.NodeProto) else (node.op, node.domain)
        ops.add(f"{domain}::{op}" if (domain or "") not in ("", "ai.onnx") else op)
    return ops


def _rule_test_files() -> dict[str, tuple[set[str], set[str]]]:
    """Per ``tests/test_rule_*.py`` (a rule's own test file): the op types it declares in
    ``OPS_UNDER_TEST`` and those it builds (``helper.make_node`` with a literal op type, and
    a literal ``domain=`` outside the default domain)."""
    found = {}
    for path in sorted(Path(__file__).parent.glob("test_rule_*.py")):
        declared: set[str] = set()
        built: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "OPS_UNDER_TEST" for t in node.targets
            ):
                declared |= set(ast.literal_eval(node.value))
            elif isinstance(node, ast.Call) and node.args and getattr(
                node.func, "attr", getattr(node.func, "id", "")
            ) == "make_node":
                op, domain = node.args[0], next(
                    (k.value for k in node.keywords if k.arg == "domain"), ast.Constant("")
                )
                if isinstance(op, ast.Constant) and isinstance(domain, ast.Constant):
                    prefix = "" if domain.value in ("", "ai.onnx") else f"{domain.value}::"
                    built.add(f"{prefix}{op.value}")
        if declared:
            found[path.name] = (declared, built)
    return found


def test_every_registered_op_type_has_a_case():
    """An op type is covered by a case here or by its own ``tests/test_rule_<op>.py`` that
    lists it in ``OPS_UNDER_TEST``."""
    covered = {op for case in CASES.values() for op in case.ops}
    for declared, _ in _rule_test_files().values():
        covered |= declared
    missing = sorted(set(registered_ops()) - covered)
    assert not missing, f"registered op types with no test case: {missing}"


def test_rule_test_files_build_the_ops_they_declare():
    files = _rule_test_files()
    assert {"test_rule_depth_to_space.py", "test_rule_space_to_depth.py"} <= set(files)
    for name, (declared, built) in files.items():
        assert declared <= built, f"{name} declares {sorted(declared - built)} but builds none"


@pytest.mark.parametrize("name", list(CASES))
def test_op_case(name):
    case = CASES[name]
    model = case.build()
    assert set(case.ops) <= _op_types(model.graph), f"the model of '{name}' lacks {case.ops}"
    if case.raw:
        graph = import_graph(onnx.shape_inference.infer_shapes(model))
        analysis = analyze_graph(graph, max(o.version for o in model.opset_import if not o.domain))
    else:
        analysis = graphprune.analyze(model)
    assert set(case.ops) <= _op_types(analysis.graph), f"the loader removed one of {case.ops}"
    assert not analysis.unsupported, analysis.unsupported
    group = group_with(analysis, *case.anchor)
    if case.expect == FROZEN:
        assert not group.prunable
        assert any(case.reason in r for r in group.frozen), group.frozen
        return
    assert group.prunable, group.frozen
    if case.expect == INEXACT:
        assert not group.is_exact
        assert any(case.reason in r for r in group.inexact), group.inexact
    else:
        assert group.is_exact, group.inexact
    if case.raw or not case.runs:
        return
    result = graphprune.prune(model, ratio=0.5, **(case.prune or {}))
    verification = result.report["verification"]
    assert verification["ok"] is True, verification
    assert verification["output_shapes_match"] is True
    if case.expect == PRUNES:
        assert result.plan.units_removed > 0, result.report["groups"]
        assert result.report["params_after"] < result.report["params_before"]
