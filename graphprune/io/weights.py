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
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, helper

from graphprune.errors import InvalidModelError

#: tensors at least this large are kept in files (smaller ones stay in the proto)
MAP_THRESHOLD = 4096
_ALIGNMENT = 4096


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
            external_data_helper.load_external_data_for_tensor(tensor, str(self.path.parent))
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
    """Every constant of ``graph`` and of its subgraphs."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            yield tensor
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from graph_constants(value)


class WeightStore:
    """A private folder holding a model's weights (see the module docstring)."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="graphprune-")
        self.root = Path(self._tmp.name)
        self._work_count = 0
        self._models = 0
        #: the model came with its weights in external data files (save it the same way)
        self.external_source = False

    def close(self) -> None:
        self._tmp.cleanup()

    # ------------------------------------------------------------------ intake
    def adopt(self, model: onnx.ModelProto, source_dir: str | os.PathLike[str] | None) -> None:
        """Move ``model``'s weights into the store (in place): tensors already external are
        linked from ``source_dir``; large in-proto tensors are written to a data file and
        cleared from the proto."""
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
                    if location not in linked:
                        self._link(Path(os.fspath(source_dir)) / location, location)
                        linked.add(location)
                    continue
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < MAP_THRESHOLD:
                    continue
                if stream is None:
                    stream = open(self.root / data_name, "wb")  # noqa: SIM115
                data = tensor.raw_data
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

    def _link(self, source: Path, location: str) -> None:
        target = self.root / location
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            return
        # a hard link (ONNX Runtime follows it; onnx.checker refuses links, so it checks a
        # skeleton instead: see checker_model); across file systems, a copy by the kernel
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)

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
        for tensor in _all_tensors(full):
            if _external(tensor):
                external_data_helper.load_external_data_for_tensor(tensor, str(self.root))
                tensor.ClearField("data_location")
                del tensor.external_data[:]
        return full

    def copy_bytes(self, stub: onnx.TensorProto, stream: Any, chunk: int = 64 * 2**20) -> int:
        """Stream the bytes of an external ``stub`` of this store into ``stream``."""
        info = external_data_helper.ExternalDataInfo(stub)
        path = self.root / info.location
        offset = int(info.offset or 0)
        length = int(info.length) if info.length else os.path.getsize(path) - offset
        with open(path, "rb") as source:
            source.seek(offset)
            left = length
            while left:
                block = source.read(min(chunk, left))
                if not block:
                    raise OSError(f"external data of '{stub.name}' is truncated")
                stream.write(block)
                left -= len(block)
        return length


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
