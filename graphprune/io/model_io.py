"""Load, check, upgrade, shape-infer and save ONNX models.

Everything that touches files or the protobuf size limit lives here. Two facts shape this module:

* protobuf cannot serialize a message of 2 GiB or more (``ByteSize()`` itself fails), so large
  models keep their weights in an external data file, and no C++ round trip (shape inference,
  version conversion) may carry the weights;
* ``onnx.save_model(..., save_as_external_data=True)`` rewrites the tensors of the model it is
  given; we never mutate a caller's model, so we build a *skeleton*: a copy whose large tensors
  are external-data references, made without copying the weight bytes.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper

from graphprune.errors import InvalidModelError, UnsupportedOpsetError, UsageError
from graphprune.io._atomic import create_temporary
from graphprune.io.names import undefined_reads, unreadable_names
from graphprune.io.tensor_protos import (  # noqa: F401  (re-exported for the tests)
    _DETACH_THRESHOLD,
    _DETACHED_LOCATION,
    _PACKED,
    TensorConverter,
    _copy_except,
    _copy_graph,
    _copy_model,
    _copy_node,
    _detach,
    _external_stub,
    _external_tensors,
    _graph_tensors,
    _is_repeated,
    _model_tensors,
    _node_tensors,
    _raw_size,
    _reattach,
    nbytes,
)

__all__ = ["MIN_OPSET", "ModelSource", "check_opset", "default_opset", "infer_shapes", "load_model",
           "model_size_bytes", "save_model", "upgrade_opset"]

MIN_OPSET = 1
"""The oldest default-domain opset accepted (old ones are converted: :func:`upgrade_opset`)."""
MIN_TARGET_OPSET = 7
"""The oldest opset :func:`upgrade_opset` converts to (the rules know opsets from 7 on)."""

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto
"""Anything :func:`load_model` accepts."""

PROTOBUF_LIMIT = 2**31
"""protobuf refuses to serialize a message of this size or more."""

EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20
"""Above this many bytes :func:`save_model` writes weights to an external data file."""

_DEFAULT_DOMAINS = ("", "ai.onnx")
_ALIGNMENT = 4096
_LARGE_ALIGNMENT = 65536  # mmap allocation granularity on Windows; ORT can map such tensors
_SHORT_CAUSE = 200
TEXT_SUFFIXES = (".json", ".onnxtxt", ".txtpb", ".textproto", ".txt")  # onnx.load_model reads as text


# --------------------------------------------------------------------------- errors


def _short(exc: BaseException) -> str:
    """A one-line, bounded description of ``exc`` for an error message."""
    text = str(exc).strip().splitlines()
    line = (text[0].strip() if text else "") or type(exc).__name__
    if len(line) > _SHORT_CAUSE:
        line = line[: _SHORT_CAUSE - 3] + "..."
    return line


# --------------------------------------------------------------------------- load


def load_model(source: ModelSource, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load a model from a path, serialized bytes or a ``ModelProto`` (deep-copied).

    Raises InvalidModelError for a missing file, bytes that are not an ONNX model (including
    random bytes that happen to parse as a protobuf) and missing or short external data.
    """
    if isinstance(source, onnx.ModelProto):
        model = copy.deepcopy(source)
        _check_structure(model, "the given ModelProto")
        return model
    if isinstance(source, bytes | bytearray | memoryview):
        return _load_bytes(bytes(source), load_external_data=load_external_data)
    if isinstance(source, str | os.PathLike):
        return _load_path(Path(os.fspath(source)), load_external_data=load_external_data)
    raise UsageError(
        f"cannot load a model from {type(source).__name__}; "
        "give a path, bytes or an onnx.ModelProto"
    )


#: files people mistake for ONNX models, by their first bytes: what they are and what to do
_OTHER_FORMATS = (
    (4, b"ORTM", "an ONNX Runtime .ort file, the flatbuffer format of its mobile builds: give the "
                 ".onnx model it was converted from"),
    (4, b"TFL3", "a TensorFlow Lite model: convert it first with python -m tf2onnx.convert --tflite FILE "
                 "--output FILE.onnx"),
    (0, b"PK\x03\x04", "a zip archive, a PyTorch checkpoint or a .keras file perhaps: export the model "
                        "to ONNX first with graphprune export torch|keras"),
)


def _format_hint(path: Path) -> str:
    """``"; it is ..."`` (what the file is instead, and what to do) for a known other format,
    else empty."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(8)
    except OSError:
        return ""
    for offset, magic, what in _OTHER_FORMATS:
        if head[offset:offset + len(magic)] == magic:
            return f"; it is {what}"
    return ""


def _load_path(path: Path, *, load_external_data: bool) -> onnx.ModelProto:
    if not path.exists():
        raise InvalidModelError(f"no such file: {path}")
    if not path.is_file():
        raise InvalidModelError(f"not a file: {path}")
    try:
        model = onnx.load_model(os.fspath(path), load_external_data=False)
    except OSError as exc:
        raise InvalidModelError(f"cannot read '{path}': {_short(exc)}") from exc
    except Exception as exc:  # DecodeError, or onnx's own parse errors for text formats
        raise InvalidModelError(f"'{path}' is not a valid ONNX model: {_short(exc)}{_format_hint(path)}") from exc
    _check_structure(model, f"'{path}'")
    if load_external_data:
        _load_external_data(model, path.parent, f"'{path}'")
    return model


def check_external_data(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Check that the external data files of the model loaded from ``path`` exist and are
    long enough, without loading them (InvalidModelError otherwise)."""
    path = Path(os.fspath(path))
    _load_external_data(model, path.parent, f"'{path}'", load=False)


def _load_bytes(data: bytes, *, load_external_data: bool) -> onnx.ModelProto:
    what = "the given bytes"
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:
        raise InvalidModelError(f"{what} are not a valid ONNX model: {_short(exc)}") from exc
    _check_structure(model, what)
    if load_external_data:
        locations = sorted(
            {_external_info(tensor, what).location for tensor in _external_tensors(model)}
        )
        if locations:
            raise InvalidModelError(
                f"{what} refer to external data ({', '.join(locations)}) that cannot be "
                "found without a directory; load the model from its file path instead"
            )
    return model


def _check_structure(model: onnx.ModelProto, what: str) -> None:
    """Reject protobufs that parse but are not a usable ONNX model."""
    problem = None
    if model.ir_version <= 0:
        problem = "it has no IR version"
    elif not model.HasField("graph"):
        problem = "it has no graph"
    elif len(model.graph.node) == 0:
        problem = "its graph has no nodes"
    elif len(model.graph.output) == 0:
        problem = "its graph has no outputs"
    problem = problem or unreadable_names(model.graph, model) or undefined_reads(model.graph)
    if problem is not None:
        verb = "are" if what.endswith("bytes") else "is"
        raise InvalidModelError(f"{what} {verb} not a valid ONNX model: {problem}")


check_structure = _check_structure


def _load_external_data(
    model: onnx.ModelProto, base_dir: Path, what: str, *, load: bool = True
) -> None:
    """Check that every external data file exists and is long enough, then load it
    (``load=False``: only check; the weights stay on disk)."""
    tensors = list(_external_tensors(model))
    if not tensors:
        return
    base = os.path.normpath(os.path.abspath(base_dir))
    for tensor in tensors:
        info = _external_info(tensor, what)
        location = info.location
        file = os.path.normpath(os.path.join(base, location))
        if not location or os.path.isabs(location) or os.path.commonpath([base, file]) != base:
            raise InvalidModelError(
                f"{what}: tensor '{tensor.name}' points to external data outside the model "
                f"directory ({location!r})"
            )
        if not os.path.isfile(file):
            raise InvalidModelError(
                f"{what}: external data file '{file}' (for tensor '{tensor.name}') does not exist"
            )
        if info.length is not None:
            end = (info.offset or 0) + info.length
            size = os.path.getsize(file)
            if size < end:
                raise InvalidModelError(
                    f"{what}: external data file '{file}' is truncated: tensor "
                    f"'{tensor.name}' needs bytes up to {end}, the file has {size}"
                )
    if not load:
        return
    try:
        external_data_helper.load_external_data_for_model(model, base)
    except Exception as exc:
        raise InvalidModelError(f"{what}: cannot load external data: {_short(exc)}") from exc
    for tensor in tensors:  # onnx sets DEFAULT explicitly; clear it so round trips compare equal
        tensor.ClearField("data_location")


def _external_info(tensor: onnx.TensorProto, what: str) -> external_data_helper.ExternalDataInfo:
    try:
        return external_data_helper.ExternalDataInfo(tensor)
    except ValueError as exc:
        raise InvalidModelError(
            f"{what}: tensor '{tensor.name}' has invalid external data: {_short(exc)}"
        ) from exc


# --------------------------------------------------------------------------- size


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of ``model`` in bytes; an estimate when it exceeds protobuf's limit."""
    if sum(_raw_size(t) for t in _model_tensors(model)) < PROTOBUF_LIMIT:
        with contextlib.suppress(Exception):  # upb refuses ByteSize() for messages of 2 GiB or more
            return int(model.ByteSize())
    skeleton, detached = _detach(model)
    return int(skeleton.ByteSize()) + sum(_raw_size(t) for t in detached)


# --------------------------------------------------------------------------- opsets


def default_opset(model: onnx.ModelProto) -> int:
    """The default-domain ('' or 'ai.onnx') opset the model imports (of other domains' ops only,
    an ``ai.onnx.ml`` classifier need not import it: the newest ONNX knows)."""
    for opset in model.opset_import:
        if opset.domain in _DEFAULT_DOMAINS:
            return int(opset.version)
    if model.opset_import and not any(n.domain in _DEFAULT_DOMAINS for n in model.graph.node):
        return onnx.defs.onnx_opset_version()
    raise InvalidModelError("model does not import the default ONNX opset (domain '' or 'ai.onnx')")


def check_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset (UnsupportedOpsetError below it, InvalidModelError past onnx's IR
    version or opset)."""
    if model.ir_version > onnx.IR_VERSION:
        raise InvalidModelError(f"the model's IR version {model.ir_version} is newer than onnx reads ({onnx.IR_VERSION})")
    version = default_opset(model)
    if version < MIN_OPSET:
        raise UnsupportedOpsetError(f"model uses opset {version}; graphprune supports opset >= {MIN_OPSET}")
    if version > onnx.defs.onnx_opset_version():  # (ONNX Runtime then fails with a C++ message)
        raise InvalidModelError(f"model uses opset {version}, newer than this onnx {onnx.__version__} knows "
                                f"({onnx.defs.onnx_opset_version()})")
    return version


def upgrade_opset(model: onnx.ModelProto, target: int = 13) -> onnx.ModelProto:
    """Convert the model to default opset ``target`` if it is older; otherwise return it as is."""
    newest = onnx.defs.onnx_opset_version()
    if not MIN_TARGET_OPSET <= target <= newest:
        raise UsageError(f"target opset must be between {MIN_TARGET_OPSET} and {newest}, got {target}")
    current = check_opset(model)
    if current >= target:
        return model
    from graphprune.io.converter_semantics import convert  # (imports the rules)

    skeleton, detached = _detach(model)
    # IR 3 files without their initializers among the inputs (OnnxMLTools), converted as IR 4
    skeleton.ir_version = max(skeleton.ir_version, 4)
    try:
        converted = convert(skeleton, current, target)
    except Exception as exc:
        raise InvalidModelError(f"cannot convert the model from opset {current} to opset {target}: {_short(exc)}") \
            from exc
    _reattach(converted, detached)
    # IR >= 4: the constants the converter adds (Pad's pads) need not be graph inputs
    converted.ir_version = max(converted.ir_version, 7)
    return converted


# --------------------------------------------------------------------------- shape inference


def infer_shapes(model: onnx.ModelProto, *, inplace: bool = False) -> onnx.ModelProto:
    """``model`` with inferred shapes (data propagation on, partial results kept).

    Large weights are detached before the model goes to C++, so this works for models over
    2 GiB and does not copy weights through protobuf serialization; only the inferred
    ``value_info`` and output types are copied back. With ``inplace=True`` the caller's
    model is annotated and returned (no copy of the weights at all). Inference that fails on
    a model the ONNX checker accepts only warns (``RuntimeWarning``) and returns the model
    unchanged; a model the checker rejects raises InvalidModelError.
    """
    skeleton, _ = _detach(model)
    target = model if inplace else copy.deepcopy(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            skeleton, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as exc:
        try:
            onnx.checker.check_model(skeleton)
        except Exception as check_exc:
            if "should be stored in" in str(check_exc):  # the skeleton's own weight stubs, not the model
                raise InvalidModelError(f"model fails ONNX shape inference: {_short(exc)}") from exc
            raise InvalidModelError(
                f"model fails the ONNX checker: {_short(check_exc)}"
            ) from check_exc
        warnings.warn(
            f"shape inference failed, continuing without inferred shapes: {_short(exc)}",
            RuntimeWarning,
            stacklevel=2,
        )
        return target
    _copy_inferred(inferred.graph, target.graph)
    return target


def concrete_shapes(model: onnx.ModelProto, input_shapes: dict[str, Any]) -> dict[str, list[int]]:
    """Shapes of the main graph's tensors, all dims known, when the graph inputs have
    ``input_shapes`` (``{name: shape}``; inputs not named keep their declared shape): ONNX
    shape inference with data propagation on a weightless skeleton. Tensors left with an
    unknown dim are absent; ``{}`` when inference fails."""
    skeleton, _ = _detach(model)
    for value in skeleton.graph.input:
        shape = input_shapes.get(value.name)
        if shape is None or not value.type.HasField("tensor_type"):
            continue
        declared = value.type.tensor_type.shape
        declared.ClearField("dim")
        for size in shape:
            declared.dim.add().dim_value = int(size)
    from graphprune.io.custom_shapes import at_observed_sizes

    # custom operators' outputs at the sizes their run gave (those that follow the inputs: open)
    custom = at_observed_sizes(skeleton.graph.value_info, varying=not input_shapes)
    del skeleton.graph.value_info[:]
    skeleton.graph.value_info.extend(custom)
    for value in skeleton.graph.output:
        if value.type.HasField("tensor_type"):
            value.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    shapes: dict[str, list[int]] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
            shapes[value.name] = [int(d.dim_value) for d in dims]
    return shapes


def keep_value_info(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """``model`` with the main graph's ``value_info`` cut to ``names`` (in place)."""
    kept = [v for v in model.graph.value_info if v.name in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model


def _copy_inferred(source: onnx.GraphProto, target: onnx.GraphProto) -> None:
    """Copy inferred value_info and input/output types from ``source`` into ``target``."""
    del target.value_info[:]
    # a value_info for a graph input or output (quantization tools write shapeless ones)
    # would hide the declared type from graphsurgeon, and the output would lose its shape
    declared = {v.name for v in (*source.input, *source.output)}
    target.value_info.extend(v for v in source.value_info if v.name not in declared)
    for field in ("input", "output"):
        src, dst = getattr(source, field), getattr(target, field)
        for s_value, d_value in zip(src, dst, strict=False):
            if s_value.name == d_value.name:
                d_value.CopyFrom(s_value)
    subgraphs = {}
    for node in source.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                subgraphs[(node.name, node.op_type, attr.name, len(subgraphs))] = attr.g
    index = 0
    for node in target.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                key = (node.name, node.op_type, attr.name, index)
                if key in subgraphs:
                    _copy_inferred(subgraphs[key], attr.g)
                index += 1


# --------------------------------------------------------------------------- save


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _input_data_files(input_path: Path) -> list[Path]:
    """External data files of the model at ``input_path`` (best effort; empty if unreadable)."""
    from graphprune.io.wire import scan_model

    try:
        # only the references matter: the skeleton, without the weights inside the file
        scanned = None if input_path.suffix.lower() in TEXT_SUFFIXES else scan_model(
            input_path, 64)
        if scanned is not None:
            model = onnx.ModelProto()
            model.ParseFromString(scanned[0])
        else:
            model = onnx.load_model(os.fspath(input_path), load_external_data=False)
    except Exception:
        return []
    files = []
    for tensor in _external_tensors(model):
        try:
            location = external_data_helper.ExternalDataInfo(tensor).location
        except ValueError:
            continue
        files.append(input_path.parent / location)
    return files


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    input_path: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    size_threshold: int = 1024,
    store: Any = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    Refuses to overwrite ``input_path`` (or its external data). ``external_data=None`` writes
    weights to ``<name>.data`` next to the model only when the model is too large for one
    protobuf; ``True`` forces it for every raw tensor of ``size_threshold`` bytes or more.
    Both files are written to temporary files and renamed into place; on failure nothing is
    left at ``path``. The caller's model is never modified.
    """
    target = Path(os.fspath(path))
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"output directory does not exist: {parent}")
    if target.is_dir():
        raise UsageError(f"output path is a directory: {target}")
    data_target = parent / f"{target.name}.data"

    protected: list[Path] = []
    if input_path is not None:
        source = Path(os.fspath(input_path))
        if _same_file(target, source):
            raise UsageError(f"output path is the input path: {target}")
        if source.is_file():
            protected = _input_data_files(source)

    unloaded = [t.name for t in _external_tensors(model)]
    inline = None
    if unloaded and store is not None:
        # weights held by a graphprune.io.weights.WeightStore: stream them from there
        size = model_size_bytes(model) + sum(nbytes(t) for t in _external_tensors(model))
        if (size <= EXTERNAL_DATA_THRESHOLD if external_data is None else not external_data):
            # one protobuf, written field by field with each weight streamed into it
            model, inline, unloaded = store.inlinable(model), store, []
    if unloaded and store is None:
        raise UsageError(
            f"tensor '{unloaded[0]}' keeps its data in an external file that was not loaded; "
            "load the model with load_external_data=True before saving it"
        )

    size = model_size_bytes(model) + sum(nbytes(t) for t in _external_tensors(model))
    use_external = size > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    use_external = use_external or bool(unloaded)
    if not use_external and size >= PROTOBUF_LIMIT:
        raise UsageError(
            f"model is {size} bytes, over protobuf's 2 GiB limit; save it with external data"
        )
    written = [target, data_target] if use_external else [target]
    for out in written:
        for data_file in protected:
            if _same_file(out, data_file):
                raise UsageError(f"output would overwrite the input model's data file: {out}")

    temporaries: list[str] = []
    try:
        if use_external:
            data_temp = _temporary(parent, data_target.name, temporaries)
            with open(data_temp, "wb") as stream:
                skeleton = _write_external(model, stream, data_target.name, size_threshold,
                                           store=store)
                _sync(stream)
            model_bytes = skeleton.SerializeToString()
        elif inline is None:
            model_bytes = model.SerializeToString()
        model_temp = _temporary(parent, target.name, temporaries)
        with open(model_temp, "wb") as stream:
            if inline is not None:
                from graphprune.io.wire import write_inline

                write_inline(model, stream, inline.copy_bytes,
                             external_data_helper.uses_external_data, nbytes)
            else:
                stream.write(model_bytes)
            _sync(stream)
        if use_external:
            os.replace(data_temp, data_target)
        os.replace(model_temp, target)
        temporaries.clear()
    except OSError as exc:
        raise UsageError(f"cannot write '{target}': {_short(exc)}") from exc
    finally:
        for temporary in temporaries:
            try:
                os.remove(temporary)
            except OSError:
                pass
    return target


def _temporary(directory: Path, name: str, registry: list[str]) -> str:
    """Create an empty temporary file next to the final file; remember it for cleanup."""
    handle, temporary = create_temporary(directory / name)  # umask respected, not 0600
    os.close(handle)
    registry.append(temporary)
    return temporary


def _sync(stream: Any) -> None:
    stream.flush()
    os.fsync(stream.fileno())


def _write_external(
    model: onnx.ModelProto, stream: Any, location: str, size_threshold: int, store: Any = None
) -> onnx.ModelProto:
    """Write large raw tensors to ``stream``; return a skeleton that refers to them.
    External stubs of ``store`` (a WeightStore) are streamed from it."""
    offset = 0

    def convert(tensor: onnx.TensorProto) -> onnx.TensorProto | None:
        nonlocal offset
        if store is not None and external_data_helper.uses_external_data(tensor):
            length = nbytes(tensor)
            alignment = _LARGE_ALIGNMENT if length >= _DETACH_THRESHOLD else _ALIGNMENT
            padding = -offset % alignment
            if padding:
                stream.write(b"\0" * padding)
                offset += padding
            length = store.copy_bytes(tensor, stream)
            stub = _external_stub(tensor, location, offset, length)
            offset += length
            return stub
        if not tensor.HasField("raw_data") or _raw_size(tensor) < size_threshold:
            return None
        data = tensor.raw_data
        alignment = _LARGE_ALIGNMENT if len(data) >= _DETACH_THRESHOLD else _ALIGNMENT
        padding = -offset % alignment
        if padding:
            stream.write(b"\0" * padding)
            offset += padding
        stream.write(data)
        stub = _external_stub(tensor, location, offset, len(data))
        offset += len(data)
        return stub

    return _copy_model(model, convert)
