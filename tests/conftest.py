"""Shared builders and checks for the graphprune test suite.

``make_model`` writes a tiny ONNX model from ``onnx.helper`` nodes with seeded random
initializers. ``assert_prunes_exactly`` prunes a model and checks it the way a user would:
the ONNX checker, an ONNX Runtime run, unchanged graph inputs/outputs, the report's own
verification, and — independently of graphprune's validator — the pruned model against the
original with the removed producer and consumer slices set to zero.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import graphprune

IR_VERSION = 8  # at least; onnx 1.23 writes IR 14 by default, which ORT 1.31 cannot load
DEFAULT_OPSET = 17

Shape = Sequence[int | str | None]
ParamSpec = Sequence[int] | np.ndarray


# --------------------------------------------------------------------------- building


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, Shape],
    outputs: Mapping[str, Shape | None],
    params: Mapping[str, ParamSpec] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
    extra_opsets: Mapping[str, int] | None = None,
    functions: Sequence[onnx.FunctionProto] = (),
    value_info: Mapping[str, Shape] | None = None,
    check: bool = True,
) -> onnx.ModelProto:
    """A model from ``nodes``; float inputs/outputs; ``params`` are initializers.

    A param given as a shape gets standard-normal float32 values (seeded); an array is used
    as is (int64 arrays for shape constants). Unnamed nodes are named ``{op}_{index}``.
    Outputs declared without a shape get the inferred one; ``value_info`` declares the
    shapes of intermediate tensors that ONNX shape inference cannot work out.
    """
    rng = np.random.default_rng(seed)
    named = []
    for index, node in enumerate(nodes):
        node = copy.deepcopy(node)
        if not node.name:
            node.name = f"{node.op_type}_{index}"
        named.append(node)
    initializers = []
    for name, spec in (params or {}).items():
        if isinstance(spec, np.ndarray):
            values = spec
        else:
            values = rng.standard_normal(tuple(spec)).astype(np.float32)
        initializers.append(numpy_helper.from_array(values, name))
    graph = helper.make_graph(
        named,
        "tiny",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, None if s is None else list(s))
            for n, s in outputs.items()
        ],
        initializers,
        value_info=[
            helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s))
            for n, s in (value_info or {}).items()
        ],
    )
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    ir_version = max(IR_VERSION, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    model = helper.make_model(
        graph, opset_imports=opsets, ir_version=ir_version, functions=list(functions)
    )
    if any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def positive(*shape: int, seed: int = 1) -> np.ndarray:
    """Float32 values in [0.5, 1.5): BN variances and scales."""
    return np.random.default_rng(seed).uniform(0.5, 1.5, shape).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    """An int64 initializer (shapes, axes, split sizes, slice bounds)."""
    return np.array(values, dtype=np.int64)


def conv_node(
    x: str,
    w: str,
    y: str,
    b: str | None = None,
    *,
    k: int = 3,
    name: str | None = None,
    **attrs: Any,
) -> onnx.NodeProto:
    """A 'same'-padded ``k`` x ``k`` Conv node, named ``name`` (default: its output)."""
    attrs.setdefault("pads", [k // 2] * 4)
    return helper.make_node(
        "Conv", [x, w] + ([b] if b else []), [y], name=name or y, kernel_shape=[k, k], **attrs
    )


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(f"no initializer '{name}'")


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(f"no node '{name}' in {[n.name for n in model.graph.node]}")


def nodes_of(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def attr(n: onnx.NodeProto, name: str) -> Any:
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    raise KeyError(f"node '{n.name}' has no attribute '{name}'")


def const_input(model: onnx.ModelProto, n: onnx.NodeProto, index: int) -> np.ndarray:
    """The constant value of input ``index`` of node ``n`` (initializer or Constant node)."""
    name = n.input[index]
    inits = initializers(model)
    if name in inits:
        return inits[name]
    for other in model.graph.node:
        if other.op_type == "Constant" and other.output[0] == name:
            return numpy_helper.to_array(other.attribute[0].t)
    raise KeyError(f"input {index} of '{n.name}' ('{name}') is not a constant")


# --------------------------------------------------------------------------- analysis views


def group_with(analysis: Any, tensor: str, axis: int) -> Any:
    """The channel group that contains dimension ``(tensor, axis)``."""
    for group in analysis.groups:
        if (tensor, axis) in group.dims:
            return group
    raise AssertionError(f"no group contains ({tensor!r}, {axis})")


def member_tensors(group: Any) -> set[str]:
    return {d[0] for d in group.dims}


def param_members(group: Any) -> set[tuple[str, int]]:
    return {tuple(d) for d in group.params}


# --------------------------------------------------------------------------- running


def default_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Standard-normal inputs; a symbolic axis 0 takes ``batch``; other symbols are refused."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = []
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif axis == 0:
                dims.append(batch)
            else:
                raise AssertionError(f"give feeds: input '{value.name}' axis {axis} is symbolic")
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, dict(feeds))


def relative_difference(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    worst = 0.0
    for ref, out in zip(reference, other, strict=True):
        assert ref.shape == out.shape, f"output shapes differ: {ref.shape} vs {out.shape}"
        if ref.size == 0:
            continue
        diff = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64))))
        worst = max(worst, diff / max(float(np.max(np.abs(ref))), 1e-6))
    return worst


# --------------------------------------------------------------------------- zeroed original

PRODUCER, CONSUMER = "producer", "consumer"


def parameter_roles(model: onnx.ModelProto) -> dict[tuple[str, int], str]:
    """Which parameter axes create channels (producer) or read them (consumer).

    Written from the ONNX operator definitions, independently of graphprune's rules. Axes of
    norm parameters and per-channel constants are neither: zeroing them is not needed for
    the equivalence (the consumer columns are zero) and would be wrong for variances.
    """
    roles: dict[tuple[str, int], str] = {}
    for n in model.graph.node:
        ins = list(n.input)

        def put(index: int, axis: int, role: str, ins: list[str] = ins) -> None:
            if index < len(ins) and ins[index]:
                roles.setdefault((ins[index], axis), role)

        # W's second axis: every input (Conv) or output (ConvTranspose) channel when
        # group == 1; with groups, one position inside every conv group (removed only
        # when a grouped conv is pruned position by position)
        if n.op_type == "Conv":
            put(1, 0, PRODUCER)
            put(2, 0, PRODUCER)
            put(1, 1, CONSUMER)
        elif n.op_type == "ConvTranspose":
            put(1, 0, CONSUMER)
            put(2, 0, PRODUCER)
            put(1, 1, PRODUCER)
        elif n.op_type == "Gemm":
            if _attr_or(n, "transB", 0):
                put(1, 0, PRODUCER)
                put(1, 1, CONSUMER)
            else:
                put(1, 0, CONSUMER)
                put(1, 1, PRODUCER)
        elif n.op_type == "MatMul":
            put(1, 0, CONSUMER)
            put(1, 1, PRODUCER)
    return roles


def _attr_or(n: onnx.NodeProto, name: str, default: Any) -> Any:
    try:
        return attr(n, name)
    except KeyError:
        return default


def _constant_sources(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor name -> the initializer or Constant output that holds its value (through Identity)."""
    sources = {i.name: i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            sources[n.output[0]] = n.output[0]
    changed = True
    while changed:
        changed = False
        for n in model.graph.node:
            if n.op_type == "Identity" and n.input[0] in sources and n.output[0] not in sources:
                sources[n.output[0]] = sources[n.input[0]]
                changed = True
    return sources


def zeroed_original(
    model: onnx.ModelProto, plan: Any, roles: Mapping[tuple[str, int], str] | None = None
) -> onnx.ModelProto:
    """``model`` with the producer and consumer slices that ``plan`` removes set to zero."""
    model = copy.deepcopy(model)
    roles = dict(parameter_roles(model) if roles is None else roles)
    sources = _constant_sources(model)
    inits = {i.name: i for i in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for group in plan.groups:
        for tensor, axes in group.channels.items():
            for axis_text, indices in axes.items():
                axis = int(axis_text)
                if roles.get((tensor, axis)) not in (PRODUCER, CONSUMER):
                    continue
                source = sources.get(tensor)
                assert source is not None, f"'{tensor}' is not a constant of the original"
                if source in inits:
                    proto = inits[source]
                else:
                    proto = constants[source].attribute[0].t
                values = numpy_helper.to_array(proto).copy()
                index: list[Any] = [slice(None)] * values.ndim
                index[axis] = np.asarray(indices, dtype=np.int64)
                values[tuple(index)] = 0
                proto.CopyFrom(numpy_helper.from_array(values, proto.name))
    return model


def _declared(values: Iterable[onnx.ValueInfoProto]) -> list[tuple[str, list[Any]]]:
    out = []
    for v in values:
        dims = [
            d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in v.type.tensor_type.shape.dim
        ]
        out.append((v.name, dims))
    return out


def assert_prunes_exactly(
    model: onnx.ModelProto,
    ratio: float = 0.5,
    *,
    expect_pruned: bool = True,
    feeds: Mapping[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
    roles: Mapping[tuple[str, int], str] | None = None,
    **kwargs: Any,
) -> Any:
    """Prune ``model`` and check it is valid and equal to the zeroed original; return the result."""
    original = copy.deepcopy(model)
    result = graphprune.prune(model, ratio=ratio, **kwargs)
    pruned = result.model
    assert model == original, "prune() modified the caller's model"

    onnx.checker.check_model(pruned, full_check=True)
    verification = result.report["verification"]
    assert verification.get("ok") is True, verification
    assert _declared(pruned.graph.input) == _declared(
        [
            i
            for i in original.graph.input
            if i.name not in {t.name for t in original.graph.initializer}
        ]
    ), "graph inputs changed"
    assert _declared(pruned.graph.output) == _declared(original.graph.output), (
        "graph outputs changed"
    )

    feeds = default_feeds(original) if feeds is None else feeds
    original_out = run_ort(original, feeds)
    pruned_out = run_ort(pruned, feeds)
    assert [o.shape for o in pruned_out] == [o.shape for o in original_out]

    removed = result.plan.units_removed
    if expect_pruned:
        assert removed > 0, (
            f"nothing was pruned: {result.report['groups']}, frozen {result.report['frozen']}"
        )
        assert result.report["params_after"] < result.report["params_before"]
    reference = run_ort(zeroed_original(original, result.plan, roles), feeds)
    difference = relative_difference(reference, pruned_out)
    assert difference <= tolerance, f"pruned differs from the zeroed original by {difference:.3g}"
    return result
