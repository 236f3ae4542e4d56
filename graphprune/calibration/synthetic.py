"""Synthetic calibration data: ``--calibration random[:N]`` when there is no data at all.

A least-squares refit makes each pruned layer compute what the original computed on the
calibration inputs; it needs inputs that exercise the layers, not inputs that mean anything.
Random inputs of the right kind do that well on convolutional, recurrent and MLP networks (the
digits CNN of ``bench/calibration_digits.py`` at 0.25x MACs: test accuracy 74 % data-free,
97.6 % calibrated on random normal images, 98.9 % on real ones), part of the way on
transformers (all-MiniLM-L6-v2 at 25 % of its MLP: sentence cosine 0.80 data-free, 0.87 on
random tokens, 0.98 on real sentences), and not at all on a text recogniser (PP-OCRv5):
``bench/calibration_synthetic.py``, ``docs/calibration.md``.

``N`` feeds (default :data:`DEFAULT_COUNT`), each at the sizes verification runs the model
with (batch 1; ``--input-shape`` fixes them) or, where the model does not run there on these
values (a sample rate of 16000 takes a branch that needs longer audio), at sizes chosen by
running it on them; deterministic for a model:

* floating-point inputs: standard normal values (what a normalised image, spectrogram or
  feature vector roughly looks like), or uniform in ``[LO, HI]`` with ``random:N:LO,HI``
  where the user knows the range (images in [0, 1]: ``random:128:0,1``);
* integer inputs that index a table (token ids into an embedding ``Gather``, found through
  reshapes and casts by the rule registry's :meth:`~graphprune.rules.registry.OpRule.index_bound`):
  uniform over the table's rows; one named like a position (``position``) counts up along its
  last axis, one named like a segment (``token_type``, ``segment``) is all zeros;
* integer or boolean inputs named like a mask (``mask``): all ones (everything attended); a
  boolean one all False where all True makes the outputs ignore the input it masks and all
  False does not (PyTorch's key-padding masks: True = padding; :func:`unmask`);
* a small integer or boolean input that the graph tests for equality with a constant (a mode
  switch ahead of an ``If``: silero's ``Equal(sr, 16000)``, :func:`tested_values`): that
  constant, as verification feeds it;
* a small integer input named like a length (``len``): the sequence length of the other
  inputs (the token ids' last axis, else the longest second axis); one named like a sample
  rate (``sr``, ``sample_rate``) that the graph does not test: 16000;
* any other integer or boolean input: 0 or 1 at random, as verification feeds it.

The fidelity the report gives is then measured on held-out *random* inputs: how well the
pruned model follows the original there, not on the data it will see.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.errors import UsageError
from graphprune.io import gs_export
from graphprune.io.feeds import InputSpec, random_text
from graphprune.rules.registry import OpRule, lookup

#: feeds made when ``random`` names no count
DEFAULT_COUNT = 128
#: how many nodes past a graph input an index bound is looked for
MAX_DEPTH = 6

_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?"
_SPEC = re.compile(rf"random(?::(\d+)(?::({_NUMBER}),({_NUMBER}))?)?")
#: integer inputs that state a sequence length, or an audio sample rate (names)
_LENGTH = re.compile(r"len")
_RATE = re.compile(r"^sr$|sample_?rate|sampling_?rate")
#: the sample rate such an input gets (what speech models mostly run at)
SAMPLE_RATE = 16000


class Spec(NamedTuple):
    """``random[:N[:LO,HI]]``: N feeds; floats uniform in [LO, HI] when given, else normal."""

    count: int
    float_range: tuple[float, float] | None = None


def parse(source: Any) -> Spec | None:
    """``source`` as a synthetic spec when it is ``random``, ``random:N`` or ``random:N:LO,HI``
    (and no file or folder of that name exists); ``None`` when it is other calibration data."""
    if not isinstance(source, str) or os.path.exists(source):
        return None
    match = _SPEC.fullmatch(source.strip())
    if match is None:
        if source.strip().startswith("random:"):
            raise UsageError(f"--calibration {source}: write random, random:N or random:N:LO,HI "
                             "(e.g. random:128:0,1 for floats uniform in [0, 1])")
        return None
    count = DEFAULT_COUNT if match.group(1) is None else int(match.group(1))
    if count < 2:
        raise UsageError(f"--calibration {source}: at least 2 random samples are needed (one is held out)")
    if match.group(2) is None:
        return Spec(count)
    low, high = float(match.group(2)), float(match.group(3))
    if not low < high:
        raise UsageError(f"--calibration {source}: the float range needs LO < HI")
    return Spec(count, (low, high))


def _readers(graph: gs.Graph, opset: int) -> Iterator[tuple[gs.Tensor, gs.Node, OpRule, int]]:
    """``(graph input, node, its rule, input index)`` for every node that reads a graph
    input's values within :data:`MAX_DEPTH` nodes, through nodes that carry values unchanged
    (reshapes, casts: :meth:`~graphprune.rules.registry.OpRule.carries_values`)."""
    for source in graph.inputs:
        frontier, seen = [(source, 0)], {source.name}
        while frontier:
            tensor, depth = frontier.pop()
            for node in tensor.outputs:
                rule = lookup(node.domain or "", node.op, opset)
                if rule is None:
                    continue
                positions = [i for i, t in enumerate(node.inputs) if t is tensor]
                for index in positions:
                    yield source, node, rule, index
                if depth + 1 >= MAX_DEPTH or not set(positions) & set(rule.carries_values(node)):
                    continue
                out = node.outputs[0] if node.outputs else None
                if out is not None and out.name not in seen:
                    seen.add(out.name)
                    frontier.append((out, depth + 1))


def index_bounds(graph: gs.Graph, opset: int) -> dict[str, int]:
    """Graph input name -> number of table rows its values index (the smallest table found
    within :data:`MAX_DEPTH` nodes, through nodes that carry values unchanged)."""
    bounds: dict[str, int] = {}
    for source, node, rule, index in _readers(graph, opset):
        bound = rule.index_bound(node, index)
        if bound:
            bounds[source.name] = min(bound, bounds.get(source.name, bound))
    return bounds


def value_ranges(graph: gs.Graph, opset: int) -> dict[str, tuple[float, float]]:
    """Float graph input name -> the range of values it is meant to lie in
    (:meth:`~graphprune.rules.registry.OpRule.value_range`: an input quantizer's), the
    narrowest where several readers say (within :data:`MAX_DEPTH` nodes, through nodes that
    carry values unchanged)."""
    ranges: dict[str, tuple[float, float]] = {}
    for source, node, rule, index in _readers(graph, opset):
        if source.dtype is None or not np.issubdtype(np.dtype(source.dtype), np.floating):
            continue
        found = rule.value_range(node, index)
        if found is not None:
            known = ranges.get(source.name)
            ranges[source.name] = found if known is None or found[1] - found[0] < known[1] - known[0] else known
    return ranges


def tested_values(graph: gs.Graph, opset: int) -> dict[str, list[Any]]:
    """Graph input name -> the constants its value is tested for equality with (in graph
    order, each once), for integer and boolean inputs of at most one element: a mode switch
    such as silero's ``Equal(sr, 16000)`` ahead of an ``If``
    (:meth:`~graphprune.rules.registry.OpRule.tested_value`). Such an input is fed the first
    of them, by verification and by synthetic calibration alike, so the model takes a branch
    a real feed takes."""
    found: dict[str, list[Any]] = {}
    for source, node, rule, index in _readers(graph, opset):
        if not _small_switch(source):
            continue
        value = rule.tested_value(node, index)
        if value is None:
            continue
        values = found.setdefault(source.name, [])
        if value.item() not in values:
            values.append(value.item())
    return found


def first_tested_values(model: Any, graph: Callable[[], gs.Graph] | None = None) -> dict[str, Any]:
    """:func:`tested_values` of ``model`` (a ModelProto or a path; weights not read), the
    first value of each input: what verification and timing feed a mode switch. ``graph``
    gives the model's graph (default: graphsurgeon's import of it); it is made only where
    the model has a small integer or boolean input."""
    import onnx

    from graphprune.io.feeds import input_specs

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    if not any((np.issubdtype(s.dtype, np.integer) or s.dtype == np.bool_) and s.shape is not None
               and all(d == 1 for d in s.shape) for s in input_specs(model)):
        return {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    try:
        found = tested_values(graph() if graph is not None else gs_export.import_onnx(model), opset)
    except Exception:  # a graph graphsurgeon cannot read (its constants in external data): no values
        return {}
    return {name: values[0] for name, values in found.items()}


def _small_switch(tensor: gs.Tensor) -> bool:
    """An integer or boolean tensor declared with at most one element."""
    try:
        dtype = np.dtype(tensor.dtype)
    except TypeError:
        return False
    if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_) or tensor.shape is None:
        return False
    return all(isinstance(d, int | np.integer) and d == 1 for d in tensor.shape)


def _sequence_length(name: str, shapes: Mapping[str, tuple[int, ...]], bounds: Mapping[str, int]) -> int:
    """The length a ``*len*`` input states: the last axis of a token-id input, else the
    longest second axis (``[batch, time, ...]``) of the other inputs (at least 1)."""
    tokens = [shape[-1] for other, shape in shapes.items() if other in bounds and other != name and shape]
    if tokens:
        return max(tokens)
    return max([shape[1] for other, shape in shapes.items() if other != name and len(shape) > 1] or [1])


def _integers(spec: InputSpec, shape: tuple[int, ...], bound: int | None,
              rng: np.random.Generator, length: int) -> np.ndarray:
    name = spec.name.lower()
    if "mask" in name:
        return np.ones(shape, dtype=spec.dtype)
    if _LENGTH.search(name) and bound is None and int(np.prod(shape)) <= 8:
        return np.full(shape, length, dtype=spec.dtype)
    if _RATE.search(name) and bound is None and int(np.prod(shape)) == 1:
        return np.full(shape, SAMPLE_RATE, dtype=spec.dtype)
    if bound is not None and "position" in name and shape:
        return np.broadcast_to(np.arange(shape[-1]) % bound, shape).astype(spec.dtype)
    if bound is not None and ("token_type" in name or "segment" in name):
        return np.zeros(shape, dtype=spec.dtype)
    return rng.integers(0, bound or 2, size=shape).astype(spec.dtype)


def synthetic_feeds(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, tuple[int, ...]],
    bounds: Mapping[str, int],
    count: int,
    seed: int = 0,
    float_range: tuple[float, float] | None = None,
    tested: Mapping[str, Sequence[Any]] | None = None,
    float_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``count`` random feeds for ``specs`` at ``shapes`` (see the module docstring);
    ``tested``: :func:`tested_values` (an input listed there gets its first value);
    ``float_ranges``: :func:`value_ranges` (where ``float_range`` does not give one range to
    every float input, an input listed there is uniform in its own)."""
    rng = np.random.default_rng(seed)
    lengths = {spec.name: _sequence_length(spec.name, shapes, bounds) for spec in specs}
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape = tuple(shapes[spec.name])
            if tested and tested.get(spec.name):
                value = np.full(shape, tested[spec.name][0], dtype=spec.dtype)
            elif spec.dtype == np.bool_:
                value = (np.ones(shape, dtype=bool) if "mask" in spec.name.lower()
                         else rng.random(shape) < 0.5)
            elif np.issubdtype(spec.dtype, np.floating):
                limits = float_range or (float_ranges or {}).get(spec.name)
                value = (rng.standard_normal(shape) if limits is None
                         else rng.uniform(*limits, size=shape)).astype(spec.dtype)
            elif np.issubdtype(spec.dtype, np.integer):
                value = _integers(spec, shape, bounds.get(spec.name), rng, lengths[spec.name])
            elif spec.dtype == np.object_:  # a string input (a tokenizer in the graph)
                value = random_text(rng, shape)
            else:
                raise UsageError(f"--calibration random cannot make values for input '{spec.name}' "
                                 f"of dtype {spec.dtype}: give calibration data")
            feed[spec.name] = np.asarray(value)
        feeds.append(feed)
    return feeds


def unmask(specs: Sequence[InputSpec], feeds: list[dict[str, np.ndarray]], text: str,
           outputs: Callable[[dict[str, np.ndarray]], list[np.ndarray]]) -> tuple[list[dict[str, np.ndarray]], str]:
    """``feeds`` (and their description ``text``) with each boolean input named like a mask all
    False where True marks what is ignored (PyTorch's key-padding convention): a position set
    True alone makes the outputs ignore the inputs that share the mask's axes there (a decoder's
    ``memory [batch, src_len, 256]``, an encoder's ids ``src`` under ``src_mask [batch, src_len]``), and one
    set False alone does not. A romanizer's decoder calibrated with every source position so
    masked was refit on degenerate attention and decoded no name as before. ``outputs(feed)``:
    the original's outputs (raises where it does not run)."""
    flipped = []
    for spec in specs:
        feed = feeds[0] if feeds else {}
        mask = feed.get(spec.name)
        if spec.dtype != np.bool_ or "mask" not in spec.name.lower() or mask is None or not mask.size:
            continue
        read = [s.name for s in specs if s.name != spec.name and s.name in feed and s.dtype != np.bool_
                and (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer))
                and feed[s.name].shape[:mask.ndim] == mask.shape]
        if read and _ignored_where(outputs, feed, spec.name, read, True) \
                and not _ignored_where(outputs, feed, spec.name, read, False):
            flipped.append(spec.name)
    if not flipped:
        return feeds, text
    feeds = [{**f, **{name: np.zeros_like(f[name]) for name in flipped}} for f in feeds]
    return feeds, f"{text}; {', '.join(flipped)} all False (True marks what the model ignores)"


def _ignored_where(outputs: Callable[[dict[str, np.ndarray]], list[np.ndarray]], feed: dict[str, np.ndarray],
                   mask: str, read: list[str], value: bool) -> bool:
    """Whether, with ``mask`` set to ``value`` at its last position alone, the outputs stay the
    same (and finite) when the inputs ``read`` change at that position."""
    where = np.unravel_index(feed[mask].size - 1, feed[mask].shape)
    marked = np.full(feed[mask].shape, not value)
    marked[where] = value
    at = {**feed, mask: marked}
    moved = {}
    for name in read:
        array = feed[name].copy()
        if np.issubdtype(array.dtype, np.floating):
            array[where] += np.asarray(1.0 + np.abs(array[where]), array.dtype)
        else:  # token ids ([batch, len], as the mask): another id the feed holds (one the table has)
            others = array[array != array[where]] if array.ndim == len(where) else array[:0]
            if not others.size:
                continue
            array[where] = others.flat[0]
        moved[name] = array
    if not moved:
        return False
    try:
        before, after = outputs(at), outputs({**at, **moved})
    except Exception:  # noqa: BLE001 - does not run so: no sign either way
        return False
    floats = [_elsewhere(np.asarray(b), np.asarray(a), feed[mask].shape[-1], int(where[-1]))
              for b, a in zip(before, after, strict=True) if np.asarray(b).dtype.kind == "f"]
    return bool(floats) and all(np.isfinite(b).all() and np.array_equal(b, a) for b, a in floats)


def _elsewhere(before: np.ndarray, after: np.ndarray, length: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    """Both outputs without ``position`` on their one axis of the mask's ``length`` (an encoder's
    output at the marked token is computed from that token whatever the mask says), else whole."""
    axes = [k for k, size in enumerate(before.shape) if size == length and k > 0]
    if len(axes) != 1 or before.shape != after.shape:
        return before, after
    return np.delete(before, position, axis=axes[0]), np.delete(after, position, axis=axes[0])


def describe(feeds: Sequence[Mapping[str, np.ndarray]], bounds: Mapping[str, int],
             float_range: tuple[float, float] | None = None,
             float_ranges: Mapping[str, tuple[float, float]] | None = None) -> str:
    """The source line of the report: what the random feeds were (an integer input filled
    with one value: ``= value``)."""
    parts = []
    for name, value in feeds[0].items():
        text = f"{name} {list(value.shape)}"
        if name in bounds:
            text += f" ids < {bounds[name]}"
        elif value.dtype == np.object_:
            text += " random words"
        elif value.size and not np.issubdtype(value.dtype, np.floating) and (value == value.flat[0]).all():
            text += f" = {value.flat[0].item()}"
        elif np.issubdtype(value.dtype, np.floating):
            limits = float_range or (float_ranges or {}).get(name)
            text += " normal" if limits is None else f" uniform [{limits[0]:g}, {limits[1]:g}]"
            if float_range is None and limits is not None:
                text += " (its quantizer's range)"
        parts.append(text)
    return f"random ({len(feeds)} synthetic feeds: {', '.join(parts)})"


def named_feeds(model: Any, graph: gs.Graph, opset: int, shapes: Mapping[str, tuple[int, ...]],
                count: int = 4) -> tuple[list[dict[str, np.ndarray]], str] | None:
    """Feeds for verification where the model does not run on random 0s and 1s: integer and
    boolean inputs get the values their names and the tables they index call for (lengths,
    masks, positions, token ids, sample rates: the rules of this module), at ``shapes``, with
    a description; ``None`` where the model has no such input (nothing would change)."""
    from graphprune.io.feeds import input_specs

    specs = input_specs(model)
    if not any(np.issubdtype(s.dtype, np.integer) or s.dtype == np.bool_ for s in specs):
        return None
    bounds = index_bounds(graph, opset)
    feeds = synthetic_feeds(specs, shapes, bounds, count, seed=1, tested=tested_values(graph, opset))
    parts = describe(feeds, bounds).split(": ", 1)[-1].rstrip(")")
    return feeds, f"inputs generated by their names and the tables they index ({parts})"
