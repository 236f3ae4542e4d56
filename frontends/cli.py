"""``graphprune export``: framework models to ONNX from the command line.

::

    graphprune export torch MODULE:FACTORY --input-shape 1,3,224,224 -o model.onnx
        [--dtype float32] [--kwargs JSON] [--exporter dynamo|torchscript] [--opset N]
        [--dynamic-batch]
    graphprune export keras model.keras -o model.onnx [--input-shape 1,224,224,3] [--opset N]

``MODULE`` is an importable module (``torchvision.models``) or a ``.py`` file; ``FACTORY`` is
a callable returning an ``nn.Module`` (called with ``--kwargs``) or a module instance.
Repeat ``--input-shape`` (and ``--dtype``) for a model with several inputs. The Keras form
takes a ``.keras``/``.h5`` file or a SavedModel directory.

The main parser (``graphprune.cli``) calls :func:`add_export_parser`; the command runs
:func:`run_export`, which raises :class:`~graphprune.errors.GraphPruneError` subclasses that
the main parser maps to exit codes. :func:`resolve_source` lets ``graphprune prune`` and
``graphprune analyze`` take the same framework sources directly. Framework imports happen
only when a command needs them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from graphprune.errors import UsageError

__all__ = ["add_export_parser", "load_torch_factory", "parse_shape", "resolve_source", "run_export"]

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_FACTORY = re.compile(r"^(?P<module>[^:]+):(?P<attr>[A-Za-z_][\w.]*)$")


def parse_shape(text: str) -> tuple[int, ...]:
    """argparse type for ``--input-shape 1,3,224,224``."""
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must be integers like 1,3,224,224, got '{text}'") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"input shape must be positive integers, got '{text}'")
    return dims


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export torch`` and ``export keras`` to the main parser's subcommands."""
    export = subparsers.add_parser("export", help="export a PyTorch or Keras model to ONNX")
    frameworks = export.add_subparsers(dest="framework", required=True)

    p = frameworks.add_parser("torch", help="a PyTorch nn.Module from MODULE:FACTORY")
    p.add_argument("factory", metavar="MODULE:FACTORY",
                   help="importable module or .py file, and a callable or module in it")
    p.add_argument("--input-shape", type=parse_shape, action="append", required=True,
                   metavar="N,C,H,W", help="example input shape (repeat for several inputs)")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="example input dtype (default float32; repeat per input)")
    p.add_argument("--kwargs", default="{}", help="JSON keyword arguments for the factory (default: %(default)s)")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="which torch.onnx exporter (default: %(default)s)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="keep axis 0 symbolic (give a batch of 2 or more in --input-shape)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.set_defaults(func=run_export)

    p = frameworks.add_parser("keras", help="a .keras/.h5 file or a SavedModel directory")
    p.add_argument("source", metavar="MODEL", help=".keras/.h5 file or SavedModel directory")
    p.add_argument("--input-shape", type=parse_shape, action="append", metavar="N,H,W,C",
                   help="full input shape where the model leaves sizes open (repeat per input)")
    p.add_argument("--batch-size", type=int, default=1, help="size of an open batch axis (default: %(default)s)")
    p.add_argument("--dynamic-batch", action="store_true", help="keep an open batch axis symbolic")
    p.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.set_defaults(func=run_export)
    return export


def load_torch_factory(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    """The ``nn.Module`` named by ``MODULE:FACTORY`` (a callable is called with ``kwargs``)."""
    from torch import nn

    match = _FACTORY.match(spec)
    if match is None:
        raise UsageError(f"expected MODULE:FACTORY, got '{spec}'")
    module_name, attr = match["module"], match["attr"]
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"no such file: {path}")
            loader_spec = importlib.util.spec_from_file_location(f"_graphprune_factory_{path.stem}", path)
            if loader_spec is None or loader_spec.loader is None:
                raise UsageError(f"cannot import {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[loader_spec.name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot import '{module_name}': {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"'{module_name}' has no attribute '{attr}'")
        target = getattr(target, part)
    if not isinstance(target, nn.Module):
        if not callable(target):
            raise UsageError(f"'{spec}' is neither an nn.Module nor a callable")
        try:
            target = target(**(kwargs or {}))
        except Exception as exc:
            raise UsageError(f"calling '{spec}' failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(target, nn.Module):
        raise UsageError(f"'{spec}' returned {type(target).__name__}, not an nn.Module")
    return target.eval()


def _example_inputs(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str] | None) -> tuple[Any, ...]:
    import torch

    names = list(dtypes or [])
    if names and len(names) not in (1, len(shapes)):
        raise UsageError(f"{len(shapes)} input shapes but {len(names)} dtypes")
    if len(names) == 1:
        names = names * len(shapes)
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, shape in enumerate(shapes):
        name = names[i] if names else "float32"
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise UsageError(f"unknown dtype '{name}'")
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.zeros(shape, dtype=dtype))
        else:
            out.append(torch.randint(0, 2, shape, generator=gen, dtype=dtype))
    return tuple(out)


def _export_torch(args: argparse.Namespace) -> onnx.ModelProto:
    from graphprune.frontends import torch as frontend

    try:
        kwargs = json.loads(args.kwargs)
    except ValueError as exc:
        raise UsageError(f"--kwargs is not JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise UsageError("--kwargs must be a JSON object")
    module = load_torch_factory(args.factory, kwargs)
    inputs = _example_inputs(args.input_shape, args.dtype)
    options: dict[str, Any] = {"exporter": args.exporter, "opset": args.opset}
    if args.dynamic_batch:
        if any(shape[0] < 2 for shape in args.input_shape):
            raise UsageError("--dynamic-batch needs a batch of 2 or more in --input-shape")
        if args.exporter == "dynamo":
            import torch

            batch = torch.export.Dim("batch")
            options["dynamic_shapes"] = tuple({0: batch} for _ in inputs)
        else:
            names = [f"input_{i}" for i in range(len(inputs))]
            options["input_names"] = names
            options["dynamic_axes"] = {n: {0: "batch"} for n in names}
    return frontend.to_onnx(module, inputs, **options)


def _export_keras(args: argparse.Namespace) -> onnx.ModelProto:
    try:
        from graphprune.frontends import tensorflow as frontend
    except ImportError as exc:
        raise UsageError(
            "exporting Keras models needs TensorFlow and tf2onnx: pip install 'graphprune[tf]'"
        ) from exc
    options: dict[str, Any] = {
        "input_shapes": args.input_shape,
        "batch_size": None if args.dynamic_batch else args.batch_size,
    }
    if args.opset is not None:
        options["opset"] = args.opset
    return frontend.to_onnx(args.source, **options)


def run_export(args: argparse.Namespace) -> int:
    """Run ``graphprune export``; writes ``args.output`` atomically and returns 0."""
    from graphprune.io import model_io
    from graphprune.verify.metrics import count_params

    source = args.factory if args.framework == "torch" else args.source
    output = Path(args.output)
    if not output.resolve().parent.is_dir():
        raise UsageError(f"output folder does not exist: {output.resolve().parent}")
    if args.framework == "keras" and Path(source).exists() and output.resolve() == Path(source).resolve():
        raise UsageError(f"output path is the input path: {output}")
    if args.framework == "torch":
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise UsageError("exporting PyTorch models needs torch: pip install 'graphprune[torch]'") from exc
        model = _export_torch(args)
        how = f"torch {args.exporter}"
    else:
        model = _export_keras(args)
        how = "keras tf2onnx"
    input_path = source if args.framework == "keras" and Path(source).is_file() else None
    model_io.save_model(model, output, input_path=input_path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    sys.stdout.write(
        f"wrote {output} ({how}, opset {opset}, {count_params(model):,} parameters, "
        f"{len(model.graph.node)} nodes)\n"
    )
    return 0


def resolve_source(
    source: str,
    *,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    dtypes: Sequence[str] | None = None,
    exporter: str = "dynamo",
) -> onnx.ModelProto | None:
    """A framework model named on the command line, as ONNX; ``None`` for anything else.

    ``model.keras``/``.h5`` files and SavedModel directories convert through
    :mod:`graphprune.frontends.tensorflow`; ``MODULE:FACTORY`` (with ``input_shapes``)
    exports through :mod:`graphprune.frontends.torch`. ONNX paths return ``None`` so the
    caller loads them as usual.
    """
    path = Path(source)
    saved_model = path.is_dir() and (path / "saved_model.pb").exists()
    if saved_model or (path.is_file() and path.suffix.lower() in KERAS_SUFFIXES):
        namespace = argparse.Namespace(
            source=source, input_shape=list(input_shapes) if input_shapes else None,
            batch_size=1, dynamic_batch=False, opset=None,
        )
        return _export_keras(namespace)
    if not path.exists() and _FACTORY.match(source):
        if not input_shapes:
            raise UsageError(f"'{source}' is a PyTorch factory: give --input-shape")
        namespace = argparse.Namespace(
            factory=source, input_shape=list(input_shapes), dtype=list(dtypes or []) or None,
            kwargs="{}", exporter=exporter, opset=None, dynamic_batch=False,
        )
        return _export_torch(namespace)
    return None
