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
calibrate; otherwise every sample is its own batch. A stacked batch holds at most
:data:`STACK_BYTES` of the tensors the model computes (estimated from its shapes at the
samples' sizes, :func:`sample_bytes`): every run holds one batch's activations, so stacking
more samples of a large model would make the memory of every calibration run grow with
the number of samples (a 1024x1024 U-Net computes 3.2 GB of tensors per sample: its
samples run one at a time).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from graphprune.errors import VerificationError
from graphprune.io import runtime, scratch
from graphprune.io.feeds import output_array
from graphprune.io.graph_reads import node_reads
from graphprune.io.model_io import concrete_shapes
from graphprune.io.order import needed_nodes, not_tensors, producers
from graphprune.rules.quantize import optimizer_fuses_quantization

Feed = dict[str, np.ndarray]

#: estimated exposed bytes per batch above which tensors are exposed in several runs
CHUNK_BYTES = 512 << 20




def exposed_model(model: onnx.ModelProto, names: Sequence[str], given: dict[str, int] | None = None,
                  shapes: dict[str, list[int | None]] | None = None) -> bytes:
    """Serialised ``model`` with outputs ``names`` and only the nodes they need.

    ``given``: tensors fed from a cache (name -> ONNX element type): they become graph
    inputs and the nodes upstream of them are left out (a cached tensor that a kept node
    computes anyway is not fed). :func:`fed_names` tells which were used. ``shapes``: their
    sizes where known (:meth:`TensorCache.shapes`), declared on those inputs: ONNX Runtime's
    ``Resize`` refuses a ``sizes`` input of unknown length ("Number of elements of input
    'sizes' (0)"), as a PyTorch export's ``interpolate(size=x.shape[2:])`` fed from a cache is."""
    graph = model.graph
    given = dict(given or {})
    known = set(producers(graph)) | {i.name for i in graph.input} | set(given)
    missing = [n for n in names if n not in known]
    if missing:
        raise VerificationError(f"tensor '{missing[0]}' is not computed by the model")
    types = {v.name: v for v in [*graph.value_info, *graph.output, *graph.input]}
    saved_outputs = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in graph.output]
    needed = needed_nodes(graph, names, given)
    fed = fed_names(graph, names, given, needed)
    trim = len(needed) < len(graph.node)
    saved_nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node] if trim else []
    read = {n for i in needed for n in node_reads(graph.node[i])} | set(names)
    saved_inputs = [onnx.ValueInfoProto.FromString(i.SerializeToString()) for i in graph.input]
    try:
        del graph.input[:]  # inputs no kept node reads are left out (ORT would ask for them)
        graph.input.extend(i for i in saved_inputs if i.name in read)
        del graph.output[:]
        for name in names:
            info = types.get(name)
            value = onnx.ValueInfoProto(name=name)
            if info is not None and info.type.HasField("tensor_type"):
                value.type.tensor_type.elem_type = info.type.tensor_type.elem_type
            elif name in given:
                value.type.tensor_type.elem_type = given[name]
            graph.output.append(value)
        for name in fed:
            value = onnx.ValueInfoProto(name=name)
            value.type.tensor_type.elem_type = given[name]
            dims = (shapes or {}).get(name)
            if dims is not None:
                value.type.tensor_type.shape.SetInParent()
                for size in dims:
                    dim = value.type.tensor_type.shape.dim.add()
                    if size is not None:
                        dim.dim_value = size
            graph.input.append(value)
        if trim:
            kept = [saved_nodes[i] for i in needed]
            del graph.node[:]
            graph.node.extend(kept)
        return model.SerializeToString()
    finally:
        del graph.output[:]
        graph.output.extend(saved_outputs)
        del graph.input[:]
        graph.input.extend(saved_inputs)
        if trim:
            del graph.node[:]
            graph.node.extend(saved_nodes)


def fed_names(
    graph: onnx.GraphProto, names: Sequence[str], given: dict[str, int], needed: list[int] | None = None
) -> list[str]:
    """The cached tensors that the run of ``names`` reads (kept nodes do not compute them)."""
    needed = needed_nodes(graph, names, given) if needed is None else needed
    computed = {o for i in needed for o in graph.node[i].output}
    read = {n for i in needed for n in node_reads(graph.node[i])} | set(names)
    inputs = {i.name for i in graph.input}
    return sorted(n for n in given if n in read and n not in computed and n not in inputs)


#: ONNX Runtime 1.32 crashes (a segmentation fault, no exception) building a session of a
#: float16 graph that ends in ``Transpose -> MatMul``, as a truncated calibration graph can:
#: the fused MatMul it makes of them breaks its NCHWc layout pass. Not made for float16.
HALF_DISABLED = ["MatmulTransposeFusion"]


def computes_half(model: onnx.ModelProto) -> bool:
    """Does ``model`` hold float16 weights or inputs (reads the stubs, not the bytes)?"""
    half = onnx.TensorProto.FLOAT16
    return any(t.data_type == half for t in model.graph.initializer) or any(
        v.type.tensor_type.elem_type == half for v in model.graph.input)


def session(data: bytes, data_dir: Path | None = None, optimize: bool = True,
            half: bool = False) -> ort.InferenceSession:
    """A CPU session; a model whose weights are external files of ``data_dir`` (a weight
    store) is written there for ORT to load, and the file removed once loaded. ``half``: the
    model computes in float16 (:data:`HALF_DISABLED`)."""
    options = runtime.session_options()
    options.log_severity_level = 4  # fatal only: run errors come back as exceptions
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # idle worker threads sleep instead of spinning: calibration runs alternate with numpy
    # work (statistics, solves) that needs the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    disabled = HALF_DISABLED if half else None
    if data_dir is None:
        return ort.InferenceSession(data, options, providers=providers, disabled_optimizers=disabled)
    path = Path(data_dir) / f"gp-calibration-{uuid.uuid4().hex}.onnx"
    path.write_bytes(data)
    try:
        return ort.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)
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
    cache: TensorCache | None = None,
    keep: Sequence[str] = (),
    cache_bytes: int = 0,
    optimize: bool | None = None,
) -> TensorCache | None:
    """Run every feed with ``names`` exposed; call ``callback(batch_index, name, value)``.

    ``cache``: tensors already computed (per batch) that the run reads instead of
    recomputing the nodes upstream of them. ``keep``: tensors to store in a new cache for
    the next run (returned; ``None`` without ``keep``), holding up to ``cache_bytes``
    (default :data:`CACHE_BYTES`) in memory. ``optimize``: ORT's graph optimizations
    (default: on, except where they would turn QDQ patterns into integer kernels: which
    patterns fuse depends on which tensors are exposed, so two runs exposing different
    tensors would compute different numbers; unoptimised, every run computes the graph's
    own float semantics)."""
    if optimize is None:
        optimize = not optimizer_fuses_quantization(model)
    names = list(dict.fromkeys(names))
    given = cache.types() if cache is not None else {}
    from_cache = [n for n in names if n in given]
    wanted = set(names)
    kept = TensorCache(cache_bytes or CACHE_BYTES, data_dir) if keep else None
    for name in from_cache:
        for index in range(len(feeds)):
            callback(index, name, cache.get(name, index))  # type: ignore[union-attr]
    graph_inputs = {i.name for i in model.graph.input if feeds and i.name in feeds[0]} - set(given)
    for name in names:
        if name in graph_inputs and name not in given:
            for index, feed in enumerate(feeds):
                callback(index, name, feed[name])
    run = [n for n in dict.fromkeys([*names, *keep]) if n not in given and n not in graph_inputs]
    if run:
        _run_chunks(model, run, feeds, callback, given, cache, kept, set(keep), wanted,
                    chunk_bytes=chunk_bytes, what=what, data_dir=data_dir, cache_bytes=cache_bytes,
                    optimize=optimize)
    if kept is not None:
        for name in keep:
            if name in given:  # still valid: carried over (moved, not copied)
                kept.take_over(cache, name)  # type: ignore[arg-type]
    return kept


def _run_chunks(
    model: onnx.ModelProto,
    run: list[str],
    feeds: Sequence[Feed],
    callback: Callable[[int, str, np.ndarray], None],
    given: dict[str, int],
    cache: TensorCache | None,
    kept: TensorCache | None,
    keep_set: set[str],
    wanted: set[str],
    *,
    chunk_bytes: int,
    what: str,
    data_dir: Path | None,
    cache_bytes: int,
    optimize: bool = True,
) -> None:
    """The runs of :func:`stream`: ``run`` in chunks, each feeding the next its frontier."""
    first = np.shape(next(iter(feeds[0].values()))) if feeds and feeds[0] else ()
    batch = int(first[0]) if first else 1  # a scalar input: one sample
    order = producers(model.graph)
    run.sort(key=lambda n: order.get(n, -1))
    parts = chunks(model, run, max(batch, 1), chunk_bytes)
    half = computes_half(model)
    inner: TensorCache | None = None  # frontier between chunks: later chunks skip the prefix
    try:
        for number, chunk in enumerate(parts):
            available = {**given, **(inner.types() if inner is not None else {})}
            sizes = {**(cache.shapes() if cache is not None else {}), **(inner.shapes() if inner is not None else {})}
            later = [n for part in parts[number + 1 :] for n in part]
            cut: list[str] = []
            if later:
                now = computed(model.graph, chunk, available)
                cut = frontier(model.graph, later, produced(model.graph) - now)
            extra = [n for n in cut if n not in available and n not in chunk]
            carry = [n for n in cut if inner is not None and n in inner.types()]
            outputs_ = [*chunk, *extra]
            try:
                fed = fed_names(model.graph, outputs_, available)
                sess = session(exposed_model(model, outputs_, available, sizes), data_dir, optimize, half)
            except Exception as exc:
                raise VerificationError(
                    f"{what} does not run in ONNX Runtime: {runtime.describe(exc)}") from exc
            inputs = {i.name for i in sess.get_inputs()}
            following = TensorCache(cache_bytes or CACHE_BYTES, data_dir) if extra or carry else None
            for index, feed in enumerate(feeds):
                run_feed = {k: v for k, v in feed.items() if k in inputs}
                for name in fed:
                    source = cache if name in given else inner
                    run_feed[name] = source.get(name, index)  # type: ignore[union-attr]
                try:
                    values = sess.run(outputs_, run_feed)
                except Exception as exc:  # ORT's own exception types: one line, our type
                    raise VerificationError(
                        f"{what} does not run in ONNX Runtime: {runtime.describe(exc)}") from exc
                for name, value in zip(outputs_, values, strict=True):
                    value = output_array(value)  # a sequence of several shapes: one flat array
                    if name in keep_set:
                        kept.put(name, index, value)  # type: ignore[union-attr]
                    if name in wanted:
                        callback(index, name, value)
                    if following is not None and name in extra:
                        following.put(name, index, value)
                if following is not None:
                    for name in carry:
                        following.put(name, index, inner.get(name, index))  # type: ignore[union-attr]
            del sess
            if inner is not None:
                inner.close()
            inner = following
    finally:
        if inner is not None:
            inner.close()


# ---------------------------------------------------------------------- frontier cache
#: bytes of cached tensors held in memory; beyond it they are written to temporary files
CACHE_BYTES = 512 << 20


class TensorCache:
    """Tensors of every batch, by name: in memory up to ``limit`` bytes, then in ``.npy``
    files of a temporary folder (under ``data_dir`` when given), so that memory stays
    bounded whatever the number of samples."""

    def __init__(self, limit: int = CACHE_BYTES, data_dir: Path | None = None) -> None:
        self.limit = limit
        self.data_dir = data_dir
        self.held = 0
        self._values: dict[str, dict[int, np.ndarray | Path]] = {}
        self._types: dict[str, int] = {}
        #: cached names -> the size of each axis where every batch has the same (else None)
        self._shapes: dict[str, list[int | None]] = {}
        self._folder: scratch.Folder | None = None

    def types(self) -> dict[str, int]:
        """Cached names -> ONNX element type."""
        return dict(self._types)

    def shapes(self) -> dict[str, list[int | None]]:
        """Cached names -> each axis' size where every batch agrees on it (``None``: not)."""
        return {name: list(dims) for name, dims in self._shapes.items()}

    def put(self, name: str, batch: int, value: np.ndarray) -> None:
        self._types[name] = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        seen = self._shapes.get(name)
        self._shapes[name] = list(value.shape) if seen is None else (
            [a if a == b else None for a, b in zip(seen, value.shape, strict=True)]
            if len(seen) == value.ndim else [None] * value.ndim)
        if self.held + value.nbytes <= self.limit:
            self._values.setdefault(name, {})[batch] = value
            self.held += value.nbytes
            return
        if self._folder is None:
            self._folder = scratch.Folder("gp-cache-", self.data_dir)
        path = Path(self._folder.name) / f"{len(self._types)}-{uuid.uuid4().hex[:8]}-{batch}.npy"
        np.save(path, value)
        self._values.setdefault(name, {})[batch] = path

    def take_over(self, other: TensorCache, name: str) -> None:
        """Move ``name`` (every batch) from ``other``: arrays by reference, files by rename."""
        values = other._values.pop(name, {})
        dtype = other._types.pop(name, None)
        shape = other._shapes.pop(name, None)
        if dtype is None:
            return
        self._types[name] = dtype
        if shape is not None:
            self._shapes[name] = shape
        for batch, value in values.items():
            if isinstance(value, Path):
                if self._folder is None:
                    self._folder = scratch.Folder("gp-cache-", self.data_dir)
                target = Path(self._folder.name) / value.name
                os.replace(value, target)
                value = target
            else:
                other.held -= value.nbytes
                self.held += value.nbytes
            self._values.setdefault(name, {})[batch] = value

    def get(self, name: str, batch: int) -> np.ndarray:
        value = self._values[name][batch]
        return np.load(value) if isinstance(value, Path) else value

    def close(self) -> None:
        self._values.clear()
        self._types.clear()
        self.held = 0
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def downstream(graph: onnx.GraphProto, sources: Iterable[str]) -> set[str]:
    """``sources`` and every tensor computed from them (graph order is topological)."""
    out = set(sources)
    for node in graph.node:
        if any(n in out for n in node_reads(node)):
            out.update(o for o in node.output if o)
    return out


def produced(graph: onnx.GraphProto) -> set[str]:
    """Every tensor a node computes."""
    return set(producers(graph))


def computed(graph: onnx.GraphProto, names: Sequence[str], given: dict[str, int]) -> set[str]:
    """Tensors a run of ``names`` has at hand: what its nodes compute and what it is fed."""
    needed = needed_nodes(graph, names, given)
    return {o for i in needed for o in graph.node[i].output} | set(given)


def frontier(graph: onnx.GraphProto, later: Iterable[str], unstable: set[str]) -> list[str]:
    """Tensors worth caching for later runs that compute ``later``: those not in
    ``unstable`` (they will not change before then) that a node computing an unstable
    tensor on the way to ``later`` reads, and the stable ``later`` tensors themselves."""
    later = list(later)
    made = producers(graph)
    out = {n for n in later if n not in unstable and n in made}
    for index in needed_nodes(graph, later):
        node = graph.node[index]
        if any(o in unstable for o in node.output):
            out.update(n for n in node_reads(node) if n in made and n not in unstable)
    return sorted(out - not_tensors(graph))  # (no fed input can be declared a sequence)


def outputs(model: onnx.ModelProto, feeds: Sequence[Feed], what: str = "the model", data_dir: Path | None = None,
            also: Sequence[str] = ()) -> list[list[np.ndarray]]:
    """The graph outputs of ``model`` on every feed, in the graph's output order (a sequence of maps,
    ZipMap's, as a samples x labels array), then the tensors ``also`` names (``None``: no node computes it)."""
    width, here = len(model.graph.output), {name for node in model.graph.node for name in node.output} if also else ()
    names = [o.name for o in model.graph.output] + [name for name in also if name in here]
    position: dict[str, list[int]] = {}  # a graph may list one output twice
    for k, name in enumerate(names):
        position.setdefault(name, []).append(k)
    result: list[list[Any]] = [[None] * len(names) for _ in feeds]

    def take(index: int, name: str, value: np.ndarray) -> None:
        array = output_array(value)
        for k in position[name]:
            result[index][k] = array

    # an output that is a constant (an exporter's Identity of a weight, folded) is no
    # tensor a run computes: its value is the same for every feed
    constants = {t.name: t for t in model.graph.initializer if t.name in position}
    for name, tensor in constants.items():
        value = onnx.numpy_helper.to_array(tensor, base_dir=str(data_dir) if data_dir else "")
        for index in range(len(feeds)):
            take(index, name, value)
    computed = [name for name in position if name not in constants]
    if computed:
        # as deployed: ORT's optimizations on (QDQ patterns run as integer kernels)
        stream(model, computed, feeds, take, chunk_bytes=1 << 62, what=what, data_dir=data_dir, optimize=True)
    at = {name: width + k for k, name in enumerate(names[width:])}  # (``also`` in its order, absent ones None)
    return [row[:width] + [row[at[name]] if name in at else None for name in also] for row in result] if also else result


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
        if value.shape[:1] != (2,) or any(p.shape != (1, *value.shape[1:]) for p in parts):
            return False  # one sample per row, and rows of one size (a decoder's outputs may not be)
        ref = np.concatenate(parts, 0).astype(np.float64)
        scale = max(float(np.abs(ref).max()), 1e-12) if ref.size else 1.0
        if ref.shape != value.shape or float(np.abs(ref - value).max(initial=0.0)) > tolerance * scale:
            return False
    return True


#: estimated bytes of the tensors a model computes on one stacked batch (:func:`sample_bytes`
#: times the samples) above which fewer samples are stacked: ONNX Runtime holds a batch's
#: activations while it runs it, so a batch of large activations multiplies the peak memory
#: of every calibration run (statistics, refit, fidelity) by its samples
STACK_BYTES = 512 << 20


def _symbol_sizes(model: onnx.ModelProto, feed: Feed) -> dict[str, int]:
    """The sizes that ``feed`` gives the symbolic dimensions of ``model``'s inputs."""
    sizes: dict[str, int] = {}
    for value in model.graph.input:
        if value.name not in feed or not value.type.HasField("tensor_type"):
            continue
        dims, shape = value.type.tensor_type.shape.dim, np.shape(feed[value.name])
        if len(dims) != len(shape):
            continue
        for dim, size in zip(dims, shape, strict=True):
            if dim.HasField("dim_param") and dim.dim_param:
                sizes.setdefault(dim.dim_param, int(size))
    return sizes


def sample_bytes(model: onnx.ModelProto, feed: Feed) -> int:
    """Estimated bytes of every tensor that ``model`` computes on ``feed`` (one sample): the
    shapes its ``value_info`` and outputs declare at the inputs' sizes in ``feed``, and where
    a size is a symbol no input names (a paddle2onnx detector's every feature map) or a tensor
    has no shape, its shape from inference at the feed's sizes (:func:`concrete_shapes`). A
    size that stays unknown counts 1 (the estimate can only fall short)."""
    symbols = _symbol_sizes(model, feed)
    # name -> (itemsize, elements, whether every size is known): an unknown size counts 1
    declared: dict[str, tuple[int, int, bool]] = {}
    for value in [*model.graph.value_info, *model.graph.output]:
        if value.name in declared or not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        count, known = 1, tensor.HasField("shape")
        for dim in tensor.shape.dim if known else ():
            if dim.HasField("dim_value"):
                count *= max(int(dim.dim_value), 0)
            else:
                count *= symbols.get(dim.dim_param, 1)
                known = known and dim.dim_param in symbols
        declared[value.name] = (_itemsize(tensor.elem_type), count if tensor.HasField("shape") else 0, known)
    computed = {name for node in model.graph.node for name in node.output if name} | set(declared)
    computed -= {v.name for v in model.graph.input}
    concrete: dict[str, list[int]] = {}
    if any(not declared.get(name, (0, 0, False))[2] for name in computed):
        concrete = concrete_shapes(model, {k: np.shape(v) for k, v in feed.items()})
    total = 0
    for name in computed:
        itemsize, count, known = declared.get(name, (4, 0, False))
        if not known and name in concrete:
            count = int(np.prod(concrete[name], dtype=np.int64))
        total += itemsize * count
    return total


def _itemsize(elem_type: int) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except Exception:  # noqa: BLE001 - an undefined or exotic element type
        return 4


def stack_limit(model: onnx.ModelProto, feed: Feed, limit: int | None = None) -> int:
    """The most samples like ``feed`` whose stacked batch stays under ``limit`` (default
    :data:`STACK_BYTES`) of computed tensors; at least 1."""
    limit = STACK_BYTES if limit is None else limit
    return max(1, limit // max(sample_bytes(model, feed), 1))


def batches(
    model: onnx.ModelProto, feeds: Sequence[Feed], size: int = 16, data_dir: Path | None = None
) -> Batches:
    """``feeds`` in batches of up to ``size`` samples when the model allows it, and in two
    batches at least (the refit cross-validates its ridge on even against odd batches: with
    one batch it could not, and a few samples are where a fixed ridge overfits most). A
    batch holds at most :data:`STACK_BYTES` of computed tensors (:func:`stack_limit`), so
    that the memory of a calibration run does not grow with the number of samples."""
    size = min(size, max(1, -(-len(feeds) // 2)))
    if size > 1 and _stackable(feeds):
        size = min(size, stack_limit(model, feeds[0]))
    if size > 1 and _stackable(feeds) and batch_separable(model, feeds, data_dir=data_dir):
        groups = [list(feeds[i : i + size]) for i in range(0, len(feeds), size)]
        return Batches([_stack(g) for g in groups], [len(g) for g in groups], True)
    return Batches(list(feeds), [1] * len(feeds), False)
