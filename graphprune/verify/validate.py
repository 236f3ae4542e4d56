"""Validation of a pruned model: checker, ORT run, output shapes, zero-equivalence.

This is the one verifier of every mode: :func:`compare` checks a candidate against a reference
(the zeroed original, the original, or the original with erased branches zeroed) on the same
feeds. Models are given as protos or as file paths; a path (a model with external data, one over
2 GB) is checked and run from the file, never serialised.

The self-check: removing a channel is equivalent to zeroing its producer (weights, bias) and
consumer (input weights) in the original — exactly, for groups whose channels meet only
channel-separable ops. :mod:`graphprune.verify.zeroed` builds that *zeroed reference* from the
prepared original; :func:`compare` runs both with ONNX Runtime on the same random inputs and
reports the largest absolute and relative difference. Groups marked inexact (a normalisation
over the pruned axis) are left out of the check and listed with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
import onnxruntime as ort

from graphprune import crash_guard
from graphprune.errors import InvalidModelError, OutputShapesDiffer, VerificationError
from graphprune.io import model_io, runtime, scratch, segments
from graphprune.io.feeds import output_array
from graphprune.io.tensor_protos import nbytes
from graphprune.rules.quantize import optimizer_fuses_quantization

TWO_GB = 2**31 - 2**20

#: intra-op threads of every verification session (``None``: ONNX Runtime's default); one for
#: a model whose results depend on the threads' order (:func:`threads`)
_THREADS: int | None = None


@contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Verification sessions opened inside run on ``count`` threads (``None``: the default)."""
    global _THREADS
    before, _THREADS = _THREADS, count
    try:
        yield
    finally:
        _THREADS = before
#: a pruned model up to this size is run once more as it is written (:func:`written_fault`)
WRITTEN_RUN_BYTES = 1 << 30
#: model files larger than this hold their weights and are run whole
SEGMENT_FILE_LIMIT = 16 * 2**20
#: a reference run segment by segment that differs from the candidate runs whole again where
#: its external weights are at most this many bytes
WHOLE_RERUN_BYTES = 1 << 30

ModelRef = Union[onnx.ModelProto, str, "os.PathLike[str]"]


def _is_path(model: Any) -> bool:
    return isinstance(model, str | os.PathLike)


def check_model(model: ModelRef, original: ModelRef | None = None) -> None:
    """``onnx.checker`` full check (strict shape inference included).

    Where ONNX's own shape inference cannot handle the *original* either (a function op whose
    output it does not infer), the pruned model is held to the same standard as the original:
    the structural check without strict inference.
    """
    try:
        _full_check(model)
    except VerificationError:
        if original is None or _passes_full_check(original):
            raise
        try:
            onnx.checker.check_model(os.fspath(model) if _is_path(model) else model)
        except onnx.checker.ValidationError as exc:
            first = str(exc).splitlines()[0]
            try:
                onnx.checker.check_model(os.fspath(original) if _is_path(original) else original)
            except onnx.checker.ValidationError as input_exc:  # bad input, not a bad rewrite
                raise InvalidModelError(
                    f"the input model fails onnx.checker: {str(input_exc).splitlines()[0]}"
                ) from input_exc
            raise VerificationError(f"pruned model fails onnx.checker: {first}") from exc


def unregistered_op(model: onnx.ModelProto) -> str | None:
    """``onnx.checker``'s complaint about the first node of ``model``'s main graph that names
    a standard-domain op ONNX does not have at the model's opset (tf2onnx leaves TF's
    ``Erfc`` in the graph), else ``None``: read from the graph alone, weights untouched."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    for node in model.graph.node if opset is not None else ():
        if node.domain in ("", "ai.onnx"):
            try:
                onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                return f"No Op registered for {node.op_type} with domain_version of {opset}"
    return None


def _full_check(model: ModelRef) -> None:
    try:
        if _is_path(model):
            onnx.checker.check_model(os.fspath(model), full_check=True)
        elif model_io.model_size_bytes(model) > TWO_GB:
            with scratch.Folder("graphprune-check-") as tmp:
                path = Path(tmp) / "model.onnx"
                model_io.save_model(model, path, external_data=True)
                onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"pruned model fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    except onnx.shape_inference.InferenceError as exc:
        raise VerificationError(f"pruned model fails shape inference: {str(exc).splitlines()[0]}") from exc


def _passes_full_check(model: ModelRef) -> bool:
    try:
        _full_check(model)
    except VerificationError:
        return False
    return True


def session(
    model: ModelRef,
    *,
    optimize: bool = True,
    overrides: dict[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """A CPU session from a proto or a path; ``overrides`` replace initializer values without
    copying the model (only honoured with ``optimize=False``: ORT's optimizers read the
    stored initializers). A proto too large to serialise goes through a temporary file with
    external data, removed when the session is released."""
    options = runtime.session_options()
    options.log_severity_level = 4  # fatal only: ORT's errors come back as exceptions, not log lines
    # a verification session runs a few times: plain allocations that go back when a tensor
    # dies beat an arena that keeps its high-water mark (a masked weight, a large activation)
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    # pre-packed weights are a second copy of every packed weight, paid back only over many runs
    options.add_session_config_entry("session.disable_prepacking", "1")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if _THREADS is not None:
        options.intra_op_num_threads = _THREADS
    keep_alive = []
    for name, values in (overrides or {}).items():
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(values))
        keep_alive.append(value)
        options.add_initializer(name, value)
    providers = ["CPUExecutionProvider"]
    if _is_path(model):
        sess = ort.InferenceSession(os.fspath(model), options, providers=providers)
        sess._graphprune_keep_alive = keep_alive  # type: ignore[attr-defined]
        return sess
    data = None
    if model_io.model_size_bytes(model) <= TWO_GB:
        try:
            data = model.SerializeToString()
        except Exception:  # ValueError / protobuf EncodeError above the limit
            data = None
    if data is None or len(data) > TWO_GB:
        tmp = scratch.Folder("graphprune-verify-")
        try:
            path = Path(tmp.name) / "model.onnx"
            model_io.save_model(model, path, external_data=True)
            sess = ort.InferenceSession(str(path), options, providers=providers)
        except BaseException:
            tmp.cleanup()
            raise
        keep_alive.append(tmp)  # removed with the session
    else:
        sess = ort.InferenceSession(data, options, providers=providers)
    sess._graphprune_keep_alive = keep_alive  # type: ignore[attr-defined]
    return sess


def written_fault(write: Any, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> VerificationError | None:
    """Why ``model`` as it is written (``write``: to a file ORT loads) does not run on ``feeds``,
    else ``None``; models over :data:`WRITTEN_RUN_BYTES` are not run. What is written differs
    from what was verified by what goes back on it after (the size names the user's file
    declared: written back on a cut size, they made ONNX Runtime's memory planner fail)."""
    if model_io.model_size_bytes(model) > WRITTEN_RUN_BYTES:
        return None
    try:
        run(write(model), feeds, "the pruned model as written")
    except VerificationError as exc:
        return exc
    return None


def run(
    model: ModelRef,
    feeds: dict[str, np.ndarray],
    what: str,
    overrides: dict[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    return run_many(model, [feeds], what, overrides)[0]


def run_many(
    model: ModelRef,
    feeds_list: list[dict[str, np.ndarray]],
    what: str,
    overrides: dict[str, np.ndarray] | None = None,
    optimize: bool | None = None,
    segmented: bool = False,
) -> list[list[np.ndarray]]:
    """Outputs of ``model`` on each feed dict (one session for all). ``segmented``: a model
    file with external weights may run one segment at a time (:func:`_run_segmented`; for
    a reference, never for a model that must be shown to load and run whole)."""
    crash_guard.note(f"running {what}")
    try:
        # ORT's graph optimizers fold/pre-pack weights from the stored initializers and would
        # ignore overrides: the overridden reference runs unoptimised
        if optimize is None:
            optimize = not overrides
        if segmented and not overrides and _is_path(model):
            outputs = _run_segmented(model, feeds_list, optimize)
            if outputs is not None:
                return outputs
        sess = session(model, overrides=overrides, optimize=optimize)
        names = [o.name for o in sess.get_outputs()]
        outputs = [[output_array(v) for v in sess.run(names, feeds)] for feeds in feeds_list]
        del sess
        segments.trim()  # what the session freed goes back to the system
        return outputs
    except Exception as exc:
        raise VerificationError(f"{what} does not run in ONNX Runtime: {runtime.describe(exc)}") from exc


def _segments(model: ModelRef, optimize: bool) -> tuple[onnx.ModelProto, list[tuple[int, int]]] | None:
    """The skeleton and segments a model file with external weights runs in (``None``: whole)."""
    if not _is_path(model) or os.path.getsize(os.fspath(model)) > SEGMENT_FILE_LIMIT:
        return None  # the weights are inside the file
    skeleton = onnx.load_model(os.fspath(model), load_external_data=False)
    if optimize and optimizer_fuses_quantization(skeleton):
        return None  # segment cuts would split Q/DQ pairs ORT fuses: other numbers
    ranges = segments.plan(skeleton)
    return None if ranges is None else (skeleton, ranges)


def _run_segmented(model: ModelRef, feeds_list: list[dict[str, np.ndarray]],
                   optimize: bool) -> list[list[np.ndarray]] | None:
    """Outputs of a model file with external weights run one segment at a time (a session
    holds one segment's weights, not all: :mod:`graphprune.io.segments`); ``None`` where the
    model is run whole (small weights, weights inside the file, or anything unexpected)."""
    try:
        found = _segments(model, optimize)
        if found is None:
            return None
        return segments.run_in_segments(os.fspath(model), *found, feeds_list,
                                        lambda file: session(file, optimize=optimize))
    except Exception:  # the whole model gets its own chance (and reports its own error)
        return None


def _rerun_whole(reference: ModelRef, optimize: bool | None, overrides: dict[str, np.ndarray] | None) -> bool:
    """The reference ran segment by segment and may run whole again (its weights at most
    :data:`WHOLE_RERUN_BYTES`): the graph optimizer fuses across a segment's cut in the whole
    candidate, not in the segments (LightGlue's log-softmax: 2.7e-4 relative for an unchanged graph)."""
    if overrides or not _is_path(reference):
        return False
    try:
        found = _segments(reference, not overrides if optimize is None else optimize)
    except Exception:  # noqa: BLE001 - it ran whole
        return False
    return found is not None and sum(nbytes(t) for t in found[0].graph.initializer) <= WHOLE_RERUN_BYTES


def compare(
    candidate: ModelRef,
    reference: ModelRef,
    feeds_list: list[dict[str, np.ndarray]],
    *,
    what: str,
    tolerance: float,
    reference_overrides: dict[str, np.ndarray] | None = None,
    check: bool = True,
    original: ModelRef | None = None,
    candidate_outputs: list[list[np.ndarray]] | None = None,
    reference_outputs: list[list[np.ndarray]] | None = None,
    optimize_reference: bool | None = None,
    emulate_quantization: bool = False,
    segment_candidate: bool = False,
    pair_safe: bool = False,
) -> dict[str, Any]:
    """Check ``candidate`` against ``reference`` on the same feeds.

    ``onnx.checker`` (full, held to the original's standard: see :func:`check_model`), an
    ORT run of both, equal output shapes, and the largest absolute and relative difference.
    ``what`` names the reference in the report and in errors ("the zeroed original", "the
    original", ...). Raises :class:`VerificationError` when the candidate fails the checker,
    does not run or has other output shapes; a difference above ``tolerance`` is reported
    with ``ok: False``.

    ``emulate_quantization`` (QDQ models, which ORT's optimizer fuses into integer kernels):
    both models are compared unoptimised, where QuantizeLinear / DequantizeLinear compute
    what the ONNX standard says. The fused kernels' results depend on the channel count (an
    x86 u8s8 kernel sums adjacent channel pairs in saturating 16-bit arithmetic, so removing a
    channel can move an output by one quantization step); the candidate still runs once
    optimised, as it will be deployed.

    ``pair_safe`` (models with integer kernels that saturate pair sums, :mod:`.saturation`):
    both models are compared as copies with their int8 weights halved; the candidate still
    runs as it is.

    ``candidate_outputs`` / ``reference_outputs``: outputs already computed on ``feeds_list``
    (that model is not run again).
    """
    if check:
        check_model(candidate, original)
    # the reference is only a means of comparison: it may run segment by segment (one
    # segment's weights at a time); the candidate runs whole, as it will be used, unless
    # ``segment_candidate`` says it is an intermediate model too
    optimize = False if emulate_quantization else None
    copies = None
    if pair_safe and not candidate_outputs and not reference_outputs:
        copies = _pair_safe(candidate, reference, reference_overrides)
    pair_safe_used = copies is not None
    if copies is not None:  # integer kernels that saturate pair sums: compare 7-bit copies
        candidate_copy, reference_copy, copy_overrides = copies
        del copies
        ref_outs = run_many(reference_copy, feeds_list, what, copy_overrides, optimize=False)
        outs = run_many(candidate_copy, feeds_list, "the pruned model (7-bit weight copy)", optimize=False)
        del candidate_copy, reference_copy, copy_overrides
        run_many(candidate, feeds_list[:1], "the pruned model")
    else:
        ref_outs = reference_outputs or run_many(reference, feeds_list, what, reference_overrides,
                                                 False if emulate_quantization else optimize_reference,
                                                 segmented=True)
        outs = candidate_outputs or run_many(candidate, feeds_list, "the pruned model", optimize=optimize,
                                             segmented=segment_candidate)
    result = _differences(ref_outs, outs, what, tolerance)
    if not result["ok"] and not pair_safe_used and not reference_outputs and not segment_candidate \
            and _rerun_whole(reference, False if emulate_quantization else optimize_reference, reference_overrides):
        whole = run_many(reference, feeds_list, what, reference_overrides,
                         False if emulate_quantization else optimize_reference)
        again = _differences(whole, outs, what, tolerance)
        if again["max_rel_diff"] < result["max_rel_diff"]:  # the nearer comparison is the verdict
            again["reference_run"] = (f"whole, as the pruned model runs (segment by segment, fused apart at the "
                                      f"cuts, it differed by {result['max_rel_diff']:.3g})")
            result = again
    if emulate_quantization and not result["ok"] and not candidate_outputs and not reference_outputs:
        # Unoptimised, a QuantizeLinear rounds the float sums of a layer, whose order changes
        # with the channel count: a sum a hair apart lands on the other step, and the steps add
        # up over the layers (a per-channel QDQ CUNet: 0.027 relative). Optimised, the fused
        # integer kernels sum exactly; where both models agree there, the rewrite is right (a
        # wrong one differs either way), and the nearer comparison is the verdict.
        ref_fused = run_many(reference, feeds_list, what, reference_overrides, True, segmented=True)
        fused = run_many(candidate, feeds_list, "the pruned model (optimised)", segmented=segment_candidate)
        plain = _differences(ref_fused, fused, what, tolerance)
        if plain["max_rel_diff"] < result["max_rel_diff"]:
            return {"ok": plain["ok"], "reference": what, "checker": check, **plain, "compared": (
                "optimised, as ONNX Runtime deploys them: its fused integer kernels (unoptimised, with "
                "QuantizeLinear/DequantizeLinear in float, rounding flips of sums summed in another order "
                f"differ by {result['max_rel_diff']:.3g})")}
    elif emulate_quantization:
        run_many(candidate, feeds_list[:1], "the pruned model (optimised)")
    if pair_safe_used and not result["ok"]:
        # The 7-bit copies compute another function than the models, and where the model
        # amplifies small differences (an inverse STFT's division by its window sum, a
        # rounded duration) they can differ more than the models do. Saturation can only
        # make the models themselves differ, never agree where the rewrite is wrong: where
        # they are nearer as they are, that comparison is the verdict (and the one the
        # model's own float noise, measured on the model as it is, is held against).
        ref_outs = run_many(reference, feeds_list, what, reference_overrides, optimize_reference, segmented=True)
        outs = run_many(candidate, feeds_list, "the pruned model", optimize=optimize, segmented=segment_candidate)
        plain = _differences(ref_outs, outs, what, tolerance)
        if plain["max_rel_diff"] < result["max_rel_diff"]:  # the nearer of the two is the verdict
            return {"ok": plain["ok"], "reference": what, "checker": check, **plain, "compared": (
                "the models as they are (their copies with the int8 weights of u8 x s8 kernels halved, "
                f"which avoid ONNX Runtime's saturating pair sums, differ by {result['max_rel_diff']:.3g})")}
    return {
        "ok": result["ok"],
        "reference": what,
        "checker": check,
        **result,
        **({"compared": "unoptimised (ONNX QuantizeLinear/DequantizeLinear semantics)"}
           if emulate_quantization else {}),
        **({"compared": "copies with the int8 weights of u8 x s8 kernels halved (ONNX Runtime's x86 "
                        "kernels saturate 16-bit pair sums, which depend on the channel count)"}
           if pair_safe_used else {}),
    }


def _differences(ref_outs: list[list[np.ndarray]], outs: list[list[np.ndarray]], what: str,
                 tolerance: float) -> dict[str, Any]:
    """The comparison of two models' outputs on the same feeds (see :func:`compare`)."""
    max_abs = max_rel = 0.0
    per_output: list[list[float]] = []  # [largest absolute difference, reference scale]
    for ref_out, out in zip(ref_outs, outs, strict=True):
        if not output_shapes_match(ref_out, out):
            differ = [j for j, (a, b) in enumerate(zip(ref_out, out, strict=False)) if a.shape != b.shape]
            raise OutputShapesDiffer(
                f"pruned model output shapes differ from {what}: "
                f"{[o.shape for o in ref_out]} vs {[o.shape for o in out]}",
                differ if len(ref_out) == len(out) else list(range(max(len(ref_out), len(out)))),
            )
        for j, (ref, o) in enumerate(zip(ref_out, out, strict=True)):
            if len(per_output) <= j:
                per_output.append([0.0, 0.0])
            a, r, scale = _difference(ref, o)
            max_abs, max_rel = max(max_abs, a), max(max_rel, r)
            per_output[j] = [max(per_output[j][0], a), max(per_output[j][1], scale)]
    return {
        "ok": bool(max_rel <= tolerance),
        "reference": what,
        "ort": True,
        "output_shapes_match": True,
        "samples": len(ref_outs),
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "per_output": [{"max_abs_diff": a, "scale": sc} for a, sc in per_output],
        "tolerance": tolerance,
        # outputs with no element on any feed (a detector whose scores pass no threshold on
        # random inputs): nothing was compared there
        **({"empty_outputs": empty} if (empty := [j for j in range(len(per_output))
                                                  if all(out[j].size == 0 for out in ref_outs)]) else {}),
        # float outputs of one value throughout on every feed (a quantized model fed values its
        # input quantizer maps to one level answers 0 everywhere): little was compared there
        **({"constant_outputs": constant} if (constant := [j for j in range(len(per_output))
                                                        if _one_value([out[j] for out in ref_outs])]) else {}),
        # outputs NaN or infinite throughout on every feed (the feeds lie outside the model's
        # domain, such as a negative frequency bound): nothing was compared there
        **({"non_finite_outputs": nan} if (nan := [j for j in range(len(per_output))
                                                   if _no_finite([out[j] for out in ref_outs])]) else {}),
    }


def _one_value(values: list[np.ndarray]) -> bool:
    """Float arrays of more than one element in all, every element the same value."""
    if not values or any(v.dtype.kind != "f" for v in values) or sum(v.size for v in values) < 2:
        return False
    first = values[0].reshape(-1)[:1]
    return bool(first.size) and all(np.all(v == first[0]) for v in values)


def _pair_safe(candidate: ModelRef, reference: ModelRef, overrides: dict[str, np.ndarray] | None
               ) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray] | None] | None:
    """Copies of both models free of saturating pair sums, and the reference's overrides
    likewise (:mod:`graphprune.verify.saturation`); ``None`` when neither has such a kernel
    whose constants it can change."""
    from graphprune.io import weights
    from graphprune.verify import saturation

    def load(model: ModelRef) -> onnx.ModelProto:
        return weights.load_whole(model) if _is_path(model) else model

    cand, ref = load(candidate), load(reference)
    cand_tensors, ref_tensors = saturation.paired_tensors(cand), saturation.paired_tensors(ref)
    if not cand_tensors and not ref_tensors:
        return None
    copied = None if overrides is None else {
        name: saturation.halve(ref_tensors[name], v) if name in ref_tensors else v for name, v in overrides.items()}
    return saturation.pair_safe_copy(cand, cand_tensors), saturation.pair_safe_copy(ref, ref_tensors), copied


def differences(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float]:
    """Largest absolute difference and the largest difference relative to each output's scale."""
    max_abs = max_rel = 0.0
    for ref, out in zip(reference, other, strict=True):
        a, r, _ = _difference(ref, out)
        max_abs, max_rel = max(max_abs, a), max(max_rel, r)
    return max_abs, max_rel


def finite_pair(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Both outputs flat in float64, less the elements where both are NaN or the same
    infinity (a model that answers NaN to an input out of its domain, swift-f0's pitch for a
    negative ``fmin``, answers so pruned too); ``(None, None)`` where one is non-finite and
    the other not."""
    a, b = y.reshape(-1).astype(np.float64), p.reshape(-1).astype(np.float64)
    finite = np.isfinite(a)
    if finite.all() and np.isfinite(b).all():
        return a, b
    if not (finite == np.isfinite(b)).all() or not ((np.isnan(a) & np.isnan(b)) | (a == b) | finite).all():
        return None, None
    return a[finite], b[finite]


def _difference(ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    """One output: largest absolute difference, that relative to the output's scale, and the
    scale (largest finite magnitude of ``ref``; 0 for a non-float output, whose differences
    count mismatching elements). Non-finite elements agree where both are NaN or the same
    infinity (:func:`finite_pair`); anywhere else they differ by ``inf``."""
    if ref.size == 0:
        return 0.0, 0.0, 0.0
    if ref.dtype.kind not in "fc":
        mismatch = float(np.count_nonzero(ref != out))
        return mismatch, mismatch / ref.size, 0.0
    finite = np.isfinite(ref)
    scale = float(np.max(np.abs(ref[finite]))) if finite.any() else 0.0
    a, b = finite_pair(ref, out)
    if a is None:  # non-finite on one side only
        return float("inf"), float("inf"), scale
    d = float(np.max(np.abs(a - b))) if a.size else 0.0
    return d, d / max(scale, 1e-12), scale


def _no_finite(values: list[np.ndarray]) -> bool:
    """Float arrays with elements, none of them finite (NaN or infinite throughout)."""
    return (bool(values) and all(v.dtype.kind in "fc" for v in values) and sum(v.size for v in values) > 0
            and not any(np.isfinite(v).any() for v in values))


def output_shapes_match(reference: list[np.ndarray], other: list[np.ndarray]) -> bool:
    return len(reference) == len(other) and all(a.shape == b.shape for a, b in zip(reference, other, strict=True))
