"""Weights held once: a model's tensors live in files, memory-mapped when read.

A :class:`WeightStore` is a private working folder. When a model is loaded into it, every
large tensor's bytes go to a data file in that folder (the caller's external data file is
hard-linked into the store, or copied by the kernel across file systems) and the ``ModelProto`` keeps only external-data stubs:
the graph is small, and a weight costs memory only while someone reads it. Reading is a
copy-on-write memory map (:class:`MappedValues`), so nothing can write back into the
user's files; :func:`release` hands a mapped tensor's pages back to the kernel once it has
been scored. New tensors (the sliced weights of a rewrite) are spilled into a work data
file of the store by :meth:`WeightStore.spill`, so a pruned model never needs a second
in-memory copy of its weights either.

ONNX Runtime sessions and ``onnx.checker`` read models of the store by path
(:meth:`WeightStore.write_model`); :func:`graphprune.io.model_io.save_model` streams the
bytes of external stubs from the store into the output's data file.
"""

from __future__ import annotations

import mmap
import os
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, helper, numpy_helper

from graphprune.errors import InvalidModelError
from graphprune.io import scratch, sparse
from graphprune.io.graph_reads import subgraphs_of
from graphprune.io.tensor_protos import check_fits

#: tensors at least this large are kept in files (smaller ones stay in the proto)
MAP_THRESHOLD = 4096
_ALIGNMENT = 4096
#: the model file itself, linked into the store, when its initializers' bytes are read there
_SOURCE_LOCATION = "_gp_source.onnx"


def _np_dtype(data_type: int) -> np.dtype | None:
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except Exception:
        return None
    if dtype.kind not in "biuf" or data_type in (onnx.TensorProto.BFLOAT16,):
        return None
    return dtype


def _external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


class MappedValues(gs.ir.tensor.LazyValues):
    """gs lazy values of an external-data tensor: a copy-on-write memory map on ``load``."""

    def __init__(self, stub: onnx.TensorProto, path: Path, offset: int, length: int,
                 store: WeightStore | None = None) -> None:
        super().__init__(stub)
        self.path, self.offset, self.length = path, offset, length
        self.array: np.ndarray | None = None
        self.store = store  # the store's folder lives as long as a tensor refers to it

    def load(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        dtype = _np_dtype(self.tensor.data_type)
        shape = tuple(int(d) for d in self.tensor.dims)
        count = int(np.prod(shape)) if shape else 1
        if dtype is None or count == 0 or self.length < count * dtype.itemsize:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(self.tensor)
            with open(self.path, "rb") as source:
                source.seek(self.offset)
                tensor.raw_data = source.read(self.length)
            tensor.ClearField("data_location")
            del tensor.external_data[:]
            return np.array(onnx.numpy_helper.to_array(tensor))
        array = np.memmap(self.path, dtype=dtype, mode="c", offset=self.offset, shape=shape)
        self.array = array
        array._gp_origin = self  # the array keeps its source alive (gs drops the lazy values)
        return array


def origin(values: Any) -> MappedValues | None:
    """The mapped source of an array :class:`MappedValues` produced (``None`` otherwise)."""
    found = getattr(values, "__dict__", {}).get("_gp_origin") if isinstance(values, np.memmap) else None
    return found if found is not None and found.array is values else None


def release(values: Any) -> None:
    """Give the pages of a memory-mapped array back to the kernel (they re-read on use)."""
    source = values if isinstance(values, np.memmap) else None
    raw = getattr(source, "_mmap", None)
    if raw is None:
        return
    try:
        raw.madvise(mmap.MADV_DONTNEED)
    except (AttributeError, OSError, ValueError):
        pass


def restore_stubs(graph: gs.Graph) -> None:
    """Put the lazy stub back on every constant whose values are an untouched mapping, so
    export writes a reference instead of copying the bytes."""
    for tensor in graph_constants(graph):
        values = tensor._values
        if isinstance(values, np.ndarray):
            source = origin(values)
            if source is not None:
                tensor._values = source
            elif getattr(tensor, "data_location", None) is not None:
                tensor.data_location = None  # new bytes in the proto, not a reference


def graph_constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Every constant of ``graph`` and of its subgraphs, and every tensor held in an
    attribute (a ``Constant`` node's ``value``: the store keeps large ones in its files too)."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            yield tensor
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from graph_constants(value)
            elif isinstance(value, gs.Constant):
                yield value


class WeightStore:
    """A private folder holding a model's weights (see the module docstring)."""

    def __init__(self) -> None:
        self.root = scratch.make("graphprune-")
        # removed with the last object that refers to the store (a result outlives its
        # session), or at exit; silently: letting it go is how a result is released
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.root), ignore_errors=True)
        self._work_count = 0
        self._models = 0
        #: the model came with its weights in external data files (save it the same way)
        self.external_source = False
        #: sparse initializers of the model, stored dense (graphprune.io.sparse)
        self.densified: list[str] = []

    def close(self) -> None:
        self._cleanup()

    # ------------------------------------------------------------------ intake
    def load(self, path: str | os.PathLike[str]) -> onnx.ModelProto:
        """Load the model file at ``path`` with its weights in the store (see :meth:`adopt`).

        A model with its weights inside the protobuf is read as a skeleton
        (:func:`graphprune.io.wire.scan_model`): its large initializers become references
        to their bytes in the model file itself (linked into the store), so neither the
        file's bytes nor a parsed copy of the weights are ever held in memory."""
        from graphprune.io import model_io, wire

        source = Path(os.fspath(path))
        scanned = None
        if source.is_file() and source.suffix.lower() not in model_io.TEXT_SUFFIXES:
            try:
                scanned = wire.scan_model(source, MAP_THRESHOLD)
            except OSError:
                scanned = None  # the ordinary path reports it
        if scanned is None:
            return self._load_parsed(source)
        skeleton, cuts = scanned
        model = onnx.ModelProto()
        try:
            model.ParseFromString(skeleton)
            inits = model.graph.initializer
            if any(c.index >= len(inits) or inits[c.index].HasField("raw_data") for c in cuts):
                raise ValueError("skeleton does not match its cuts")
        except Exception:  # not what the scan took it for: the ordinary path and its errors
            del skeleton
            return self._load_parsed(source)
        del skeleton
        model_io.check_structure(model, f"'{source}'")
        model_io.check_external_data(model, source)
        self.adopt(model, source.parent, cut={inits[c.index].name: c.length for c in cuts})
        self._link(source, _SOURCE_LOCATION)
        for cut in cuts:
            _make_stub(inits[cut.index], _SOURCE_LOCATION, cut.offset, cut.length)
        return model

    def take(self, source: Any) -> onnx.ModelProto:
        """A model from a path (:meth:`load`) or from anything else
        :func:`~graphprune.io.model_io.load_model` reads (:meth:`adopt`), with its weights in
        the store, as a fresh message: the cleared weight bytes go back with the old one's memory."""
        from graphprune.io import model_io

        if isinstance(source, str | os.PathLike):
            model = self.load(source)
        else:
            model = model_io.load_model(source)
            self.adopt(model, None)
        small = onnx.ModelProto()
        small.ParseFromString(model.SerializeToString())
        return small

    def _load_parsed(self, source: Path) -> onnx.ModelProto:
        from graphprune.io import model_io

        model = model_io.load_model(source, load_external_data=False)
        model_io.check_external_data(model, source)
        self.adopt(model, source.parent)
        return model

    def adopt(self, model: onnx.ModelProto, source_dir: str | os.PathLike[str] | None, *,
              cut: dict[str, int] | None = None) -> None:
        """Move ``model``'s weights into the store (in place): tensors already external are
        linked from ``source_dir``; large in-proto tensors are written to a data file and
        cleared from the proto. Sparse initializers become dense ones first (:attr:`densified`).
        Each tensor's data must fit its shape (``cut``: initializers whose bytes :meth:`load` left in the file: their length)."""
        self.densified.extend(sparse.densify(model.graph, source_dir))
        linked: set[str] = set()
        data_name = "weights.data"
        stream = None
        offset = 0
        try:
            for tensor in _all_tensors(model):
                if _external(tensor):
                    location = external_data_helper.ExternalDataInfo(tensor).location
                    if source_dir is None:
                        raise InvalidModelError(
                            f"tensor '{tensor.name}' keeps its data in an external file "
                            f"('{location}') that was not loaded; give the model's file path"
                        )
                    self.external_source = True
                    check_fits(tensor, None)
                    if location not in linked:
                        # copied, not linked: onnx refuses to read a data file with more
                        # than one link, so a link would break onnx.load / onnx.checker on
                        # the caller's own model for as long as this store lives
                        self._link(Path(os.fspath(source_dir)) / location, location, copy=True)
                        linked.add(location)
                    continue
                data = tensor.raw_data if tensor.HasField("raw_data") else None  # (a copy: read once)
                check_fits(tensor, len(data) if data is not None else (cut or {}).get(tensor.name))
                if data is None or len(data) < MAP_THRESHOLD:
                    continue
                if stream is None:
                    stream = open(self.root / data_name, "wb")  # noqa: SIM115
                pad = -offset % _ALIGNMENT
                if pad:
                    stream.write(b"\0" * pad)
                    offset += pad
                stream.write(data)
                _make_stub(tensor, data_name, offset, len(data))
                offset += len(data)
        finally:
            if stream is not None:
                stream.close()

    def _link(self, source: Path, location: str, *, copy: bool = False) -> None:
        # the file a symbolic link names (the Hugging Face cache links snapshots to blobs): a
        # hard link to the link itself would leave ONNX Runtime a relative link that resolves
        # to nothing in the store, or an absolute one out of it
        source = Path(os.path.realpath(source))
        target = self.root / location
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            return
        # a hard link (ONNX Runtime follows it; onnx.checker refuses links, so it checks a
        # skeleton instead: see checker_model); across file systems, or with ``copy``, a
        # copy-on-write clone where the file system has them, else a copy by the kernel
        if not copy:
            try:
                os.link(source, target)
                return
            except OSError:
                pass
        _clone_or_copy(source, target)

    # ------------------------------------------------------------------ graphs
    def map_graph(self, graph: gs.Graph) -> None:
        """Give every external-data constant of ``graph`` mapped lazy values."""
        for tensor in graph_constants(graph):
            values = tensor._values
            if isinstance(values, gs.ir.tensor.LazyValues) and not isinstance(values, MappedValues):
                stub = values.tensor
                if _external(stub):
                    tensor._values = self.mapped(stub)

    def mapped(self, stub: onnx.TensorProto) -> MappedValues:
        info = external_data_helper.ExternalDataInfo(stub)
        path = self.root / info.location
        offset = int(info.offset or 0)
        length = int(info.length) if info.length else os.path.getsize(path) - offset
        return MappedValues(stub, path, offset, length, self)

    def spill(self, graph: gs.Graph) -> int:
        """Write every large in-memory constant of ``graph`` to a work data file and map it
        back; returns the number of bytes written."""
        pending = [t for t in graph_constants(graph)
                   if isinstance(t._values, np.ndarray) and origin(t._values) is None
                   and t._values.nbytes >= MAP_THRESHOLD and _np_dtype_ok(t._values)]
        if not pending:
            return 0
        self._work_count += 1
        name = f"work-{self._work_count}.data"
        offset = written = 0
        with open(self.root / name, "wb") as stream:
            stubs = []
            for tensor in pending:
                array = np.ascontiguousarray(tensor._values)
                pad = -offset % _ALIGNMENT
                if pad:
                    stream.write(b"\0" * pad)
                    offset += pad
                stream.write(array.tobytes())
                stub = onnx.TensorProto()
                stub.name = tensor.name
                stub.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
                stub.dims.extend(array.shape)
                _make_stub(stub, name, offset, array.nbytes)
                stubs.append((tensor, stub))
                offset += array.nbytes
                written += array.nbytes
        for tensor, stub in stubs:
            tensor._values = self.mapped(stub)
        return written

    def write_zeroed(self, cuts: dict[str, tuple[onnx.TensorProto, list[tuple[int, Any]]]],
                     chunk_bytes: int = 8 * 2**20,
                     fills: dict[str, np.ndarray] | None = None) -> dict[str, onnx.TensorProto]:
        """Zeroed copies of external tensors of this store, written to a data file of the
        store: ``cuts`` maps a name to its stub and the ``(axis, indices)`` to zero. Returns
        the new stubs (same name, type and shape) by name. Tensors are copied a block of
        leading-axis rows at a time, so memory holds one block, never a whole weight;
        tensors whose type numpy cannot map are left out (the caller masks them instead).
        ``fills``: per name, the value that reads as zero (a quantized weight's zero point,
        broadcastable against the tensor) written instead of 0."""
        todo = {name: (stub, axes) for name, (stub, axes) in cuts.items()
                if _external(stub) and _np_dtype(stub.data_type) is not None and len(stub.dims)}
        if not todo:
            return {}
        self._work_count += 1
        name_of_file = f"zeroed-{self._work_count}.data"
        stubs: dict[str, onnx.TensorProto] = {}
        offset = 0
        with open(self.root / name_of_file, "wb") as stream:
            for name, (stub, axes) in todo.items():
                source = self.mapped(stub).load()
                pad = -offset % _ALIGNMENT
                if pad:
                    stream.write(b"\0" * pad)
                    offset += pad
                rows = max(1, chunk_bytes // max(1, source[:1].nbytes))
                indices = [(axis, _indices(idx, source.shape[axis])) for axis, idx in axes]
                leading = [idx for axis, idx in indices if axis == 0]
                others = [(axis, idx) for axis, idx in indices if axis != 0]
                fill = (fills or {}).get(name)
                full = None if fill is None else np.broadcast_to(np.asarray(fill).astype(source.dtype), source.shape)
                for start in range(0, source.shape[0], rows):
                    block = np.array(source[start:start + rows])
                    zero = 0 if full is None else full[start:start + len(block)]
                    for idx in leading:
                        local = idx[(idx >= start) & (idx < start + len(block))] - start
                        block[local] = 0 if full is None else zero[local]
                    for axis, idx in others:
                        index: list[Any] = [slice(None)] * block.ndim
                        index[axis] = idx
                        block[tuple(index)] = 0 if full is None else zero[tuple(index)]
                    stream.write(block.tobytes())
                    release(source)
                new = onnx.TensorProto()
                new.name, new.data_type = stub.name, stub.data_type
                new.dims.extend(stub.dims)
                _make_stub(new, name_of_file, offset, source.nbytes)
                offset += source.nbytes
                stubs[name] = new
        return stubs

    # ------------------------------------------------------------------ files
    def write_model(self, model: onnx.ModelProto, name: str | None = None) -> Path:
        """Write the (weight-free) ``model`` into the store; ORT and the checker load it from
        there with its external data resolved."""
        self._models += 1
        path = self.root / (name or f"model-{self._models}.onnx")
        path.write_bytes(model.SerializeToString())
        return path

    def write_checker_model(self, model: onnx.ModelProto, name: str | None = None) -> Path:
        """Write a copy of ``model`` for ``onnx.checker`` by path: every external reference
        points at one empty placeholder file. The checker reads no weight bytes, only asks
        that the file be a regular one (it refuses the links the store uses), so the check
        is the same and costs nothing."""
        placeholder = "checker-placeholder.data"
        (self.root / placeholder).touch()
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(model)
        for tensor in _all_tensors(skeleton):
            if _external(tensor):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = placeholder
        self._models += 1
        path = self.root / (name or f"check-{self._models}.onnx")
        path.write_bytes(skeleton.SerializeToString())
        return path

    def materialize(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` with every external tensor's bytes loaded into the proto."""
        full = onnx.ModelProto()
        full.CopyFrom(model)
        _inline_external(full, self.root)
        return full

    def hoist_source_stubs(self, model: onnx.ModelProto) -> None:
        """Move subgraph initializers that reference the linked source file up to the main
        graph (where ``If``/``Loop`` bodies still see them). graphsurgeon exports an outer
        weight that a body reads as an initializer of that body; ONNX Runtime checks the
        external data of subgraph tensors with onnx's checker, which refuses a file with
        more than one link ("potential hardlink attack"), so the model would not load."""
        main = model.graph
        present = {t.name for t in main.initializer}
        defined = present | {i.name for i in main.input} | {o for n in main.node for o in n.output}

        def walk(graph: onnx.GraphProto) -> None:
            for node in graph.node:
                for sub in subgraphs_of(node):
                    moved = [t for t in sub.initializer if _external(t)
                             and external_data_helper.ExternalDataInfo(t).location == _SOURCE_LOCATION
                             and (t.name in present or t.name not in defined)]
                    for tensor in moved:
                        if tensor.name not in present:
                            main.initializer.add().CopyFrom(tensor)
                            present.add(tensor.name)
                            defined.add(tensor.name)
                    if moved:
                        names = {t.name for t in moved}
                        kept = [t for t in sub.initializer if t.name not in names]
                        del sub.initializer[:]
                        sub.initializer.extend(kept)
                    walk(sub)

        walk(main)

    def tensor_bytes(self, tensor: onnx.TensorProto) -> bytes:
        """The bytes of a tensor of this store's models, external or in the proto."""
        if _external(tensor):
            return read_external_bytes(tensor, self.root)
        return tensor.raw_data or numpy_helper.to_array(tensor).tobytes()

    def copy_bytes(self, stub: onnx.TensorProto, stream: Any, chunk: int = 4 * 2**20) -> int:
        """Stream the bytes of an external ``stub`` of this store into ``stream`` (by the
        kernel where it can: the bytes never pass through this process's memory)."""
        info = external_data_helper.ExternalDataInfo(stub)
        path = self.root / info.location
        offset = int(info.offset or 0)
        length = int(info.length) if info.length else os.path.getsize(path) - offset
        with open(path, "rb") as source:
            left = length
            if _kernel_copy(source, stream, offset, length):
                left = 0
            source.seek(offset)
            while left:
                block = source.read(min(chunk, left))
                if not block:
                    raise OSError(f"external data of '{stub.name}' is truncated")
                stream.write(block)
                left -= len(block)
        return length

    def inlinable(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` ready for :func:`graphprune.io.wire.write_inline`: external tensors
        anywhere but among the top-level initializers (subgraphs, node attributes) loaded
        into a copy; ``model`` itself when there are none."""
        nested = [t for node in model.graph.node for t in _node_tensors(node) if _external(t)]
        if not nested:
            return model
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for node in copy.graph.node:
            for tensor in _node_tensors(node):
                if _external(tensor):
                    tensor.raw_data = read_external_bytes(tensor, self.root)
                    tensor.ClearField("data_location")
                    del tensor.external_data[:]
        return copy


def load_whole(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The model file at ``path`` with every external tensor's bytes loaded into the proto
    (read directly: the files may be the store's hard links, which onnx's loader refuses)."""
    model = onnx.load_model(os.fspath(path), load_external_data=False)
    _inline_external(model, Path(os.fspath(path)).parent)
    return model


def _inline_external(model: onnx.ModelProto, root: Path) -> None:
    """Load every external tensor of ``model`` (files in ``root``) into the proto."""
    for tensor in _all_tensors(model):
        if _external(tensor):
            tensor.raw_data = read_external_bytes(tensor, root)
            tensor.ClearField("data_location")
            del tensor.external_data[:]


def read_external_bytes(stub: onnx.TensorProto, root: Path) -> bytes:
    """The bytes of an external ``stub`` whose file lies in ``root`` (onnx's own reader
    refuses the store's hard links)."""
    info = external_data_helper.ExternalDataInfo(stub)
    path = root / info.location
    offset = int(info.offset or 0)
    length = int(info.length) if info.length else os.path.getsize(path) - offset
    with open(path, "rb") as source:
        source.seek(offset)
        data = source.read(length)
    if len(data) != length:
        raise OSError(f"external data of '{stub.name}' is truncated")
    return data


def _indices(idx: Any, size: int) -> np.ndarray:
    """Positions (non-negative integers) of an index array or a boolean mask."""
    idx = np.asarray(idx)
    if idx.dtype == bool:
        return np.flatnonzero(idx)
    return np.where(idx < 0, idx + size, idx).astype(np.int64)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    """Tensors held by ``node``'s attributes and subgraphs (initializers included)."""
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            yield from sub.initializer
            for inner in sub.node:
                yield from _node_tensors(inner)


def _clone_or_copy(source: Path, target: Path) -> None:
    """A reflink clone (btrfs, xfs, ...: no data copied) or a kernel copy of ``source``."""
    try:
        import fcntl

        with open(source, "rb") as src, open(target, "wb") as dst:
            fcntl.ioctl(dst.fileno(), 0x40049409, src.fileno())  # FICLONE
        return
    except (OSError, ImportError):
        target.unlink(missing_ok=True)
    shutil.copyfile(source, target)


def _kernel_copy(source: Any, stream: Any, offset: int, length: int) -> bool:
    """``length`` bytes of ``source`` from ``offset`` appended to ``stream`` by
    ``os.copy_file_range``; False (nothing written) where that is not possible."""
    copy_range = getattr(os, "copy_file_range", None)
    try:
        target = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if copy_range is None or length == 0:
        return False
    stream.flush()
    start = os.lseek(target, 0, os.SEEK_CUR)
    done = 0
    try:
        while done < length:
            n = copy_range(source.fileno(), target, length - done, offset + done)
            if n <= 0:
                raise OSError("short copy")
            done += n
    except OSError:
        os.lseek(target, start, os.SEEK_SET)
        os.ftruncate(target, start)
        stream.seek(start)
        return False
    stream.seek(start + length)
    return True


def _np_dtype_ok(array: np.ndarray) -> bool:
    try:
        helper.np_dtype_to_tensor_dtype(array.dtype)
    except Exception:
        return False
    return array.dtype.kind in "biuf"


def _make_stub(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from external_data_helper._get_all_tensors(model)
