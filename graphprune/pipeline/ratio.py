"""The ratio driver: remove about ``ratio`` of every prunable group (or replay a plan).

Verification compares the pruned model with the *zeroed original*: the prepared original
with the removed channels' producer and consumer weights set to zero (ORT initializer
overrides, no copy of the model). Groups marked inexact (a normalisation over the pruned
axis) cannot match it; when the plan prunes such groups, the exactness of the rewrite is
checked on a model built from the exact groups only, and the inexact ones are listed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from graphprune.analysis import Analysis, targets
from graphprune.errors import InvalidModelError
from graphprune.io import declared_shapes
from graphprune.passes.prune_channels import removed_elements
from graphprune.pipeline import branches as branches_mode
from graphprune.pipeline import selections
from graphprune.pipeline.branches import has_branches
from graphprune.pipeline.candidates import channel_passes
from graphprune.pipeline.report import cut_axes
from graphprune.pipeline.session import PruneResult, Session
from graphprune.pipeline.unchanged import write_unchanged
from graphprune.planning.plan import Plan
from graphprune.planning.planner import plan_ratio, replay
from graphprune.rules.quantize import optimizer_fuses_quantization, output_quantization_steps
from graphprune.verify import validate, zeroed
from graphprune.verify.noise import NOISE_MULTIPLE

#: verification tolerance on the relative difference (float32 models)
DEFAULT_TOLERANCE = 1e-4


@dataclass
class RatioOptions:
    ratio: float = 0.5
    criterion: str = "l1"
    round_to: int | None = None
    min_channels: int = 1
    seed: int = 0
    head_ratio: float | None = None
    mlp_ratio: float | None = None
    hidden_ratio: float | None = None
    prune_hidden: bool = False
    #: with calibration: ``auto`` allocates interchangeable groups by measurement where it
    #: applies (:mod:`graphprune.pipeline.measured_ratio`), ``uniform`` never
    allocation: str = "auto"
    #: only per-kind ratios were given: a model with no prunable group of those kinds is a
    #: usage error (:func:`graphprune.analysis.targets.require_kinds`; the whole model only, not
    #: its ``If`` branches)
    require_kinds: bool = False


def make_plan(session: Session, analysis: Analysis, options: RatioOptions,
              saved: Plan | str | None = None, scorer: Any = None) -> Plan:
    with session.stage("plan"):
        if saved is not None:
            return replay(analysis, Plan.load(saved) if isinstance(saved, str) else saved)
        if options.require_kinds and not (session.model is not None and has_branches(session.model)):
            targets.require_kinds(analysis, options)
        plan = plan_ratio(
            analysis, ratio=options.ratio, criterion=options.criterion,
            round_to=options.round_to, min_channels=options.min_channels, seed=options.seed,
            scorer=scorer,
            ratio_of=targets.ratio_function(
                analysis, options.ratio, head_ratio=options.head_ratio,
                mlp_ratio=options.mlp_ratio, hidden_ratio=options.hidden_ratio,
                prune_hidden=options.prune_hidden,
            ),
        )
        plan.meta.update({"head_ratio": options.head_ratio, "mlp_ratio": options.mlp_ratio,
                          "hidden_ratio": options.hidden_ratio,
                          "prune_hidden": options.prune_hidden})
        return plan


def prune_session_branches(session: Session, prune_one: Any, ratio: float = 0.5,
                           model: Any = None) -> tuple[Any, Any]:
    """Prune the ``If`` branches of the session's exported model
    (:mod:`graphprune.pipeline.branches`) with ``prune_one(branch_session, ratio)``, each
    verified on its own; the branch sessions get the sizes of the outer values they read
    that the whole model is counted at (the caller's input shapes, else
    :meth:`Session.cost_shapes`: a budget prunes each branch to a fraction of its cost
    there, and a fixed-cost LSTM beside convolutions makes that fraction depend on the
    length), and choose their own where the branch does not run at those (the branch a mode
    switch takes for other inputs: silero's 8 kHz branch does not run on the 512 samples
    given for 16 kHz). ``model``: prune the branches of this model (materialised: weights in
    the proto) and leave the session's model alone (:func:`attach_branches` puts them in
    later). Return the branch report and the session's model without them. ``prune_one``
    may take ``branch=(if_name, attr)`` (which branch it prunes)."""
    def prune_branch(branch_model: Any, ratio: float, branch: tuple[str, str]) -> PruneResult:
        names = {i.name for i in branch_model.graph.input}
        sizes = session.input_shapes or session.cost_shapes() or {}
        shapes = {k: v for k, v in sizes.items() if k in names}
        try:
            return prune_one(Session(branch_model, input_shapes=shapes or None), ratio, branch=branch)
        except InvalidModelError as exc:
            if not shapes:
                raise
            try:
                return prune_one(Session(branch_model), ratio, branch=branch)
            except InvalidModelError:
                raise exc from None

    with session.stage("branches"):
        if model is not None:
            return branches_mode.prune_branches(model, ratio, prune_branch), session.model
        assert session.model is not None
        model = session.materialize(session.model)
        found = branches_mode.prune_branches(model, ratio, prune_branch)
    return found, attach_branches(session, found, model)


def attach_branches(session: Session, found: Any, model: Any = None) -> Any:
    """Put the pruned branches of ``found`` into the session's model (``model``: its
    materialised copy, if made already) and share the constants they copy; return the
    session's model without them."""
    unbranched = session.model
    with session.stage("branches"):
        model = session.materialize(session.model) if model is None else model
        branches_mode.apply(model, found)
        found.hoisted = branches_mode.hoist_shared_constants(model)
        if found.pruned or found.hoisted:
            session.model = model
    return unbranched


#: fewer calibration samples than this take a branch: it is left as it is
MIN_BRANCH_SAMPLES = 4


def prune_branches_with_data(session: Session, calibrated: Any, prune_with: Any, model: Any = None) -> Any:
    """The ``If`` branches pruned with calibration data: each as a model of its own by
    ``prune_with(branch_session, samples, calibration_options)``, with the outer values it
    reads on the samples (used and held out) whose condition takes it
    (:func:`graphprune.pipeline.branches.branch_calibration`); a branch too few samples take
    is left as it is (said in the report). ``model``: the session's model materialised (by
    default its exported one)."""

    from graphprune.errors import GraphPruneError

    model = session.materialize(session.model) if model is None else model
    samples = [*calibrated.calib.samples, *calibrated.calib.holdout]
    with session.stage("branches"):
        feeds = branches_mode.branch_calibration(model, samples)
    session.branches_taken = {}  # MACs count the branches the data takes
    for (name, attr), data in feeds.items():
        session.branches_taken.setdefault(name, set()).update([attr] if data else [])
    # no final refit inside a branch: the whole model's fidelity is measured after them
    branch_options = replace(calibrated.options, class_scores=(), final_refit="off")

    def prune_one(branch_session: Session, _: float, branch: tuple[str, str]) -> PruneResult:
        data = feeds.get(branch) or []
        if len(data) < MIN_BRANCH_SAMPLES:
            raise GraphPruneError(f"{len(data)} of {len(samples)} calibration samples take this branch "
                                  f"(at least {MIN_BRANCH_SAMPLES} needed): left as it is")
        return prune_with(branch_session, data, branch_options)

    found, _ = prune_session_branches(session, prune_one, model=model)
    return found


def verify_with_branches(session: Session, analysis: Analysis, plan: Plan, tolerance: float,
                         branches: Any, unbranched: Any, *, allow_noise: bool = True) -> dict[str, Any]:
    """:func:`verify_zeroed` of the model with its pruned branches; when that fails, fail
    closed: the main graph's rewrite alone, branches as they were (said in the report)."""
    verification = verify_zeroed(session, analysis, plan, tolerance, branches, allow_noise=allow_noise)
    if branches is not None and (branches.pruned or branches.hoisted) and not verification.get("ok"):
        branches.skipped.append("the whole model's self-check failed: branches left as they were: "
                                + str(verification.get("error") or verification.get("max_rel_diff"))[:160])
        branches.pruned.clear()
        branches.hoisted = 0
        session.model = unbranched
        verification = verify_zeroed(session, analysis, plan, tolerance, allow_noise=allow_noise)
    return verification


def branch_summary(report: dict[str, Any], branches: Any) -> None:
    """The branches' part of ``report`` (in place)."""
    if branches is not None:
        report["branches"] = branches.summary()
        if branches.pruned:
            report.pop("nothing_prunable", None)


def _as_written(session: Session, model: Any, analysis: Analysis, plan: Plan) -> Any:
    """A copy of ``model`` (its weights stay in the store) with the size names the file gives where
    ``plan`` kept the size, and no invented ones, as :meth:`Session.finish` writes it: ONNX Runtime
    1.32 crashed (SIGSEGV) building a session of a float16 transformer whose ``Add`` before a
    ``LayerNormalization`` had lost its ``[1, seq, 192]`` (its skip-norm fusion)."""
    view = type(model)()
    view.CopyFrom(model)
    declared_shapes.forget_invented(view, declared_shapes.declared_sizes(session.loaded), cut_axes(analysis, plan))
    return view


def verify_zeroed(session: Session, analysis: Analysis, plan: Plan, tolerance: float,
                  branches: Any = None, *, allow_noise: bool = True) -> dict[str, Any]:
    """The self-check of a structural rewrite: pruned model vs the zeroed original (with its
    ``If`` branches zeroed as the pruned branches were, :mod:`graphprune.pipeline.branches`).
    ``allow_noise``: a difference within the model's own float noise passes
    (:meth:`Session.within_float_noise`); off when the user set the tolerance."""
    by_id = {g.id: g for g in analysis.groups}
    pruned_groups = [by_id[g.group] for g in plan.groups if g.remove]
    inexact = [g for g in pruned_groups if not g.is_exact]
    candidate = session.model
    what = "the zeroed original"
    if inexact:
        # the rewrite of the exact groups alone must match the zeroed original exactly
        check = session.sibling()
        fresh = check.analyze(stage="verify")
        exact_plan = replay(fresh, Plan(groups=[g for g in plan.groups if by_id[g.group].is_exact]))
        check.apply(channel_passes(fresh, exact_plan))
        candidate = _as_written(session, check.export(), fresh, exact_plan)
        if branches is not None and branches.pruned:
            branches_mode.apply(candidate, branches)
        reference = zeroed.zeroed_reference(session.prepared, fresh, removed_elements(fresh, exact_plan),
                                              store=session.store)
        what = ("the zeroed original (exact groups only)" if len(inexact) < len(pruned_groups) else
                "the original (every pruned group is inexact: none of what was pruned was compared, the pruned "
                "model was checked to pass onnx.checker and run)")
    else:
        candidate = _as_written(session, candidate, analysis, plan)
        reference = zeroed.zeroed_reference(session.prepared, analysis, removed_elements(analysis, plan),
                                              store=session.store)
    if branches is not None and branches.pruned:
        branches_mode.apply(reference, branches, zeroed=True)
    # the reference unoptimised (cheap masks); QDQ models both ways (ORT's fused kernels differ)
    verification = session.verify_against(reference, what, tolerance=tolerance, candidate=candidate,
                                          optimize_reference=False,
                                          emulate_quantization=optimizer_fuses_quantization(session.prepared),
                                          segment_candidate=bool(inexact))  # then run whole below
    if verification.get("ok") is False and "max_abs_diff" in verification:
        verification = _relative_to_original(session, verification, tolerance)
    if allow_noise and verification.get("ok") is False and "max_abs_diff" in verification:
        verification = session.within_float_noise(candidate, verification, reference)
    if allow_noise and verification.get("ok") is False and "max_abs_diff" in verification:
        verification = _within_quantization_steps(session, verification)
    if allow_noise and verification.get("ok") is False and (
            "max_abs_diff" in verification or verification.get("shapes_differ")):
        verification = selections.within_selection_flips(session, candidate, reference, verification, tolerance)
    if inexact and verification.get("ok"):
        # the model that is returned must itself pass the checker and run
        try:
            session.check(session.model)
            validate.run(session.path_of(session.model), session.feeds()[0], "the pruned model")
        except Exception as exc:  # VerificationError
            verification = {"ok": False, "reference": what, "error": str(exc), "_error": exc}
    verification["exact_groups_checked"] = len(pruned_groups) - len(inexact)
    verification["inexact_groups"] = [
        {"group": g.id, "anchor": f"{g.anchor[0]}:{g.anchor[1]}", "why": g.inexact[:3]}
        for g in inexact
    ]
    return verification


def _relative_to_original(session: Session, verification: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Each output's difference relative to the larger of its range in the zeroed original
    and in the ORIGINAL, where the zeroed original's outputs collapse towards 0 (a detector's
    sigmoid map saturates once channels are zeroed: float noise of 1e-7 on outputs of 2e-7
    reads as a relative difference of 0.5; MediaPipe's hand-presence score at 6e-5 on a
    probe). Output by output: a landmark output of range 250 differing by 5e-5 says nothing
    about a score of range 0.006."""
    per_output = verification.get("per_output")
    try:
        outputs = validate.run_many(session.path_of(session.prepared), session.feeds(), "the original")
    except Exception:  # VerificationError: the verdict stands
        return verification
    if not per_output or any(len(out) != len(per_output) for out in outputs):  # one figure for all
        scales = [float(np.max(np.abs(o[np.isfinite(o)]))) for out in outputs for o in out
                  if o.size and o.dtype.kind == "f" and np.isfinite(o).any()]
        scale = min(scales, default=0.0)
        if scale <= 0 or verification["max_abs_diff"] > tolerance * scale:
            return verification
        return {**verification, "ok": True, "scale": "the original's output range",
                "max_rel_diff_to_original_range": verification["max_abs_diff"] / scale}
    worst = 0.0
    for j, entry in enumerate(per_output):
        values = [o[j] for o in outputs if o[j].size and o[j].dtype.kind == "f"]
        original = max((float(np.max(np.abs(v[np.isfinite(v)]))) for v in values if np.isfinite(v).any()),
                       default=0.0)
        scale = max(original, entry["scale"])
        if entry["max_abs_diff"] and scale <= 0:
            return verification
        worst = max(worst, entry["max_abs_diff"] / scale if scale > 0 else 0.0)
    if worst > tolerance:
        return verification
    return {**verification, "ok": True, "scale": "each output's range in the original",
            "max_rel_diff_to_original_range": worst}


def _within_quantization_steps(session: Session, verification: dict[str, Any]) -> dict[str, Any]:
    """Accept a difference of a few output quantization steps in a model whose every output
    is dequantized with a constant per-tensor scale (``quantize.output_quantization_steps``):
    ONNX Runtime's x86 integer kernels
    (QLinearConv, QLinearMatMul, and the QDQ patterns they fuse) sum adjacent input channels'
    u8 x s8 products in saturating 16-bit arithmetic, so removing a channel re-pairs the others
    and an output can move by a step or two (ORT's ``reduce_range`` quantization, which avoids
    the saturation, prunes exactly). A rewrite error moves outputs by far more."""
    steps = output_quantization_steps(session.prepared)
    if not steps or verification["max_abs_diff"] > NOISE_MULTIPLE * min(steps):
        return verification
    step = min(steps)
    return {**verification, "ok": True, "quantization_step": step,
            "scale": f"within {NOISE_MULTIPLE:g} output quantization steps ({step:.3g}: ONNX Runtime's "
                     "integer kernels pair input channels in saturating 16-bit sums)"}


def prune_ratio(
    session: Session,
    options: RatioOptions,
    *,
    plan: Plan | str | None = None,
    verify: bool = True,
    tolerance: float | None = None,
    calibration: Any = None,
    calibration_options: Any = None,
    calibrated: Any = None,
    allocation: dict[str, Any] | None = None,
) -> PruneResult:
    """Plan (or replay) and apply a ratio prune on ``session``; verify and report.

    ``tolerance=None``: 1e-4 relative for float32 models, 1e-2 for 16-bit float models.

    With ``calibration`` (see :mod:`graphprune.pipeline.calibrated`) the plan uses a
    data-aware criterion, the structural rewrite is checked against the zeroed original as
    always, then reconstruction passes run and the report gains ``calibration`` and
    ``fidelity`` (held-out samples against the original). ``calibrated``: a
    :class:`~graphprune.pipeline.calibrated.CalibratedRun` already made on ``session`` (instead
    of ``calibration``); ``allocation``: ``report["allocation"]``
    (:mod:`graphprune.pipeline.measured_ratio` decides it)."""
    allow_noise = tolerance is None  # a tolerance the user set is the last word
    if tolerance is None:
        tolerance = session.default_tolerance(DEFAULT_TOLERANCE)
    if calibration is not None and calibrated is None:
        from graphprune.pipeline.calibrated import CalibratedRun

        calibrated = CalibratedRun(session, calibration, calibration_options)
    analysis = session.analyze()
    scorer = calibrated.scorer(analysis) if calibrated is not None and plan is None else None
    the_plan = make_plan(session, analysis, options, plan, scorer=scorer)
    if calibrated is not None and scorer is not None:
        from graphprune.pipeline.criterion_choice import choose_criterion

        the_plan = choose_criterion(session, analysis, options, calibrated, the_plan, lambda other, name: make_plan(
            session, analysis, replace(options, criterion=name if other is None else options.criterion),
            scorer=other))
        the_plan.meta["criterion"] = calibrated.criterion
    with session.stage("prune"):
        session.apply(channel_passes(analysis, the_plan))
        session.export()
    branches = unbranched = calibrated_branches = None
    if plan is None and session.model is not None and has_branches(session.model):
        if calibrated is None:
            branches, unbranched = prune_session_branches(
                session, lambda branch_session, _, **__: prune_ratio(
                    branch_session, replace(options, require_kinds=False), verify=True, tolerance=tolerance),
                options.ratio)
        else:  # each branch with the samples that take it, reconstructed on its own
            calibrated_branches = prune_branches_with_data(
                session, calibrated, lambda branch_session, data, branch_options: prune_ratio(
                    branch_session, replace(options, require_kinds=False), verify=True, tolerance=tolerance,
                    calibration=data, calibration_options=branch_options))
    verification = (verify_with_branches(session, analysis, the_plan, tolerance, branches, unbranched,
                                         allow_noise=allow_noise) if verify else None)
    if calibrated_branches is not None and calibrated_branches.pruned and (verification is None
                                                                         or verification.get("ok")):
        # the main graph's rewrite was checked on its own, each branch's inside its prune;
        # the whole model (with the reconstructed branches) is judged by the fidelity below
        branches = calibrated_branches
        attach_branches(session, branches)
    if calibrated is not None and (verification is None or verification.get("ok")):
        calibrated.reconstruct(analysis, the_plan, compare=True)
        if branches is not None and branches.pruned:
            attach_branches(session, branches)  # the reconstruction re-exported the main graph
            calibrated.no_final_refit("If branches: each branch was refit on the samples that take it")
        calibrated.fidelity()  # keeps the reconstruction only where it pays: before the model is counted
    report = session.report("plan" if plan is not None else "ratio", the_plan)  # (a replay plans nothing)
    if calibrated is None and branches is None:
        write_unchanged(session, report, the_plan)
    report["kinds"] = targets.kind_summary(analysis)
    branch_summary(report, branches)
    if allocation is not None:
        report["allocation"] = allocation
    if calibrated is not None:
        report["calibration"] = calibrated.report()
        report["fidelity"] = calibrated.fidelity()
    result = session.finish(report, the_plan, verification)
    result.branches = branches  # nested If branches: their zeroed versions for the caller
    return result
