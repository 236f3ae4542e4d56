"""Run calibration samples through ONNX Runtime with intermediate tensors exposed.

:func:`exposed_model` serialises a model whose outputs are the requested tensors and whose
nodes are only those the tensors need (a prefix of the graph). It edits the given proto's
outputs and node list in place, serialises, and puts them back, so the weights are never
copied (a deep copy of a large model's initializers would cost as much as the model).

:func:`stream` runs the feeds through such a model and hands every requested tensor of every
batch to a callback: nothing is kept across batches, so memory is bounded by what the
callback accumulates. Tensors are exposed in chunks whose estimated size per batch stays
under ``chunk_bytes`` (each chunk is one more run of the prefix it needs).

:func:`batches` stacks samples along axis 0 when the model is batch-separable (checked by
running two samples separately and stacked), which makes small models much faster to
calibrate; otherwise every sample is its own batch.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphprune.errors import VerificationError

Feed = dict[str, np.ndarray]

#: estimated exposed bytes per batch above which tensors are exposed in several runs
CHUNK_BYTES = 512 << 20


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name:
                out[name] = index
    return out


def _needed_nodes(graph: onnx.GraphProto, names: Iterable[str]) -> list[int]:
    """Indices (graph order) of the nodes that the tensors ``names`` depend on."""
    producers = _producers(graph)
    needed: set[int] = set()
    stack = [producers[n] for n in names if n in producers]
    while stack:
        index = stack.pop()
        if index in needed:
            continue
        needed.add(index)
        node = graph.node[index]
        inputs = list(node.input)
        for attr in node.attribute:  # outer names read by subgraphs
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                for inner in sub.node:
                    inputs.extend(inner.input)
        stack.extend(producers[n] for n in inputs if n in producers)
    return sorted(needed)


def exposed_model(model: onnx.ModelProto, names: Sequence[str]) -> bytes:
    """Serialised ``model`` with outputs ``names`` and only the nodes they need."""
    graph = model.graph
    known = set(_producers(graph)) | {i.name for i in graph.input}
    missing = [n for n in names if n not in known]
    if missing:
        raise VerificationError(f"tensor '{missing[0]}' is not computed by the model")
    types = {v.name: v for v in [*graph.value_info, *graph.output, *graph.input]}
    saved_outputs = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in graph.output]
    needed = _needed_nodes(graph, names)
    trim = len(needed) < len(graph.node)
    saved_nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node] if trim else []
    try:
        del graph.output[:]
        for name in names:
            info = types.get(name)
            value = onnx.ValueInfoProto(name=name)
            if info is not None and info.type.HasField("tensor_type"):
                value.type.tensor_type.elem_type = info.type.tensor_type.elem_type
            graph.output.append(value)
        if trim:
            kept = [saved_nodes[i] for i in needed]
            del graph.node[:]
            graph.node.extend(kept)
        return model.SerializeToString()
    finally:
        del graph.output[:]
        graph.output.extend(saved_outputs)
        if trim:
            del graph.node[:]
            graph.node.extend(saved_nodes)


def session(data: bytes, data_dir: Path | None = None) -> ort.InferenceSession:
    """A CPU session; a model whose weights are external files of ``data_dir`` (a weight
    store) is written there for ORT to load, and the file removed once loaded."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if data_dir is None:
        return ort.InferenceSession(data, options, providers=providers)
    path = Path(data_dir) / f"gp-calibration-{uuid.uuid4().hex}.onnx"
    path.write_bytes(data)
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    finally:
        path.unlink(missing_ok=True)


def _tensor_bytes(model: onnx.ModelProto, name: str, batch: int) -> int:
    for value in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        if value.name != name or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        size = 4
        for i, d in enumerate(dims):
            size *= d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else 64)
        return int(size)
    return 4 << 20  # unknown: assume 4 MB


def chunks(model: onnx.ModelProto, names: Sequence[str], batch: int, limit: int = CHUNK_BYTES) -> list[list[str]]:
    """Split ``names`` into runs whose estimated exposed size per batch is under ``limit``."""
    out: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name in names:
        b = _tensor_bytes(model, name, batch)
        if current and size + b > limit:
            out.append(current)
            current, size = [], 0
        current.append(name)
        size += b
    if current:
        out.append(current)
    return out


def stream(
    model: onnx.ModelProto,
    names: Sequence[str],
    feeds: Sequence[Feed],
    callback: Callable[[int, str, np.ndarray], None],
    *,
    chunk_bytes: int = CHUNK_BYTES,
    what: str = "the model",
    data_dir: Path | None = None,
) -> None:
    """Run every feed with ``names`` exposed; call ``callback(batch_index, name, value)``."""
    names = list(dict.fromkeys(names))
    if not names:
        return
    batch = int(next(iter(feeds[0].values())).shape[0]) if feeds and feeds[0] else 1
    for chunk in chunks(model, names, max(batch, 1), chunk_bytes):
        try:
            sess = session(exposed_model(model, chunk), data_dir)
        except Exception as exc:
            raise VerificationError(f"{what} does not run in ONNX Runtime: {str(exc).splitlines()[0]}") from exc
        inputs = {i.name for i in sess.get_inputs()}
        for index, feed in enumerate(feeds):
            values = sess.run(chunk, {k: v for k, v in feed.items() if k in inputs})
            for name, value in zip(chunk, values, strict=True):
                callback(index, name, np.asarray(value))


def outputs(
    model: onnx.ModelProto, feeds: Sequence[Feed], what: str = "the model", data_dir: Path | None = None
) -> list[list[np.ndarray]]:
    """The graph outputs of ``model`` on every feed."""
    names = [o.name for o in model.graph.output]
    result: list[list[np.ndarray]] = [[] for _ in feeds]
    stream(model, names, feeds, lambda i, _n, v: result[i].append(v), chunk_bytes=1 << 62,
           what=what, data_dir=data_dir)
    return result


# ---------------------------------------------------------------------- batching
@dataclass
class Batches:
    """Feeds grouped into batches; ``sizes[i]`` samples in batch ``i``."""

    feeds: list[Feed]
    sizes: list[int]
    stacked: bool


def _stack(feeds: Sequence[Feed]) -> Feed:
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in feeds[0]}


def _stackable(feeds: Sequence[Feed]) -> bool:
    if len(feeds) < 2 or not feeds[0]:
        return False
    first = feeds[0]
    for feed in feeds:
        for name, value in feed.items():
            if value.ndim == 0 or value.shape != first[name].shape or value.shape[0] != 1:
                return False
    return True


def batch_separable(
    model: onnx.ModelProto, feeds: Sequence[Feed], tolerance: float = 1e-4, data_dir: Path | None = None
) -> bool:
    """True when stacking two samples along axis 0 gives each sample's own outputs."""
    if not _stackable(feeds[:2]):
        return False
    symbolic = all(
        i.type.tensor_type.shape.dim and not i.type.tensor_type.shape.dim[0].HasField("dim_value")
        for i in model.graph.input
        if i.name in feeds[0]
    )
    if not symbolic:
        return False
    try:
        single = outputs(model, feeds[:2], data_dir=data_dir)
        joint = outputs(model, [_stack(feeds[:2])], data_dir=data_dir)[0]
    except VerificationError:
        return False
    for k, value in enumerate(joint):
        parts = [s[k] for s in single]
        if value.shape[:1] != (2,) or any(p.shape[:1] != (1,) for p in parts):
            return False
        ref = np.concatenate(parts, 0).astype(np.float64)
        scale = max(float(np.abs(ref).max()), 1e-12) if ref.size else 1.0
        if ref.shape != value.shape or float(np.abs(ref - value).max(initial=0.0)) > tolerance * scale:
            return False
    return True


def batches(
    model: onnx.ModelProto, feeds: Sequence[Feed], size: int = 16, data_dir: Path | None = None
) -> Batches:
    """``feeds`` in batches of up to ``size`` samples when the model allows it."""
    if size > 1 and _stackable(feeds) and batch_separable(model, feeds, data_dir=data_dir):
        groups = [list(feeds[i : i + size]) for i in range(0, len(feeds), size)]
        return Batches([_stack(g) for g in groups], [len(g) for g in groups], True)
    return Batches(list(feeds), [1] * len(feeds), False)
