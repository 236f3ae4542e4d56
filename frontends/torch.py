"""PyTorch frontend: export with the module's names, prune, map the plan back, slice the module.

The round trip::

    >>> from graphprune.frontends import torch as gpt                       # doctest: +SKIP
    >>> result = gpt.prune_module(model, (x,), ratio=0.5)                   # doctest: +SKIP
    >>> gpt.apply_plan(model, result.plan)     # the module is now smaller  # doctest: +SKIP
    >>> gpt.check_module(model, result.model, (x,))  # equals the pruned ONNX  # doctest: +SKIP

**Names.** The export keeps every parameter and buffer under its ``state_dict`` key: the
dynamo exporter runs without the onnxscript optimiser (which folds BatchNorm into Conv and
keeps the Conv weight's name on the *folded* values), the TorchScript exporter runs without
constant folding and its de-duplicated initializers are split again. :func:`to_onnx` checks
that every initializer named after a ``state_dict`` key holds exactly that tensor.

**Provenance.** Exporters still move parameters before use (``Transpose`` of a Linear weight
for a 3-D MatMul, ``Slice``/``Split`` of a packed QKV weight) and graphprune's preparation
folds those chains into new constants (``val_12``). :func:`parameter_sources` replays every
data-movement op of the export on *element indices* instead of values: each parameter
element gets a global id, a folded constant ends up as an array of the ids it was copied
from. A plan cut ``(tensor, axis, indices)`` then maps to the parameter elements it removes,
which must be whole slices along one axis of that parameter. Constants computed from
parameters by arithmetic (not movement) cannot be mapped back and raise
:class:`PlanMappingError` when a plan cuts them. Finally every constant that comes from a
cut parameter must lose exactly the elements the parameter loses (tied weights pruned two
different ways are refused).

**Slicing.** :func:`apply_plan` slices parameters and buffers in place (new ``Parameter``
objects: build the optimiser afterwards) and updates module attributes through a table of
handlers, one per module type (:func:`register_module_handler` adds a custom layer).
``nn.MultiheadAttention`` cannot express an input width different from its projection
width, so a pruned one becomes :class:`PrunedMultiheadAttention`, a subclass with the same
parameters and ``state_dict`` keys whose forward handles any widths.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from graphprune.errors import GraphPruneError, UsageError, VerificationError
from graphprune.planning.plan import GroupPlan, Plan

__all__ = [
    "EXPORTERS",
    "ExportError",
    "ModuleHandler",
    "ParameterSources",
    "PlanMappingError",
    "PrunedMultiheadAttention",
    "TorchPruneResult",
    "apply_plan",
    "check_module",
    "map_plan",
    "parameter_sources",
    "prune_module",
    "register_module_handler",
    "to_onnx",
]

EXPORTERS = ("dynamo", "torchscript")
#: opset for the TorchScript exporter when none is given (LayerNormalization needs 17)
TORCHSCRIPT_OPSET = 17

ExampleInputs = Any  # torch.Tensor | tuple[torch.Tensor | Any, ...]
ParamCuts = dict[str, dict[int, np.ndarray]]


class ExportError(GraphPruneError):
    """The framework exporter failed, or its output cannot be mapped to the module."""


class PlanMappingError(GraphPruneError):
    """A plan cuts something that is not a whole slice of a module parameter."""


# ----------------------------------------------------------------------------- export


def _as_tuple(example_inputs: ExampleInputs) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
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
    on the result maps back to the module with :func:`map_plan`.
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    if exporter == "dynamo" and dynamic_axes is not None:
        raise UsageError("dynamic_axes is for exporter='torchscript'; use dynamic_shapes")
    if exporter == "torchscript" and dynamic_shapes is not None:
        raise UsageError("dynamic_shapes is for exporter='dynamo'; use dynamic_axes")
    args = _as_tuple(example_inputs)
    kwargs: dict[str, Any] = {}
    if input_names is not None:
        kwargs["input_names"] = list(input_names)
    if output_names is not None:
        kwargs["output_names"] = list(output_names)
    torch_logger = logging.getLogger("torch.onnx")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)  # "torchvision is not installed" and the like
    with _eval_mode(module), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
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
    _castlike_to_cast(model)
    check_names(model, module)
    return model


def _castlike_to_cast(model: onnx.ModelProto) -> None:
    """``CastLike(constant, x)`` -> ``Cast(constant, to=dtype(x))`` where ``x``'s type is known.

    The dynamo exporter builds the zero bias of a bias-free Conv as ``CastLike(0, x)``: the
    activation ``x`` only lends its dtype, but as an input it looks like a consumer of every
    channel of ``x``. A ``Cast`` of a literal folds away in graphprune's preparation.
    """
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    constants.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    if not any(n.op_type == "CastLike" and n.input[0] in constants for n in graph.node):
        return
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # > 2 GB or not inferable: leave the CastLikes alone
        return
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    for node in graph.node:
        if node.op_type != "CastLike" or node.input[0] not in constants:
            continue
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
        if values.shape != expected.shape or not np.array_equal(
            values.astype(np.float64), expected.astype(np.float64)
        ):
            raise ExportError(
                f"initializer '{init.name}' does not hold the module's '{init.name}' "
                "(the exporter folded or rewrote it); export with graphprune's to_onnx"
            )


# ----------------------------------------------------------------------------- provenance

#: ops that only move, copy or re-view elements: replayed on element ids
_MOVEMENT = {
    "Identity", "Cast", "CastLike", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
    "Slice", "Split", "Gather", "Concat", "Expand", "Tile",
}
#: ops whose output does not depend on the input values
_SHAPE_ONLY = {"Shape", "Size"}
NO_SOURCE = -1


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _const_input(node: onnx.NodeProto, index: int, values: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The literal value of an optional input (``None`` when absent; KeyError when unknown)."""
    if index >= len(node.input) or not node.input[index]:
        return None
    value = values.get(node.input[index])
    if value is None:
        raise KeyError(node.input[index])
    return np.asarray(value)


def _required(node: onnx.NodeProto, index: int, values: Mapping[str, np.ndarray]) -> np.ndarray:
    value = _const_input(node, index, values)
    if value is None:
        raise KeyError(f"input {index} of {node.op_type}")
    return value


def _reshape_target(data: np.ndarray, shape: np.ndarray, allowzero: int) -> list[int]:
    target = [int(s) for s in shape.reshape(-1)]
    if not allowzero:
        target = [data.shape[i] if s == 0 else s for i, s in enumerate(target)]
    return target


def _move(node: onnx.NodeProto, data: list[np.ndarray], values: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Evaluate one data-movement node on ``data`` (element ids or plain values)."""
    op = node.op_type
    attrs = _attrs(node)
    x = data[0]
    if op in ("Identity", "Cast", "CastLike"):
        return [x]
    if op == "Transpose":
        perm = attrs.get("perm")
        return [np.transpose(x, perm)]
    if op == "Reshape":
        shape = _required(node, 1, values)
        return [x.reshape(_reshape_target(x, shape, int(attrs.get("allowzero", 0))))]
    if op == "Flatten":
        axis = int(attrs.get("axis", 1)) % max(x.ndim, 1) if x.ndim else 0
        return [x.reshape(math.prod(x.shape[:axis]), -1)]
    if op in ("Squeeze", "Unsqueeze"):
        axes = attrs.get("axes")
        if axes is None:
            given = _const_input(node, 1, values)
            axes = None if given is None else [int(a) for a in given.reshape(-1)]
        if op == "Squeeze":
            if axes is None:
                return [np.squeeze(x)]
            return [np.squeeze(x, axis=tuple(a % x.ndim for a in axes))]
        out = x
        rank = x.ndim + len(axes)  # type: ignore[arg-type]
        for a in sorted(a % rank for a in axes):  # type: ignore[union-attr]
            out = np.expand_dims(out, a)
        return [out]
    if op == "Slice":
        if "starts" in attrs:
            starts, ends = attrs["starts"], attrs["ends"]
            axes = attrs.get("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts = _required(node, 1, values).reshape(-1).tolist()
            ends = _required(node, 2, values).reshape(-1).tolist()
            given_axes = _const_input(node, 3, values)
            given_steps = _const_input(node, 4, values)
            axes = list(range(len(starts))) if given_axes is None else given_axes.reshape(-1).tolist()
            steps = [1] * len(starts) if given_steps is None else given_steps.reshape(-1).tolist()
        index: list[Any] = [slice(None)] * x.ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            index[int(a) % x.ndim] = slice(int(s), int(e), int(st))
        return [x[tuple(index)]]
    if op == "Split":
        axis = int(attrs.get("axis", 0)) % x.ndim
        sizes = attrs.get("split")
        if sizes is None:
            given = _const_input(node, 1, values)
            sizes = None if given is None else given.reshape(-1).tolist()
        if sizes is None:
            n = len(node.output)
            size = -(-x.shape[axis] // n)
            sizes = [min(size, x.shape[axis] - i * size) for i in range(n)]
        bounds = np.cumsum([0, *sizes])
        return [np.take(x, np.arange(bounds[i], bounds[i + 1]), axis=axis) for i in range(len(sizes))]
    if op == "Gather":
        indices = _required(node, 1, values)
        axis = int(attrs.get("axis", 0)) % x.ndim
        indices = np.where(indices < 0, indices + x.shape[axis], indices)
        return [np.take(x, indices, axis=axis)]
    if op == "Concat":
        axis = int(attrs["axis"])
        return [np.concatenate(data, axis=axis % data[0].ndim)]
    if op == "Expand":
        target = [int(s) for s in _required(node, 1, values).reshape(-1)]
        return [x * np.ones(target, dtype=x.dtype)]
    if op == "Tile":
        repeats = [int(r) for r in _required(node, 1, values).reshape(-1)]
        return [np.tile(x, repeats)]
    raise KeyError(op)


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    if node.op_type == "Concat":
        return list(node.input)
    return [node.input[0]] if node.input else []


@dataclass
class ParameterSources:
    """Where the elements of each export constant come from (see the module docstring).

    ``sources[tensor]`` has the tensor's shape and holds, per element, a global element id
    (``offsets[p] + flat position`` in parameter ``p``) or ``NO_SOURCE``. ``derived`` names
    constants computed from parameters by arithmetic, with the op that did it. ``leaves``
    are the parameter-derived constants an op that is not folded away consumes.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    offsets: np.ndarray
    sources: dict[str, np.ndarray]
    derived: dict[str, str] = field(default_factory=dict)
    leaves: set[str] = field(default_factory=set)
    #: parameters each ``derived`` constant is computed from
    derived_from: dict[str, set[str]] = field(default_factory=dict)

    def parameter_of(self, ids: np.ndarray) -> np.ndarray:
        """Index into ``names`` of the parameter owning each global id."""
        return np.searchsorted(self.offsets, ids, side="right") - 1

    def map_cut(self, tensor: str, axis: int, indices: Sequence[int]) -> list[tuple[str, int, list[int]]]:
        """Parameter slices ``(name, axis, indices)`` removed by cutting ``indices`` of ``tensor``."""
        if tensor not in self.sources:
            if tensor in self.derived:
                raise PlanMappingError(
                    f"the plan cuts '{tensor}', computed from module parameters by "
                    f"{self.derived[tensor]}: it has no parameter slice to remove; protect it "
                    "with keep=[...] or export without that computation"
                )
            return []  # an exporter constant that no module parameter owns
        ids = self.sources[tensor]
        idx = np.asarray(list(indices), dtype=np.int64)
        removed = np.take(ids, idx, axis=axis).reshape(-1)
        kept = np.delete(ids, idx, axis=axis).reshape(-1)
        removed, kept = removed[removed >= 0], kept[kept >= 0]
        if removed.size == 0:
            return []
        overlap = np.intersect1d(removed, kept)
        if overlap.size:
            owner = self.names[int(self.parameter_of(overlap[:1])[0])]
            raise PlanMappingError(
                f"the plan cuts copies of '{owner}' in '{tensor}' but keeps other copies "
                "of the same elements"
            )
        out = []
        owners, kept_owners = self.parameter_of(removed), self.parameter_of(kept)
        for p in np.unique(owners):
            positions = np.unique(removed[owners == p] - self.offsets[p])
            others = np.unique(kept[kept_owners == p] - self.offsets[p])
            name, shape = self.names[int(p)], self.shapes[int(p)]
            out.append((name, *_parameter_axis(name, shape, positions, others, tensor)))
        return out


def _parameter_axis(
    name: str, shape: tuple[int, ...], removed: np.ndarray, kept: np.ndarray, tensor: str
) -> tuple[int, list[int]]:
    """The parameter axis and indices a cut removes.

    ``removed``/``kept`` are the flat positions of the parameter that the cut tensor drops
    and keeps. The axis is one along which the removed slices hold no kept element (the
    tensor may hold only part of the parameter: one projection of a packed QKV weight);
    slices wholly covered by the cut are preferred. That the *other* copies of those slices
    are cut too is checked for the whole plan by :func:`_check_consistent`.
    """
    if len(shape) == 0:
        raise PlanMappingError(f"the plan cuts scalar parameter '{name}' (through '{tensor}')")
    cut, rest = np.unravel_index(removed, shape), np.unravel_index(kept, shape)
    total = math.prod(shape)
    candidates = []
    for axis in range(len(shape)):
        chosen = np.unique(cut[axis])
        if np.intersect1d(chosen, rest[axis]).size:
            continue
        whole = chosen.size * (total // shape[axis]) == removed.size
        candidates.append((not whole, axis, [int(i) for i in chosen]))
    candidates.sort()
    if candidates and (len(candidates) == 1 or candidates[0][0] != candidates[1][0]):
        return candidates[0][1], candidates[0][2]
    raise PlanMappingError(
        f"the plan cuts elements of '{name}' (through '{tensor}') that are not "
        "slices along one axis"
    )


def parameter_sources(model: onnx.ModelProto, names: Iterable[str]) -> ParameterSources:
    """Replay the export's data-movement ops on element ids of the parameters ``names``."""
    wanted = set(names)
    inits = {t.name: t for t in model.graph.initializer}
    params = [n for n in inits if n in wanted]
    shapes = [tuple(int(d) for d in inits[n].dims) for n in params]
    sizes = [math.prod(s) for s in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if params else np.zeros(0, np.int64)
    sources: dict[str, np.ndarray] = {}
    for name, shape, offset, size in zip(params, shapes, offsets, sizes, strict=True):
        sources[name] = (offset + np.arange(size, dtype=np.int64)).reshape(shape)
    values: dict[str, np.ndarray] = {
        n: numpy_helper.to_array(t) for n, t in inits.items() if n not in sources
    }
    derived: dict[str, str] = {}
    derived_from: dict[str, set[str]] = {}
    constant: set[str] = set(inits)

    for node in model.graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant":
            with contextlib.suppress(Exception):  # value, value_int, value_floats, ...
                values[node.output[0]] = np.asarray(ReferenceEvaluator(node).run(None, {})[0])  # type: ignore[index]
            constant.update(node.output)
            continue
        if not inputs or not all(i in constant for i in inputs):
            continue  # depends on a graph input: not folded, not a constant
        constant.update(o for o in node.output if o)
        from_params = [i for i in inputs if i in sources or i in derived]
        if node.op_type in _SHAPE_ONLY:
            src = sources.get(inputs[0], values.get(inputs[0]))
            if src is not None:
                dims = np.asarray(np.shape(src), dtype=np.int64)
                values[node.output[0]] = dims if node.op_type == "Shape" else np.asarray(dims.prod())
            continue
        if not from_params:
            with contextlib.suppress(Exception):  # a value we cannot compute stays unknown
                results: Sequence[Any]
                if node.op_type in _MOVEMENT:
                    results = _move(node, [values[i] for i in _data_inputs(node)], values)
                else:  # shape arithmetic on literals (Sub, Range, ...)
                    results = ReferenceEvaluator(node).run(None, {i: values[i] for i in inputs})  # type: ignore[assignment]
                for out, value in zip(node.output, results, strict=False):
                    values[out] = np.asarray(value)
            continue
        data_names = _data_inputs(node)
        movable = (
            node.op_type in _MOVEMENT
            and not any(i in derived for i in data_names)
            and not any(i in sources for i in inputs if i not in data_names)
        )
        if movable:
            try:
                data = [
                    sources[i] if i in sources
                    else np.full(np.shape(values[i]), NO_SOURCE, dtype=np.int64)
                    for i in data_names
                ]
                for out, ids in zip(node.output, _move(node, data, values), strict=False):
                    sources[out] = np.asarray(ids, dtype=np.int64)
                continue
            except (KeyError, ValueError, IndexError, TypeError):
                pass
        why = f"{node.op_type} '{node.name}'"
        owners: set[str] = set()
        for i in from_params:
            if i in derived:
                owners |= derived_from[i]
            else:
                valid = sources[i][sources[i] >= 0]
                owners |= {params[int(p)] for p in np.unique(np.searchsorted(offsets, valid, side="right") - 1)}
        for out in node.output:
            if out:
                derived[out] = why
                derived_from[out] = owners

    leaves: set[str] = set()
    for node in model.graph.node:
        inputs = [i for i in node.input if i]
        if inputs and all(i in constant for i in inputs):
            continue  # folded away by graphprune's preparation
        leaves.update(i for i in inputs if i in sources or i in derived)
    leaves.update(o.name for o in model.graph.output if o.name in sources or o.name in derived)
    return ParameterSources(params, shapes, offsets, sources, derived, leaves, derived_from)


# ----------------------------------------------------------------------------- plan mapping


def _plan_cuts(plan: Plan) -> dict[str, dict[int, set[int]]]:
    cuts: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for gp in plan.groups:
        if not gp.remove:
            continue
        for tensor, axes in gp.channels.items():
            for axis, idx in axes.items():
                cuts[tensor][int(axis)].update(int(i) for i in idx)
    return cuts


def map_plan(plan: Plan, model: onnx.ModelProto, module: nn.Module | Iterable[str]) -> Plan:
    """Re-key ``plan`` (made on ``model``, an export of ``module``) by ``state_dict`` names.

    Each group keeps its id, anchor and units; its ``channels`` name module parameters and
    buffers with their own axes. Constants no parameter owns (exporter literals) are listed
    in ``meta["unmapped"]``. Raises :class:`PlanMappingError` when a cut is not a whole
    slice of a parameter or when two uses of one parameter would be cut differently.
    """
    names = list(module.state_dict()) if isinstance(module, nn.Module) else list(module)
    sources = parameter_sources(model, names)
    out = Plan(erase=list(plan.erase), meta={**plan.meta, "keys": "torch state_dict"})
    unmapped: set[str] = set()
    param_cuts: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for gp in plan.groups:
        channels: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        if gp.remove:
            for tensor, axes in gp.channels.items():
                for axis, idx in axes.items():
                    mapped = sources.map_cut(tensor, int(axis), idx)
                    if not mapped and tensor not in sources.sources:
                        unmapped.add(tensor)
                    for name, paxis, pidx in mapped:
                        channels[name][str(paxis)].update(pidx)
                        param_cuts[name][paxis].update(pidx)
        out.groups.append(
            GroupPlan(
                group=gp.group, anchor=gp.anchor, size=gp.size, remove=list(gp.remove),
                channels={
                    name: {axis: sorted(idx) for axis, idx in sorted(axes.items())}
                    for name, axes in sorted(channels.items())
                },
            )
        )
    _check_consistent(sources, _plan_cuts(plan), param_cuts)
    if unmapped:
        out.meta["unmapped"] = sorted(unmapped)
    return out


def _check_consistent(
    sources: ParameterSources,
    onnx_cuts: Mapping[str, Mapping[int, set[int]]],
    param_cuts: Mapping[str, Mapping[int, set[int]]],
) -> None:
    """Every constant copied from a cut parameter loses exactly the parameter's cut elements."""
    if not param_cuts:
        return
    index = {n: i for i, n in enumerate(sources.names)}
    removed_ids: list[np.ndarray] = []
    for name, axes in param_cuts.items():
        p = index[name]
        shape = sources.shapes[p]
        mask = np.zeros(shape, dtype=bool)
        for axis, idx in axes.items():
            sel: list[Any] = [slice(None)] * len(shape)
            sel[axis] = sorted(idx)
            mask[tuple(sel)] = True
        removed_ids.append(sources.offsets[p] + np.flatnonzero(mask))
    removed = np.concatenate(removed_ids)
    for tensor in sorted(sources.leaves):
        ids = sources.sources.get(tensor)
        if ids is None:
            hit = sorted(sources.derived_from.get(tensor, set()) & set(param_cuts))
            if hit:
                raise PlanMappingError(
                    f"'{tensor}' is computed from {hit} by {sources.derived[tensor]}, and the "
                    "plan cuts them: the module would change where the ONNX does not; protect "
                    "them with keep=[...]"
                )
            continue
        expected = np.isin(ids, removed)
        planned = np.zeros(ids.shape, dtype=bool)
        for axis, idx in onnx_cuts.get(tensor, {}).items():
            where: list[Any] = [slice(None)] * ids.ndim
            where[axis] = sorted(idx)
            planned[tuple(where)] = True
        planned &= ids >= 0
        if not np.array_equal(expected, planned):
            owners = {sources.names[int(p)] for p in sources.parameter_of(ids[expected != planned])}
            raise PlanMappingError(
                f"'{tensor}' and the parameter(s) {sorted(owners)} it is copied from would be "
                "cut differently (a parameter used in two places, pruned in one); protect "
                "one use with keep=[...]"
            )


# ----------------------------------------------------------------------------- prune


@dataclass
class TorchPruneResult:
    """``model``: the pruned ONNX; ``plan``: keyed by the module's ``state_dict`` names."""

    model: onnx.ModelProto
    plan: Plan
    onnx_plan: Plan
    report: dict[str, Any]
    exported: onnx.ModelProto = field(repr=False)
    result: Any = field(default=None, repr=False)


def _expand_keep(keep: Iterable[str], module: nn.Module, sources: ParameterSources) -> list[str]:
    """Module and parameter names in ``keep`` become the export tensors they own."""
    out: list[str] = []
    state = list(module.state_dict())
    by_param: dict[str, list[str]] = defaultdict(list)
    for tensor, ids in sources.sources.items():
        valid = ids[ids >= 0]
        if valid.size:
            for p in np.unique(sources.parameter_of(valid)):
                by_param[sources.names[int(p)]].append(tensor)
    for entry in keep:
        out.append(entry)
        owned = [n for n in state if n == entry or n.startswith(entry + ".")]
        for name in owned:
            out.extend(by_param.get(name, [name]))
    return list(dict.fromkeys(out))


def prune_module(
    module: nn.Module,
    example_inputs: ExampleInputs,
    *,
    ratio: float = 0.5,
    criterion: str = "l1",
    keep: Iterable[str] = (),
    plan: Plan | str | None = None,
    exporter: str = "dynamo",
    opset: int | None = None,
    dynamic_shapes: Any = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    **prune_options: Any,
) -> TorchPruneResult:
    """Export ``module``, prune the export with :func:`graphprune.prune`, map the plan back.

    ``keep`` takes ONNX node/tensor names and module or parameter names (``"head"``,
    ``"layer4.1.conv2.weight"``). The module itself is not changed: pass the returned
    ``plan`` to :func:`apply_plan`.
    """
    from graphprune.api import prune

    exported = to_onnx(
        module, example_inputs, exporter=exporter, opset=opset,
        dynamic_shapes=dynamic_shapes, dynamic_axes=dynamic_axes,
    )
    names = list(module.state_dict())
    sources = parameter_sources(exported, names)
    result = prune(
        exported, ratio=ratio, criterion=criterion, plan=plan,
        keep=_expand_keep(keep, module, sources), **prune_options,
    )
    mapped = map_plan(result.plan, exported, names)
    return TorchPruneResult(result.model, mapped, result.plan, result.report, exported, result)


# ----------------------------------------------------------------------------- apply


class ModuleHandler:
    """How one module type is sliced: prunable axes per parameter, attributes to update.

    A handler with ``container = True`` is for a module whose *children* own the
    parameters but which keeps sizes of its own (a head count in a custom attention): its
    :meth:`update` runs after the children were sliced, with ``cuts`` keyed by the
    descendants' names relative to it.
    """

    module_types: tuple[type[nn.Module], ...] = ()
    #: local parameter/buffer name -> axes a plan may cut
    axes: dict[str, tuple[int, ...]] = {}
    container: bool = False

    def check(self, module: nn.Module, cuts: Mapping[str, Mapping[int, np.ndarray]], where: str) -> None:
        for name, by_axis in cuts.items():
            allowed = self.axes.get(name)
            if allowed is None or any(a not in allowed for a in by_axis):
                raise PlanMappingError(
                    f"cannot cut {name} axes {sorted(by_axis)} of {type(module).__name__} "
                    f"'{where}' (prunable: {self.axes or 'none'})"
                )

    def update(
        self, module: nn.Module, cuts: Mapping[str, Mapping[int, np.ndarray]],
        old: Mapping[str, tuple[int, ...]],
    ) -> None:
        """Fix the attributes after slicing (``old`` holds shapes before the cut)."""


_HANDLERS: dict[type[nn.Module], ModuleHandler] = {}


def register_module_handler(handler_cls: type[ModuleHandler]) -> type[ModuleHandler]:
    """Class decorator: register a handler for its ``module_types`` (refuses duplicates)."""
    handler = handler_cls()
    for cls in handler_cls.module_types:
        if cls in _HANDLERS:
            raise UsageError(f"a module handler for {cls.__name__} is already registered")
        _HANDLERS[cls] = handler
    return handler_cls


def _handler_for(module: nn.Module) -> ModuleHandler | None:
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


def _size(shape: tuple[int, ...] | None, axis: int) -> int | None:
    return None if shape is None else shape[axis]


@register_module_handler
class ConvHandler(ModuleHandler):
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    axes = {"weight": (0, 1), "bias": (0,)}

    def check(self, module, cuts, where):
        super().check(module, cuts, where)
        if module.groups > 1 and 1 in cuts.get("weight", {}):
            raise PlanMappingError(f"cannot cut the per-group input columns of grouped conv '{where}'")

    def update(self, module, cuts, old):
        w = module.weight.shape
        if module.groups == 1:
            module.in_channels = int(w[1])
        else:
            per_group = old["weight"][0] // module.groups
            if w[0] % per_group:
                raise PlanMappingError("a grouped conv lost part of a conv group")
            module.groups = int(w[0] // per_group)
            module.in_channels = module.groups * int(w[1])
        module.out_channels = int(w[0])


@register_module_handler
class ConvTransposeHandler(ModuleHandler):
    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    axes = {"weight": (0, 1), "bias": (0,)}

    def check(self, module, cuts, where):
        super().check(module, cuts, where)
        if module.groups > 1 and 1 in cuts.get("weight", {}):
            raise PlanMappingError(f"cannot cut the per-group output columns of grouped '{where}'")

    def update(self, module, cuts, old):
        w = module.weight.shape
        if module.groups == 1:
            module.out_channels = int(w[1])
        else:
            per_group = old["weight"][0] // module.groups
            module.groups = int(w[0] // per_group)
            module.out_channels = module.groups * int(w[1])
        module.in_channels = int(w[0])


@register_module_handler
class LinearHandler(ModuleHandler):
    module_types = (nn.Linear,)
    axes = {"weight": (0, 1), "bias": (0,)}

    def update(self, module, cuts, old):
        module.out_features, module.in_features = (int(s) for s in module.weight.shape)


@register_module_handler
class BatchNormHandler(ModuleHandler):
    module_types = (nn.modules.batchnorm._NormBase,)  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    axes = {"weight": (0,), "bias": (0,), "running_mean": (0,), "running_var": (0,)}

    def update(self, module, cuts, old):
        for name in ("weight", "running_mean", "bias", "running_var"):
            t = getattr(module, name, None)
            if t is not None:
                module.num_features = int(t.shape[0])
                return


@register_module_handler
class LayerNormHandler(ModuleHandler):
    module_types = (nn.LayerNorm, nn.RMSNorm)
    axes = {"weight": (0, 1, 2, 3), "bias": (0, 1, 2, 3)}

    def update(self, module, cuts, old):
        t = module.weight if module.weight is not None else module.bias
        module.normalized_shape = tuple(int(s) for s in t.shape)


@register_module_handler
class GroupNormHandler(ModuleHandler):
    module_types = (nn.GroupNorm,)
    axes = {"weight": (0,), "bias": (0,)}

    def update(self, module, cuts, old):
        per_group = module.num_channels // module.num_groups
        channels = int(module.weight.shape[0])
        if channels % per_group:
            raise PlanMappingError("a GroupNorm lost part of a group")
        module.num_channels, module.num_groups = channels, channels // per_group


@register_module_handler
class EmbeddingHandler(ModuleHandler):
    module_types = (nn.Embedding,)
    axes = {"weight": (0, 1)}

    def update(self, module, cuts, old):
        rows = cuts.get("weight", {}).get(0)
        if rows is not None and module.padding_idx is not None:
            if module.padding_idx in set(rows.tolist()):
                module.padding_idx = None
            else:
                module.padding_idx -= int(np.count_nonzero(rows < module.padding_idx))
        module.num_embeddings, module.embedding_dim = (int(s) for s in module.weight.shape)


@register_module_handler
class PReLUHandler(ModuleHandler):
    module_types = (nn.PReLU,)
    axes = {"weight": (0,)}

    def update(self, module, cuts, old):
        module.num_parameters = int(module.weight.shape[0])


@register_module_handler
class MultiheadAttentionHandler(ModuleHandler):
    module_types = (nn.MultiheadAttention,)
    axes = {
        "in_proj_weight": (0, 1), "in_proj_bias": (0,),
        "q_proj_weight": (0, 1), "k_proj_weight": (0, 1), "v_proj_weight": (0, 1),
    }

    def check(self, module, cuts, where):
        super().check(module, cuts, where)
        if module.bias_k is not None or module.add_zero_attn:
            raise PlanMappingError(
                f"pruning MultiheadAttention '{where}' with bias_k/bias_v or add_zero_attn "
                "is not supported"
            )
        rows = _mha_row_cuts(module, cuts)
        _mha_layout(module, rows, where)  # raises when heads are cut unevenly

    def update(self, module, cuts, old):
        PrunedMultiheadAttention.convert(module, _mha_row_cuts(module, cuts, old))


def _mha_row_cuts(
    module: nn.MultiheadAttention, cuts: Mapping[str, Mapping[int, np.ndarray]],
    old: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """Removed projection rows of q, k and v, each numbered within its own projection."""
    dims = getattr(module, "_gp_dims", None) or (module.embed_dim,) * 3
    out: dict[str, np.ndarray] = {}
    packed = getattr(module, "in_proj_weight", None) is not None
    rows: set[int] = set()
    for name in ("in_proj_weight", "in_proj_bias"):
        rows |= {int(i) for i in cuts.get(name, {}).get(0, [])}
    bounds = np.cumsum([0, *dims])
    for k, which in enumerate("qkv"):
        own = {int(i) for i in cuts.get(f"{which}_proj_weight", {}).get(0, [])} if not packed else set()
        packed_rows = {r - bounds[k] for r in rows if bounds[k] <= r < bounds[k + 1]}
        out[which] = np.asarray(sorted(own | packed_rows), dtype=np.int64)
    return out


def _mha_layout(module: nn.MultiheadAttention, rows: Mapping[str, np.ndarray], where: str) -> tuple[int, int, int]:
    """Heads left, q/k head width and v head width after removing ``rows``."""
    heads = module.num_heads
    dims = getattr(module, "_gp_dims", None) or (module.embed_dim,) * 3
    kept = {}
    for k, which in enumerate("qkv"):
        per_head = dims[k] // heads
        lost = np.bincount(rows[which] // per_head, minlength=heads) if rows[which].size else np.zeros(heads, int)
        kept[which] = per_head - lost
    alive = (kept["q"] > 0) | (kept["k"] > 0) | (kept["v"] > 0)
    q, k, v = (kept[w][alive] for w in "qkv")
    if not alive.any() or np.any(q != k) or np.unique(q).size > 1 or np.unique(v).size > 1 or np.any(v == 0):
        raise PlanMappingError(
            f"the plan cuts the heads of MultiheadAttention '{where}' unevenly "
            f"(q {kept['q'].tolist()}, k {kept['k'].tolist()}, v {kept['v'].tolist()} per head)"
        )
    return int(alive.sum()), int(q[0]), int(v[0])


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose input, projection and output widths may all differ.

    Same parameters and ``state_dict`` keys as the module it came from; ``_gp_dims`` holds
    the q, k and v projection widths and ``_gp_scale`` the original ``1/sqrt(head_dim)``.
    ``_qkv_same_embed_dim`` is ``False`` so that ``nn.TransformerEncoderLayer``'s fused fast
    path (which assumes equal widths) is never taken.
    """

    _gp_dims: tuple[int, int, int]
    _gp_scale: float
    _gp_packed: bool

    @classmethod
    def convert(cls, module: nn.MultiheadAttention, rows: Mapping[str, np.ndarray]) -> None:
        if not isinstance(module, cls):
            setattr(module, "_gp_scale", float(module.head_dim) ** -0.5)  # noqa: B010
            setattr(module, "_gp_packed", module.in_proj_weight is not None)  # noqa: B010
            setattr(module, "_gp_dims", (module.embed_dim,) * 3)  # noqa: B010
        heads, qk, v = _mha_layout(module, rows, "")
        setattr(module, "_gp_dims", (heads * qk, heads * qk, heads * v))  # noqa: B010
        module.num_heads = heads
        module.head_dim = qk
        module.embed_dim = heads * qk
        module._qkv_same_embed_dim = False
        module.__class__ = cls

    def _projections(self) -> tuple[torch.Tensor, ...]:
        dq, dk, dv = self._gp_dims
        if self._gp_packed:
            wq, wk, wv = self.in_proj_weight.split([dq, dk, dv], dim=0)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split([dq, dk, dv], dim=0)
        else:
            bq = bk = bv = None
        return wq, wk, wv, bq, bk, bv

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        wq, wk, wv, bq, bk, bv = self._projections()
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        b, length, source = q.shape[0], q.shape[1], k.shape[1]
        h = self.num_heads
        q = q.view(b, length, h, -1).transpose(1, 2)
        k = k.view(b, source, h, -1).transpose(1, 2)
        v = v.view(b, source, h, -1).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * self._gp_scale
        mask = _additive(attn_mask, scores.dtype)
        if mask is not None:
            scores = scores + (mask.view(b, h, length, source) if mask.dim() == 3 else mask)
        elif is_causal:
            causal = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        padding = _additive(key_padding_mask, scores.dtype)
        if padding is not None:
            scores = scores + padding.view(b, 1, 1, source)
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = (weights @ v).transpose(1, 2).reshape(b, length, -1)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (``True`` = not allowed) as an additive ``-inf`` mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _module_cuts(plan: Plan | Mapping[str, Mapping[Any, Sequence[int]]]) -> ParamCuts:
    if isinstance(plan, Plan):
        merged: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
        for gp in plan.groups:
            if not gp.remove:
                continue
            for name, axes in gp.channels.items():
                for axis, idx in axes.items():
                    merged[name][int(axis)].update(int(i) for i in idx)
        raw: Mapping[str, Mapping[Any, Any]] = merged
    else:
        raw = plan
    return {
        name: {int(a): np.asarray(sorted({int(i) for i in idx}), dtype=np.int64) for a, idx in axes.items() if len(idx)}
        for name, axes in raw.items()
    }


def apply_plan(module: nn.Module, plan: Plan | Mapping[str, Mapping[Any, Sequence[int]]]) -> nn.Module:
    """Slice ``module`` in place by a plan keyed by ``state_dict`` names; returns ``module``.

    ``plan`` is the ``plan`` of :func:`prune_module` (or :func:`map_plan`), or a mapping
    ``{name: {axis: removed indices}}``. Everything is checked before anything changes.
    Parameters become new ``nn.Parameter`` objects: create the optimiser afterwards.
    """
    cuts = _module_cuts(plan)
    state = module.state_dict(keep_vars=True)
    missing = sorted(set(cuts) - set(state))
    if missing:
        hint = " (was this plan made on the ONNX export? map it with map_plan)"
        raise PlanMappingError(f"the plan names {missing[:5]}, not in the module's state_dict{hint}")
    # owner module and local name of every state entry; tied parameters have several
    owners: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for local, t in [*sub._parameters.items(), *sub._buffers.items()]:
            if t is not None:
                full = f"{prefix}.{local}" if prefix else local
                owners[id(t)].append((full, sub, local))
    per_tensor: dict[int, dict[int, np.ndarray]] = {}
    for name, by_axis in cuts.items():
        key = id(state[name])
        previous = per_tensor.get(key)
        if previous is not None and (
            previous.keys() != by_axis.keys()
            or any(not np.array_equal(previous[a], by_axis[a]) for a in by_axis)
        ):
            raise PlanMappingError(f"tied parameter '{name}' is cut two different ways")
        per_tensor[key] = by_axis
    # check every touched module before changing anything
    touched: dict[int, tuple[str, nn.Module, dict[str, dict[int, np.ndarray]]]] = {}
    for key, by_axis in per_tensor.items():
        tensor = next(t for t in state.values() if id(t) == key)
        for axis, idx in by_axis.items():
            if not 0 <= axis < tensor.dim() or idx.min() < 0 or idx.max() >= tensor.shape[axis]:
                raise PlanMappingError(f"the plan cuts outside '{owners[key][0][0]}' {tuple(tensor.shape)}")
            if idx.size >= tensor.shape[axis]:
                raise PlanMappingError(f"the plan removes every slice of '{owners[key][0][0]}' axis {axis}")
        for full, sub, local in owners[key]:
            prefix = full[: -len(local) - 1] if full != local else ""
            touched.setdefault(id(sub), (prefix, sub, {}))[2][local] = by_axis
    for prefix, sub, sub_cuts in touched.values():
        handler = _handler_for(sub)
        if handler is None:
            raise PlanMappingError(
                f"no handler for {type(sub).__name__} '{prefix}' (cut: {sorted(sub_cuts)}); "
                "register one with register_module_handler or protect it with keep=[...]"
            )
        handler.check(sub, sub_cuts, prefix or type(sub).__name__)
    # slice
    new: dict[int, torch.Tensor] = {}
    for key, by_axis in per_tensor.items():
        tensor = next(t for t in state.values() if id(t) == key)
        data = tensor.detach()
        for axis, idx in by_axis.items():
            keep_idx = np.setdiff1d(np.arange(data.shape[axis]), idx)
            data = data.index_select(axis, torch.as_tensor(keep_idx, device=data.device))
        data = data.clone().contiguous()
        if isinstance(tensor, nn.Parameter):
            new[key] = nn.Parameter(data, requires_grad=tensor.requires_grad)
        else:
            new[key] = data
    for _prefix, sub, sub_cuts in touched.values():
        old = {}
        for local in sub_cuts:
            t = sub._parameters.get(local)
            if t is None:
                t = sub._buffers.get(local)
            old[local] = tuple(t.shape)
            if local in sub._parameters:
                sub._parameters[local] = new[id(t)]  # type: ignore[assignment]  # a Parameter
            else:
                sub._buffers[local] = new[id(t)]
        _handler_for(sub).update(sub, sub_cuts, old)  # type: ignore[union-attr]
    for prefix, sub in module.named_modules():
        handler = _handler_for(sub)
        if handler is None or not handler.container:
            continue
        start = f"{prefix}." if prefix else ""
        below = {n[len(start):]: c for n, c in cuts.items() if n.startswith(start)}
        if below:
            handler.update(sub, below, {})
    return module


# ----------------------------------------------------------------------------- checks


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _flat_outputs(v)]
    return []


def check_module(
    module: nn.Module,
    model: onnx.ModelProto,
    example_inputs: ExampleInputs,
    *,
    tolerance: float = 1e-4,
) -> float:
    """Run ``module`` (eval mode) and ``model`` (ONNX Runtime) on the same inputs.

    Returns the largest difference relative to each output's largest magnitude; raises
    :class:`VerificationError` above ``tolerance``.
    """
    from graphprune.verify.validate import differences, run

    args = _as_tuple(example_inputs)
    with _eval_mode(module), torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in _flat_outputs(module(*args))]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != len(tensors):
        raise UsageError(f"the model has {len(names)} inputs, {len(tensors)} tensors were given")
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
    got = run(model, feeds, "the pruned model")
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected, strict=False)):
        raise VerificationError(
            f"module outputs {[e.shape for e in expected]} differ in shape from the ONNX "
            f"outputs {[g.shape for g in got]}"
        )
    _, rel = differences(got, expected)
    if rel > tolerance:
        raise VerificationError(
            f"module and ONNX outputs differ: max relative difference {rel:.3g} > {tolerance:g}"
        )
    return rel


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy (the plan is applied in place; keep the original when comparing)."""
    return copy.deepcopy(module)


def __getattr__(name: str) -> Callable[..., Any] | type:
    if name == "GroupSparsity":
        from graphprune.frontends.sparsity import GroupSparsity

        return GroupSparsity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
