"""Choosing a budget's allocation by measurement (calibrated MACs and parameter targets).

The greedy allocation, the uniform one at the same cost and a blend of the two
(:func:`graphprune.planning.search.candidates`), then perturbations of the best so far
(:func:`graphprune.planning.search.neighbours`), are each rewritten on a sibling session,
checked against their zeroed original, reconstructed, and compared with the original on the
held-out calibration samples; the nearest is kept. Candidates are ranked after a screening
refit (one default ridge for every layer), and the two nearest are then reconstructed again
with the ridges cross-validated per layer (most of a refit's time on convolutions and wide
MLPs is that validation; docs/budgets.md, "Screening refit"). A candidate is also measured before its
reconstruction, and where that is nearer the reconstruction is undone for it (the held-out
samples decide, as for a ratio prune: :meth:`~graphprune.pipeline.calibrated.CalibratedRun.fidelity`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from graphprune.analysis import Analysis
from graphprune.calibration.fidelity import reported_error
from graphprune.pipeline.candidates import Judged, apply_plan
from graphprune.pipeline.ratio import verify_zeroed
from graphprune.pipeline.session import Session
from graphprune.planning import budget as budget_mod
from graphprune.planning import search
from graphprune.planning.plan import GroupPlan, Plan
from graphprune.planning.search import candidate_seconds
from graphprune.verify.metrics import uncounted_bodies

#: calibration samples a candidate allocation is judged on when none are held out
CHOICE_SAMPLES = 64
#: calibration batches the sensitivity sweep runs (each (group, ratio) runs all of them)
SENSITIVITY_BATCHES = 4
#: held-out samples the sweep runs on a model that repeats a body with layers (a decoder
#: run step by step, ``Loop``): each (group, ratio) runs every sample, each up to hundreds of
#: steps (SLANet's table decoder: 26 samples x 40 groups x 3 ratios took 635 s)
SENSITIVITY_STEPPED_SAMPLES = 8
#: with calibration, allocations searched beyond the first three by default: as many as fit
#: in SEARCH_SECONDS by a deterministic estimate of one candidate's cost (rewrite, check and
#: sequential refit: per node of the graph, plus per multiply-accumulate of the model on
#: every calibration sample; fitted on 2 CPU cores), at most SEARCH_MAX. The digits CNNs: 12;
#: all-MiniLM-L6-v2 on 150 sentences: 3; PP-OCRv4's detector on 16 images at 320x320: 4;
#: a ResNet-50 on 128 images at 224x224: 1. Where the first three candidates took longer
#: each than that estimate, the count is what fits at the time they took (since round 55)
SEARCH_SECONDS = 60.0
SEARCH_MAX = 12
#: a budget stops weighing the statistics correction for its candidates once it lost on two, or on
#: one by this factor of the nearest reconstruction's held-out error (:func:`choose`)
STATS_MARGIN = 1.25
#: allocations evaluated per search round (perturbations of the best so far)
SEARCH_ROUND = 4
#: a round that finds nothing better narrows the next round's perturbations by this factor
SEARCH_SHRINK = 0.6


def measure_sensitivity(session: Session, analysis: Analysis, states: list, calibrated: Any
                        ) -> tuple[dict[str, Any], list | None]:
    """Each group's measured sensitivity (:mod:`graphprune.planning.sensitivity`) as its state's
    loss; returns the report's figures and, under reconstruction ``auto``, the curves measured
    without the refit's corrections (``None``: not measured)."""
    from graphprune.calibration import runner
    from graphprune.planning import sensitivity

    with session.stage("sensitivity"):
        refit = None
        # reconstruction auto: the curves without the refit's corrections too (a candidate more)
        uncorrected = [] if calibrated.auto_reconstruction and calibrated.stats_unaffordable() is None else None
        if calibrated.options.reconstruction == "refit" and calibrated.stats is not None:
            from graphprune.calibration.linear import LinearView
            from graphprune.planning.data_aware import consumer_views

            linear = {k: v for k, v in consumer_views(analysis).items() if isinstance(v, LinearView) and not v.rectified}
            refit = (linear, calibrated.stats)  # (the sweep corrects linear layers only, as the refit: no rectified one)
        masked, sweep = sensitivity.masked_model(session.prepared, analysis, states, refit)
        # judged on the held-out calibration samples: the refit's Grams never saw them, so
        # a consumer refit that over-fits its samples is not mistaken for a harmless cut
        held = calibrated.calib.holdout
        if uncounted_bodies(session.prepared):
            held = held[:SENSITIVITY_STEPPED_SAMPLES]
        feeds = (runner.batches(session.prepared, held, calibrated.options.batch_size, calibrated.data_dir).feeds
                 if held else calibrated.batches.feeds[:SENSITIVITY_BATCHES])
        curves = sensitivity.measure(session.path_of(masked), states, sweep, feeds,
                                     progress=session.counter("sensitivity: groups measured"),
                                     uncorrected=uncorrected)
        info = sensitivity.apply_curves(states, curves)
        info["samples"] = len(held) if held else sum(calibrated.batches.sizes[:SENSITIVITY_BATCHES])
        # deviations measured after each consumer's least-squares refit
        info["consumers_refit"] = sum(len(f) for f in sweep.corrections)
    return info, uncorrected or None


def search_count(nodes: int, macs: float, samples: int) -> int:
    """Allocations searched beyond the first candidates by default: as many as fit in
    :data:`SEARCH_SECONDS` at the estimated cost of one (at most :data:`SEARCH_MAX`)."""
    return int(min(SEARCH_MAX, SEARCH_SECONDS // max(candidate_seconds(nodes, macs, samples), 1e-3)))


def _search_count(analysis: Analysis, states: list, model: budget_mod.CostModel, options: Any,
                  samples: int) -> int:
    """``options.search``, else :func:`search_count` of this graph (its MACs from ``model``
    when that counts MACs; a MACs cost model is built only for a parameter target)."""
    if options.search is not None:
        return options.search
    macs = model if model.kind == "macs" else budget_mod.CostModel(analysis, states, "macs", shape_of=model.shape_of)
    return search_count(len(analysis.graph.nodes), macs.full_total, samples)


@dataclass
class _Measured:
    """One measured candidate allocation of :func:`choose`."""

    #: relative L2 of its outputs to the original's, pooled over the held-out samples (-inf: its
    #: structural check failed, adopted as it is so that the failure is reported)
    error: float
    label: str
    session: Session
    analysis: Analysis
    plan: Plan
    verification: dict[str, Any] | None
    pass_stats: dict[str, Any]
    #: the allocation (step index per group state)
    indexes: list[int]
    #: its reconstruction was undone (the held-out samples were nearer without it)
    reverted: bool = False
    #: the rewrite before its reconstruction and its relative L2 (kept where the
    #: reconstruction was a screening one, to be done again with cross-validated ridges)
    unreconstructed: Any = None
    plain_error: float = math.inf
    plain_cosine: float | None = None
    #: the rewrite before any reconstruction (what the final refit of the chosen one starts from)
    rewrite: Any = None
    #: under ``reconstruction="auto"``: what is kept ("refit", "stats" or "none") and each one's error
    kind: str = "refit"
    errors: dict[str, float] | None = None
    #: the statistics-corrected model and its pass figures (to come back to after a finalist's refit)
    stats_model: Any = None
    stats_pass: dict[str, Any] | None = None
    #: its allocation lands further above the goal than a met target allows (a greedy allocation
    #: stopped short): chosen only where every candidate does
    off_target: bool = False
    #: the ridges its full reconstruction validated (what the final refit recalls where it is kept)
    ridges: Any = None

    def rank(self) -> tuple[bool, float]:
        return self.off_target, self.error


def choose(session: Session, analysis: Analysis, states: list, model: budget_mod.CostModel,
            calibrated: Any, meta: dict[str, Any], fraction: float, tolerance: float, verify: bool,
            options: Any, fixed: Sequence[GroupPlan] = (), more: Sequence[tuple[str, list[int]]] = (),
            criteria: dict[str, Any] | None = None) -> tuple:
    """Choose the allocation by measurement: each candidate (:func:`search.candidates`: the
    greedy one, uniform at the same cost, a blend; then :func:`_search_count` perturbations of
    the best so far, :func:`search.neighbours`) is rewritten on a sibling session, checked
    against its zeroed original, reconstructed, and compared with the original on the
    held-out calibration samples (the fidelity metric: relative L2 of the outputs); the
    nearest is adopted by ``session`` (with the states at its allocation). A candidate that
    fails its check is adopted as it is, so that the failure is reported; one whose
    reconstruction fails is not chosen (the error is in its row; raised when all fail).

    ``fixed``: group plans outside the allocation, part of every candidate; ``more``: further
    first candidates (label, allocation), measured where they are not one of the others;
    ``criteria``: other criteria's group scores (name -> scores), whose units the chosen allocation
    is measured with too, at the same widths (:func:`_weigh_criteria`).

    Returns (plan, analysis of the rewrite, verification, candidate table, chosen label)."""
    import numpy as np

    from graphprune.calibration import fidelity as fidelity_mod

    first = search.candidates(model, fraction)
    first += [(label, list(indexes)) for label, indexes in more if all(list(indexes) != i for _, i in first)]
    # candidates are ranked after a screening refit (the default ridge for every layer: the
    # per-layer cross-validation of the ridge is most of a refit's time on convolutions and
    # wide MLPs), and the two nearest are reconstructed again with cross-validated ridges
    screening = calibrated.options.reconstruction == "refit" and calibrated.options.ridge is None
    # reconstruction auto: each candidate with the statistics correction too, nearest of three kept
    weigh_stats = calibrated.auto_reconstruction and calibrated.stats_unaffordable() is None
    stats_lost: list[float] = []  # per candidate where the correction lost: its error over the nearest's
    feeds = calibrated.calib.holdout or calibrated.calib.samples[:CHOICE_SAMPLES]
    names, decided = fidelity_mod.compared_names(session.prepared)  # (and the scores ids are chosen from)
    judged = Judged(names, decided, calibrated.data_dir)
    with session.stage("candidates"):
        reference = judged.run(session.prepared, feeds, "the original model")
    rows: list[dict[str, Any]] = []
    best: _Measured | None = None
    runner_up: _Measured | None = None  # second by the screening refit
    failed: Exception | None = None
    last: _Measured | None = None  # the latest candidate measured
    shown = _name_stages(session)  # progress lines name the allocation being measured (until the end)
    uniform: _Measured | None = None  # the uniform allocation, measured

    def evaluate(label: str, indexes: list[int], full: bool = False) -> bool:
        """Rewrite, check and reconstruct one allocation (``full``: no screening refit); ``True`` when
        the search must stop (a failed structural check, adopted as it is)."""
        nonlocal best, runner_up, failed, last, weigh_stats, uniform
        last = None
        shown(f"allocation {len(rows) + 1} ({label})")
        budget_mod.restore(model, indexes)
        plan = budget_mod.to_plan(analysis, states, meta)
        plan.groups.extend(fixed)
        candidate, fresh, plan = apply_plan(session, plan)
        verification = verify_zeroed(candidate, fresh, plan, tolerance) if verify else None
        row: dict[str, Any] = {"allocation": label, "modelled_fraction": round(model.total / model.full_total, 4),
                               "kept": [st.kept for st in states]}
        rows.append(row)
        if verification is not None and not verification.get("ok"):
            row["verified"] = False
            best = last = _Measured(-math.inf, label, candidate, fresh, plan, verification, {}, indexes)
            return True
        unreconstructed = candidate.model
        calibrated.session, calibrated.pass_stats = candidate, {}
        try:
            calibrated.reconstruct(fresh, plan, screening=screening and not full, keep_recorded=True)
            validated = None if screening and not full else calibrated._ridges
        except Exception as exc:  # noqa: BLE001 - this candidate cannot be reconstructed: not chosen
            failed = failed or exc
            row["error"] = f"reconstruction failed: {type(exc).__name__}: {exc}"[:300]
            return False
        finally:
            calibrated.session = session
        with session.stage("candidates"):
            outputs = judged.run(candidate.model, feeds, "a candidate")
        score, error = judged.score(reference, outputs)
        refit_error = error
        reverted, plain_error, plain_cosine = False, error, score["cosine"]  # it may have changed nothing
        if candidate.model is not unreconstructed:  # measured without it only where it changed something
            with session.stage("candidates"):
                plain = judged.run(unreconstructed, feeds, "a candidate")
            plain_score, plain_error = judged.score(reference, plain)
            plain_cosine = plain_score["cosine"]
            reverted = plain_error < error
            if reverted:  # the held-out samples are nearer without this candidate's reconstruction
                candidate.adopt(unreconstructed)
                row["reconstruction_reverted"] = {"pooled_rel_l2": reported_error(error), "cosine": score["cosine"]}
                score, error = plain_score, plain_error
        kind, errors, pass_stats, stats_model, stats_pass = "none" if reverted else "refit", None, \
            calibrated.pass_stats, None, None
        if weigh_stats:
            errors = {"refit": refit_error, "none": plain_error}
            corrected = fidelity_mod.stats_needless(refit_error, plain_error) or _stats_correction(
                session, candidate, calibrated, fresh, plan, unreconstructed, feeds, judged, reference)
            if isinstance(corrected, str):
                row["stats"] = corrected
            else:
                stats_model, stats_pass, stats_score, errors["stats"] = corrected
                row["stats"] = {"pooled_rel_l2": reported_error(errors["stats"]), "cosine": stats_score["cosine"]}
                dropped = pass_stats if errors["stats"] < error else stats_pass  # (the counters of the other)
                for name in dropped:
                    candidate.ctx.stats.pop(name, None)
                if errors["stats"] < error:
                    candidate.adopt(stats_model)
                    kind, score, error, pass_stats, reverted = "stats", stats_score, errors["stats"], stats_pass, False
            row["reconstruction"] = kind
            # far from the nearest here (or not the nearest twice): the later candidates weigh refit and
            # none, and the allocation kept is weighed against the correction once more where it was not
            # here (CalibratedRun.weigh_later; a tempo CNN's budget spent 149 of 584 s correcting three)
            if kind != "stats":
                stats_lost.append(errors.get("stats", math.inf) / max(error, 1e-30))
                weigh_stats = len(stats_lost) < 2 and stats_lost[-1] < STATS_MARGIN
        row.update({"pooled_rel_l2": reported_error(error), "cosine": score["cosine"], "samples": len(feeds)})
        if "deciding_rel_l2" in score:  # (the figure in pooled_rel_l2: the outputs' geometric mean)
            row["outputs_mean"] = True
        elif "balanced_rel_l2" in score:  # (channel by channel)
            row["balanced"] = True
        measured = last = _Measured(error, label, candidate, fresh, plan, verification, pass_stats, indexes,
                             reverted, unreconstructed if screening and not full else None, plain_error, plain_cosine,
                             unreconstructed, kind, errors, stats_model, stats_pass,
                             off_target=row["modelled_fraction"] > fraction + budget_mod.met_within(fraction), ridges=validated)
        if measured.off_target:
            row["off_target"] = True
        if label == "uniform":
            uniform = measured
        if best is None or measured.rank() < best.rank():
            best, runner_up = measured, best
        elif runner_up is None or measured.rank() < runner_up.rank():
            runner_up = measured
        return False

    outer_progress = session.progress
    try:
        started = time.perf_counter()
        stop = any(evaluate(label, indexes) for label, indexes in first)
        left = 0 if stop else _search_count(analysis, states, model, options, calibrated.calib.total)
        if options.search is None and first:  # where the first candidates took longer than estimated:
            # as many more as fit in SEARCH_SECONDS at the time they took (a ResNet-18 on 64 images:
            # estimated 11 s a candidate, measured about 40; the least-squares fits of wide layers)
            each = (time.perf_counter() - started) / len(first)
            left = min(left, int(SEARCH_SECONDS // max(each, 1e-3)))
        rng = np.random.default_rng(options.seed)
        seen = {tuple(indexes) for _, indexes in first}
        sigma, round_index = search.SEARCH_SIGMA, 0
        while left > 0 and best is not None and not stop:
            round_index += 1
            before = best.error
            proposals = search.neighbours(model, fraction, best.indexes, rng, min(SEARCH_ROUND, left), sigma, seen)
            if not proposals:
                break
            left -= len(proposals)
            for k, indexes in enumerate(proposals):
                if evaluate(f"search {round_index}.{k + 1}", indexes):
                    stop = True
                    break
            if best.error >= before:
                sigma *= SEARCH_SHRINK
        if best is None:  # no candidate could be reconstructed: the first failure is the error
            calibrated.close_recorded()
            assert failed is not None
            raise failed
        finalists: list[_Measured] = []
        if best.unreconstructed is not None and best.error > -math.inf:
            # the two nearest after the screening refit, reconstructed again: the nearer is kept
            finalists = [m for m in (best, runner_up) if m is not None and m.unreconstructed is not None]
            for m in finalists:
                shown(f"allocation {m.label!r} again")
                _refit_finalist(session, m, calibrated, feeds, judged, reference, _row(rows, m.label))
            best = min(finalists, key=lambda m: m.rank())
        if uniform is not None:
            screened = uniform.unreconstructed is not None and not any(m is uniform for m in finalists)

            def refit_uniform() -> None:
                shown("allocation 'uniform' again")
                _refit_finalist(session, uniform, calibrated, feeds, judged, reference, _row(rows, "uniform"))

            best = _confident_over_uniform(best, uniform, rows, judged, feeds, reference, session,
                                           refit=refit_uniform if screened else None)
        if best.ridges is not None:  # (the final refit recalls the kept allocation's validated ridges)
            calibrated._ridges = best.ridges
        if criteria and math.isfinite(best.error):
            best = _weigh_criteria(best, criteria, states, options, evaluate, lambda: last, judged, feeds,
                                   reference, calibrated, session)
        calibrated.close_recorded()
        budget_mod.restore(model, best.indexes)
        calibrated.pass_stats, calibrated.reverted = best.pass_stats, best.reverted
        if best.errors is not None:  # reconstruction auto, weighed for each candidate
            calibrated.choice = {"tried": ["refit", "stats", "none"], "kept": best.kind, "rel_l2": {
                k: reported_error(v) for k, v in best.errors.items()}, "weighed": "for each allocation"}
        if best.kind == "stats":
            calibrated.no_final_refit("the statistics correction was kept: the held-out samples were nearer the "
                                      "original with it than with the refit")
            calibrated.weigh_later(best.rewrite)  # (its figures without reconstruction)
        elif best.reverted or best.rewrite is None:
            calibrated.no_final_refit("the chosen allocation is written without its reconstruction")
            if best.errors is None:
                calibrated.refit_undone()
        else:
            calibrated.refit_from = (best.analysis, best.plan, best.rewrite)
            calibrated.weigh_later(best.rewrite)  # (reconstruction auto: against the statistics correction)
        candidate = best.session
        session.graph, session.analysis, session.model = candidate.graph, best.analysis, candidate.model
        session.ctx = candidate.ctx
        return best.plan, best.analysis, best.verification, rows, best.label
    finally:
        session.progress = outer_progress


def _name_stages(session: Session) -> Callable[[str], None]:
    """While allocations are measured, ``session``'s stage lines read ``"<what>: <stage>"``;
    the returned function sets ``<what>`` (the caller puts the session's own callback back)."""
    outer, what = session.progress, [""]
    if outer is None:
        return lambda _what: None

    def line(stage: str) -> None:  # ("candidates": the run compared with the original)
        outer(f"{what[0]}: {'compare' if stage == 'candidates' else stage}")

    def show(now: str) -> None:
        what[0], session.progress = now, line
    return show


def _stats_correction(session: Session, candidate: Session, calibrated: Any, analysis: Analysis, plan: Plan,
                      unreconstructed: Any, feeds: list, judged: Judged, reference: list
                      ) -> tuple[Any, dict[str, Any], dict[str, Any], float] | str:
    """A candidate's rewrite ``unreconstructed`` with the statistics correction instead of its
    refit (reconstruction ``auto``): the model, its pass figures, its fidelity figures and
    error on the held-out samples, or why there is none. The candidate keeps its model."""

    fitted, fitted_stats, seconds = candidate.model, calibrated.pass_stats, calibrated.refit_seconds
    candidate.adopt(unreconstructed)
    calibrated.session, calibrated.pass_stats = candidate, {}
    try:
        calibrated.reconstruct(analysis, plan, kind="stats", keep_recorded=True, stage="stats correction")
        corrected, corrected_stats = candidate.model, calibrated.pass_stats
        with session.stage("stats correction"):
            outputs = judged.run(corrected, feeds, "a candidate")
    except Exception as exc:  # noqa: BLE001 - the candidate keeps its refit
        return f"failed: {type(exc).__name__}: {exc}"[:300]
    finally:
        calibrated.session, calibrated.pass_stats, calibrated.refit_seconds = session, fitted_stats, seconds
        candidate.adopt(fitted)
    score, error = judged.score(reference, outputs)
    return corrected, corrected_stats, score, error


def _refit_finalist(session: Session, finalist: _Measured, calibrated: Any, feeds: list, judged: Judged,
                  reference: list, row: dict[str, Any]) -> None:
    """Reconstruct a finalist allocation again, from its rewrite, with cross-validated ridges
    (it was ranked after a screening refit); the result replaces the screening one, unless
    the held-out samples are nearer without any reconstruction (then it is undone, as for
    every candidate), and ``finalist.error`` becomes its error. Where this reconstruction fails,
    the screening one stays."""

    candidate = finalist.session
    screened, screened_stats = candidate.model, finalist.pass_stats
    # the session's per-pass figures add up over runs: the screening ones leave
    counted = {name: candidate.ctx.stats.pop(name) for name in screened_stats if name in candidate.ctx.stats}
    candidate.adopt(finalist.unreconstructed)
    calibrated.session, calibrated.pass_stats = candidate, {}
    try:
        calibrated.reconstruct(finalist.analysis, finalist.plan, keep_recorded=True)
    except Exception as exc:  # noqa: BLE001 - the screening reconstruction stays
        candidate.adopt(screened)
        candidate.ctx.stats.update(counted)
        calibrated.pass_stats = screened_stats
        row["refit_error"] = f"reconstruction failed: {type(exc).__name__}: {exc}"[:300]
        return
    finally:
        calibrated.session = session
    with session.stage("candidates"):
        outputs = judged.run(candidate.model, feeds, "a finalist allocation")
    score, error = judged.score(reference, outputs)
    finalist.pass_stats, finalist.reverted, finalist.error = calibrated.pass_stats, False, error
    finalist.ridges = calibrated._ridges
    row["refit"] = {"pooled_rel_l2": reported_error(error), "cosine": score["cosine"], "ridge": "cross-validated"}
    if finalist.errors is not None:  # (reconstruction auto)
        finalist.errors["refit"], finalist.kind = error, "refit"
    if finalist.plain_error < error:  # nearer without it: undone
        candidate.adopt(finalist.unreconstructed)
        finalist.reverted, finalist.error, finalist.kind = True, finalist.plain_error, "none"
        row["refit"].update(pooled_rel_l2=reported_error(finalist.plain_error), cosine=finalist.plain_cosine,
                            reconstruction_reverted={"pooled_rel_l2": reported_error(error), "cosine": score["cosine"]})
    corrected = (finalist.errors or {}).get("stats", math.inf)
    if corrected < finalist.error and finalist.stats_model is not None:  # the statistics correction stays
        for name in calibrated.pass_stats:
            candidate.ctx.stats.pop(name, None)
        candidate.adopt(finalist.stats_model)
        candidate.ctx.stats.update(finalist.stats_pass or {})
        finalist.pass_stats, finalist.reverted = finalist.stats_pass or {}, False
        finalist.error, finalist.kind = corrected, "stats"
    row["reconstruction"] = finalist.kind


def _row(rows: list[dict[str, Any]], label: str) -> dict[str, Any]:
    return next(r for r in rows if r["allocation"] == label)


def _confident_over_uniform(best: _Measured, uniform: _Measured, rows: list[dict[str, Any]], judged: Judged,
                            feeds: list, reference: list, session: Session,
                            refit: Callable[[], Any] | None = None) -> _Measured:
    """``best``, where it is nearer the original than the uniform allocation on
    :data:`~graphprune.pipeline.criterion_choice.CONFIDENCE` of bootstrap draws of the held-out
    samples, else the uniform allocation: a lead within the noise of a few held-out samples is no
    reason to leave it (a YOLOv8n's budget kept an allocation 0.5 % nearer on 19 images, which
    found fewer faces on 150 others than the uniform cut). ``refit``: reconstructs the uniform
    allocation in full where it was ranked after a screening refit only (run where that one is
    not already far enough behind). Each one's row says so."""
    from graphprune.pipeline import criterion_choice as cc

    if best is uniform or best.off_target or uniform.off_target or best.error == -math.inf \
            or not math.isfinite(uniform.error):
        return best

    def squares(m: _Measured) -> Any:
        with session.stage("candidates"):
            return cc.sample_squares(reference, judged.run(m.session.model, feeds, "a candidate"))

    ours = squares(best)
    share = cc.nearer_share(ours, squares(uniform))
    if refit is not None and (share is None or share < cc.CONFIDENCE):
        refit()
        share = cc.nearer_share(ours, squares(uniform))
    row = _row(rows, best.label)
    row["confidence_over_uniform"] = None if share is None else round(share, 4)
    if share is not None and share >= cc.CONFIDENCE:
        return best
    row["not_kept"] = (f"nearer than the uniform allocation in {share or 0:.0%} of bootstrap draws of the held-out "
                       f"samples (under {cc.CONFIDENCE:.0%}): the uniform one is kept")
    return uniform


def _weigh_criteria(prior: _Measured, criteria: dict[str, Any], states: list, options: Any,
                    evaluate: Callable[..., bool], measured: Callable[[], _Measured | None], judged: Judged,
                    feeds: list, reference: list, calibrated: Any, session: Session) -> _Measured:
    """The chosen allocation ``prior`` measured again with each other criterion's units at its widths
    (reconstructed in full), and the one kept: another only where it is nearer the original on
    :data:`~graphprune.pipeline.criterion_choice.CONFIDENCE` of bootstrap draws of the held-out
    samples (:mod:`graphprune.pipeline.criterion_choice`, which the report's ``criterion_choice``
    follows)."""
    from graphprune.pipeline import criterion_choice as cc

    found: dict[str, _Measured] = {"auto": prior}
    record: dict[str, Any] = {"compared": True, "allocation": prior.label, "samples": len(feeds)}
    started = time.perf_counter()
    for name, scores_of in criteria.items():
        spent = time.perf_counter() - started
        if len(found) > 1 and spent * len(found) / (len(found) - 1) > cc.MEASURED_SECONDS:
            record.setdefault("not_measured", []).append(name)
            continue
        orders = cc.other_orders(states, scores_of, options.min_channels)
        if orders is None:  # (the same units, or a floor leaves this criterion fewer)
            record.setdefault("same_as", {})[name] = "auto"
            continue
        held = cc.swap_orders(states, orders)
        try:
            stop = evaluate(f"{prior.label} ({name})", prior.indexes, full=True)
        finally:
            cc.swap_orders(states, held)
        got = measured()
        if stop and got is not None:  # a structural check failed: adopted as it is, to be reported
            return got
        if got is not None:
            found[name] = got
    errors = {k: m.error for k, m in found.items()}
    record["held_out"] = {k: {"error": round(v, 6) if math.isfinite(v) else None} for k, v in errors.items()}

    def squares_of(name: str) -> Any:  # (each allocation's held-out outputs again: only for the two compared)
        with session.stage("candidates"):
            return cc.sample_squares(reference, judged.run(found[name].session.model, feeds, "a candidate"))

    kept, decided = cc.decide(errors, squares_of)
    record.update(kept=kept, **decided)
    if found[kept].ridges is not None:  # (the final refit recalls the kept one's validated ridges)
        calibrated._ridges = found[kept].ridges
    cc.keep_other(calibrated, kept, criteria.get(kept), record)
    return found[kept]
