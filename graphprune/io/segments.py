"""Run a model with external weights one piece at a time.

An ONNX Runtime session holds every weight of its model for as long as it lives. To verify
a model without holding all of its weights at once, :func:`run_in_segments` cuts the
(topologically ordered) top-level nodes into consecutive segments whose weights stay
under a budget, and runs them one after another, each in its own session that is released
before the next is built: the values that cross a cut are handed on as feeds (typed from
the arrays themselves). Peak memory is one segment's weights plus the live activations
instead of the whole model. Each segment computes what the same nodes compute in the
whole model (the same kernels; graph optimizations cannot fuse across a cut).

Only models read from a file whose weights are external (a model of a
:class:`~graphprune.io.weights.WeightStore`) are cut; :func:`plan` returns ``None`` where
cutting would not help or is not possible, and callers then run the model whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from graphprune.io.feeds import output_array
from graphprune.io.graph_reads import node_reads
from graphprune.io.tensor_protos import nbytes

#: a segment holds at most this share of the model's weights (or its largest weight)
SHARE = 1 / 8
#: models whose external weights total less than this are run whole
MIN_WEIGHTS = 8 * 2**20


class Unsegmentable(Exception):
    """A value crossing a cut that cannot be fed back (not a tensor)."""


def ordered_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes in its order, except that a node computed from weights alone (a
    weight's mask, say) comes right before its first reader, so that it lands in the
    segment that uses it instead of being carried from the first segment on."""
    nodes = list(graph.node)
    weights = {t.name for t in graph.initializer}
    free: dict[str, int] = {}  # output name -> index of a weights-only node
    for k, node in enumerate(nodes):
        if node.output and all(n in weights or n in free for n in node_reads(node)):
            free.update((o, k) for o in node.output if o)
    deferred = set(free.values())
    placed: set[int] = set()
    ordered: list[onnx.NodeProto] = []

    def place(k: int) -> None:
        if k in placed:
            return
        placed.add(k)
        for name in sorted(node_reads(nodes[k])):
            if name in free:
                place(free[name])
        ordered.append(nodes[k])

    for k in range(len(nodes)):
        if k not in deferred:
            place(k)
    for k in range(len(nodes)):  # weights-only nodes nobody reads
        place(k)
    return ordered


def plan(model: onnx.ModelProto) -> list[tuple[int, int]] | None:
    """Ranges ``[start, end)`` of :func:`ordered_nodes` for the segments, or ``None`` (run
    the model whole)."""
    graph = model.graph
    external = {t.name: nbytes(t) for t in graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    total = sum(external.values())
    if total < MIN_WEIGHTS or len(graph.node) < 2:
        return None
    produced = {o for node in graph.node for o in node.output}
    if any(o.name not in produced for o in graph.output):
        return None  # an output that is an input or a weight: nothing to gain, keep it simple
    budget = max(total * SHARE, max(external.values()))
    ranges: list[tuple[int, int]] = []
    start, held, seen = 0, 0, set()
    for k, node in enumerate(ordered_nodes(graph)):
        new = {n for n in node_reads(node) if n in external} - seen
        cost = sum(external[n] for n in new)
        if held and held + cost > budget:
            ranges.append((start, k))
            start, held, seen = k, 0, set()
            new = {n for n in node_reads(node) if n in external}
            cost = sum(external[n] for n in new)
        held += cost
        seen |= new
    ranges.append((start, len(graph.node)))
    return ranges if len(ranges) > 1 else None


def _value_info(name: str, value: Any) -> onnx.ValueInfoProto:
    if not isinstance(value, np.ndarray):
        raise Unsegmentable(f"'{name}' is a {type(value).__name__}, not a tensor")
    elem = helper.np_dtype_to_tensor_dtype(value.dtype)
    return helper.make_tensor_value_info(name, elem, list(value.shape))


def _segment_model(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: dict[str, Any],
                   outputs: list[str], known: dict[str, onnx.ValueInfoProto]) -> onnx.ModelProto:
    graph = model.graph
    read: set[str] = set()
    for node in nodes:
        read |= node_reads(node)
    seg = onnx.GraphProto()
    seg.name = graph.name
    seg.node.extend(nodes)
    seg.initializer.extend(t for t in graph.initializer if t.name in read)
    seg.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in read)
    seg.input.extend(_value_info(name, value) for name, value in inputs.items())
    for name in outputs:
        info = onnx.ValueInfoProto()
        info.name = name
        if name in known and known[name].type.HasField("tensor_type"):
            info.type.tensor_type.elem_type = known[name].type.tensor_type.elem_type
        seg.output.append(info)
    out = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(out, field, getattr(model, field))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.CopyFrom(seg)
    return out


def run_in_segments(
    path: str | os.PathLike[str],
    model: onnx.ModelProto,
    ranges: list[tuple[int, int]],
    feeds_list: list[dict[str, np.ndarray]],
    make_session: Callable[[str], Any],
) -> list[list[np.ndarray]]:
    """Outputs of the model at ``path`` (``model`` is its parsed skeleton) on each feed dict,
    its nodes (:func:`ordered_nodes`) run by ``ranges`` (see :func:`plan`);
    ``make_session(file)`` builds a session.
    Raises :class:`Unsegmentable` when a value crossing a cut is not a tensor."""
    graph = model.graph
    nodes = ordered_nodes(graph)
    finals = [o.name for o in graph.output]
    known = {v.name: v for v in list(graph.value_info) + list(graph.output)}
    initializers = {t.name for t in graph.initializer}
    later_reads: list[set[str]] = []  # names read by segments after the k-th
    acc: set[str] = set(finals)
    for start, end in reversed(ranges):
        later_reads.append(set(acc))
        for node in nodes[start:end]:
            acc |= node_reads(node)
    later_reads.reverse()
    states = [dict(feeds) for feeds in feeds_list]
    folder = Path(os.fspath(path)).parent
    for k, (start, end) in enumerate(ranges):
        part = nodes[start:end]
        produced = [o for node in part for o in node.output if o]
        read: set[str] = set()
        for node in part:
            read |= node_reads(node)
        needed = sorted(n for n in read - set(produced) - initializers if n in states[0])
        outputs = [o for o in produced if o in later_reads[k]]
        segment = _segment_model(model, part, {n: states[0][n] for n in needed}, outputs, known)
        file = folder / f"segment-{os.getpid()}-{id(states)}-{k}.onnx"
        file.write_bytes(segment.SerializeToString())
        try:
            session = make_session(str(file))
        finally:
            file.unlink(missing_ok=True)
        for state in states:
            values = session.run(outputs, {n: state[n] for n in needed})
            state.update(zip(outputs, values, strict=True))
            for name in [n for n in state if n not in later_reads[k]]:
                del state[name]
        del session
        trim()
    return [[output_array(state[name]) for name in finals] for state in states]


def trim() -> None:
    """Hand the C heap's free memory back to the system (glibc keeps what ONNX Runtime
    freed, so the next segment would find the previous one's memory still counted)."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None

