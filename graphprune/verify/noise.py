"""Float noise of a model: is a verification difference evidence of a rewrite error?

A pruned model computes the same function as the zeroed original in another order (fewer
channels summed, other kernels chosen from other shapes); on models whose outputs amplify
rounding that differs by more than a fixed tolerance. :func:`excuse_float_noise` measures
the model's own noise and holds each output to it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from graphprune.errors import InvalidModelError
from graphprune.io.tensor_protos import nbytes
from graphprune.io.weights import read_external_bytes
from graphprune.rules.registry import lookup
from graphprune.verify import validate

#: a difference within this multiple of the model's own float noise is float noise
NOISE_MULTIPLE = 4.0

#: float weights up to this many bytes in all are moved by rounding for one more noise run
#: (a moved copy of them is held while it runs); a larger model's noise leaves that run out
NUDGE_WEIGHT_BYTES = 256 << 20


def verification_threads(model: onnx.ModelProto) -> int | None:
    """1 where a node of ``model`` (or of its subgraphs) computes a result that depends on how
    ONNX Runtime splits its work over threads (:meth:`~graphprune.rules.registry.OpRule.
    sums_in_thread_order`: a GNN's scatter-add, which differed from itself by 1e-3 of its size
    between runs and failed every comparison), else ``None`` (ONNX Runtime's default)."""
    from graphprune.io.graph_reads import subgraphs_of
    from graphprune.io.ir import default_opset
    from graphprune.rules import OpRule

    opset, pending = default_opset(model), [model.graph]
    while pending:
        graph = pending.pop()
        for node in graph.node:
            pending.extend(subgraphs_of(node))
            rule = lookup(node.domain or "", node.op_type, opset)
            if rule is None or type(rule).sums_in_thread_order is OpRule.sums_in_thread_order:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if rule.sums_in_thread_order(gs.Node(node.op_type, node.name, attrs)):
                return 1
    return None


def _unreproducible(path: Any, feeds: list[dict[str, np.ndarray]], tolerance: float) -> tuple[int, float] | None:
    """``(output index, difference relative to its size)`` where the model, run twice in one
    session on each of ``feeds``, differs from itself by more than ``tolerance``, else ``None``
    (a kernel that leaves part of an output unwritten, a random generator without a seed)."""
    try:
        runs = validate.run_many(path, [*feeds, *feeds], "the pruned model", optimize=True)
    except Exception:  # VerificationError: nothing to say
        return None
    for a, b in zip(runs[: len(feeds)], runs[len(feeds):], strict=True):
        for j, (x, y) in enumerate(zip(a, b, strict=True)):
            if isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.size and not np.array_equal(x, y, equal_nan=True):
                moved = validate.differences([x], [y])[1]
                if moved > tolerance:
                    return j, moved
    return None


def error_floors(graph: gs.Graph, names: list[str], opset: int) -> list[float]:
    """The absolute error each tensor ``names`` of ``graph`` carries at least, whatever its
    size: that of the op that computed it (:meth:`~graphprune.rules.registry.OpRule.absolute_error`),
    followed back through ops that only move values (``carries_values``: a ``Squeeze``, a
    ``Reshape``, a ``Concat`` of several); 0 where none is known."""
    tensors = graph.tensors()
    memo: dict[str, float] = {}

    def floor(tensor: gs.Tensor, depth: int) -> float:
        if tensor.name in memo:
            return memo[tensor.name]
        value = 0.0
        if depth < _FLOOR_DEPTH and len(tensor.inputs) == 1:
            node = tensor.inputs[0]
            rule = lookup(node.domain or "", node.op, opset)
            if rule is not None and node.outputs and node.outputs[0] is tensor:
                own = rule.absolute_error(node)
                value = own if own else max((floor(node.inputs[i], depth + 1) for i in rule.carries_values(node)
                                             if i < len(node.inputs)), default=0.0)
        memo[tensor.name] = value
        return value

    return [floor(tensors[name], 0) if name in tensors else 0.0 for name in names]


#: ops followed back from a tensor to the one that computed it
_FLOOR_DEPTH = 64


def spread(fast: list[list[np.ndarray]], *others: list[list[np.ndarray]],
           floors: list[float] | None = None) -> list[float] | None:
    """Per output, how far one model's runs on the same feeds move it: with ORT's graph
    optimizations (``fast``) against each of ``others`` (without them, with the feeds moved by
    rounding: :func:`nudged`, with the weights moved: :func:`nudged_weights`), the largest
    absolute difference over the feeds, and at least ``floors`` (:func:`error_floors`);
    ``None`` where a run gave another shape."""
    out = list(floors) if floors is not None else [0.0] * (len(fast[0]) if fast else 0)
    for other in others:
        for a, b in zip(fast, other, strict=True):
            for j, (x, y) in enumerate(zip(a, b, strict=True)):
                if np.shape(x) != np.shape(y):
                    return None
                out[j] = max(out[j], validate.differences([x], [y])[0])
    return out


def nudged(feed: dict[str, np.ndarray], ulps: int = 2) -> dict[str, np.ndarray]:
    """``feed`` with every float input moved by ``ulps`` units in the last place, up or down
    at random (seeded): what rounding does to a value."""
    rng = np.random.default_rng(0)
    out = {}
    for name, value in feed.items():
        if value.dtype.kind == "f" and value.size:
            step = np.spacing(np.abs(value)).astype(value.dtype) * ulps
            value = (value + step * rng.choice(np.array([-1, 1], value.dtype), size=value.shape)).astype(value.dtype)
        out[name] = value
    return out


def nudged_weights(path: Any, ulps: int = 1) -> dict[str, np.ndarray]:
    """Every float weight (an initializer of rank 2 or more: not a threshold or a scale) of the
    model file at ``path``, moved by ``ulps`` units in the last place up or down at random
    (seeded): the rounding every layer
    adds to what it computes (a product and a sum round at each layer, not only at the
    inputs: a pruned convolution sums fewer channels in another order in all thirty layers of
    a U-Net, whose outputs then move 7x more than when only its input is moved by rounding).
    ``{}`` where those weights hold more than ``NUDGE_WEIGHT_BYTES``, or cannot be read."""
    try:
        skeleton = onnx.load(os.fspath(path), load_external_data=False)
        floats = [t for t in skeleton.graph.initializer
                  if onnx.helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f" and len(t.dims) >= 2]
        if not floats or sum(nbytes(t) for t in floats) > NUDGE_WEIGHT_BYTES:
            return {}
        root = Path(os.fspath(path)).parent
        values = {}
        for tensor in floats:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:  # (onnx's reader refuses hard links)
                stub, tensor = tensor, onnx.TensorProto()
                tensor.CopyFrom(stub)
                tensor.raw_data = read_external_bytes(stub, root)
                tensor.ClearField("data_location")
                del tensor.external_data[:]
            values[tensor.name] = numpy_helper.to_array(tensor)
        return nudged(values, ulps)  # (moved as the inputs are)
    except Exception:  # an unreadable weight: no such run
        return {}


def excuse_float_noise(path: Any, feeds: list[dict[str, np.ndarray]], verification: dict[str, Any],
                       selected: set[int] = frozenset(), floors: list[float] | None = None) -> dict[str, Any]:
    """Accept a difference that is float noise of the model at ``path``. The model, run on
    ``feeds`` with and without ORT's graph optimizations (other kernels, fused ops, another summation order,
    the NCHWc layout ONNX Runtime chooses from the shapes it knows), run on the feeds
    with every float input moved by two units in the last place, and run with every float
    weight moved by one (:func:`nudged_weights`), differs from itself by
    ``noise``; an output whose difference to the reference is within ``NOISE_MULTIPLE`` x
    its own noise (or within the tolerance) is no evidence of a rewrite error. Models whose
    outputs amplify rounding (a detector's saturated sigmoid map on random input: outputs
    ~1e-7 that differ by 5e-4 of their size between two kernel paths; a face mesh's
    confidence ~1e-5 that moves by 6e-8 when its input moves by one ulp, as it does when a
    convolution sums fewer channels in another order) fail a fixed tolerance otherwise.
    Each output is held to its own noise, so one noisy output does not excuse another; a
    rewrite error moves outputs by orders of magnitude more. An output in ``selected`` (computed
    from what a selection picks: :mod:`graphprune.pipeline.selections`) is never excused: its
    "noise" is a flipped choice, as large as the output. ``floors``: per output, the least
    noise it has whatever the runs show (:func:`error_floors`)."""
    try:
        fast = validate.run_many(path, feeds, "the pruned model", optimize=True)
        plain = validate.run_many(path, feeds, "the pruned model", optimize=False)
        moved = validate.run_many(path, [nudged(feed) for feed in feeds], "the pruned model", optimize=True)
        weights = nudged_weights(path)
        rounded = [validate.run_many(path, feeds, "the pruned model", overrides=weights)] if weights else []
        del weights
    except Exception:  # VerificationError: the verdict stands
        return verification
    per_output = verification.get("per_output") or []
    noise = spread(fast, plain, moved, *rounded,
                   floors=floors if floors is not None and fast and len(floors) == len(fast[0]) else None)
    if noise is None:
        return verification
    if len(per_output) != len(noise):
        return verification
    tolerance = verification.get("tolerance", 0.0)
    excused = [j for j, entry in enumerate(per_output)
               if entry["max_abs_diff"] > tolerance * max(entry["scale"], 1e-12)]
    if any(j in selected for j in excused):
        return verification
    relative = max((noise[j] / max(per_output[j]["scale"], 1e-12) for j in excused), default=0.0)
    if excused:  # does the model disagree with itself? then no difference means anything
        unwritten = _unreproducible(path, feeds, tolerance)
        if unwritten is not None:
            return {**verification, "float_noise": relative, "_error": InvalidModelError(
                f"the model's outputs are not reproducible at the inputs verification ran with (output "
                f"{unwritten[0]} differs by {unwritten[1]:.3g} of its size between two runs of one model on one "
                "input: an operator draws random numbers, or leaves part of it unwritten there, e.g. a KV cache "
                "longer than the total length it is told), so no comparison is evidence of anything; where "
                "that depends on the sizes, give the ones the model is used at with --input-shape "
                "NAME=d0,d1,... (or calibration data)")}
    if any(per_output[j]["max_abs_diff"] > NOISE_MULTIPLE * noise[j] for j in excused):
        return {**verification, "float_noise": relative}
    return {**verification, "ok": True, "float_noise": relative,
            "scale": f"within {NOISE_MULTIPLE:g}x the model's own float noise ({relative:.3g}: "
                     "its outputs with and without ORT's graph optimizations and with its inputs and weights moved "
                     "by rounding)"}
