"""Shapes behind operators ONNX inference cannot size, learnt by running them.

An operator of a custom domain (onnxruntime-extensions' ``BertTokenizer`` in front of a text
encoder) has no schema, and most ONNX-ML operators (scikit-learn's ``Scaler`` and
``OneHotEncoder`` in front of an MLP) have no shape inference: ONNX inference stops there, and
every tensor computed from their outputs -- the whole network behind a tokenizer -- stays
without a shape, so the analysis freezes its heads ("Reshape not understood") and the MACs
cannot be counted. :func:`annotate` runs the part of the graph that computes those outputs
(a preprocessing front: at most :data:`RUN_LIMIT` bytes of constants) twice in ONNX Runtime,
at batch 1 and 2 on random feeds (string inputs get random words), with the registered
custom-op libraries (:mod:`graphprune.io.runtime`), and writes each output's rank and type
into ``value_info``: sizes that agree between the two runs as numbers, the others as symbols
(a token count, which depends on the text; a batch axis). ONNX inference then goes on from
there, the analysis' shape probes treat those outputs as inputs
(:mod:`graphprune.analysis.shape_probe`), and the MACs are counted at the sizes the first run
saw (:func:`observed_size`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from graphprune.io.graph_reads import node_reads
from graphprune.io.order import needed_nodes
from graphprune.io.ort_schemas import ORT_ONNX_DOMAIN_OPS

#: the sub-graph that computes a custom operator's outputs is run only when its constants
#: take at most this many bytes (a preprocessing front, not a network)
RUN_LIMIT = 32 * 2**20

#: the symbolic sizes :func:`annotate` writes are ``custom_A_B``: the sizes the two runs saw
SYMBOL = "custom_"


def observed_size(dim: object) -> int | None:
    """The size the first run saw for a symbolic size :func:`annotate` wrote (the MACs are
    counted at it), ``None`` for any other dim."""
    if isinstance(dim, str) and dim.startswith(SYMBOL):
        first = dim[len(SYMBOL):].split("_")[0]
        if first.isdigit():
            return int(first)
    return None


def varies(dim: str) -> bool:
    """Whether the two runs of :func:`annotate` saw different sizes (one that follows an input size)."""
    return len(set(dim[len(SYMBOL):].split("_"))) > 1


def at_observed_sizes(values: Iterable[onnx.ValueInfoProto], *, varying: bool = True) -> list[onnx.ValueInfoProto]:
    """The entries of ``values`` with symbolic sizes :func:`annotate` wrote, each set to the
    size the first run saw (in place): where the MACs are counted. ``varying=False``: only
    the sizes both runs saw alike (the others follow the inputs: at other input sizes they
    are not the first run's; an ONNX-ML ``Scaler``'s batch counted at 1 for ``--input-shape x=8,4``)."""
    def pinned(dim: onnx.TensorShapeProto.Dimension) -> bool:
        return observed_size(dim.dim_param) is not None and (varying or not varies(dim.dim_param))

    out = []
    for value in values:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if any(pinned(d) for d in dims):
            for d in dims:
                if pinned(d):
                    size = observed_size(d.dim_param)
                    d.Clear()
                    d.dim_value = size
            out.append(value)
    return out


def learnt(values: Iterable[onnx.ValueInfoProto], graph: onnx.GraphProto, opset: int) -> list[onnx.ValueInfoProto]:
    """The entries of ``values`` that :func:`annotate` wrote for outputs of ``graph``'s opaque
    operators without a rule (a rewritten model keeps them: ONNX inference cannot find them
    again, and channels never pass such an operator; an operator with a rule, ONNX-ML's
    ``Scaler``, may pass pruned channels: its shape is derived afresh)."""
    from graphprune.rules import registry

    outputs = {o for n in graph.node if opaque(n.domain, n.op_type)
               and registry.lookup(n.domain or "", n.op_type, opset) is None for o in n.output}
    return [v for v in values if v.name in outputs and v.type.HasField("tensor_type")
            and any(observed_size(d.dim_param) is not None for d in v.type.tensor_type.shape.dim)]


def put(model: onnx.ModelProto, values: list[onnx.ValueInfoProto]) -> None:
    """Make ``values`` the ``value_info`` of their tensors in ``model`` (in place)."""
    if not values:
        return
    names = {v.name for v in values}
    kept = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend([*kept, *values])


def opaque(domain: str | None, op: str) -> bool:
    """An operator whose outputs ONNX inference does not size: one without a schema in ONNX
    or in ONNX Runtime's symbolic inference (a custom library's), or one of ONNX-ML's, whose
    schemas mostly infer no shape (scikit-learn's ``Scaler`` in front of an MLP).
    ``domain``: ``None`` or ``""`` is ONNX's, as graphsurgeon and protobuf write it."""
    domain = domain or ""
    if domain == "ai.onnx.ml":
        return True
    if domain.startswith("com.microsoft") or op in ORT_ONNX_DOMAIN_OPS:
        return False
    return not onnx.defs.has(op, "" if domain == "ai.onnx" else domain)


def _shaped(graph: onnx.GraphProto) -> set[str]:
    values = [*graph.value_info, *graph.input, *graph.output]
    return {v.name for v in values if v.type.tensor_type.HasField("shape")} | {i.name for i in graph.initializer}


def _sub_model(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto | None:
    """``model`` cut to the nodes that compute ``outputs``; ``None`` when their constants are
    external (a weight store's) or over :data:`RUN_LIMIT`."""
    graph = model.graph
    kept = [graph.node[k] for k in needed_nodes(graph, outputs)]
    read = {i for n in kept for i in node_reads(n) if i}
    inits = [t for t in graph.initializer if t.name in read]
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in inits):
        return None
    if sum(t.ByteSize() for t in inits) > RUN_LIMIT:
        return None
    sub = helper.make_graph(kept, "custom_shapes", [i for i in graph.input if i.name in read],
                            [helper.make_empty_tensor_value_info(o) for o in outputs], inits)
    out = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def annotate(model: onnx.ModelProto, ran: dict[str, int] | None = None) -> bool:
    """Write the shapes of custom operators' outputs that inference left unknown into
    ``model``'s ``value_info`` (in place), learnt by running them. ``True`` when any was
    added: infer again. ``ran`` (a dict) receives, per operator (``domain::op``), how many of
    its nodes had output shapes learnt."""
    graph = model.graph
    shaped = _shaped(graph)
    outputs = {o.name for o in graph.output}  # nothing reads them: their declared types stand
    missing = [o for n in graph.node if opaque(n.domain, n.op_type) for o in n.output
               if o and o not in shaped and o not in outputs]
    if not missing:
        return False
    sub = _sub_model(model, missing)
    if sub is None:  # (a label's ArrayFeatureExtractor after the whole network: the front still runs)
        missing = [o for o in missing if _sub_model(model, [o]) is not None]
        sub = _sub_model(model, missing) if missing else None
    if sub is None:
        return False
    import onnxruntime as ort

    from graphprune.io import runtime
    from graphprune.io.feeds import make_feeds

    try:
        options = runtime.session_options()
        options.log_severity_level = 4
        session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
        # batch 1, then 2 (and other random values): a batch axis is told from a fixed size
        runs = [session.run(missing, make_feeds(sub, seed=batch, batch=batch)[0]) for batch in (1, 2)]
    except Exception as exc:  # noqa: BLE001 - no shapes learnt: the analysis freezes what it cannot size
        if runtime.missing_op_hint(str(exc)):  # a library is missing: the first run says so
            return False
        warnings.warn(f"custom operators not run for their shapes: {runtime.describe(exc)}",
                      RuntimeWarning, stacklevel=2)
        return False
    added = []
    for k, name in enumerate(missing):
        if not all(isinstance(run[k], np.ndarray) for run in runs):  # a sequence or a map (ZipMap)
            continue
        first, second = (run[k] for run in runs)
        if first.ndim != second.ndim:
            continue
        elem = onnx.TensorProto.STRING if first.dtype.kind in "OUS" else helper.np_dtype_to_tensor_dtype(first.dtype)
        # a size that differs between the runs is symbolic; sizes that differ alike are one
        # symbol (a tokenizer's ids and attention mask: the same token count)
        dims = [a if a == b else f"{SYMBOL}{a}_{b}" for a, b in zip(first.shape, second.shape, strict=True)]
        added.append(helper.make_tensor_value_info(name, elem, dims))
    graph.value_info.extend(added)
    if ran is not None and added:
        names = {v.name for v in added}
        for node in graph.node:
            if opaque(node.domain, node.op_type) and names & set(node.output):
                key = f"{node.domain or 'ai.onnx'}::{node.op_type}"
                ran[key] = ran.get(key, 0) + 1
    return bool(added)
