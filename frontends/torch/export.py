"""Export a module to ONNX with every parameter and buffer named by its ``state_dict`` key.

The dynamo exporter runs without the onnxscript optimiser (which folds BatchNorm into Conv
and keeps the Conv weight's name on the *folded* values), the TorchScript exporter runs
without constant folding and its de-duplicated initializers are split again.
:func:`to_onnx` checks that every initializer named after a ``state_dict`` key holds
exactly that tensor.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from graphprune.frontends.torch.errors import ExportError
from graphprune.frontends.torch.weightless import is_large, without_data
from onnx import helper, numpy_helper
from torch import nn

from graphprune.errors import GraphPruneError, UsageError
from graphprune.io.shared_constants import mark_shared, readers

__all__ = [
    "EXPORTERS",
    "TORCHSCRIPT_OPSET",
    "ExampleInputs",
    "as_tuple",
    "check_names",
    "eval_mode",
    "state_arrays",
    "to_onnx",
]

EXPORTERS = ("dynamo", "torchscript")
#: opset for the TorchScript exporter when none is given (LayerNormalization needs 17)
TORCHSCRIPT_OPSET = 17

ExampleInputs = Any  # torch.Tensor | tuple[torch.Tensor | Any, ...]


def as_tuple(example_inputs: ExampleInputs) -> tuple[Any, ...]:
    """The example inputs as the positional arguments of ``module(...)``."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run the block with ``module`` in eval mode, then restore its training flag."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


def state_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's ``state_dict`` as numpy arrays (floating-point and integer tensors)."""
    return {
        name: t.detach().cpu().numpy()
        for name, t in module.state_dict(keep_vars=False).items()
        if isinstance(t, torch.Tensor) and t.dtype != torch.bfloat16
    }


def to_onnx(
    module: nn.Module,
    example_inputs: ExampleInputs,
    *,
    exporter: str = "dynamo",
    opset: int | None = None,
    dynamic_shapes: Any = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Export ``module`` (in eval mode) to ONNX, keeping ``state_dict`` keys as initializer names.

    ``exporter="dynamo"`` (``torch.export``; give ``dynamic_shapes`` for symbolic sizes) or
    ``"torchscript"`` (give ``dynamic_axes``). Neither folds BatchNorm into Conv, so a plan
    on the result maps back to the module with :func:`~graphprune.frontends.torch.map_plan`.
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    if exporter == "dynamo" and dynamic_axes is not None:
        raise UsageError("dynamic_axes is for exporter='torchscript'; use dynamic_shapes")
    if exporter == "torchscript" and dynamic_shapes is not None:
        raise UsageError("dynamic_shapes is for exporter='dynamo'; use dynamic_axes")
    args = as_tuple(example_inputs)
    kwargs: dict[str, Any] = {}
    if input_names is not None:
        kwargs["input_names"] = list(input_names)
    if output_names is not None:
        kwargs["output_names"] = list(output_names)
    if exporter == "torchscript" and dynamic_axes is not None and input_names is None:
        names = _argument_names(module, args)  # else TorchScript picks names the caller cannot know
        if names is not None:
            kwargs["input_names"] = names
    torch_logger = logging.getLogger("torch.onnx")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)  # "torchvision is not installed" and the like
    with eval_mode(module), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                program = torch.onnx.export(
                    module, args, dynamo=True, optimize=False, verbose=False,
                    opset_version=opset, dynamic_shapes=dynamic_shapes, **kwargs,
                )
                if program is None:
                    raise ExportError("the dynamo exporter returned nothing")
                model = program.model_proto
            else:
                buffer = io.BytesIO()
                torch.onnx.export(
                    module, args, buffer,  # type: ignore[arg-type]
                    dynamo=False, do_constant_folding=False, export_params=True,
                    keep_initializers_as_inputs=False,
                    training=torch.onnx.TrainingMode.EVAL,
                    opset_version=opset or TORCHSCRIPT_OPSET, dynamic_axes=dynamic_axes,
                    **kwargs,
                )
                model = onnx.load_from_string(buffer.getvalue())
                _split_deduplicated(model, module)
        except GraphPruneError:
            raise
        except Exception as exc:
            raise ExportError(
                f"{exporter} export of {type(module).__name__} failed: {_first_line(exc)}"
            ) from exc
        finally:
            torch_logger.setLevel(level)
    _check_dynamic_names(model, dynamic_axes)
    _castlike_to_cast(model)
    check_names(model, module)
    counts = readers(model, module.state_dict())
    mark_shared(model, [name for name, count in counts.items() if count > 1])  # one tensor of the module
    return model


def _argument_names(module: nn.Module, args: tuple[Any, ...]) -> list[str] | None:
    """The names of ``module.forward``'s parameters that ``args`` fill, where every one is a
    tensor (one graph input each); None otherwise."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(args) or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    return positional[: len(args)]


def _check_dynamic_names(model: onnx.ModelProto, dynamic_axes: Mapping[str, Any] | None) -> None:
    """TorchScript ignores a ``dynamic_axes`` key that names no input or output (with a
    warning): the export would be silently static. Raise instead."""
    if not dynamic_axes:
        return
    known = [v.name for v in model.graph.input] + [v.name for v in model.graph.output]
    unknown = sorted(set(dynamic_axes) - set(known))
    if unknown:
        raise UsageError(
            f"dynamic_axes names {', '.join(map(repr, unknown))}, not an input or output of the export "
            f"(inputs: {', '.join(v.name for v in model.graph.input)}; pass input_names)"
        )


def _castlike_to_cast(model: onnx.ModelProto) -> None:
    """``CastLike(constant, x)`` -> ``Cast(constant, to=dtype(x))`` where ``x``'s type is known.

    The dynamo exporter builds the zero bias of a bias-free Conv as ``CastLike(0, x)``: the
    activation ``x`` only lends its dtype, but as an input it looks like a consumer of every
    channel of ``x``. A ``Cast`` of a literal folds away in graphprune's preparation.
    (Constants are initializers and the outputs of nodes without inputs.)
    """
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    constants.update(o for n in graph.node if not n.input for o in n.output)
    candidates = [n for n in graph.node if n.op_type == "CastLike" and n.input[0] in constants]
    if not candidates:
        return
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(without_data(model, is_large))
    except Exception:  # not inferable: leave the CastLikes alone
        return
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    for node in candidates:
        target = types.get(node.input[1])
        if target is None:
            continue
        source = node.input[0]
        del node.input[:]
        node.input.append(source)
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("to", target))
        node.op_type = "Cast"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    """The first meaningful line of ``exc`` (or of its cause when it only says 'see below')."""
    for err in (exc, exc.__cause__):
        if err is None:
            continue
        text = _ANSI.sub("", str(err)).strip()
        line = text.splitlines()[0] if text else type(err).__name__
        if err is exc and exc.__cause__ is not None and "Next steps" in text:
            line = line.split(". This is step")[0] + ": " + _first_line(exc.__cause__)
        return line
    return type(exc).__name__


def _split_deduplicated(model: onnx.ModelProto, module: nn.Module) -> None:
    """Undo the TorchScript exporter's initializer de-duplication.

    Equal parameters (fresh BatchNorm weights are all ones) are stored once and the other
    names become ``Identity`` outputs; give each its own initializer again.
    """
    names = set(module.state_dict())
    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if (
            node.op_type == "Identity"
            and node.input[0] in inits
            and node.output[0] in names
            and node.output[0] not in inits
        ):
            copy_ = onnx.TensorProto()
            copy_.CopyFrom(inits[node.input[0]])
            copy_.name = node.output[0]
            model.graph.initializer.append(copy_)
            continue
        keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def check_names(model: onnx.ModelProto, module: nn.Module) -> None:
    """Every initializer named after a ``state_dict`` key must hold that tensor's values."""
    state = state_arrays(module)
    for init in model.graph.initializer:
        if init.name not in state:
            continue
        values = numpy_helper.to_array(init)
        expected = state[init.name]
        if values.dtype != expected.dtype:
            values, expected = values.astype(np.float64), expected.astype(np.float64)
        if values.shape != expected.shape or not np.array_equal(values, expected):
            raise ExportError(
                f"initializer '{init.name}' does not hold the module's '{init.name}' "
                "(the exporter folded or rewrote it); export with graphprune's to_onnx"
            )
