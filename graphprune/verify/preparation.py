"""The preparation check: does the prepared graph compute what the model as loaded computes?

Every rewrite is checked against a reference built from the *prepared* original (constants
folded, fused kernels lowered, shape computations simplified, ...: :func:`graphprune.io.ir.prepare`).
A preparation that changed what the model computes would pass that check exactly and ship a
wrong model (a sliced ``Shape`` folded as the whole shape wrote an output of another shape;
a cast elided where it rounded). :func:`check_preparation` closes that gap: the prepared
original, run on the verification's feeds, must match the graph as it was loaded within the
verification's tolerance or within the loaded model's own float noise
(:func:`graphprune.verify.noise.excuse_float_noise`; lowered fused kernels sum in another order),
or within a few output quantization steps of a model whose outputs are dequantized.

Both models are read from files of the weight store (the loaded graph holds references to the
same weights: no copy of them) and run one segment of weights at a time where they are large
(:func:`graphprune.verify.validate.run_many`), like the zeroed original.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from graphprune.errors import VerificationError
from graphprune.rules.quantize import output_quantization_steps
from graphprune.verify import noise, validate

#: what the reports call the model the prepared one is checked against
AS_LOADED = "the model as loaded"


def _signature(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits], [o.name for o in graph.output]


def _computation(model: onnx.ModelProto) -> tuple[Any, ...]:
    """What ``model`` computes, as a value: its nodes (order and names aside), initializers
    (references into the store for large ones), inputs and outputs. Two models with equal
    values compute the same; annotations (declared shapes, node order) do not count."""
    graph = model.graph

    def node(n: onnx.NodeProto) -> tuple[Any, ...]:
        return (n.domain, n.op_type, tuple(n.input), tuple(n.output),
                tuple(sorted(a.SerializeToString(deterministic=True) for a in n.attribute)))

    def value(v: onnx.ValueInfoProto) -> tuple[str, int]:
        return v.name, v.type.tensor_type.elem_type

    return (sorted(map(node, graph.node)), sorted(i.SerializeToString(deterministic=True) for i in graph.initializer),
            [value(v) for v in graph.input], [value(v) for v in graph.output],
            sorted((o.domain, o.version) for o in model.opset_import))


def same_computation(loaded: onnx.ModelProto, prepared: onnx.ModelProto) -> bool:
    """The preparation changed no node, weight, input or output (only annotations)."""
    return _computation(loaded) == _computation(prepared)


def check_preparation(
    loaded: onnx.ModelProto, prepared: onnx.ModelProto, path_of: Any,
    feeds: list[dict[str, np.ndarray]], tolerance: float, label: str = "the prepared graph",
) -> dict[str, Any]:
    """The prepared graph against ``loaded`` (the graph as loaded, before preparation) on
    ``feeds``; ``path_of`` writes a model of the session to a file of its store; ``label``
    names ``prepared`` in the errors (another stage of the preparation may be checked).

    Returns ``{"checked": True, "ok": bool, "max_rel_diff": ..., ...}``, or ``{"checked":
    False, "why": ...}`` where the comparison cannot be made (the loaded graph does not run
    in ONNX Runtime as it is: preparation is what makes some exporters' graphs run; other
    inputs or outputs). A prepared graph that does not run, or runs to other output shapes,
    is a failed check.
    """
    inputs, output_names = _signature(loaded)
    prepared_inputs, prepared_outputs = _signature(prepared)
    if output_names != prepared_outputs or not set(prepared_inputs) <= set(inputs):
        return {"checked": False, "why": "the prepared graph has other inputs or outputs"}
    fed = [{k: v for k, v in feed.items() if k in inputs} for feed in feeds]
    if any(set(feed) != set(inputs) for feed in fed):
        return {"checked": False, "why": "the model as loaded has inputs the verification does not feed"}
    loaded_path = path_of(loaded)
    # both unoptimised: the same kernels for the nodes both graphs have (no fused kernel
    # chosen from other shapes; QDQ computed as ONNX defines QuantizeLinear /
    # DequantizeLinear), and sessions that start sooner (a check runs each once)
    optimize = False
    try:
        # the loaded graph may not run as it is (an opset ORT lacks, a stale declared shape)
        reference = validate.run_many(loaded_path, fed, AS_LOADED, optimize=optimize, segmented=True)
    except VerificationError as exc:
        return {"checked": False, "why": str(exc)[:300]}
    try:
        outputs = validate.run_many(path_of(prepared), fed, label, optimize=optimize, segmented=True)
    except VerificationError as exc:
        return {"checked": True, "ok": False, "error": str(exc)}
    for ref, out in zip(reference, outputs, strict=True):
        if not validate.output_shapes_match(ref, out):
            return {"checked": True, "ok": False, "error": (
                f"{label}'s output shapes {[o.shape for o in out]} differ from {AS_LOADED}'s "
                f"{[o.shape for o in ref]}")}
    result = validate.compare(prepared, loaded, fed, what=AS_LOADED, tolerance=tolerance, check=False,
                              candidate_outputs=outputs, reference_outputs=reference)
    del outputs, reference
    result["compared"] = "unoptimised (ORT's graph optimizations off in both)"
    if not result["ok"]:
        result = noise.excuse_float_noise(loaded_path, fed, result)
    if not result["ok"]:
        steps = output_quantization_steps(prepared)
        if steps and result["max_abs_diff"] <= noise.NOISE_MULTIPLE * min(steps):
            result = {**result, "ok": True, "quantization_step": min(steps)}
    if result["ok"] and _opset(loaded) != _opset(prepared):
        drift = _optimised_drift(loaded_path, path_of(prepared), prepared, loaded, fed[:1], label)
        if drift is not None and drift > OPTIMISED_GROSS:
            return {"checked": True, "ok": False, "error": (
                f"{label} computes what {AS_LOADED} computes with ONNX Runtime's graph optimizations off, "
                f"but not with them on (max relative difference {drift:.3g}): the opset conversion changed "
                "what the optimizer makes of the model")}
    keep = ("ok", "max_abs_diff", "max_rel_diff", "tolerance", "float_noise", "quantization_step", "compared")
    return {"checked": True, **{k: result[k] for k in keep if k in result}}


#: relative difference of the loaded and the converted model, both optimised by ONNX Runtime,
#: above which the conversion changed what the optimizer makes of the model (fused integer
#: kernels differ from each other by quantization steps, far less)
OPTIMISED_GROSS = 0.25


def _opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _optimised_drift(loaded_path: Any, prepared_path: Any, prepared: onnx.ModelProto, loaded: onnx.ModelProto,
                     fed: list[dict[str, np.ndarray]], label: str) -> float | None:
    """The largest relative difference of the two models' outputs on ``fed``, both optimised
    (``None``: one does not run so). A contrib op's semantics can follow the model's opset (a
    ``QLinearSoftmax`` keeps an ``opset`` attribute of its own that ONNX's version converter
    does not update, and the optimizer moved Transposes across it as the new opset reads a
    softmax): unoptimised both computed the same."""
    try:
        reference = validate.run_many(loaded_path, fed, AS_LOADED, optimize=True, segmented=True)
        outputs = validate.run_many(prepared_path, fed, label, optimize=True, segmented=True)
        found = validate.compare(prepared, loaded, fed, what=AS_LOADED, tolerance=OPTIMISED_GROSS, check=False,
                                 candidate_outputs=outputs, reference_outputs=reference)
    except VerificationError:
        return None
    return float(found["max_rel_diff"])


def failure_detail(check: dict[str, Any]) -> str:
    """What a failed check found: its error, or how far the outputs were apart."""
    return check.get("error") or (f"max relative difference {check.get('max_rel_diff', float('nan')):.3g} > "
                                  f"{check.get('tolerance', 0):g}")


def failure_message(check: dict[str, Any]) -> str:
    """The one-line error of a failed preparation check."""
    return ("the prepared graph does not compute what the model as loaded computes (" + failure_detail(check)
            + "): a defect of graphprune's preparation, not of the pruning; please report it "
              "with the model")
