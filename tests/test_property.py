"""Property tests: random valid CNN graphs, planted zeros, lossless and ratio pruning.

The generator builds small NCHW graphs from Conv (plain, depthwise, grouped), BN,
activations, residual Add, Concat, Split, pooling and Flatten + Gemm heads. Zeros are planted
as a group-sparse optimiser leaves them (:func:`graphprune.testing.plant_zeros`: whole or
partial channel groups, whole residual branches). Properties:

- lossless mode computes the same function (its own verification, and an independent ORT
  comparison here), and removes every planted zero unit and branch — except units that turn
  into a non-zero constant (``Sigmoid(0) = 0.5``) before a padded consumer, which lossless
  mode may leave by design;
- ratio mode keeps the graph valid and passes its verification.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from conftest import make_model, relative_difference, run_ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import graphprune
from graphprune.analysis import analyze_graph
from graphprune.pipeline.lossless import prune_lossless
from graphprune.pipeline.session import Session
from graphprune.testing import plant_zeros

ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "HardSwish", "Clip", None)
#: activations whose value at 0 is not 0: a planted zero becomes a constant there
CONSTANT_MAKERS = ("Sigmoid", "HardSigmoid")
BLOCKS = ("conv", "depthwise", "grouped", "residual", "concat", "split", "pool")

#: derandomized (the same examples every run) and sized for CI, about 10 s for both tests;
#: GRAPHPRUNE_PROPERTY_EXAMPLES=500 searches deeper
SETTINGS = settings(
    max_examples=int(os.environ.get("GRAPHPRUNE_PROPERTY_EXAMPLES", "50")), deadline=None,
    derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Builder:
    """Appends nodes to a growing NCHW graph, tracking the current tensor's channels and size."""

    rng: np.random.Generator
    channels: int
    size: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    current: str = "x"
    count: int = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def param(self, prefix: str, array: np.ndarray) -> str:
        name = self.name(prefix)
        self.params[name] = array.astype(np.float32)
        return name

    def conv(self, x: str, cin: int, cout: int, *, k: int = 3, group: int = 1, bias: bool = True,
             bn: bool = False, act: str | None = None) -> str:
        fan_in = cin // group * k * k
        w = self.param("w", self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(fan_in))
        inputs = [x, w]
        if bias:
            inputs.append(self.param("b", self.rng.standard_normal(cout) * 0.1))
        y = self.name("conv")
        self.nodes.append(helper.make_node(
            "Conv", inputs, [y], name=y, kernel_shape=[k, k], pads=[k // 2] * 4, group=group
        ))
        if bn:
            p = [
                self.param("s", self.rng.uniform(0.5, 1.5, cout)),
                self.param("t", self.rng.standard_normal(cout) * 0.1),
                self.param("m", self.rng.standard_normal(cout) * 0.1),
                self.param("v", self.rng.uniform(0.5, 1.5, cout)),
            ]
            z = self.name("bn")
            self.nodes.append(helper.make_node("BatchNormalization", [y, *p], [z], name=z))
            y = z
        return self.activation(y, act)

    def activation(self, x: str, act: str | None) -> str:
        if act is None:
            return x
        y = self.name(act.lower())
        if act == "Clip":
            lo = self.param("lo", np.array(0.0))
            hi = self.param("hi", np.array(6.0))
            self.nodes.append(helper.make_node("Clip", [x, lo, hi], [y], name=y))
        else:
            self.nodes.append(helper.make_node(act, [x], [y], name=y))
        return y


@st.composite
def layer(draw: st.DrawFn) -> dict:
    return {
        "k": draw(st.sampled_from([1, 3])),
        "out": draw(st.integers(2, 8)),
        "bias": draw(st.booleans()),
        "bn": draw(st.booleans()),
        "act": draw(st.sampled_from(ACTIVATIONS)),
    }


@st.composite
def architectures(draw: st.DrawFn) -> dict:
    return {
        "channels": draw(st.sampled_from([3, 4])),
        "size": draw(st.sampled_from([6, 8])),
        "blocks": draw(st.lists(st.tuples(st.sampled_from(BLOCKS), layer(), layer()), min_size=1, max_size=5)),
        "head": draw(st.sampled_from(["gap_gemm", "flatten_gemm", "conv"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(arch: dict) -> onnx.ModelProto:
    b = Builder(np.random.default_rng(arch["seed"]), arch["channels"], arch["size"])
    x, c = "x", arch["channels"]
    for kind, first, second in arch["blocks"]:
        if kind == "conv":
            x = b.conv(x, c, first["out"], k=first["k"], bias=first["bias"], bn=first["bn"], act=first["act"])
            c = first["out"]
        elif kind == "depthwise":
            x = b.conv(x, c, c, group=c, bias=first["bias"], bn=first["bn"], act=first["act"])
        elif kind == "grouped":
            if c % 2:
                x = b.conv(x, c, c + 1, k=1, act="Relu")
                c += 1
            out = 2 * max(1, first["out"] // 2)
            x = b.conv(x, c, out, group=2, bias=first["bias"], bn=first["bn"], act=first["act"])
            c = out
        elif kind == "residual":
            h = b.conv(x, c, first["out"], k=first["k"], bias=first["bias"], bn=first["bn"], act=first["act"])
            h = b.conv(h, first["out"], c, k=second["k"], bias=second["bias"], bn=second["bn"])
            y = b.name("add")
            b.nodes.append(helper.make_node("Add", [x, h], [y], name=y))
            x = b.activation(y, second["act"])
        elif kind == "concat":
            h = b.conv(x, c, first["out"], k=first["k"], bias=first["bias"], bn=first["bn"], act=first["act"])
            y = b.name("cat")
            b.nodes.append(helper.make_node("Concat", [x, h], [y], name=y, axis=1))
            x, c = y, c + first["out"]
        elif kind == "split":
            if c % 2:
                x = b.conv(x, c, c + 1, k=1, act="Relu")
                c += 1
            half = c // 2
            left, right = b.name("left"), b.name("right")
            sizes = b.name("split_sizes")
            b.params[sizes] = np.array([half, half], dtype=np.int64)
            b.nodes.append(helper.make_node("Split", [x, sizes], [left, right], name=b.name("split"), axis=1))
            h = b.conv(right, half, half, k=first["k"], bias=first["bias"], bn=first["bn"], act=first["act"])
            y = b.name("cat")
            b.nodes.append(helper.make_node("Concat", [left, h], [y], name=y, axis=1))
            x = y
        elif kind == "pool":
            y = b.name("pool")
            if first["k"] == 3 or b.size < 4:
                b.nodes.append(helper.make_node("AveragePool", [x], [y], name=y, kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            else:
                b.nodes.append(helper.make_node("MaxPool", [x], [y], name=y, kernel_shape=[2, 2], strides=[2, 2]))
                b.size //= 2
            x = y
    head = arch["head"]
    if head == "conv":
        x = b.conv(x, c, 3, k=1, act=None)
    else:
        if head == "gap_gemm":
            g = b.name("gap")
            b.nodes.append(helper.make_node("GlobalAveragePool", [x], [g], name=g))
            x, features = g, c
        else:
            features = c * b.size * b.size
        f = b.name("flat")
        b.nodes.append(helper.make_node("Flatten", [x], [f], name=f))
        w = b.param("fc", b.rng.standard_normal((3, features)) / np.sqrt(features))
        bias = b.param("fcb", b.rng.standard_normal(3) * 0.1)
        b.nodes.append(helper.make_node("Gemm", [f, w, bias], ["out"], name="fc", transB=1))
        x = "out"
    if x != "out":
        b.nodes.append(helper.make_node("Identity", [x], ["out"], name="output"))
    return make_model(b.nodes, {"x": [1, arch["channels"], arch["size"], arch["size"]]}, {"out": None}, b.params)


@st.composite
def planted_models(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict]:
    arch = draw(architectures())
    plant = {
        "groups": draw(st.sampled_from([0.5, 1.0])),
        "units": draw(st.sampled_from([0.3, 0.6, 1.0])),
        "branches": draw(st.integers(0, 2)),
        "seed": draw(st.integers(0, 1000)),
    }
    return build(arch), plant


def constant_makers_in(group_nodes: set[str], model: onnx.ModelProto) -> bool:
    ops = {n.name: n.op_type for n in model.graph.node}
    return any(ops.get(name) in CONSTANT_MAKERS for name in group_nodes)


def same(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    feeds = {"x": np.random.default_rng(7).standard_normal(
        [d.dim_value for d in a.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)}
    return relative_difference(run_ort(a, feeds), run_ort(b, feeds))


@SETTINGS
@given(planted_models())
def test_lossless_keeps_the_function_and_removes_every_planted_zero(case):
    check_lossless(*case)


def check_lossless(model: onnx.ModelProto, plant: dict) -> None:
    planted, record = plant_zeros(model, **plant)
    result = prune_lossless(planted)  # raises VerificationError when the function changes
    assert result.report["verification"]["ok"]
    assert same(planted, result.model) <= 1e-5
    onnx.checker.check_model(result.model, full_check=True)

    measured = record.measure(result.model)
    assert measured["removed_branches"] == measured["planted_branches"], (measured, record.branches)
    # planted units that only meet zero-preserving ops must all be gone
    session = Session(planted)
    analysis = analyze_graph(session.import_graph(), session.opset)
    by_anchor = {f"{g.anchor[0]}:{g.anchor[1]}": g for g in analysis.groups}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for planted_group in record.groups:
        group = by_anchor.get(planted_group["anchor"])
        if group is None or constant_makers_in(set(group.nodes), planted):
            continue
        for name, axis, _ in planted_group["producers"]:
            if name in inits:
                rows = np.moveaxis(inits[name], axis, 0).reshape(inits[name].shape[axis], -1)
                left = int((~(rows != 0).any(axis=1)).sum())
                assert left == 0, f"{left} planted units of {planted_group['anchor']} left in '{name}'"
                break


@SETTINGS
@given(architectures(), st.sampled_from([0.25, 0.5, 0.75]))
def test_ratio_mode_stays_valid_and_verified(arch, ratio):
    model = build(arch)
    result = graphprune.prune(model, ratio=ratio)  # raises VerificationError on a mismatch
    assert result.report["verification"]["ok"]
    onnx.checker.check_model(result.model, full_check=True)
    assert result.report["params_after"] <= result.report["params_before"]
