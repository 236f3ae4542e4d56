"""Folded expansions written back as their computation.

The preparation folds constant subgraphs so that the analysis sees weights
(:func:`graphprune.io.ir.prepare`). Some of them compute a tensor far larger than the stored
values they read: swift-f0 builds four DCT bases of 32x32 to 64x64 as ``Cos`` of an outer
product of two index vectors, 29.9 k stored values that fold into 53.7 k. A prune that
leaves such a tensor as it was would write the expansion, and a ``--lossless`` model would
hold twice the parameters of the original.

:func:`record` keeps, for every folded tensor at least :data:`EXPANSION` times larger than
the stored values it was computed from (with every other tensor folded from the same ones),
the nodes that computed it and those values;
:func:`restore` puts the computation back into the written model for each one that is still
there as it was folded, after checking that ONNX Runtime computes it from them bit for bit.
One the rewrite sliced along one axis is computed from its sources sliced alike where that
computes it bit for bit (:func:`_sliced`); one it refit stays a constant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.io.model_io import default_opset
from graphprune.rules import registry

__all__ = ["EXPANSION", "Expansion", "record", "restore"]

#: a folded tensor of more than this many times the elements of the stored values it is
#: computed from is written back as its computation where it is left as it was (a weight's
#: dtype cast, its dequantisation and a concatenation compute as many values as they read)
EXPANSION = 4
#: smaller folded tensors stay (shapes, indices, short tables; 256 left an skl2onnx Gaussian
#: process its 200 folded zeros, 13 % of its parameters)
MIN_ELEMENTS = 64


@dataclass
class Expansion:
    """How a folded tensor was computed: ``nodes`` in order, reading ``sources``."""

    nodes: list[onnx.NodeProto]
    sources: list[onnx.TensorProto]
    opset: int
    shape: tuple[int, ...] = field(default=())


def _elements(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64))


def _stored_in(node: onnx.NodeProto) -> int:
    """Values a node stores in its attributes (a ``Constant``'s tensor: paddle2onnx writes
    every weight so; such a weight is no expansion)."""
    stored = 0
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            stored += _elements(attr.t)
        elif attr.type in (onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS):
            stored += len(attr.floats) + len(attr.ints)
    return stored


def record(model: onnx.ModelProto, folded: dict[str, tuple[int, ...]], opset: int,
           earlier: dict[str, Expansion] | None = None) -> dict[str, Expansion]:
    """The expansions among ``folded`` (``{name: shape}`` of the constants a fold created), traced through ``model``, the graph before the fold, and through the expansions
    of ``earlier`` folds (a stored tensor of ``model`` that one of them created is traced
    through its nodes). A tensor computed from anything but stored values and nodes without
    subgraphs (a graph input's shape) is left out."""
    earlier = earlier or {}
    producer = {out: node for node in model.graph.node for out in node.output if out}
    stored = {t.name: t for t in model.graph.initializer}
    fixed = _fixed_sizes(model)
    found: dict[str, Expansion] = {}
    chains: dict[str, tuple[dict, dict, int, int]] = {}
    for name, shape in folded.items():
        size = int(np.prod(shape, dtype=np.int64))
        if size < MIN_ELEMENTS or name in stored or name not in producer:
            continue
        nodes: dict[str, onnx.NodeProto] = {}  # by first output
        sources: dict[str, onnx.TensorProto] = {}
        todo, ok = [name], True
        while todo and ok:
            tensor = todo.pop()
            if not tensor or tensor in sources or tensor in nodes:
                continue
            if tensor in stored and tensor in earlier and earlier[tensor].opset == opset:
                for node in earlier[tensor].nodes:
                    nodes.setdefault(node.output[0], node)
                for source in earlier[tensor].sources:
                    sources.setdefault(source.name, source)
                continue
            if tensor in stored:
                sources[tensor] = stored[tensor]
                continue
            node = producer.get(tensor)
            value = _shape_value(node, fixed, opset) if node is not None else None
            if value is not None:
                # a stored tensor's shape: its sizes are the values read, not its elements
                # (skl2onnx's Gaussian process: 200 zeros of the shape of a 1200-value table)
                sources[tensor] = numpy_helper.from_array(value, tensor)
                continue
            if node is None or node.domain not in ("", "ai.onnx") or any(
                    a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                ok = False
                break
            if node.output[0] not in nodes:
                nodes[node.output[0]] = node
                todo.extend(node.input)
        if not ok or not nodes:
            continue
        read = sum(_elements(t) for t in sources.values()) + sum(_stored_in(n) for n in nodes.values())
        chains[name] = (nodes, sources, size, read)
    # tensors folded from the same stored values count together: DeBERTa's layers each fold
    # LayerNorm(relative embeddings) into a copy of their own (12 x the table, each the size of it)
    together: dict[frozenset[str], int] = {}
    for _, sources, size, _ in chains.values():
        key = frozenset(sources)
        together[key] = together.get(key, 0) + size
    for name, (nodes, sources, _, read) in chains.items():
        if together[frozenset(sources)] <= EXPANSION * read:
            continue
        found[name] = Expansion([_copy(n) for n in _in_order(list(nodes.values()))],
                                [_copy(t) for t in sources.values()], opset, tuple(folded[name]))
    return found


def _shape_value(node: onnx.NodeProto, dims: dict[str, list[int]], opset: int) -> np.ndarray | None:
    """What ``node`` computes from an input of fixed sizes ``dims`` (a stored tensor, a graph
    input whose every size is fixed) whose shape alone it reads
    (:meth:`~graphprune.rules.registry.OpRule.shape_value`: ``Shape``); ``None`` otherwise."""
    rule = registry.lookup(node.domain or "", node.op_type, opset)
    if rule is None or not node.input or node.input[0] not in dims:
        return None
    return rule.shape_value({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute},
                            dims[node.input[0]])


def _fixed_sizes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The sizes of the stored tensors and of the graph inputs whose every size is fixed (no
    prune changes them: TorchScript's ``Expand`` of a literal to ``Shape(k)`` of a ``[1, 1024]``
    input folded into 24,576 stored values that ``--lossless`` wrote, 6 % more parameters)."""
    fixed = {t.name: list(t.dims) for t in model.graph.initializer}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim if value.type.tensor_type.HasField("shape") else None
        if dims is not None and value.name not in fixed and all(d.HasField("dim_value") and d.dim_value > 0
                                                                for d in dims):
            fixed[value.name] = [d.dim_value for d in dims]
    return fixed


def _in_order(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` with every producer before its readers."""
    made = {out: k for k, node in enumerate(nodes) for out in node.output if out}
    placed: list[onnx.NodeProto] = []
    done: set[int] = set()

    def place(k: int) -> None:
        if k in done:
            return
        done.add(k)
        for tensor in nodes[k].input:
            if tensor in made:
                place(made[tensor])
        placed.append(nodes[k])

    for k in range(len(nodes)):
        place(k)
    return placed


def _copy(proto):  # noqa: ANN001, ANN202 - a NodeProto or a TensorProto
    other = type(proto)()
    other.CopyFrom(proto)
    return other


def restore(model: onnx.ModelProto, expansions: dict[str, Expansion],
            read: Callable[[onnx.TensorProto], bytes] | None = None,
            check: Callable[[onnx.ModelProto], None] | None = None) -> int:
    """Put each recorded expansion that ``model`` still holds as it was folded back as its
    computation (in place); the number put back. Each is checked first: ONNX Runtime computes
    it from the recorded nodes and values bit for bit, its names clash with nothing, and the
    model passes the checker afterwards (else the model is left as it was). ``read``: the
    bytes of a tensor of ``model`` (a weight store's reader, for tensors stored outside the
    proto; default: only tensors in the proto are read); ``check``: the checker, raising on a
    failure (default: ``onnx.checker.check_model``)."""
    if not expansions:
        return 0
    graph = model.graph
    held = {t.name: t for t in graph.initializer}
    taken = {out for node in graph.node for out in node.output} | {i.name for i in graph.input}
    candidates = {}
    for k, (name, exp) in enumerate(expansions.items()):
        tensor = held.get(name)
        if tensor is None or exp.opset != default_opset(model) \
                or (read is None and tensor.data_location == onnx.TensorProto.EXTERNAL):
            continue
        if tuple(tensor.dims) != exp.shape:  # sliced by the rewrite: from its sources sliced alike
            exp = _sliced(name, exp, _array(tensor, read), read, f"__gp_cut{k}")
            if exp is None:
                continue
        outputs = {out for node in exp.nodes for out in node.output if out}
        if (outputs - {name}) & (taken | set(held)):
            continue
        if any(s.name in held and not _same(held[s.name], s, read) for s in exp.sources) \
                or any(s.name in taken for s in exp.sources):
            continue
        candidates[name] = exp
    equal = _recomputed_equal(candidates, held, read)
    if not equal:
        return 0
    before = onnx.ModelProto()
    before.CopyFrom(model)
    nodes: dict[str, onnx.NodeProto] = {}
    sources: dict[str, onnx.TensorProto] = {}
    for name in equal:
        for node in candidates[name].nodes:
            nodes.setdefault(node.output[0], node)
        for source in candidates[name].sources:
            sources.setdefault(source.name, source)
    keep = [t for t in graph.initializer if t.name not in equal]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.initializer.extend(s for n, s in sources.items() if n not in held)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes.values())
    graph.node.extend(rest)
    try:
        (check or onnx.checker.check_model)(model)
    except Exception:  # noqa: BLE001 - any failure: the model stays as it was verified
        model.CopyFrom(before)
        return 0
    return len(equal)


def _sliced(name: str, exp: Expansion, stored: np.ndarray, read: Callable[[onnx.TensorProto], bytes] | None,
            suffix: str) -> Expansion | None:
    """The expansion of ``name`` that the rewrite sliced along one axis (``stored``: what it
    holds now; swift-f0's DCT bases, 32 x 32 -> 32 x 31, grew the model at a 10 % prune): its
    nodes over its sources taken at the kept indices where they run along that axis (an index
    vector of the outer product), those and the nodes' outputs but ``name`` given ``suffix``
    (the unsliced expansion may stay too). ``None`` where the kept indices are not found, or a source of that
    axis' size neither runs along it nor broadcasts over it. :func:`restore` checks the result
    bit for bit."""
    full = _computed(name, exp, read)
    if full is None or full.ndim != stored.ndim or full.dtype != stored.dtype:
        return None
    axes = [a for a in range(full.ndim) if full.shape[a] != stored.shape[a]]
    if len(axes) != 1 or any(stored.shape[a] > full.shape[a] for a in axes):
        return None
    axis, kept, start = axes[0], [], 0
    for j in range(stored.shape[axis]):  # (kept indices in order: the first equal slice after the last)
        want = np.take(stored, j, axis=axis)
        found = next((i for i in range(start, full.shape[axis])
                      if np.array_equal(np.take(full, i, axis=axis), want, equal_nan=True)), None)
        if found is None:
            return None
        kept.append(found)
        start = found + 1
    sources, renamed = [], {o for n in exp.nodes for o in n.output if o and o != name}
    for source in exp.sources:
        values = _array(source, read)
        at = axis - (full.ndim - values.ndim)
        if at >= 0 and values.shape[at] != 1:
            if values.shape[at] != full.shape[axis]:
                return None
            sources.append(numpy_helper.from_array(np.take(values, kept, axis=at), source.name + suffix))
            renamed.add(source.name)
        else:  # (read as it is: shared with the unsliced expansion)
            sources.append(source)
    nodes = []
    for node in exp.nodes:
        node = _copy(node)
        node.input[:] = [i + suffix if i in renamed else i for i in node.input]
        node.output[:] = [o + suffix if o in renamed else o for o in node.output]
        node.name = node.name + suffix if node.name else node.name
        nodes.append(node)
    return Expansion(nodes, sources, exp.opset, tuple(stored.shape))


def _computed(name: str, exp: Expansion, read: Callable[[onnx.TensorProto], bytes] | None) -> np.ndarray | None:
    """``name`` as ONNX Runtime computes it from ``exp``'s nodes and values (``None``: it does not)."""
    import onnxruntime as ort

    if read is None and any(t.data_location == onnx.TensorProto.EXTERNAL for t in exp.sources):
        return None
    graph = onnx.helper.make_graph(exp.nodes, "expansion", [], [onnx.helper.make_empty_tensor_value_info(name)],
                                   [numpy_helper.from_array(_array(t, read), t.name) for t in exp.sources])
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", exp.opset)])
    probe.ir_version = min(probe.ir_version, 10)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.asarray(session.run([name], {})[0])
    except Exception:  # noqa: BLE001 - not computable here
        return None


def _array(tensor: onnx.TensorProto, read: Callable[[onnx.TensorProto], bytes] | None) -> np.ndarray:
    if read is None or tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    return np.frombuffer(read(tensor), dtype=dtype).reshape(tuple(tensor.dims))


def _same(a: onnx.TensorProto, b: onnx.TensorProto, read: Callable[[onnx.TensorProto], bytes] | None) -> bool:
    if tuple(a.dims) != tuple(b.dims) or a.data_type != b.data_type:
        return False
    return bool(np.array_equal(_array(a, read), _array(b, read), equal_nan=True))


def _recomputed_equal(candidates: dict[str, Expansion], held: dict[str, onnx.TensorProto],
                      read: Callable[[onnx.TensorProto], bytes] | None) -> list[str]:
    """The names among ``candidates`` that ONNX Runtime computes from their nodes and values
    exactly as ``held`` stores them."""
    if not candidates:
        return []

    equal = []
    for name, exp in candidates.items():
        value = _computed(name, exp, read)
        try:
            stored = _array(held[name], read)
        except Exception:  # noqa: BLE001 - not readable here: it stays a constant
            continue
        if value is not None and value.shape == stored.shape and value.dtype == stored.dtype \
                and np.array_equal(value, stored, equal_nan=True):
            equal.append(name)
    return equal
