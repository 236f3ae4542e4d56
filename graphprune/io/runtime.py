"""ONNX Runtime session options for every session graphprune builds, with the custom-operator
libraries that the models at hand need.

Some models use operators that ONNX Runtime runs only from a custom-op library:
onnxruntime-extensions' ``ai.onnx.contrib`` domain (tokenizers, image decoding, pre- and
post-processing written into the graph), or an exporter's own domain. graphprune does not
prune through such operators (they have no rule: the groups they touch are frozen with the
reason), but it runs the model to verify, calibrate, probe sizes and time it, so every
session loads the registered libraries:

- :func:`register_custom_ops` (CLI ``--custom-ops LIB``) registers a shared library for the
  rest of the process;
- a model that imports the ``ai.onnx.contrib`` domain registers onnxruntime-extensions'
  library by itself when that package is installed (:func:`use_extensions_for`).

A library adds operators and nothing else: models that do not use it run as before.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from graphprune.errors import UsageError

#: the domain of onnxruntime-extensions' operators
EXTENSIONS_DOMAIN = "ai.onnx.contrib"

_LIBRARIES: list[str] = []


def register_custom_ops(path: str | os.PathLike[str]) -> str:
    """Load the custom-op shared library ``path`` into every ONNX Runtime session graphprune
    builds from now on (once per library). Returns the resolved path."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise UsageError(f"custom-op library not found: {path}")
    name = str(resolved)
    if name not in _LIBRARIES:
        try:  # a library ONNX Runtime cannot load: said now, not at the first session
            ort.SessionOptions().register_custom_ops_library(name)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own error types
            raise UsageError(f"ONNX Runtime cannot load the custom-op library {path}: {describe(exc)}") from exc
        _LIBRARIES.append(name)
    return name


def libraries() -> tuple[str, ...]:
    """The custom-op libraries every session loads."""
    return tuple(_LIBRARIES)


def _domains(model: onnx.ModelProto) -> set[str]:
    return {o.domain for o in model.opset_import}


def extensions_library() -> str | None:
    """onnxruntime-extensions' custom-op library, found without importing the package (its
    import loads PyTorch and transformers where they are installed: seconds); ``None`` when
    the package is not installed."""
    spec = importlib.util.find_spec("onnxruntime_extensions")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = Path(folder) / f"_extensions_pydll{suffix}"
            if path.is_file():
                return str(path)
    try:  # another layout: ask the package
        import onnxruntime_extensions
    except ImportError:
        return None
    return str(onnxruntime_extensions.get_library_path())


def use_extensions_for(model: onnx.ModelProto) -> bool:
    """Register onnxruntime-extensions' library when ``model`` imports its domain and the
    package is installed; ``True`` when the library is (now) registered."""
    if EXTENSIONS_DOMAIN not in _domains(model):
        return False
    library = extensions_library()
    if library is None:
        return False
    register_custom_ops(library)
    return True


def registered_for(exc: Any) -> str | None:
    """After ONNX Runtime refused a model: register onnxruntime-extensions' library when the
    operator it lacked is of that domain and the library is installed but not registered yet
    (a model given as a path, whose domains were not read). Returns the library to add to the
    session options and build the session again with, or ``None``."""
    found = _UNREGISTERED.search(str(exc))
    library = extensions_library() if found and found.group(1) == EXTENSIONS_DOMAIN else None
    if library is None or str(Path(library).resolve()) in _LIBRARIES:
        return None
    return register_custom_ops(library)


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """ONNX Runtime's default logger at fatal only, for the sessions that onnx-graphsurgeon's
    constant folding builds itself: their optimizers warn about shape-only subgraphs, and a
    fold that fails (a ``Range`` at a probe size it cannot take) logs an error line although
    the folding goes on without it. Restored to ORT's default (warnings) afterwards."""
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)  # ORT's default


def session_options() -> ort.SessionOptions:
    """Fresh session options with every registered custom-op library loaded, logging errors
    only (the graph optimizer warns once per node it leaves, on every session)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for path in _LIBRARIES:
        options.register_custom_ops_library(path)
    return options


_UNREGISTERED = re.compile(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op")


def missing_op_hint(message: str) -> str:
    """What to do when ONNX Runtime says an operator is not registered ('' otherwise)."""
    found = _UNREGISTERED.search(message)
    if found is None:
        return ""
    domain, op = found.group(1), found.group(2)
    if domain == EXTENSIONS_DOMAIN and extensions_library() is None:
        return f" ({domain}::{op} comes from onnxruntime-extensions: pip install onnxruntime-extensions)"
    return (f" ({domain}::{op} needs the custom-op library it was written for: "
            "--custom-ops LIB, or graphprune.register_custom_ops(LIB))")


def describe(exc: Any) -> str:
    """The first line of ONNX Runtime's error ``exc`` with :func:`missing_op_hint`."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    # the file ONNX Runtime loaded is graphprune's temporary copy: its path says nothing
    first = re.sub(r"Load model from \S+ failed: ?", "", first)
    return first + missing_op_hint(text)
