"""What one operator costs depends on: :class:`OpSpec`, a hashable, stable description.

An :class:`OpSpec` holds the op type, domain and opset, the attributes (normalised to
hashable values with their ONNX attribute type), and for each input its shape, numpy dtype
and whether it is a constant. Weights are described by shape only (their values do not
change a kernel's speed); small constants and integer constants keep their values, since
those can change what the op does (a Resize scale, a Reshape target, Clip bounds).
:attr:`OpSpec.key` is a SHA-256 digest of a canonical JSON form: the same in every process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

__all__ = ["FORMAT", "OpSpec", "OperandSpec", "ShapeOf", "Untimable", "static_shape"]

FORMAT = 1
"""Version of the spec key and the cache file; bump it when either changes meaning."""

SMALL_CONSTANT = 64
"""Constants up to this many elements keep their own values in the spec (Clip bounds,
Resize scales, Pow exponents): they can change what the op does, not only its cost."""

INTEGER_CONSTANT = 4096
"""Integer constants up to this many elements keep their values (shapes, axes, indices)."""

ShapeOf = Callable[[gs.Tensor], "list[int] | None"]


class Untimable(Exception):
    """The node cannot be timed on its own (a subgraph, an unknown shape, ...)."""


def static_shape(tensor: gs.Tensor) -> list[int] | None:
    """The tensor's shape when every dimension is a known non-negative integer, else None:
    the default ``shape_of`` for a graph whose shapes were inferred."""
    shape = tensor.shape
    if shape is None or any(not isinstance(dim, int | np.integer) or dim < 0 for dim in shape):
        return None
    return [int(dim) for dim in shape]


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class OperandSpec:
    """One input of an :class:`OpSpec`: its shape, numpy dtype name and whether it is a
    constant. ``values`` holds a small or integer constant's own values (flattened); other
    constants are filled with seeded random numbers when measured."""

    shape: tuple[int, ...]
    dtype: str
    constant: bool
    values: tuple[Any, ...] | None = None

    def to_json(self) -> list[Any]:
        return [list(self.shape), self.dtype, self.constant,
                None if self.values is None else list(self.values)]


def _attribute(value: Any) -> tuple[str, Any]:
    """(type tag, hashable value) of one graphsurgeon attribute; Untimable for subgraphs."""
    if isinstance(value, bool | np.bool_):
        return "i", int(value)
    if isinstance(value, int | np.integer):
        return "i", int(value)
    if isinstance(value, float | np.floating):
        return "f", float(value)
    if isinstance(value, str):
        return "s", value
    if isinstance(value, bytes):
        return "s", value.decode("utf-8", "surrogateescape")
    if isinstance(value, gs.Constant):
        if int(np.prod(value.shape)) > INTEGER_CONSTANT:
            raise Untimable("has a large tensor attribute")
        array = np.asarray(value.values)
        return "t", (array.dtype.name, tuple(array.shape), tuple(array.ravel().tolist()))
    if isinstance(value, list | tuple | np.ndarray):
        items = list(np.asarray(value).ravel().tolist()) if isinstance(value, np.ndarray) else list(value)
        if not items or all(isinstance(item, int | np.integer) for item in items):
            return "ints", tuple(int(item) for item in items)
        if all(isinstance(item, int | float | np.number) for item in items):
            return "floats", tuple(float(item) for item in items)
        if all(isinstance(item, str | bytes) for item in items):
            return "strings", tuple(item if isinstance(item, str) else item.decode() for item in items)
    if isinstance(value, gs.Graph):
        raise Untimable("has a subgraph")
    raise Untimable(f"has an attribute of type {type(value).__name__}")


def _dtype_name(tensor: gs.Tensor) -> str | None:
    dtype = tensor.dtype
    if dtype is None:
        return None
    try:
        if isinstance(dtype, int):
            return np.dtype(helper.tensor_dtype_to_np_dtype(dtype)).name
        return np.dtype(dtype).name
    except (TypeError, KeyError, ValueError):
        return None


def _kept_values(tensor: gs.Constant, shape: tuple[int, ...], dtype: str) -> tuple[Any, ...] | None:
    if tuple(tensor.shape) != shape:
        return None  # pruned: the original values do not fit; measured with made-up ones
    size = int(np.prod(shape))
    integer = np.issubdtype(np.dtype(dtype), np.integer) or dtype == "bool"
    if size > SMALL_CONSTANT and not (integer and size <= INTEGER_CONSTANT):
        return None
    return tuple(np.asarray(tensor.values).ravel().tolist())


def _computed_from_constants(tensor: gs.Tensor, depth: int = 0) -> bool:
    """Is ``tensor`` a constant, or computed from constants only (an exporter's Identity on
    a weight, a Constant node)? ORT folds those: the op sees a constant (its weights get
    prepacked), and so does its spec. Looks back a few nodes at most."""
    if isinstance(tensor, gs.Constant):
        return True
    if depth > 4 or len(tensor.inputs) != 1:
        return False
    producer = tensor.inputs[0]
    if any(isinstance(value, gs.Graph) for value in producer.attrs.values()):
        return False
    return all(_computed_from_constants(source, depth + 1) for source in producer.inputs if not source.is_empty())


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One operator to time: hashable, and with a stable :attr:`key` across processes."""

    op_type: str
    domain: str
    opset: int
    attributes: tuple[tuple[str, str, Any], ...]
    """(name, type tag, value), sorted by name"""
    inputs: tuple[OperandSpec | None, ...]
    """None for an omitted optional input"""
    outputs: tuple[bool, ...]
    """which outputs the node produces (False: an omitted optional output)"""

    @classmethod
    def from_node(cls, node: gs.Node, shape_of: ShapeOf, opset: int) -> OpSpec | None:
        """The spec of ``node`` with each input shaped by ``shape_of`` (its possibly pruned
        shape); None when a shape or dtype is unknown or the node cannot run alone."""
        try:
            return cls._from_node(node, shape_of, opset)
        except Untimable:
            return None

    @classmethod
    def _from_node(cls, node: gs.Node, shape_of: ShapeOf, opset: int) -> OpSpec:
        attributes = tuple(sorted((name, *_attribute(value)) for name, value in node.attrs.items()))
        inputs: list[OperandSpec | None] = []
        for tensor in node.inputs:
            if tensor.is_empty():
                inputs.append(None)
                continue
            shape = shape_of(tensor)
            dtype = _dtype_name(tensor)
            if shape is None or dtype is None:
                raise Untimable(f"input '{tensor.name}' has no static shape or dtype")
            if any(not isinstance(dim, int | np.integer) or dim < 0 for dim in shape):
                raise Untimable(f"input '{tensor.name}' has a dynamic shape")
            dims = tuple(int(dim) for dim in shape)
            constant = _computed_from_constants(tensor)
            values = _kept_values(tensor, dims, dtype) if isinstance(tensor, gs.Constant) else None
            inputs.append(OperandSpec(dims, dtype, constant, values))
        outputs = tuple(not tensor.is_empty() for tensor in node.outputs)
        return cls(node.op, node.domain or "", int(opset), attributes, tuple(inputs), outputs)

    def to_json(self) -> list[Any]:
        return [FORMAT, self.domain, self.op_type, self.opset,
                [[name, tag, list(value) if isinstance(value, tuple) else value]
                 for name, tag, value in self.attributes],
                [None if operand is None else operand.to_json() for operand in self.inputs],
                list(self.outputs)]

    @property
    def key(self) -> str:
        """A stable hex digest of the spec (the cache key)."""
        text = json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def describe(self) -> str:
        """``Conv(1x64x56x56, w64x64x3x3, w64)``: op and input shapes, ``w`` for constants."""
        parts = []
        for operand in self.inputs:
            if operand is None:
                parts.append("-")
                continue
            dims = "x".join(map(str, operand.shape)) or "scalar"
            parts.append(("w" if operand.constant else "") + dims)
        return f"{self.op_type}({', '.join(parts)})"

    def to_node(self, name: str, inputs: list[str]) -> onnx.NodeProto:
        """The node again, named ``name``, reading ``inputs``, writing ``{name}_out{k}``."""
        outputs = [f"{name}_out{k}" if present else "" for k, present in enumerate(self.outputs)]
        node = helper.make_node(self.op_type, inputs, outputs, name=name, domain=self.domain or None)
        for name, tag, value in self.attributes:
            if tag == "t":
                dtype, shape, values = value
                attribute = helper.make_attribute(
                    name, numpy_helper.from_array(np.asarray(values, dtype=dtype).reshape(shape)))
            else:
                kind = {"i": onnx.AttributeProto.INT, "f": onnx.AttributeProto.FLOAT,
                        "s": onnx.AttributeProto.STRING, "ints": onnx.AttributeProto.INTS,
                        "floats": onnx.AttributeProto.FLOATS, "strings": onnx.AttributeProto.STRINGS}[tag]
                attribute = helper.make_attribute(name, list(value) if isinstance(value, tuple) else value,
                                                  attr_type=kind)
            node.attribute.append(attribute)
        return node
