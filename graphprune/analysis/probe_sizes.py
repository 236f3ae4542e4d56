"""Probe sizes the model runs with: sizes for the input dimensions a model leaves open.

Verification runs the model on random feeds, so every dimension the graph does not fix
needs a size. :func:`graphprune.io.feeds.resolve_shapes` guesses (batch 1, images 224,
sequences 8), but many real models only run at some sizes: an OCR recogniser whose
height must be 32 or 48, a voice detector that pads its 8-sample input by 96. When the
guess does not run, :func:`choose_input_shapes` tries other sizes with ONNX Runtime on the
original model and keeps the first that runs, reproducibly, with every input reaching the
outputs (new values in the inputs an open dimension sizes change some output; where none
does, the first that runs):

1. the guess (shapes given by the caller always stay as given);
2. every open dimension at the same candidate size up to 256 (32, 48, 64, ... for image
   axes, 16, 32, ... for other axes);
3. one open dimension at a time at each candidate size (up to 640 for image axes, 1024 for
   others), the others guessed;
4. every open dimension at the same candidate size above 256;
5. one open dimension at a time at each candidate size, the others at 1 (an unnamed batch
   axis of a recurrent state next to a sequence length);
6. the guess at batch 2, 4 and 8 (a model that averages four views of each sample).

Sizes found past the guess are then shrunk one open dimension at a time, to the smallest
candidate (not below the guess) that still works (:func:`_shrink`): one input that needs a
long length leaves the others small.

A dimension is *open* when the input declares a symbol, ``-1`` or nothing on an axis other
than the batch axis (axis 0 stays at 1 but in the last tries). Inputs that share a symbol
keep one size. When no candidate runs, the guess stays and the caller reports the original's
failure (with the hint to give shapes, ``--input-shape NAME=d0,d1,...``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphprune.errors import UsageError
from graphprune.io.feeds import (
    InputSpec,
    derived_from,
    integers_zeroed,
    make_feeds_from_specs,
    resolve_shapes,
)

IMAGE_SIZES = (224, 32, 48, 64, 96, 128, 160, 256, 320, 512, 640)
OTHER_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 1, 2, 4)
#: every open dimension at the same size up to this one first; larger sizes for one dimension
#: at a time before all of them (a run with every axis at 1024 took VITS 36 s and 2 GB, where
#: only its reference audio needed more than 256 samples)
JOINT_FIRST = 256
#: batch sizes tried last, where nothing runs at batch 1
BATCHES = (2, 4, 8)
#: at most this many runs of the original, and this much time, are spent looking
MAX_TRIES = 100
MAX_SECONDS = 30.0
#: after the first sizes at which an input does not reach the outputs, this many more tries
#: and this much time in all are spent looking for sizes at which it does
BLIND_TRIES = 12
BLIND_SECONDS = 10.0

Key = tuple[str, int] | str  # a symbol, or (input name, axis) for an unnamed dimension


def open_dimensions(
    specs: Sequence[InputSpec], given: Mapping[str, Sequence[int]] | None = None
) -> dict[Key, list[tuple[str, int]]]:
    """The open dimensions of ``specs`` (see the module docstring), each with the
    ``(input, axis)`` positions it sizes; inputs in ``given`` are not open."""
    found: dict[Key, list[tuple[str, int]]] = {}
    symbols = {d for spec in specs for d in spec.shape or () if isinstance(d, str)}
    for spec in specs:
        if spec.shape is None or (given and spec.name in given):
            continue
        for axis, dim in enumerate(spec.shape):
            if axis == 0 or (isinstance(dim, int) and dim >= 0) or (isinstance(dim, str) and derived_from(dim, symbols)):
                continue  # known, the batch, or arithmetic of other symbols (sized with them)
            key: Key = dim if isinstance(dim, str) else (spec.name, axis)
            found.setdefault(key, []).append((spec.name, axis))
    # a symbol that also sits on an axis 0 is a batch size
    batch_symbols = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    return {k: v for k, v in found.items() if k not in batch_symbols}


def leading_sizes(specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]]) -> bool:
    """Do ``shapes`` (one calibration sample's) size an open axis 0 other than 1? Such an axis
    is no batch of one-sample feeds but a length of the data: a graph's atoms, a point cloud's
    points, frames of a ``[T, F]`` input. :func:`open_dimensions` takes it for the batch, which
    counts one atom: MACs per atom and per graph then weigh as they never do on the data."""
    for spec in specs:
        shape = shapes.get(spec.name)
        if spec.shape and shape and not (isinstance(spec.shape[0], int) and spec.shape[0] >= 0) and shape[0] != 1:
            return True
    return False


def required_sizes(model: Any, specs: Sequence[InputSpec], opset: int) -> dict[str, int]:
    """Sizes of the input symbols that the ops reading those inputs require
    (:meth:`~graphprune.rules.registry.OpRule.required_sizes`: ONNX Runtime GenAI's decoders
    declare their KV cache ``[batch_size, H_kv, past_sequence_length, kv_cache_dim]``, and
    only ``GroupQueryAttention`` knows that ``kv_cache_dim`` is its head size; a layer's weight
    fixes the features it reads), where ONNX shape inference carries the input's symbol to
    that op. ``model``: a ModelProto, its weights not read."""
    import onnx

    from graphprune.io import gs_export
    from graphprune.rules import registry

    def rule(domain: str, op: str) -> Any:
        return registry.overriding_rule(domain or "", op, opset, "required_sizes")

    by_name = {s.name: s for s in specs if s.shape}
    if not any(isinstance(d, str) for s in by_name.values() for d in s.shape[1:]) or not any(
        rule(n.domain, n.op_type) for n in model.graph.node
    ):
        return {}
    from graphprune.io.tensor_protos import _detach

    try:  # (on a weightless skeleton: no weight goes through protobuf)
        graph = gs_export.import_onnx(onnx.shape_inference.infer_shapes(_detach(model)[0]))
    except Exception:  # noqa: BLE001 - a graph inference or graphsurgeon cannot read: nothing known
        return {}
    symbols = {d for s in by_name.values() for d in s.shape if isinstance(d, str)}
    found: dict[str, int] = {}
    for node in graph.nodes:
        if (found_rule := rule(node.domain, node.op)) is None:
            continue
        for (index, axis), size in found_rule.required_sizes(node).items():
            # the symbol an input declares there, carried by shape inference (an LSTM reads the
            # features of an input [frames, features] through an Unsqueeze)
            shape = node.inputs[index].shape if index < len(node.inputs) else None
            dim = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
            if isinstance(dim, str) and dim in symbols and size >= 0:
                found.setdefault(dim, int(size))
    return found


def _is_image_axis(spec: InputSpec, axis: int) -> bool:
    return bool(spec.shape) and len(spec.shape) == 4 and np.issubdtype(spec.dtype, np.floating) and axis >= 1


def _assign(
    base: dict[str, tuple[int, ...]], keys: dict[Key, list[tuple[str, int]]], sizes: dict[Key, int]
) -> dict[str, tuple[int, ...]]:
    shapes = {name: list(shape) for name, shape in base.items()}
    for key, size in sizes.items():
        for name, axis in keys[key]:
            shapes[name][axis] = size
    return {name: tuple(shape) for name, shape in shapes.items()}


def candidate_shapes(
    specs: Sequence[InputSpec], given: Mapping[str, Sequence[int]] | None = None,
    required: Mapping[str, int] | None = None,
) -> list[dict[str, tuple[int, ...]]]:
    """The input shapes to try, in order (the guess first); without open dimensions only
    the guess. ``required``: sizes of symbols the graph's ops fix (:func:`required_sizes`),
    kept in every try unless a given shape sizes the symbol otherwise."""
    try:
        base = resolve_shapes(specs, batch=1, input_shapes=given, dim_values=required)
    except UsageError:  # a given shape sizes a required symbol otherwise: the given one holds
        base, required = resolve_shapes(specs, batch=1, input_shapes=given), None
    keys = {k: v for k, v in open_dimensions(specs, given).items() if k not in (required or {})}
    by_name = {s.name: s for s in specs}
    tries = [base]
    batched = _batched(specs, given, required)
    if not keys:
        return tries + [t for t in batched if t != base]

    def sizes_for(key: Key) -> tuple[int, ...]:
        name, axis = keys[key][0]
        return IMAGE_SIZES if _is_image_axis(by_name[name], axis) else OTHER_SIZES

    seen = {tuple(sorted(base.items()))}

    def add(sizes: dict[Key, int], shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        shapes = _assign(base, keys, sizes) if shapes is None else shapes
        marker = tuple(sorted(shapes.items()))
        if marker not in seen:
            seen.add(marker)
            tries.append(shapes)

    joint = [{k: sizes_for(k)[min(index, len(sizes_for(k)) - 1)] for k in keys}
             for index in range(max(len(IMAGE_SIZES), len(OTHER_SIZES)))]
    for sizes in joint:
        if max(sizes.values()) <= JOINT_FIRST:
            add(sizes)
    for key in keys:
        for size in sizes_for(key):
            add({key: size})
    for sizes in joint:
        add(sizes)
    if len(keys) > 1:  # the others at 1: an unnamed batch axis of a state next to a length
        for key in keys:
            for size in sizes_for(key):
                add({k: size if k == key else 1 for k in keys})
    for shapes in batched:
        add({}, shapes)
    return tries


def _batched(specs: Sequence[InputSpec], given: Mapping[str, Sequence[int]] | None,
             required: Mapping[str, int] | None) -> list[dict[str, tuple[int, ...]]]:
    """The guess at each of :data:`BATCHES` on every open batch axis (ICLabel averages four
    augmentations of each sample: it reshapes its batch to ``[4, -1]`` and runs at batch 4, 8...
    only); tried last."""
    out = []
    for batch in BATCHES:
        try:
            out.append(resolve_shapes(specs, batch=batch, input_shapes=given, dim_values=required))
        except UsageError:
            continue
    return out


def choose_input_shapes(
    model_path: Any,
    specs: Sequence[InputSpec],
    given: Mapping[str, Sequence[int]] | None = None,
    *,
    seed: int = 0,
    feed: Callable[[dict[str, tuple[int, ...]]], dict] | None = None,
    values: Mapping[str, Any] | None = None,
    session: Any = None,
    required: Mapping[str, int] | None = None,
    float_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, tuple[int, ...]] | None:
    """Input shapes the model at ``model_path`` runs with (ONNX Runtime, CPU), or ``None``
    when nothing needed choosing or no candidate runs (the caller's guess stays). ``feed``
    makes the values tried at some shapes (default: verification's random feeds, with the
    inputs of ``values`` filled with those, and those of ``float_ranges`` uniform in their
    range); ``session``: an ONNX Runtime session of the model
    to run them with (default: one on the CPU from ``model_path``). ``required``: see
    :func:`candidate_shapes`; where it sizes a symbol, the guess with those sizes is returned
    too, also where no candidate runs (the values tried may be what fails)."""
    tries = candidate_shapes(specs, given, required)
    if len(tries) == 1:
        return tries[0] if required else None
    import onnxruntime as ort

    from graphprune.io import runtime

    if session is None:
        options = runtime.session_options()
        options.log_severity_level = 4
        try:
            session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception:
            return None
    started = time.perf_counter()
    runs: tuple[int, dict[str, tuple[int, ...]]] | None = None  # the smallest that runs, if none reproduces
    blind: tuple[int, dict[str, tuple[int, ...]]] | None = None  # the first that reproduces, if none is seen
    keys = {k: v for k, v in open_dimensions(specs, given).items() if k not in (required or {})}
    if not keys and (feed is not None or _guess_runs(session, specs, tries[0], seed, values, float_ranges)):
        return tries[0] if required else None  # only the batch is open: the guess, as before, where it runs

    def outcome(shapes: dict[str, tuple[int, ...]]) -> str:
        """"fails", "varies" (runs, but overflows, leaves part of an output unwritten or draws
        random numbers), "blind" (an input sized by an open dimension reaches no output) or "ok"."""
        try:
            feeds = (feed(shapes) if feed is not None
                     else make_feeds_from_specs(specs, seed=seed, input_shapes=shapes, values=values,
                                                  float_ranges=float_ranges)[0])
            outputs = session.run(None, feeds)
            again = session.run(None, feeds) if _finite(outputs) else None
        except Exception:
            return "fails"
        if again is None or not _same(outputs, again):
            return "varies"
        if feed is None and not _inputs_reach_outputs(session, specs, keys, shapes, feeds, outputs, seed, values,
                                                        float_ranges):
            return "blind"
        return "ok"

    for count, shapes in enumerate(tries):
        if count >= MAX_TRIES or time.perf_counter() - started > MAX_SECONDS:
            break
        if blind is not None and (count - blind[0] > BLIND_TRIES or time.perf_counter() - started > BLIND_SECONDS):
            break
        found = outcome(shapes)
        if found == "varies":
            # the smallest such (a VITS vocoder whose reference audio needs 705 samples ran first
            # with every axis at 1024: 5x the verification's time)
            if runs is None or _elements(shapes, tries[0]) < _elements(runs[1], tries[0]):
                runs = (count, shapes)
        elif found == "blind":
            blind = blind or (count, shapes)
        elif found == "ok":
            if count == 0:
                return shapes if required else None
            return _shrink(shapes, tries[0], keys, lambda s: outcome(s) == "ok", _candidates(specs))
    if blind is not None or runs is not None:
        count, shapes = blind or runs
        if count == 0:
            return shapes if required else None
        if blind is None:  # sizes that run, none reproducibly: the smallest that still runs
            return _shrink(shapes, tries[0], keys, lambda s: outcome(s) != "fails", _candidates(specs))
        return shapes
    return tries[0] if required else None  # nothing runs on these values: the sizes the ops need, at least


def _guess_runs(session: Any, specs: Sequence[InputSpec], shapes: dict[str, tuple[int, ...]], seed: int,
                values: Mapping[str, Any] | None, float_ranges: Mapping[str, tuple[float, float]] | None) -> bool:
    """Whether the model runs at ``shapes`` on verification's random feeds, or with its integer
    inputs 0 (verification's own fallback: ids into a count of rows the batch sizes)."""
    try:
        feeds = make_feeds_from_specs(specs, seed=seed, input_shapes=shapes, values=values,
                                      float_ranges=float_ranges)[0]
    except Exception:  # noqa: BLE001 - feeds that cannot be made at the guess: none runs
        return False
    for attempt in (feeds, integers_zeroed(feeds)):
        try:
            session.run(None, attempt)
            return True
        except Exception:  # noqa: BLE001 - ONNX Runtime's own types
            continue
    return False


def _candidates(specs: Sequence[InputSpec]) -> Callable[[str, int], Sequence[int]]:
    """The candidate sizes of an input's axis (the trials')."""
    by_name = {spec.name: spec for spec in specs}
    return lambda name, axis: IMAGE_SIZES if _is_image_axis(by_name[name], axis) else OTHER_SIZES


def _shrink(shapes: dict[str, tuple[int, ...]], guess: dict[str, tuple[int, ...]],
            keys: Mapping[Key, list[tuple[str, int]]], works: Callable[[dict[str, tuple[int, ...]]], bool],
            sizes: Callable[[str, int], Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """``shapes`` (sizes that work) made smaller: the trials size every open dimension alike
    first, so one input that needs a long length (VITS's reference audio, 705 samples) had
    every other axis at 1024 too, and every verification and calibration run paid for it.
    First one dimension at its size and the others at the guess's, for each in turn (a run
    at the sizes found may take seconds; these are cheap); then each dimension alone at the
    smallest candidate size (as the trials', ``sizes(input, axis)``, none below the guess's)
    that still works. Within :data:`MAX_SECONDS` of its own."""
    started = time.perf_counter()
    floor = {key: guess[positions[0][0]][positions[0][1]] for key, positions in keys.items()}
    if len(keys) > 1:
        for key in keys:
            alone = _assign(shapes, dict(keys), {k: size for k, size in floor.items() if k != key})
            if alone != shapes and works(alone):
                shapes = alone
                break
            if time.perf_counter() - started > MAX_SECONDS:
                return shapes
    for key, positions in keys.items():
        name, axis = positions[0]
        for size in sorted(sizes(name, axis)):
            if time.perf_counter() - started > MAX_SECONDS:
                return shapes
            if size >= shapes[name][axis] or size < floor[key]:
                continue
            smaller = _assign(shapes, {key: positions}, {key: size})
            if works(smaller):
                shapes = smaller
                break
    return shapes


def _inputs_reach_outputs(session: Any, specs: Sequence[InputSpec], keys: Mapping[Key, list[tuple[str, int]]],
                          shapes: dict[str, tuple[int, ...]], feeds: dict, outputs: Sequence[Any], seed: int,
                          values: Mapping[str, Any] | None,
                          float_ranges: Mapping[str, tuple[float, float]] | None = None) -> bool:
    """Do the inputs sized by each open dimension change some output at ``shapes``? Silero VAD
    v5 runs at 256 samples and answers from its state alone there: verification at that size
    would not see its encoder (nor the calibration's random feeds). Inputs whose values are
    fixed (a mask of ones) are not varied; a run that fails counts as seen."""
    other = make_feeds_from_specs(specs, seed=seed + 1, input_shapes=shapes, values=values,
                                  float_ranges=float_ranges)[0]
    for positions in keys.values():
        names = {name for name, _ in positions}
        varied = {**feeds, **{n: other[n] for n in names}}
        if all(np.array_equal(varied[n], feeds[n]) for n in names):
            continue
        try:
            if _same(outputs, session.run(None, varied)):
                return False
        except Exception:
            continue
    return True


def _elements(shapes: Mapping[str, Sequence[int]], guess: Mapping[str, Sequence[int]]) -> int:
    """The values fed at ``shapes``, an input counted at no fewer than at the ``guess`` (a
    sequence of 1 is no cheaper a check than one of 8)."""
    return sum(max(int(np.prod(shape, dtype=np.int64)), int(np.prod(guess.get(name, ()), dtype=np.int64)))
               for name, shape in shapes.items())


def _same(first: Sequence[Any], second: Sequence[Any]) -> bool:
    """Two runs' outputs equal to the bit (a static KV cache's ``present`` beyond its total
    length is memory the kernel never wrote: it differs from run to run)."""
    return all(not isinstance(a, np.ndarray) or np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
               for a, b in zip(first, second, strict=True))


def _finite(outputs: Sequence[Any]) -> bool:
    """Every floating-point output finite (non-tensor outputs, sequences and maps, count as so)."""
    return all(not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating)
               or np.isfinite(value).all() for value in outputs)


def counting_shapes(model: Any, graph: Any, specs: Sequence[InputSpec],
                    given: Mapping[str, Sequence[int]] | None,
                    run_shapes: Callable[[], Mapping[str, Sequence[int]] | None]) -> dict[str, Any] | None:
    """Input shapes to count ``model``'s MACs at: the default guess
    (:func:`~graphprune.io.feeds.resolve_shapes`) where the model runs there, else the sizes
    it runs with (``run_shapes()``: verification's, one run of the original whether or not
    verification follows) where the count can size the model there. A text recogniser built
    for height 48 does not run at 224x224; counted there, its sequence neck stays unsized and
    a MACs budget was steered by the per-pixel cost of its layers. ``graph``: ``model``
    imported (or analysed). ``None`` where no size is ``given``, only the batch is open (counted at 1, unless the
    model runs at another batch only: there) and every layer has sizes the inputs name; where one does not
    (:func:`~graphprune.verify.metrics.unsized_layers`: tf2onnx flattens a Keras ``Dense`` on
    a sequence to ``[batch*8, 32]``), the default sizes, at which it is counted in full."""
    from graphprune.io import ir
    from graphprune.verify.metrics import sized_shapes, unsized_layers

    only_batch = not given and not open_dimensions(specs) and not unsized_layers(graph, ir.default_opset(model))
    try:
        guess = resolve_shapes(specs, input_shapes=given)
    except Exception:  # an input the guess cannot size: count as before
        return None
    runs = run_shapes()
    if only_batch:  # counted at batch 1, unless the model runs at another batch only (ICLabel: 4)
        return {**guess, **{n: tuple(int(d) for d in s) for n, s in runs.items()}} if runs else None
    if runs:
        chosen = {**guess, **{name: tuple(int(d) for d in shape) for name, shape in runs.items()}}
        if chosen != guess and sized_shapes(model, graph, chosen, or_none=True) is not None:
            return chosen
    return guess
