"""What the models the tool writes declare about their shapes.

An output dimension the user's file leaves open stays open (:func:`keep_open_outputs`).

The size names ONNX shape inference invents (``unk__N``) are kept from ONNX Runtime. Where inference cannot compute a size, it names it ``unk__N``, and it reuses that name
wherever it knows two sizes are equal. The analysis reads those equalities. ONNX Runtime's
graph optimizer reads them too and folds shape computations on them: a ``Reshape`` whose
target is computed as ``[Shape(a)[0], Shape(a)[1]]`` becomes ``[0, -1]``, which ORT cannot
apply to a tensor with no element ("The input tensor cannot be reshaped"). torchvision's
Faster R-CNN, Mask R-CNN and Keypoint R-CNN (TorchScript) as exported run on an image with
no region proposal; the same graphs with inferred shapes failed there. A model handed to
ONNX Runtime, and a model the tool returns, carry the exporter's size names only
(:func:`invented_cleared` for a moment, :func:`forget_invented` for good); the rank and the fixed sizes stay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import onnx

from graphprune.io.graph_reads import subgraphs
from graphprune.io.tensor_protos import _detach

INVENTED = "unk__"


def _invented(model: onnx.ModelProto) -> list[tuple[onnx.TensorShapeProto.Dimension, str]]:
    found = []
    for value in model.graph.value_info:
        if value.type.HasField("tensor_type"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_param") and dim.dim_param.startswith(INVENTED):
                    found.append((dim, dim.dim_param))
    return found


def declared_sizes(model: onnx.ModelProto) -> dict[str, list[str | None]]:
    """The size names the user's file itself gives its intermediate tensors (``value_info``:
    ONNX Runtime's symbolic inference and Optimum write ``unk__N`` there), by tensor."""
    found = {}
    for value in model.graph.value_info:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            names = [d.dim_param if d.HasField("dim_param") else None for d in value.type.tensor_type.shape.dim]
            if any(names):
                found[value.name] = names
    return found


def forget_invented(model: onnx.ModelProto, declared: dict[str, list[str | None]] | None = None,
                    cut: Iterable[tuple[str, int]] = ()) -> int:
    """Clear the invented size names of ``model``'s intermediate shapes (in place); how many.
    Where the user's file named that size of that tensor (``declared``: its
    :func:`declared_sizes`), its name is written instead, invented or not: what the file
    promised ONNX Runtime stays promised (two residual inputs of equal shape, which it fuses
    with the LayerNormalization after them into a SkipLayerNormalization; without the
    names, a lossless DeBERTa's int8 logits moved by 1.4 % under ORT's default
    optimisations). Not where the prune changed that size (``cut``: (tensor, axis)): a
    dynamo export's ``4*batch`` of one attention block with a head removed would tell ONNX
    Runtime that its ``3*batch`` tensors are the size of another block's ``4*batch`` ones,
    and its memory planner fails ("Shape mismatch attempting to re-use buffer")."""
    declared = declared or {}
    cut = set(cut)
    cleared = 0
    for value in model.graph.value_info:
        if not value.type.HasField("tensor_type"):
            continue
        names = declared.get(value.name)
        dims = value.type.tensor_type.shape.dim
        for k, dim in enumerate(dims):
            changed = (value.name, k) in cut or (value.name, k - len(dims)) in cut
            own = names[k] if names is not None and len(names) == len(dims) and not changed else None
            if own is not None and not dim.HasField("dim_value"):
                dim.dim_param = own
            elif dim.HasField("dim_param") and dim.dim_param.startswith(INVENTED):
                dim.ClearField("dim_param")
                cleared += 1
    return cleared


@contextlib.contextmanager
def invented_cleared(model: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """``model`` without its invented size names while the block runs (in place: no copy
    of its weights), with them again after."""
    found = _invented(model)
    for dim, _ in found:
        dim.ClearField("dim_param")
    try:
        yield model
    finally:
        for dim, name in found:
            dim.dim_param = name


def keep_open_outputs(model: onnx.ModelProto, declared: dict[str, onnx.TypeProto]) -> None:
    """An output dimension the user's file leaves open (named or unknown, or -1:
    :func:`open_negative_sizes`; ``declared``: its inputs' and outputs' types) stays open in
    ``model`` (in place): shape inference with data propagation can find its size at the probe
    shapes (tf2onnx's SAME padding of a dynamic input; PP-OCRv3's recogniser's sequence axis,
    declared -1, came out 1), and the written model would declare a fixed size its original
    did not promise."""
    for value in model.graph.output:
        before = declared.get(value.name)
        if before is None or not before.HasField("tensor_type") or not value.type.HasField("tensor_type") \
                or not before.tensor_type.HasField("shape"):
            continue
        dims, open_dims = value.type.tensor_type.shape.dim, before.tensor_type.shape.dim
        if len(dims) == len(open_dims):
            for dim, was in zip(dims, open_dims, strict=True):
                if not was.HasField("dim_value"):
                    dim.CopyFrom(was)
                elif was.dim_value < 0:
                    dim.Clear()


def restore_negative_sizes(model: onnx.ModelProto, declared: dict[str, onnx.TypeProto]) -> int:
    """Declare again as -1 the input sizes the user's file declares so and the tool read as
    open (:func:`open_negative_sizes`), where ``model`` leaves them open (in place): what a
    caller feeds reads as in the file. How many sizes. Outputs keep such sizes open, as
    ONNX writes an open size: a declared -1 output contradicts what strict inference computes
    from the -1 input (PP-OCRv3's recogniser fails ``onnx.checker``'s full check so; its
    pruned model passes it)."""
    restored = 0
    for value in model.graph.input:
        before = declared.get(value.name)
        if before is None or not before.HasField("tensor_type") or not value.type.HasField("tensor_type") \
                or not before.tensor_type.HasField("shape") or not value.type.tensor_type.HasField("shape"):
            continue
        dims, was_dims = value.type.tensor_type.shape.dim, before.tensor_type.shape.dim
        if len(dims) == len(was_dims):
            for dim, was in zip(dims, was_dims, strict=True):
                if was.HasField("dim_value") and was.dim_value < 0 and not dim.HasField("dim_value"):
                    dim.dim_value = was.dim_value
                    restored += 1
    return restored


def open_negative_sizes(model: onnx.ModelProto) -> int:
    """Read a negative declared size as an open one (in place); how many shapes changed.
    paddle2onnx declares an open size as -1 (``x: [-1, 3, -1, -1]``), and writes its
    framework's intermediate shapes as ``value_info`` with sizes computed from that -1
    (``[-1, 6, 0, 0]`` behind a strided conv). ONNX inference computes the same arithmetic on
    a -1 input, and ONNX Runtime trusts a declared size: a part of the model run at real sizes
    (the calibration runs a pruned model layer by layer, fed its earlier activations) met
    ``[1, 6, 28, 112] + [-1, 6, 1, 0]`` and refused to load ("Incompatible dimensions"). Graph
    inputs and outputs get open sizes there (the written model declares an input's -1 again:
    :func:`restore_negative_sizes`); intermediate shapes with one are dropped, inference
    computes them again."""
    changed = 0
    for graph in (model.graph, *subgraphs(model.graph)):
        for value in (*graph.input, *graph.output):
            dims = _dims(value)
            if any(d.HasField("dim_value") and d.dim_value < 0 for d in dims):
                changed += 1
                for d in dims:
                    if d.HasField("dim_value") and d.dim_value < 0:
                        d.ClearField("dim_value")
        kept = [v for v in graph.value_info if not any(d.HasField("dim_value") and d.dim_value < 0 for d in _dims(v))]
        if len(kept) < len(graph.value_info):
            changed += len(graph.value_info) - len(kept)
            del graph.value_info[:]
            graph.value_info.extend(kept)
    return changed


def open_traced_output_sizes(model: onnx.ModelProto,
                             symbolic: Callable[[onnx.ModelProto], onnx.ModelProto | None] | None = None) -> int:
    """Where a graph output that nodes of the graph read too declares a fixed size that ONNX
    inference computes as a size the inputs leave open, declare that open size instead (in
    place); how many outputs changed. torch writes an output's sizes as traced: LORE's table
    stage declares ``logic_axis: [batch, 54, 4]`` for the inputs' open number of cells, and
    its second transformer reads that output. ONNX inference took the 54 for the tensor its
    readers see, while every run (ONNX Runtime trusts no declared output size) has the
    number of cells fed: the shapes behind it contradicted the size probes, and its
    attention froze ("Reshape not understood"). ``symbolic(skeleton)``: ONNX Runtime's
    symbolic inference, for the outputs ONNX's leaves unshaped (a Reshape to a computed
    shape at opset 9)."""
    graph = model.graph
    read = {name for node in graph.node for name in node.input}
    fixed = [o for o in graph.output if o.name in read and any(d.HasField("dim_value") for d in _dims(o))]
    if not fixed:
        return 0
    symbols = {d.dim_param for value in graph.input for d in _dims(value) if d.dim_param}
    skeleton, _ = _detach(model)
    del skeleton.graph.value_info[:]
    for value in skeleton.graph.output:
        if value.type.HasField("tensor_type"):
            value.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - nothing learnt: the declarations stand
        return 0
    computed = {v.name: _dims(v) for v in inferred.graph.output}
    if symbolic is not None and not all(computed.get(o.name) for o in fixed):
        more = symbolic(skeleton)
        if more is not None:
            computed.update({v.name: _dims(v) for v in more.graph.output if not computed.get(v.name)})
    changed: set[str] = set()
    for value in fixed:
        dims, found = _dims(value), computed.get(value.name, [])
        if len(found) != len(dims):
            continue
        opened = [(d, f.dim_param) for d, f in zip(dims, found, strict=True)
                  if d.HasField("dim_value") and f.dim_param in symbols]
        for d, name in opened:
            d.dim_param = name  # (clears the fixed value)
        if opened:
            changed.add(value.name)
    if changed:  # the shapes inferred from the traced size (ONNX's version converter writes
        after, size = set(changed), 0  # them) are inferred again
        while len(after) > size:  # (the nodes need not be sorted yet)
            size = len(after)
            for node in graph.node:
                if after.intersection(node.input):
                    after.update(node.output)
        kept = [v for v in graph.value_info if v.name not in after]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return len(changed)


def _dims(value: onnx.ValueInfoProto) -> list:
    tensor = value.type.tensor_type if value.type.HasField("tensor_type") else None
    return list(tensor.shape.dim) if tensor is not None and tensor.HasField("shape") else []
