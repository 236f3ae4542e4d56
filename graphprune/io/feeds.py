"""Random input feeds for running a model with ONNX Runtime.

Unknown dimensions are resolved once per symbol, so inputs that share a symbolic dimension
(``input_ids[batch, seq]`` and ``attention_mask[batch, seq]``) get the same size:

* a symbol named in ``dim_values`` takes that value;
* a symbol (or unnamed dimension) on axis 0 takes ``batch``;
* on a 4-D floating-point input (an image), an unknown channel axis takes 3 and unknown
  spatial axes take 224 (channels-first, or channels-last when the last axis is known
  and at most 4);
* anything else (sequence lengths, feature sizes) takes 8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import onnx

from graphprune.errors import UsageError

__all__ = [
    "DEFAULT_CHANNELS",
    "DEFAULT_LENGTH",
    "DEFAULT_SPATIAL",
    "Dim",
    "InputSpec",
    "input_specs",
    "make_feeds",
    "make_feeds_from_specs",
    "resolve_shapes",
]

DEFAULT_LENGTH = 8
DEFAULT_SPATIAL = 224
DEFAULT_CHANNELS = 3

Dim = int | str | None
"""One axis of a declared shape: a size, a symbol, or unknown."""


class InputSpec(NamedTuple):
    """A graph input: its name, declared shape (None when the rank is unknown) and dtype."""

    name: str
    shape: list[Dim] | None
    dtype: np.dtype


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a caller must feed (inputs that are also initializers are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    initializers.update(t.values.name for t in model.graph.sparse_initializer)
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            raise UsageError(
                f"graph input '{value.name}' is a {kind or 'untyped'} value; "
                "graphprune can only feed tensor inputs"
            )
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except Exception as exc:
            raise UsageError(
                f"graph input '{value.name}' has element type {tensor_type.elem_type}, "
                "which cannot be fed from numpy"
            ) from exc
        shape: list[Dim] | None = None
        if tensor_type.HasField("shape"):
            shape = []
            for dim in tensor_type.shape.dim:
                which = dim.WhichOneof("value")
                if which == "dim_value":
                    shape.append(int(dim.dim_value))
                elif which == "dim_param" and dim.dim_param:
                    shape.append(dim.dim_param)
                else:
                    shape.append(None)
        specs.append(InputSpec(value.name, shape, dtype))
    return specs


def _channels_last(shape: Sequence[Dim]) -> bool:
    last, second = shape[3], shape[1]
    return isinstance(last, int) and last <= 4 and not (isinstance(second, int) and second <= 4)


def _default_dim(spec: InputSpec, axis: int, batch: int) -> int:
    shape = spec.shape or []
    if axis == 0:
        return batch
    if len(shape) == 4 and np.issubdtype(spec.dtype, np.floating):
        channel_axis = 3 if _channels_last(shape) else 1
        return DEFAULT_CHANNELS if axis == channel_axis else DEFAULT_SPATIAL
    return DEFAULT_LENGTH


def resolve_shapes(
    specs: Sequence[InputSpec],
    *,
    batch: int = 1,
    dim_values: Mapping[str, int] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for ``specs``; a symbol gets one value across all inputs."""
    if batch < 1:
        raise UsageError(f"batch must be at least 1, got {batch}")
    chosen: dict[str, int] = dict(dim_values or {})
    for symbol, size in chosen.items():
        if not isinstance(size, int | np.integer) or size < 0:
            raise UsageError(f"dim_values['{symbol}'] must be a non-negative integer, got {size!r}")
    # Symbols on axis 0 are batch dimensions wherever else they appear.
    for spec in specs:
        if spec.shape and isinstance(spec.shape[0], str):
            chosen.setdefault(spec.shape[0], batch)
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.shape is None:
            raise UsageError(
                f"graph input '{spec.name}' has no declared rank; give the model a shape for it"
            )
        sizes = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                sizes.append(dim)
            elif isinstance(dim, str):
                sizes.append(chosen.setdefault(dim, _default_dim(spec, axis, batch)))
            else:
                sizes.append(_default_dim(spec, axis, batch))
        shapes[spec.name] = tuple(sizes)
    return shapes


def _random(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, int_high: int, name: str
) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, int_high, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    raise UsageError(f"cannot make random values for input '{name}' of dtype {dtype}")


def make_feeds_from_specs(
    specs: Sequence[InputSpec],
    *,
    seed: int = 0,
    batch: int = 1,
    dim_values: Mapping[str, int] | None = None,
    count: int = 1,
    int_high: int = 2,
) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of random values for ``specs`` (see :func:`make_feeds`)."""
    if count < 1:
        raise UsageError(f"count must be at least 1, got {count}")
    if int_high < 1:
        raise UsageError(f"int_high must be at least 1, got {int_high}")
    shapes = resolve_shapes(specs, batch=batch, dim_values=dim_values)
    rng = np.random.default_rng(seed)
    return [
        {
            spec.name: _random(rng, shapes[spec.name], spec.dtype, int_high, spec.name)
            for spec in specs
        }
        for _ in range(count)
    ]


def make_feeds(
    model: onnx.ModelProto,
    *,
    seed: int = 0,
    batch: int = 1,
    dim_values: Mapping[str, int] | None = None,
    count: int = 1,
    int_high: int = 2,
) -> list[dict[str, np.ndarray]]:
    """``count`` random feeds for every non-initializer graph input of ``model``.

    Floats are standard normal, integers uniform in ``[0, int_high)`` (token ids, indices),
    booleans fair coin flips. The same seed gives the same feeds.
    """
    return make_feeds_from_specs(
        input_specs(model),
        seed=seed,
        batch=batch,
        dim_values=dim_values,
        count=count,
        int_high=int_high,
    )
