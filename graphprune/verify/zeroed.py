"""The zeroed original: the reference a structural rewrite is checked against.

Removing a channel is equivalent to zeroing its producer (weights, bias) and consumer (input
weights) in the original -- exactly, for groups whose channels meet only channel-separable
ops. :func:`zeroed_reference` builds that model from the prepared original: small 0/1 mask
``Mul`` nodes on the weights that lose channels (no zeroed copy of the model), zeroed copies
only where masking would cost more (quantized weights, weights cut on several axes, large
weights kept in files), and masks after the activations and computed weights the analysis
names. :func:`graphprune.verify.validate.compare` runs it beside the pruned model; the
budget's sensitivity sweep (:mod:`graphprune.planning.sensitivity`) reuses its masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from graphprune.analysis import CONSUMER, PRODUCER, Analysis, Dim
from graphprune.io.graph_reads import subgraphs_of
from graphprune.io.tensor_protos import nbytes
from graphprune.io.tensors import from_constants

#: :func:`zeroed_reference` writes a zeroed copy of a weight (instead of masking it at run
#: time) when the weight is cut on several axes or holds at least this share of the weights
LARGE_SHARE = 1 / 8


def _zeroed_values(values: np.ndarray, cuts: list[tuple[int, np.ndarray]],
                   zero: np.ndarray | None) -> np.ndarray:
    """``values`` (a writable copy) with the ``cuts`` (axis, indices) set to zero, or to the
    weight's ``zero`` point (a quantized weight's value that reads as 0)."""
    fill = None if zero is None else np.broadcast_to(zero.astype(values.dtype), values.shape)
    for axis, idx in cuts:
        index: list[Any] = [slice(None)] * values.ndim
        index[axis] = idx
        values[tuple(index)] = 0 if fill is None else fill[tuple(index)]
    return values


def zeroed_reference(
    prepared: onnx.ModelProto, analysis: Analysis, removed: dict[Dim, np.ndarray],
    *, store: Any = None,
) -> onnx.ModelProto:
    """The zeroed original as a graph: each producer/consumer weight that loses channels is
    multiplied by a 0/1 mask along the pruned axis before use.

    It costs a few small masks instead of a zeroed copy of every pruned weight, and works on
    weights that stay in files. Run it without
    ORT's graph optimizations (constant folding would materialise every masked weight).

    With ``store`` (the :class:`~graphprune.io.weights.WeightStore` holding ``prepared``'s
    weights) a weight kept in the store's files whose masking would be costly gets a zeroed
    copy written there instead (:meth:`~graphprune.io.weights.WeightStore.write_zeroed`, a
    block at a time), which the reference reads like any weight: a weight cut on several axes
    (a ``Mul`` per axis holds two masked copies at once) or one that holds ``LARGE_SHARE``
    of the weights (its masked copy, and the copy some kernels make of a weight that is not a
    constant, would add that much to the run). Weights cut on one axis (every weight of a
    transformer pruned by heads and MLP neurons) stay masked: no disk write for them.
    """
    roles = analysis.context.roles
    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for dim, idx in removed.items():
        if roles.get(dim) in (PRODUCER, CONSUMER):
            cuts.setdefault(dim[0], []).append((dim[1], idx))
    model = onnx.ModelProto()
    model.CopyFrom(prepared)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    # quantized weights whose zero is their zero point (a mask gives 0) or whose integer type
    # ONNX Runtime's Mul does not take (int8, uint8, ...): a filled copy
    narrow = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
              onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    zero_points = analysis.context.zero_points
    if store is not None:
        sizes = {i.name: nbytes(i) for i in graph.initializer
                 if i.data_location == onnx.TensorProto.EXTERNAL}
        large = sum(sizes.values()) * LARGE_SHARE
        picked = {name: (inits[name], axes) for name, axes in cuts.items()
                  if name in sizes and (name in zero_points or inits[name].data_type in narrow
                                        or len({axis for axis, _ in axes}) > 1 or sizes[name] >= large)}
        # filled on disk a block at a time (an int4 LLM's packed weights: not a copy in memory)
        zeroed = store.write_zeroed(picked, fills={n: zero_points[n] for n in picked if n in zero_points})
        for name, stub in zeroed.items():
            inits[name].CopyFrom(stub)
            del cuts[name]
    for name in [n for n in cuts if n in inits and (n in zero_points or inits[n].data_type in narrow)]:
        init = inits[name]
        if init.data_location == onnx.TensorProto.EXTERNAL and store is not None:
            loaded = onnx.TensorProto()  # through onnx's decoder: it unpacks sub-byte (int4) data
            loaded.CopyFrom(init)
            loaded.raw_data = store.tensor_bytes(init)
            loaded.ClearField("data_location")
            del loaded.external_data[:]
            values = np.array(numpy_helper.to_array(loaded), copy=True)
        else:
            values = np.array(numpy_helper.to_array(init), copy=True)
        values = _zeroed_values(values, cuts.pop(name), zero_points.get(name))
        init.CopyFrom(numpy_helper.from_array(values, name))
    _zero_attributes(graph, analysis, cuts)
    renames: dict[str, str] = {}
    masks: dict[str, list[onnx.NodeProto]] = {}
    for name, axes in cuts.items():
        init = inits.get(name)
        if init is None:
            continue
        rank = len(init.dims)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        by_axis: dict[int, np.ndarray] = {}
        for axis, idx in axes:
            if axis not in by_axis:
                full = [1] * rank
                full[axis] = int(init.dims[axis])
                by_axis[axis] = np.ones(full, dtype=dtype)
            index: list[Any] = [slice(None)] * rank
            index[axis] = idx
            by_axis[axis][tuple(index)] = 0
        nodes, current = _mask_nodes(graph, name, [by_axis[a] for a in sorted(by_axis)])
        masks[name] = nodes
        renames[name] = current
    rename_uses(graph, renames)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([n for chain in masks.values() for n in chain] + nodes)
    _zero_activations(graph, analysis, removed, model.opset_import)
    return model


def _zero_attributes(graph: onnx.GraphProto, analysis: Analysis, cuts: dict[str, list[tuple[int, np.ndarray]]]) -> None:
    """Zero the removed channels of the weights ops hold in attributes (``CouplingContext.attribute_weights``:
    a linear model's coefficient columns; no mask reaches an attribute, and a removed PCA component
    after a MinMaxScaler is its offset, not 0), in ``graph``'s copy of the attribute."""
    held = analysis.context.attribute_weights
    nodes = {n.name: n for n in graph.node if n.name}
    for name in [n for n in cuts if n in held]:
        node_name, label = held[name]
        attribute = next((a for a in nodes[node_name].attribute if a.name == label), None) if node_name in nodes else None
        weight = analysis.context.tensors.get(name)
        if attribute is None or not isinstance(weight, gs.Constant):
            continue
        values = np.array(attribute.floats, dtype=np.float32).reshape(weight.shape)
        for axis, idx in cuts.pop(name):
            index: list[Any] = [slice(None)] * values.ndim
            index[axis] = idx
            values[tuple(index)] = 0
        del attribute.floats[:]
        attribute.floats.extend(values.ravel().tolist())


def computed_weights(analysis: Analysis, linked: bool = False) -> set[str]:
    """Weights the graph computes from constants (``Add(W, c)``, ``A @ B``; up to 8 nodes deep:
    dynamo's bidirectional LSTM ``W`` takes 4) that a consumer or producer reads and whose
    constants do not take that role themselves (a dequantized or cast-and-scaled weight's integer
    constant does; ``linked``: those too): zeroing their constants would not zero the weight, so
    the zeroed original zeroes the computed weight."""
    ctx = analysis.context
    linked = set() if linked else {link[0] for link in ctx.role_links}
    out = set()
    for (name, _axis), role in ctx.variable_roles.items():
        tensor = ctx.tensors.get(name)
        if (role in (PRODUCER, CONSUMER) and name not in linked and tensor is not None
                and not hasattr(tensor, "values") and from_constants(tensor, 8)):
            out.add(name)
    return out


def _zero_activations(graph: onnx.GraphProto, analysis: Analysis, removed: dict[Dim, np.ndarray],
                      opsets: Any = ()) -> None:
    """Zero the removed channels of the activations the analysis names
    (``CouplingContext.zeroed_activations``, or on one axis: ``zeroed_axes``) and of weights the graph computes from constants
    (:func:`computed_weights`) with a mask ``Mul`` right after their producer; every reader
    reads the masked value."""
    names = analysis.context.zeroed_activations | computed_weights(analysis)
    axes_named = analysis.context.zeroed_axes
    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (name, axis), idx in removed.items():
        if (name in names or (name, axis) in axes_named) and len(idx):
            cuts.setdefault(name, []).append((axis, idx))
    inferred: dict[str, tuple[list[Any], Any]] | None = None
    # a constant's own dims: the analysed graph's constant may be the rewrite's sliced one
    constants = {i.name: i for i in graph.initializer if i.name in cuts}
    for name, axes in cuts.items():
        tensor = analysis.context.tensors.get(name)
        shape = getattr(tensor, "shape", None)
        dtype = getattr(tensor, "dtype", None)
        if name in constants:
            shape, dtype = list(constants[name].dims), onnx.helper.tensor_dtype_to_np_dtype(constants[name].data_type)
        if shape is None or dtype is None:  # a rewrite of the analysed graph dropped it
            if inferred is None:
                inferred = _value_infos(graph, opsets)
            shape, dtype = inferred.get(name, (None, None))
        if shape is None or dtype is None:
            continue
        if any(not isinstance(shape[a], int) for a, _ in axes):
            # an axis sized at run time (attention's merged [B*H]): a mask repeated to its size
            nodes, masked = _runtime_mask_nodes(graph, name, len(shape), np.dtype(dtype), [
                (axis, idx, analysis.context.member_size(tensor, axis) if tensor is not None else None)
                for axis, idx in axes])
            _insert_masks(graph, name, nodes, masked)
            continue
        masks = []
        for axis, idx in axes:
            full = [1] * len(shape)
            full[axis] = int(shape[axis])
            mask = np.ones(full, dtype=np.dtype(dtype))
            index: list[Any] = [slice(None)] * len(shape)
            index[axis] = idx
            mask[tuple(index)] = 0
            masks.append(mask)
        nodes, masked = _mask_nodes(graph, name, masks)
        _insert_masks(graph, name, nodes, masked)


def _insert_masks(graph: onnx.GraphProto, name: str, nodes: list[onnx.NodeProto], masked: str) -> None:
    """Every reader of ``name`` reads ``masked`` instead, which ``nodes`` compute right after
    ``name``'s producer."""
    rename_uses(graph, {name: masked})
    for node in nodes:  # the masks read the original name, not the masked one
        for k, used in enumerate(node.input):
            if used == masked:
                node.input[k] = name
    position = next((k + 1 for k, n in enumerate(graph.node) if name in n.output), 0)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)


def period(removed: np.ndarray, size: int) -> int | None:
    """The shortest period ``p`` (dividing ``size``) with which the removed indices repeat
    along an axis of ``size`` (the heads of ``[B*H]``, sized at the first shape probe's
    batch: the same heads of every sample), or ``None`` where they do not."""
    wanted = set(int(i) for i in removed)
    for p in range(1, size + 1):
        if size % p == 0 and wanted == {i + k * p for i in wanted if i < p for k in range(size // p)}:
            return p
    return None


def _runtime_mask_nodes(graph: onnx.GraphProto, name: str, rank: int, dtype: np.dtype,
                        axes: list[tuple[int, np.ndarray, int | None]]) -> tuple[list[onnx.NodeProto], str]:
    """:func:`_mask_nodes` for axes whose size is known at run time only: the removed indices
    (labelled at the analysis' size of the axis) repeat with a :func:`period`, and the mask
    of one period is tiled to the axis' size when the reference runs. An axis whose removed
    indices do not repeat, or whose size the analysis does not know, stays unmasked (the
    comparison then shows the difference)."""
    helper = onnx.helper
    nodes: list[onnx.NodeProto] = []
    current = name
    for k, (axis, idx, size) in enumerate(axes):
        step = period(idx, size) if size else None
        if step is None:
            continue
        tag = f"{name}__gp_rmask{k}"
        keep = np.ones(step, dtype=bool)
        keep[[int(i) for i in idx if i < step]] = False
        target = [1] * rank
        target[axis] = -1
        for suffix, value in (("period", keep), ("axis", np.array([axis], np.int64)),
                              ("step", np.array([step], np.int64)), ("shape", np.array(target, np.int64)),
                              ("zero", np.zeros((), dtype))):
            graph.initializer.append(numpy_helper.from_array(value, f"{tag}_{suffix}"))
        nodes += [
            helper.make_node("Shape", [name], [f"{tag}_dims"], name=f"{tag}_dims"),
            helper.make_node("Gather", [f"{tag}_dims", f"{tag}_axis"], [f"{tag}_size"], name=f"{tag}_size"),
            helper.make_node("Div", [f"{tag}_size", f"{tag}_step"], [f"{tag}_reps"], name=f"{tag}_reps"),
            helper.make_node("Tile", [f"{tag}_period", f"{tag}_reps"], [f"{tag}_tiled"], name=f"{tag}_tile"),
            helper.make_node("Reshape", [f"{tag}_tiled", f"{tag}_shape"], [f"{tag}_mask"], name=f"{tag}_mask"),
        ]
        if dtype in WHERE_TYPES:
            nodes.append(helper.make_node("Where", [f"{tag}_mask", current, f"{tag}_zero"], [f"{tag}_out"],
                                          name=f"{tag}_zero"))
        else:  # (bfloat16: no Where) a 0/1 factor of the tensor's type
            to = helper.np_dtype_to_tensor_dtype(dtype)
            nodes += [helper.make_node("Cast", [f"{tag}_mask"], [f"{tag}_factor"], name=f"{tag}_factor", to=to),
                      helper.make_node("Mul", [current, f"{tag}_factor"], [f"{tag}_out"], name=f"{tag}_zero")]
        current = f"{tag}_out"
    return nodes, current


def _value_infos(graph: onnx.GraphProto, opsets: Any) -> dict[str, tuple[list[Any], Any]]:
    """Shape and numpy dtype of every tensor ONNX shape inference finds in ``graph``
    (the bytes of large or external weights are not copied: only small constants, which
    shapes may be read from, keep their values)."""
    model = onnx.helper.make_model(onnx.GraphProto(), opset_imports=list(opsets))
    model.graph.CopyFrom(graph)
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or len(init.raw_data) > 4096:
            init.ClearField("raw_data")
            init.ClearField("external_data")
            init.data_location = onnx.TensorProto.DEFAULT
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph.value_info
    except Exception:  # noqa: BLE001 - nothing inferred: the caller skips what it cannot size
        return {}
    out = {}
    for info in inferred:
        t = info.type.tensor_type
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            out[info.name] = (dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    return out


def _mask_nodes(graph: onnx.GraphProto, name: str,
                masks: list[np.ndarray]) -> tuple[list[onnx.NodeProto], str]:
    """Nodes that zero ``name`` where any of the (broadcastable, 0/1) ``masks`` is 0, one
    small mask per axis (their product would be as large as the weight); their masks are
    added to ``graph``. Returns the nodes and the name of the zeroed weight.

    ``Where(mask, x, 0)``, not ``x * mask``: a trained weight may hold ``-inf`` (an attention
    bias table's row for "no path"), and ``-inf * 0`` is NaN, which the removed channel then
    carried into every output (chython-rxnmap's heads: "relative difference inf", exit 3).
    A type ``Where`` does not take (bfloat16) keeps the ``Mul``."""
    nodes, current = [], name
    for k, mask in enumerate(masks):
        suffix = str(k) if k else ""
        mask_name = f"{name}__gp_mask{suffix}"
        target = f"{name}__gp_zeroed{suffix}"
        if mask.dtype in WHERE_TYPES:
            zero_name = f"{name}__gp_zero_value{suffix}"
            graph.initializer.append(numpy_helper.from_array(mask != 0, mask_name))
            graph.initializer.append(numpy_helper.from_array(np.zeros((), mask.dtype), zero_name))
            nodes.append(onnx.helper.make_node("Where", [mask_name, current, zero_name], [target],
                                               name=f"{name}__gp_zero{suffix}"))
        else:
            graph.initializer.append(numpy_helper.from_array(mask, mask_name))
            nodes.append(onnx.helper.make_node("Mul", [current, mask_name], [target],
                                               name=f"{name}__gp_zero{suffix}"))
        current = target
    return nodes, current


#: the types ONNX Runtime's CPU ``Where`` takes, which zeroed channels use
WHERE_TYPES = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.uint8,
                                               np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64))


def rename_uses(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Make every node (subgraphs included) read ``renames[x]`` instead of ``x``."""
    local = {i.name for i in graph.initializer} - set(renames)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renames and name not in local:
                node.input[k] = renames[name]
        for sub in subgraphs_of(node):
            inner = {i.name for i in sub.initializer} | {i.name for i in sub.input}
            rename_uses(sub, {k: v for k, v in renames.items() if k not in inner})

