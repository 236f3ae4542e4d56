"""Random input feeds for running a model with ONNX Runtime.

Unknown dimensions are resolved once per symbol, so inputs that share a symbolic dimension
(``input_ids[batch, seq]`` and ``attention_mask[batch, seq]``) get the same size:

* an input named in ``input_shapes`` takes that whole shape (it must fit the declared one),
  and its symbols take the sizes it gives them;
* a symbol named in ``dim_values`` takes that value;
* a symbol (or unnamed dimension) on axis 0 takes ``batch``;
* on a 4-D floating-point input (an image), an unknown channel axis takes 3 and unknown
  spatial axes take 224 (channels-first, or channels-last when the last axis is known
  and at most 4);
* anything else (sequence lengths, feature sizes) takes 8;
* a symbol that is arithmetic of other symbols (``past_sequence_length + sequence_length``,
  Optimum's attention-mask width; ``s0 + s1``; GenAI's ``total_sequence_length``, by its
  convention) takes the value of that arithmetic.

A declared size of ``-1`` (older exporters, e.g. paddle2onnx) counts as unknown. Every feed
is an ``np.ndarray``, a scalar input one of shape ``()``.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx

from graphprune.errors import UsageError

__all__ = [
    "output_array",
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


#: symbolic sizes that only say "unknown": paddle2onnx writes ``?`` for every open axis (an
#: OCR recogniser's height and width), so equal names there do not mean equal sizes
UNNAMED_DIMS = ("?", "")


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
                if which == "dim_value" and dim.dim_value >= 0:
                    shape.append(int(dim.dim_value))
                elif which == "dim_param" and dim.dim_param not in UNNAMED_DIMS:
                    shape.append(dim.dim_param)
                else:
                    shape.append(None)
        specs.append(InputSpec(value.name, shape, dtype))
    return specs


def declare_ranks(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, int]:
    """Give (in place) each tensor graph input that declares no shape the rank of its sizes
    in ``input_shapes``, every size left open (ONNX requires a shape there; ONNX Runtime runs
    such an input at any rank, so only the caller knows it); return ``{name: rank}``. An
    input without a shape that ``input_shapes`` does not cover is a :class:`UsageError`."""
    declared: dict[str, int] = {}
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type" or value.type.tensor_type.HasField("shape") or value.name in initializers:
            continue
        sizes = (input_shapes or {}).get(value.name)
        if sizes is None:
            raise UsageError(
                f"graph input '{value.name}' declares no shape (ONNX requires one; ONNX Runtime runs "
                f"it at any rank): give its sizes with --input-shape {value.name}=d0,d1,... "
                f"(API: input_shapes)"
            )
        shape = value.type.tensor_type.shape
        for _ in sizes:
            shape.dim.add()
        declared[value.name] = len(sizes)
    return declared


def _channels_last(shape: Sequence[Dim]) -> bool:
    last, second = shape[3], shape[1]
    def small(dim: Dim) -> bool:  # a known size of at most 4 (-1 counts as unknown)
        return isinstance(dim, int) and 0 <= dim <= 4

    return small(last) and not small(second)


def _default_dim(spec: InputSpec, axis: int, batch: int) -> int:
    shape = spec.shape or []
    if axis == 0:
        return batch
    # an image: float, or integer pixels (uint8/int32) with 1, 3 or 4 declared channels last
    # (TF detection and pose models: MoveNet multipose, FaceBoxes)
    if len(shape) == 4 and (np.issubdtype(spec.dtype, np.floating) or _channels_last(shape)):
        channel_axis = 3 if _channels_last(shape) else 1
        return DEFAULT_CHANNELS if axis == channel_axis else DEFAULT_SPATIAL
    return DEFAULT_LENGTH


def _given_shape(spec: InputSpec, shape: Sequence[int], chosen: dict[str, int]) -> tuple[int, ...]:
    """``shape`` for ``spec`` after checking it against the declared shape; binds symbols."""
    sizes = tuple(shape)
    if any(not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 0 for n in sizes):
        raise UsageError(
            f"input_shapes['{spec.name}'] must be non-negative integers, got {shape!r}"
        )
    if spec.shape is not None:
        if len(sizes) != len(spec.shape):
            raise UsageError(f"input_shapes['{spec.name}'] has rank {len(sizes)}; the graph input "
                             f"'{spec.name}' has rank {len(spec.shape)}")
        for axis, (dim, size) in enumerate(zip(spec.shape, sizes, strict=True)):
            if isinstance(dim, int) and dim >= 0 and dim != size:
                raise UsageError(f"input_shapes['{spec.name}'] gives axis {axis} size {size}; "
                                 f"the graph input '{spec.name}' declares {dim}")
            if isinstance(dim, str):
                # a symbol two given inputs size differently stays the first one's for the
                # inputs not given: exporters name unrelated axes alike (torch's copied
                # ``dynamic_axes``: ``[batch, height, width]`` on [1, N, 256] and [1, N, 8]),
                # and ONNX Runtime does not bind a symbol across inputs
                chosen.setdefault(dim, int(size))
    return tuple(int(n) for n in sizes)


def resolve_shapes(
    specs: Sequence[InputSpec],
    *,
    batch: int = 1,
    dim_values: Mapping[str, int] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for ``specs``; a symbol gets one value across all inputs."""
    if batch < 1:
        raise UsageError(f"batch must be at least 1, got {batch}")
    chosen: dict[str, int] = dict(dim_values or {})
    for symbol, size in chosen.items():
        if not isinstance(size, int | np.integer) or size < 0:
            raise UsageError(f"dim_values['{symbol}'] must be a non-negative integer, got {size!r}")
    given: dict[str, tuple[int, ...]] = {}
    names = {spec.name for spec in specs}
    for name in input_shapes or {}:
        if name not in names:
            raise UsageError(f"input_shapes names '{name}', which is not a graph input "
                             f"(inputs: {', '.join(sorted(names))})")
    for spec in specs:  # given shapes first: they bind the symbols they cover
        if input_shapes and spec.name in input_shapes:
            given[spec.name] = _given_shape(spec, input_shapes[spec.name], chosen)
    # Symbols on axis 0 are batch dimensions wherever else they appear.
    for spec in specs:
        if spec.shape and isinstance(spec.shape[0], str):
            chosen.setdefault(spec.shape[0], batch)
    symbols = {d for spec in specs for d in spec.shape or () if isinstance(d, str)}
    shapes: dict[str, tuple[int, ...]] = {}
    derived: list[tuple[str, int, str]] = []
    for spec in specs:
        if spec.name in given:
            shapes[spec.name] = given[spec.name]
            continue
        if spec.shape is None:
            raise UsageError(
                f"graph input '{spec.name}' has no declared rank; give the model a shape for it"
            )
        sizes = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim >= 0:
                sizes.append(dim)
            elif isinstance(dim, str) and dim not in chosen and derived_from(dim, symbols):
                derived.append((spec.name, axis, dim))  # sized once the symbols it names are
                sizes.append(0)
            elif isinstance(dim, str):
                sizes.append(chosen.setdefault(dim, _default_dim(spec, axis, batch)))
            else:
                sizes.append(_default_dim(spec, axis, batch))
        shapes[spec.name] = tuple(sizes)
    for name, axis, dim in derived:
        names = derived_from(dim, symbols)
        spec = next(s for s in specs if s.name == name)
        for symbol in names:
            chosen.setdefault(symbol, _default_dim(spec, axis, batch))
        size = chosen.setdefault(dim, max(_evaluate(dim, chosen), 0))
        shapes[name] = (*shapes[name][:axis], size, *shapes[name][axis + 1:])
    return shapes


_ARITHMETIC = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Name, ast.Load, ast.Constant)


#: symbols that name a sum by convention: ONNX Runtime GenAI's decoders declare the attention
#: mask ``[batch_size, total_sequence_length]`` beside ``past_sequence_length`` caches and
#: ``sequence_length`` tokens
CONVENTIONS = {"total_sequence_length": "past_sequence_length + sequence_length"}


def derived_from(symbol: str, symbols: set[str]) -> tuple[str, ...]:
    """The symbols that ``symbol`` is an arithmetic expression of (Optimum names an attention
    mask's width ``past_sequence_length + sequence_length``; ``torch.export`` writes
    ``s0 + s1``; :data:`CONVENTIONS`), where every name in it is a symbol of the graph's inputs
    too; ``()`` for a plain name or anything else. Such a size follows from theirs (a decoder
    runs only where the mask covers the cache and the new tokens)."""
    try:
        tree = ast.parse(CONVENTIONS.get(symbol, symbol).strip(), mode="eval")
    except SyntaxError:
        return ()
    if isinstance(tree.body, ast.Name) or not all(isinstance(n, _ARITHMETIC) for n in ast.walk(tree)):
        return ()
    names = tuple(dict.fromkeys(n.id for n in ast.walk(tree) if isinstance(n, ast.Name)))
    return names if names and all(n in symbols and n != symbol for n in names) else ()


def _evaluate(symbol: str, sizes: Mapping[str, int]) -> int:
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return int(sizes[node.id])
        if isinstance(node, ast.BinOp):
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            return a // b if b else 0
        raise ValueError(symbol)
    return value(ast.parse(CONVENTIONS.get(symbol, symbol).strip(), mode="eval").body)


def _random(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, int_high: int, name: str,
    float_range: tuple[float, float] | None = None,
) -> np.ndarray:
    if dtype == np.bool_:  # an ndarray even for shape (): ORT refuses numpy scalars
        return np.asarray(rng.random(shape) < 0.5)
    if np.issubdtype(dtype, np.floating):
        if float_range is not None:
            return rng.uniform(*float_range, size=shape).astype(dtype)
        return rng.standard_normal(shape).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, int_high, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype == np.object_ or np.issubdtype(dtype, np.str_):  # a string input: a tokenizer in the graph
        return random_text(rng, shape)
    raise UsageError(f"cannot make random values for input '{name}' of dtype {dtype}")


def random_text(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Strings of 3-12 random lowercase words (what a tokenizer or a string-keyed lookup in
    the graph reads: no meaning, every character one a vocabulary knows)."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    count = int(np.prod(shape, dtype=np.int64))
    texts = [" ".join("".join(rng.choice(letters, size=int(rng.integers(2, 9))))
                      for _ in range(int(rng.integers(3, 13)))) for _ in range(count)]
    out = np.empty(count, dtype=object)
    out[:] = texts
    return out.reshape(shape)


def make_feeds_from_specs(
    specs: Sequence[InputSpec],
    *,
    seed: int = 0,
    batch: int = 1,
    dim_values: Mapping[str, int] | None = None,
    count: int = 1,
    int_high: int = 2,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    values: Mapping[str, Any] | None = None,
    int_highs: Mapping[str, int] | None = None,
    float_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of random values for ``specs`` (see :func:`make_feeds`)."""
    if count < 1:
        raise UsageError(f"count must be at least 1, got {count}")
    if int_high < 1:
        raise UsageError(f"int_high must be at least 1, got {int_high}")
    shapes = resolve_shapes(specs, batch=batch, dim_values=dim_values, input_shapes=input_shapes)
    rng = np.random.default_rng(seed)
    return [
        {
            spec.name: (np.full(shapes[spec.name], values[spec.name], dtype=spec.dtype)
                        if values and spec.name in values
                        else _random(rng, shapes[spec.name], spec.dtype,
                                     (int_highs or {}).get(spec.name, int_high), spec.name,
                                     (float_ranges or {}).get(spec.name)))
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
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    values: Mapping[str, Any] | None = None,
    int_highs: Mapping[str, int] | None = None,
    float_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``count`` random feeds for every non-initializer graph input of ``model``.

    Floats are standard normal (``float_ranges``: uniform in a range per input, the range its
    quantizer represents), integers uniform in ``[0, int_high)`` (``int_highs``: a bound
    per input, the rows of the table it indexes), booleans fair coin flips; an input named in
    ``values`` is filled with that value (a mode switch the graph tests: a sample rate). The
    same seed gives the same feeds.
    """
    return make_feeds_from_specs(
        input_specs(model),
        seed=seed,
        batch=batch,
        dim_values=dim_values,
        count=count,
        int_high=int_high,
        input_shapes=input_shapes,
        values=values,
        int_highs=int_highs,
        float_ranges=float_ranges,
    )


def integers_zeroed(feed: Mapping[str, Any]) -> dict[str, Any]:
    """``feed`` with every integer input 0: the fallback where random ids do not run (ids into
    an open count of rows, a GNN's atoms: verification's batch of one atom has no atom 1)."""
    return {k: np.zeros_like(v) if np.issubdtype(np.asarray(v).dtype, np.integer) else v for k, v in feed.items()}


def output_array(value: object) -> np.ndarray:
    """An ONNX Runtime output as an array. A sequence of maps (``ZipMap``'s class
    probabilities: one ``{label: score}`` per sample) becomes a samples x labels float array
    with the labels in sorted order, so outputs compare numerically instead of as Python
    objects (where any rounding difference is a mismatch). A sequence of tensors of different
    shapes (``SplitToSequence`` of uneven parts) becomes their elements in one flat array."""
    if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 1:
        value = value.tolist()
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = sorted(value[0])
        if all(sorted(v) == keys for v in value):
            return np.array([[v[k] for k in keys] for v in value], dtype=np.float64)
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value) \
            and len({v.shape for v in value}) > 1:  # a sequence of tensors of several shapes: one flat array
        return np.concatenate([v.ravel() for v in value])
    return np.asarray(value)

