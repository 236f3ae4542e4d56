"""Shape tensors: where each element of a 1-D integer shape input comes from.

A Reshape target, an Expand shape or a Resize ``sizes`` input is often computed: ``Shape``
reads dimensions, ``Gather`` and ``Slice`` pick elements, ``Concat`` joins them, ``Mul``
scales them. :class:`ShapeTrace` follows such a tensor back through the rules of its
producers (:meth:`graphprune.rules.registry.OpRule.trace_shape`) and names the source of
each element: a literal of a constant input (:class:`ShapeLiteral`), the size of a dimension
(:class:`ShapeRead`), that size times a constant (:class:`ScaledRead`), or :data:`UNKNOWN`.

:func:`track_shape` turns the sources into facts of the dependency graph: a literal that
gives a dimension's size is recorded for the rewrite (a :class:`ShapeElement`), a read
couples the dimension to the one it reads, anything else freezes the dimension.

This module knows no op: it asks the rule of each producer, through a lookup it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.dims import Dim, ShapeElement
from graphprune.analysis.index_maps import Digit, IndexMap
from graphprune.io.tensors import const_value, static_shape, static_size

#: ops followed back from a shape input before giving up (the length is then unknown)
MAX_DEPTH = 32


@dataclass(frozen=True)
class ShapeLiteral:
    """Element ``element`` of the constant input ``input_index`` of node ``node_name``."""

    node_name: str
    input_index: int
    element: int
    value: int

    def gives(self, dim: Dim) -> ShapeElement:
        """This literal as the size of ``dim``: the rewrite writes ``dim``'s new size here."""
        return ShapeElement(self.node_name, self.input_index, self.element, dim)


@dataclass(frozen=True)
class ShapeRead:
    """The size of axis ``axis`` of tensor ``tensor`` (read by a ``Shape`` node); ``size``:
    its static size when known (a size-1 factor of a product, :func:`product_of_reads`)."""

    tensor: str
    axis: int
    size: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ScaledRead:
    """``factor`` times the size of axis ``axis`` of ``tensor`` (``num_kv_heads * n_rep``);
    ``literal``: where the factor is one constant element (BLOOM's ``batch * num_heads``,
    which a rule can have rewritten with a new head count)."""

    tensor: str
    axis: int
    factor: int
    literal: ShapeLiteral | None = None


@dataclass(frozen=True)
class QuotientRead:
    """The size of axis ``axis`` of ``tensor`` divided by the literal ``divisor`` (DeBERTa's
    ``query.size(0) // num_heads``: the batch of a merged ``[B*H]`` axis). Exact after
    pruning only where the rule that reads it has the divisor rewritten with the new size."""

    tensor: str
    axis: int
    divisor: ShapeLiteral


@dataclass(frozen=True)
class ProductRead:
    """The product of the sizes of several axes (tf2onnx's einsum: ``ReduceProd`` of a
    dynamic batch and the heads, ``[B, H, ...] -> [B*H, ...]``). Recomputed at run time: exact
    after pruning where the rule that reads it merges exactly those axes."""

    reads: tuple[ShapeRead, ...]


@dataclass(frozen=True)
class UnknownElement:
    """An element computed by arithmetic the trace does not follow."""


UNKNOWN = UnknownElement()

ShapeSource = ShapeLiteral | ShapeRead | ScaledRead | QuotientRead | ProductRead | UnknownElement


def product_of_reads(factors: list[ShapeSource]) -> ShapeSource:
    """The product of shape reads (tf2onnx's einsum lowering merges the batch with the
    heads: ``ReduceProd([B, H])``): with every factor but one a size-1 axis, that read (no
    group of one unit is pruned, so the size-1 factors never change); else the
    :class:`ProductRead` of the factors that are not size 1. Anything but reads is
    :data:`UNKNOWN`."""
    reads = [f for f in factors if isinstance(f, ShapeRead)]
    if len(reads) != len(factors) or not reads:
        return UNKNOWN
    others = [r for r in reads if r.size != 1]
    if len(others) > 1:
        return ProductRead(tuple(others))
    return others[0] if others else reads[0]


class TracesShapes(Protocol):
    """What the trace asks of a producer's rule (:meth:`OpRule.trace_shape`)."""

    def trace_shape(
        self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace
    ) -> list[ShapeSource] | None: ...


RuleLookup = Callable[[gs.Node], TracesShapes | None]


def literals(node: gs.Node, index: int) -> list[ShapeSource]:
    """The elements of the constant input ``index`` of ``node``, as literals."""
    values = np.asarray(node.inputs[index].values).reshape(-1)
    return [ShapeLiteral(node.name, index, k, int(v)) for k, v in enumerate(values)]


class ShapeTrace:
    """Follows 1-D integer shape tensors back through the rules of their producers."""

    shape = staticmethod(static_shape)
    size = staticmethod(static_size)
    const = staticmethod(const_value)

    def __init__(self, rule_for: RuleLookup) -> None:
        self._rule_for = rule_for
        self._depth = 0

    @staticmethod
    def rank(tensor: gs.Tensor) -> int | None:
        shape = static_shape(tensor)
        return None if shape is None else len(shape)

    def of(self, tensor: gs.Tensor) -> list[ShapeSource] | None:
        """The source of each element of ``tensor``, computed by its producer; ``None`` when
        even the number of elements is unknown."""
        if self._depth > MAX_DEPTH or isinstance(tensor, gs.Constant) or not tensor.inputs:
            return None
        node = tensor.inputs[0]
        rule = self._rule_for(node)
        self._depth += 1
        try:
            if rule is None:
                return self.unknown(tensor)
            return rule.trace_shape(node, tensor, self)
        finally:
            self._depth -= 1

    def input(self, node: gs.Node, index: int) -> list[ShapeSource] | None:
        """The sources of input ``index`` of ``node``: literals when it is a constant."""
        if index >= len(node.inputs):
            return None
        tensor = node.inputs[index]
        if isinstance(tensor, gs.Constant):
            return literals(node, index)
        return self.of(tensor)

    def unknown(self, tensor: gs.Tensor) -> list[ShapeSource] | None:
        """Arithmetic on shapes: the length of ``tensor`` is kept, every value is lost (what a
        rule that does not know says: each dimension the shape sets is then frozen)."""
        if self.rank(tensor) == 0:
            return [UNKNOWN]
        length = self.size(tensor, 0)
        return None if length is None else [UNKNOWN] * length


class ShapeTracking(Protocol):
    """What :func:`track_shape` needs from the coupling context."""

    tensors: dict[str, gs.Tensor]

    def rank(self, tensor: gs.Tensor) -> int | None: ...

    def where(self) -> str: ...

    def rule_for(self, node: gs.Node) -> TracesShapes | None: ...

    def couple(
        self, a: gs.Tensor, axis_a: int, b: gs.Tensor, axis_b: int, imap: IndexMap = ..., *,
        exact: bool = True,
    ) -> None: ...

    def freeze(self, tensor: gs.Tensor | None, axis: int | None, reason: str) -> None: ...

    def add_shape_element(self, element: ShapeElement) -> None: ...


def track_shape(
    ctx: ShapeTracking,
    node: gs.Node,
    input_index: int,
    dims: list[tuple[gs.Tensor, int] | None],
    *,
    special_zero: bool = True,
) -> None:
    """Element ``k`` of ``node.inputs[input_index]`` gives the size of ``dims[k]``.

    Literal elements are recorded so the rewrite writes the new size; elements read
    through ``Shape`` couple their source dimension; unknown elements freeze the
    dimension. ``None`` entries (and -1/0 literals) are not tracked.
    """
    source = node.inputs[input_index]
    if isinstance(source, gs.Constant):
        elements: list[ShapeSource] | None = literals(node, input_index)
    else:
        elements = ShapeTrace(ctx.rule_for).of(source)
    if elements is None or len(elements) != len(dims):
        for entry in dims:
            if entry is not None:
                ctx.freeze(entry[0], entry[1], f"shape input not understood at {ctx.where()}")
        return
    for element, entry in zip(elements, dims, strict=True):
        if entry is None:
            continue
        tensor, axis = entry
        rank = ctx.rank(tensor)
        if rank is None:
            continue
        if isinstance(element, ShapeLiteral):
            if element.value == -1 or (element.value == 0 and special_zero):
                continue
            dim = (tensor.name, axis % rank)
            ctx.add_shape_element(
                element.gives(dim)
            )
        elif isinstance(element, ShapeRead):
            src = ctx.tensors.get(element.tensor)
            if src is not None:
                ctx.couple(src, element.axis, tensor, axis)
        elif isinstance(element, ScaledRead):
            # size(tensor, axis) = size(src) * factor: each source index owns ``factor``
            # consecutive indices (repeat_kv: KV head k serves query heads k*n .. k*n+n-1)
            src = ctx.tensors.get(element.tensor)
            if src is not None:
                ctx.couple(src, element.axis, tensor, axis, Digit(element.factor))
        else:
            ctx.freeze(tensor, axis, f"shape element computed by arithmetic at {ctx.where()}")


def dims_read(tensor: gs.Tensor, rule_for: RuleLookup) -> set[tuple[str, int]] | None:
    """The dimensions whose sizes the values of the integer tensor ``tensor`` may depend on.

    Exact where :class:`ShapeTrace` follows every element (a ``ShapeRead`` names its
    dimension); through arithmetic it does not follow (``x.shape[-1] // 2``), the union
    over the producer's inputs; a ``Shape`` reads the axes of its input it returns. The walk
    stops at constants and at float tensors (values computed from data, not from sizes);
    ``None`` when it cannot tell (rank unknown, or deeper than :data:`MAX_DEPTH`).
    """
    read: set[tuple[str, int]] = set()
    stack, seen = [(tensor, 0)], set()
    while stack:
        t, depth = stack.pop()
        if isinstance(t, gs.Constant) or t.name in seen or not t.inputs:
            continue
        seen.add(t.name)
        if depth > MAX_DEPTH:
            return None
        if t.dtype is not None and np.issubdtype(np.dtype(t.dtype), np.floating):
            continue
        sources = ShapeTrace(rule_for).of(t)
        if sources is not None and all(isinstance(s, (ShapeRead, ScaledRead, ShapeLiteral)) for s in sources):
            read.update((s.tensor, s.axis) for s in sources if isinstance(s, (ShapeRead, ScaledRead)))
            continue
        node = t.inputs[0]
        rule = rule_for(node)
        if rule is not None and getattr(rule, "reads_only_shape", False):
            rank = ShapeTrace.rank(node.inputs[0])
            if rank is None:
                return None
            read.update((node.inputs[0].name, a) for a in range(rank))
            continue
        stack.extend((i, depth + 1) for i in node.inputs if i.name)
    return read
