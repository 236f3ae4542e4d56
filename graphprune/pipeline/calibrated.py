"""The calibrated driver: data-aware planning, reconstruction and fidelity on a session.

A ratio prune with calibration data runs as:

1. ``CalibratedRun(session, source)``: read and validate the samples, hold part out, group
   the rest into batches (:mod:`graphprune.calibration.data`, :mod:`~graphprune.calibration.runner`);
2. ``scorer(analysis)``: for a data-aware criterion, stream the samples through the original
   and score units from the input statistics of their consumers
   (:mod:`graphprune.planning.data_aware`); the planner uses it instead of the weight norms
   (under ``auto``, other criteria's whole plans are weighed: :mod:`.criterion_choice`);
3. the structural rewrite and its exact check against the zeroed original (the ratio driver);
4. ``reconstruct(analysis, plan)``: reconstruction passes on the pruned graph —
   ``refit`` (:class:`~graphprune.passes.refit.RefitPass`), ``stats``
   (:class:`~graphprune.passes.stats_correction.StatsCorrectionPass`), ``bias``
   (:class:`~graphprune.passes.bias_compensation.BiasCompensationPass`), ``bn`` (the same from
   BatchNormalization statistics, no data: :class:`~graphprune.passes.bn_compensation.BatchNormCompensationPass`)
   or ``none``; ``auto`` (default): the refit, weighed in ``fidelity()`` (below);
5. ``fidelity()``: the reconstructed model against the ORIGINAL on the held-out samples
   (under ``auto``, of the refit, the statistics correction and none, the nearest is kept: a
   Thai segmenter kept F1 0.61 with the statistics correction where the refit left 0.48; a
   budget weighs the three for each allocation it measures: :mod:`graphprune.pipeline.choose`);
6. the final refit (inside ``fidelity()``, once the reconstruction is kept): the same
   reconstruction again from the rewrite with EVERY sample, the held-out ones too (each layer
   takes the ridge its validation chose: :class:`~graphprune.calibration.ridge.RidgeChoices`),
   and that model written (all-MiniLM-L6-v2, a quarter of its MLP: cosine 0.9778 -> 0.9791).
   The fidelity reported stays the one measured on held-out samples the model never saw;
   ``report["calibration"]["final_refit"]`` gives the samples, the in-sample figures, or why
   it did not run (``final_refit="off"``; under ``auto`` a reconstruction estimated, or measured,
   at over :data:`FINAL_REFIT_SECONDS`; ``If`` branches, each refit on its own samples).

``report()`` gives ``report["calibration"]`` (samples used and held out, criterion, passes
and what each changed); ``fidelity()`` gives ``report["fidelity"]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from graphprune.analysis import Analysis, ChannelGroup
from graphprune.analysis.probe_sizes import choose_input_shapes
from graphprune.calibration import fidelity as fidelity_mod
from graphprune.calibration import refit_targets, runner, sequential, synthetic
from graphprune.calibration import stats as stats_mod
from graphprune.calibration.data import DEFAULT_HOLDOUT, load_calibration
from graphprune.calibration.linear import linear_view
from graphprune.calibration.ridge import DEFAULT_RIDGE, RidgeChoices
from graphprune.calibration.targets import RecordedTargets
from graphprune.errors import UsageError
from graphprune.io import ir
from graphprune.io.feeds import input_specs
from graphprune.passes.prune_channels import removed_elements
from graphprune.planning.data_aware import (
    AUTO_CRITERION,
    DATA_CRITERIA,
    consumer_views,
    make_scorer,
)
from graphprune.planning.importance import CRITERIA
from graphprune.planning.plan import Plan
from graphprune.verify import validate

RECONSTRUCTIONS = ("auto", "refit", "stats", "bias", "bn", "none")
FINAL_REFITS = ("auto", "on", "off")
#: ``reconstruction="auto"`` weighs the statistics correction where a sample computes less than
#: this (``runner.sample_bytes``; U2-Net-p's 577 MB took it from the refit's 1.5 GB to 4.6 GB)
AUTO_STATS_SAMPLE_BYTES = 256 << 20
#: the held-out figures kept of a model that is not the one written
HELD_OUT_FIGURES = ("cosine", "rel_l2", "pooled_rel_l2", "top1_agreement")
#: under ``final_refit="auto"``, the final refit runs where one reconstruction is estimated
#: (:func:`graphprune.planning.search.candidate_seconds`) at this many seconds or fewer
FINAL_REFIT_SECONDS = 30.0
CALIBRATED_CRITERIA = (AUTO_CRITERION, *DATA_CRITERIA)


@dataclass
class CalibrationOptions:
    #: ``auto`` (default: the best candidate per group, see data_aware), a data-aware criterion or a
    #: data-free one (``l1``, ``l2``, ``random``)
    criterion: str = "auto"
    #: ``auto`` (default): the refit, the statistics correction or none, the nearest on held-out samples
    reconstruction: str = "auto"
    #: relative ridge of the refit (``None``: cross-validated per layer)
    ridge: float | None = None
    holdout: float = DEFAULT_HOLDOUT
    batch_size: int = 16
    #: refit every linear layer downstream of a change (``downstream``) or only the direct
    #: consumers of removed channels (``consumers``)
    scope: str = "downstream"
    #: graph outputs that are class logits: their layer is distilled like a softmax head's
    class_scores: tuple[str, ...] = ()
    #: reconstruct once more with every sample, the held-out ones too, once the reconstruction
    #: is kept (``auto``: where it is estimated cheap, :data:`FINAL_REFIT_SECONDS`; ``on``, ``off``)
    final_refit: str = "auto"


def check_options(criterion: str, reconstruction: str, final_refit: str = "auto") -> None:
    if criterion not in CALIBRATED_CRITERIA and criterion not in CRITERIA:
        choices = ", ".join((*CALIBRATED_CRITERIA, *CRITERIA))
        raise UsageError(f"unknown criterion '{criterion}' (choose from {choices})")
    if reconstruction not in RECONSTRUCTIONS:
        raise UsageError(f"unknown reconstruction '{reconstruction}' (choose from {', '.join(RECONSTRUCTIONS)})")
    if final_refit not in FINAL_REFITS:
        raise UsageError(f"unknown final refit '{final_refit}' (choose from {', '.join(FINAL_REFITS)})")


class CalibratedRun:
    """Calibration state of one prune on a :class:`~graphprune.pipeline.session.Session`."""

    #: record the refit targets in the statistics run instead of running the original again
    record_targets = True

    def __init__(self, session: Any, source: Any, options: CalibrationOptions | None = None) -> None:
        self.session = session
        self.options = options or CalibrationOptions()
        check_options(self.options.criterion, self.options.reconstruction, self.options.final_refit)
        #: reconstruction left to the tool: the refit runs; :meth:`fidelity` weighs it against the rest
        self.auto_reconstruction = self.options.reconstruction == "auto"
        if self.auto_reconstruction:
            self.options = replace(self.options, reconstruction="refit")
        #: ``report["calibration"]["reconstruction_choice"]`` (under ``auto``)
        self.choice: dict[str, Any] | None = None
        self.data_dir = getattr(getattr(session, "store", None), "root", None)
        outputs = [o.name for o in session.prepared.graph.output]
        unknown = [n for n in self.options.class_scores if n not in outputs]
        if unknown:
            raise UsageError(f"--class-scores: {', '.join(map(repr, unknown))} is not a graph output "
                             f"(the outputs: {', '.join(outputs)})")
        with session.stage("calibration"):
            source, described = self._synthetic(source)
            self.calib = load_calibration(source, session.prepared, holdout=self.options.holdout, run=lambda feeds: (
                validate.run_many(session.path_of(session.prepared), feeds, "the original model")))
            if described:
                self.calib.source = described
            session.data_shapes = {k: tuple(np.shape(v)) for k, v in self.calib.samples[0].items()}  # (MACs count there)
            # verification's inputs where the original does not run on generated ones
            session.data_feeds = (self.calib.holdout or self.calib.samples)[:4]
            with session.blaming_input("the original model", self.calib.samples):
                self.batches = runner.batches(session.prepared, self.calib.samples, self.options.batch_size,
                                              self.data_dir)
                # (before any mode's first run: a budget's sweep failed on it with an internal error)
                validate.run(session.path_of(session.prepared), self.calib.samples[0], "the original model")
        self.stats: stats_mod.LayerStats | None = None
        #: refit targets recorded by the statistics run (one run of the original for both)
        self.recorded: RecordedTargets | None = None
        self.pass_stats: dict[str, Any] = {}
        self._scorer: Any = None
        #: the criterion whose whole plan was kept, and ``report["calibration"]["criterion_choice"]``
        self.kept_criterion, self.criterion_choice = None, None  # (pipeline.criterion_choice)
        #: the original's outputs on the held-out samples (computed once); the rows softmax heads are fitted to
        self._reference: list | None = None
        self._head_rows: dict = {}  # (SoftmaxHeadPass's ``targets``: the original runs once for every candidate)
        #: fidelity of the pruned model before reconstruction (``reconstruct(compare=True)``), and that model
        #: until :meth:`fidelity` decides which of the two is kept
        self.unreconstructed: dict[str, Any] | None = None
        self._unreconstructed_model: onnx.ModelProto | None = None
        self._fidelity: dict[str, Any] | None = None
        #: the reconstruction was undone (:meth:`fidelity`)
        self.reverted = False
        #: what the final refit starts from: analysis, plan and model of the rewrite whose reconstruction is the
        #: session's model (by :meth:`reconstruct`, or ``choose`` for its allocation; ``None``: none, see below)
        self.refit_from: tuple[Analysis, Plan, onnx.ModelProto] | None = None
        self.final_refit_skipped: str | None = None
        #: seconds the latest full (not screening) reconstruction passes took here
        self.refit_seconds: float | None = None
        #: ``report["calibration"]["final_refit"]``
        self.final: dict[str, Any] | None = None
        #: the plan last refit in full and its layers' validated ridges (the final refit recalls them)
        self._ridges: tuple[Plan, RidgeChoices] | None = None

    def _synthetic(self, source: Any) -> tuple[Any, str | None]:
        """Random feeds and their description for ``random[:N[:LO,HI]]`` (:mod:`.synthetic`), else ``(source, None)``."""
        spec = synthetic.parse(source)
        if spec is None:
            return source, None
        session = self.session
        shapes = {k: tuple(np.shape(v)) for k, v in session.feeds(count=1)[0].items()}
        graph = session.graph if session.graph is not None else session.import_graph()
        bounds = synthetic.index_bounds(graph, session.opset)
        tested = synthetic.tested_values(graph, session.opset)
        specs = input_specs(session.prepared)
        ranges = session.value_ranges()  # (an input quantizer's range: what the model was made for)

        def feeds_at(at: dict[str, tuple[int, ...]], count: int) -> list[dict[str, np.ndarray]]:
            return synthetic.synthetic_feeds(specs, at, bounds, count, float_range=spec.float_range, tested=tested,
                                             float_ranges=ranges)

        # the sizes verification runs at were chosen with its own values; where the synthetic ones choose
        # another branch (silero's sample rate: 16000 needs 512 samples, not 128), choose sizes with them
        path = session.path_of(session.prepared)

        def run(*feeds: dict[str, np.ndarray]) -> bool:
            try:  # (one session for all: 128 had taken 40 s on a BERT)
                validate.run_many(path, list(feeds), "the original model")
                return True
            except Exception:  # VerificationError
                return False

        if not run(feeds_at(verified := shapes, 1)[0]):
            shapes = choose_input_shapes(path, specs, session.input_shapes,
                                         feed=lambda at: feeds_at(at, 1)[0]) or shapes
        feeds = feeds_at(shapes, spec.count)
        text = synthetic.describe(feeds, bounds, spec.float_range, ranges)
        # integers whose range nothing in the graph tells (a GNN's node -> graph ids, read by a ScatterElements
        # into as many graphs as another input has rows): where random ones do not run, held at the values
        # verification runs the original with, the rest random
        fixed = [s.name for s in specs if s.name not in bounds and s.name not in tested
                 and (np.issubdtype(s.dtype, np.integer) or s.dtype == np.bool_)]
        if fixed and not run(*feeds):
            fresh = feeds_at(verified, spec.count)
            # the first of verification's feeds whose integers run, else 0 (an index every table has)
            helds = [*({n: h[n] for n in fixed} for h in session.feeds(count=4)), {n: np.zeros_like(fresh[0][n]) for n in fixed}]
            for k, held in enumerate(helds):
                candidate = [{**f, **held} for f in fresh]
                if not run(candidate[0]):  # (every one holds the same integers)
                    continue
                feeds, at = candidate, "0" if k == len(helds) - 1 else "the values verification runs the original with"
                text = (synthetic.describe(feeds, bounds, spec.float_range, ranges)
                        + f"; {', '.join(fixed)} held at {at} (random values of them do not run)")
                break
        return synthetic.unmask(specs, feeds, text, lambda feed: validate.run(path, feed, "the original model"))

    @property
    def criterion(self) -> str:
        name = self.kept_criterion or self.options.criterion
        return AUTO_CRITERION if name == "auto" else name

    # ------------------------------------------------------------------ planning
    def scorer(self, analysis: Analysis) -> Callable[[ChannelGroup], np.ndarray] | None:
        """Unit scores for the planner (``None`` for a data-free criterion)."""
        if self.criterion not in DATA_CRITERIA and self.criterion != AUTO_CRITERION:
            return None
        views = consumer_views(analysis)
        if self.options.reconstruction == "refit" and self.record_targets:
            self.recorded = self._recorder(analysis.graph)
        with self.session.stage("statistics"), self.session.blaming_input("the original model", self.calib.samples):
            self.stats = stats_mod.collect(
                self.session.prepared, list(views.values()), self.batches, data_dir=self.data_dir,
                record=self.recorded,
            )
        self._scorer = make_scorer(analysis, views, self.stats, self.criterion)
        return self._scorer

    # ------------------------------------------------------------------ reconstruction
    def _bias_stats(self, original: Any, removed: dict) -> stats_mod.LayerStats:
        if self.stats is not None:
            return self.stats
        views = []
        for node in original.nodes:
            view = linear_view(node, self.session.opset)
            if view is not None and view.weight_dim(view.info.in_axis) in removed:
                views.append(view)
        return stats_mod.collect(self.session.prepared, views, self.batches, gram=False, data_dir=self.data_dir)

    def _too_large_to_refit(self, removed: dict) -> set[str]:
        """Consumers of removed channels in the pruned graph that are too large to refit
        (:data:`~graphprune.calibration.refit_targets.MAX_REFIT_INPUTS`)."""
        large = set()
        for node in self.session.graph.nodes if self.session.graph is not None else ():
            view = linear_view(node, self.session.opset)
            cut = removed.get(view.weight_dim(view.info.in_axis)) if view is not None else None
            if view is not None and cut is not None and len(cut) and refit_targets.too_large(view):
                large.add(node.name)
        return large

    def passes(self, analysis: Analysis, plan: Plan, *, screening: bool = False, kind: str | None = None,
               ridges: RidgeChoices | None = None) -> list:
        """The reconstruction passes for ``plan`` (``screening``: the refit takes the default
        ridge instead of cross-validating one per layer, unless a ridge was given, and the
        softmax head is not refit — the cheap reconstruction a budget ranks its candidate
        allocations with; ``kind``: this reconstruction instead of the options')."""
        from graphprune.passes.bias_compensation import BiasCompensationPass
        from graphprune.passes.refit import RefitPass
        from graphprune.passes.softmax_head import SoftmaxHeadPass
        from graphprune.passes.stats_correction import StatsCorrectionPass

        removed = removed_elements(analysis, plan)
        kind = kind or self.options.reconstruction
        store = getattr(self.session, "store", None)
        if not removed or kind == "none":
            return []
        if kind == "bn":  # data-free, from BatchNormalization statistics
            from graphprune.passes.bn_compensation import BatchNormCompensationPass

            return [BatchNormCompensationPass(self.session.prepared, removed, store=store)]
        if kind == "bias":
            original = ir.import_graph(self.session.prepared, store)
            return [BiasCompensationPass(original, self._bias_stats(original, removed), removed)]
        cls = RefitPass if kind == "refit" else StatsCorrectionPass
        fallback = []
        large = self._too_large_to_refit(removed) if kind == "refit" else set()
        if large:  # bias compensation where a layer has too many inputs to refit
            original = ir.import_graph(self.session.prepared, store)
            fallback = [BiasCompensationPass(original, self._bias_stats(original, removed),
                                             removed, only=large)]
        ridge = self.options.ridge
        if screening and ridge is None:
            ridge = DEFAULT_RIDGE
        refit = cls(self.session.prepared, self.batches, removed, ridge=ridge, store=store,
                    consumers_only=self.options.scope == "consumers",
                    **({"recorded": self.recorded, "ridges": ridges} if kind == "refit" else {}))
        if screening:  # the head's refit (a CTC recogniser's 6,625 classes: 12 s a candidate) waits
            return [*fallback, refit]  # for the finalists, reconstructed again in full
        return [*fallback, refit, SoftmaxHeadPass(self.session.prepared, self.batches, store=store,
                                                  logits=self.options.class_scores, targets=self._head_rows)]

    def reconstruct(self, analysis: Analysis, plan: Plan, *, compare: bool = False, screening: bool = False,
                    keep_recorded: bool = False, stage: str = "reconstruction", kind: str | None = None
                    ) -> dict[str, Any]:
        """Run the reconstruction passes on the session's pruned graph and re-export it
        (``compare``: first measure the pruned model on the held-out samples; ``screening``: see
        :meth:`passes`; ``keep_recorded``: keep the refit targets the statistics run recorded,
        until :meth:`close_recorded`; ``kind``: this reconstruction instead of the options').
        A full refit records its layers' validated ridges; the final refit of its plan recalls them."""
        with self.session.stage(stage):
            ridges = None
            if (kind or self.options.reconstruction) == "refit" and not screening:
                held = self._ridges if stage == "final refit" and self._ridges and self._ridges[0] is plan else None
                ridges = RidgeChoices(held[1].chosen, recall=True) if held else RidgeChoices()
                self._ridges = (plan, ridges)
            passes = self.passes(analysis, plan, screening=screening, kind=kind, ridges=ridges)
            if passes and compare and self.calib.holdout and self.session.model is not None:
                self.unreconstructed = self._compare(self.session.model)
                self._unreconstructed_model = self.session.model
            if passes:
                self.refit_from = (analysis, plan, self.session.model)
                before = dict(self.session.ctx.stats)
                started = time.perf_counter()
                self.session.apply(passes)
                self.session.export()
                if not screening:
                    self.refit_seconds = time.perf_counter() - started
                for p in passes:
                    stats = self.session.ctx.stats.get(p.name, before.get(p.name, {}))
                    self.pass_stats[p.name] = stats
            if not keep_recorded:  # a later reconstruction runs the original itself
                self.close_recorded()
        return self.pass_stats

    def close_recorded(self) -> None:
        """Release the refit targets recorded by the statistics run."""
        if self.recorded is not None:
            self.recorded.close()
            self.recorded = None

    # ------------------------------------------------------------------ report
    def _compare(self, model: Any) -> dict[str, Any]:
        """``model`` against the original on the held-out samples (the original runs once)."""
        feeds = self.calib.holdout
        if feeds and self._reference is None:
            with self.session.blaming_input("the original model", feeds):
                self._reference = fidelity_mod.reference_outputs(self.session.prepared, feeds,
                                                                 data_dir=self.data_dir)
        return fidelity_mod.fidelity(self.session.prepared, model, feeds, data_dir=self.data_dir,
                                     reference=self._reference)

    def fidelity(self) -> dict[str, Any]:
        """The final model against the original on the held-out samples, with the figures
        before reconstruction when they were measured. Where the reconstruction made the
        held-out relative L2 worse (it fits the calibration samples: it can overfit them,
        or fit samples unlike the held-out ones), the model without it is the result: the
        session's model goes back and the report says so. The L2 is pooled over the samples
        (``pooled_rel_l2``): averaged per sample, a few samples whose original output is near
        zero decided it (a seal detector's crops without text: 5.99 -> 4109 per sample while
        the cosine rose from 0.19 to 0.54, and on real images the reconstruction was better).
        Decided once; later calls return the same figures."""
        if self._fidelity is not None:
            return self._fidelity
        with self.session.stage("fidelity"):
            result = self._compare(self.session.model)
        before, unreconstructed = self.unreconstructed, self._unreconstructed_model
        self._unreconstructed_model = None
        if before is None and unreconstructed is not None and not self.reverted:  # (see weigh_later)
            with self.session.stage("fidelity"):
                before = self._compare(unreconstructed)
        stats_kept = False
        if before is not None and unreconstructed is not None and self.auto_reconstruction and self.choice is None:
            result, stats_kept = self._weigh_stats(result, before, unreconstructed)  # (else a budget chose)
        if before is not None and not stats_kept:
            figures = HELD_OUT_FIGURES
            worse, better = fidelity_mod.deciding_rel_l2(before), fidelity_mod.deciding_rel_l2(result)
            if worse is not None and better is not None and better > worse and unreconstructed is not None:
                self.session.adopt(unreconstructed)
                self.reverted = True
                result = {**before, "with_reconstruction": {k: result.get(k) for k in figures},
                          "reconstruction_reverted": True, "warning": fidelity_mod.made_worse(result, worse, better)}
            else:
                result["without_reconstruction"] = {k: before.get(k) for k in figures}
        elif self.reverted:  # undone for the allocation a budget chose (pipeline.choose)
            result["reconstruction_reverted"] = True
        if stats_kept:
            self.final = {"ran": False, "why": "the statistics correction was kept: the held-out samples were "
                                                "nearer the original with it than with the refit"}
        elif not self.reverted:
            self._final_refit(result)
        else:
            self.final = {"ran": False, "why": "the reconstruction was undone: the held-out samples were "
                                                "nearer the original without it"}
        self._fidelity = result
        return result

    def refit_undone(self) -> None:
        """Under ``auto``: the refit was undone where it was made, the statistics correction not weighed."""
        if self.auto_reconstruction:
            self.choice = {"tried": ["refit", "none"], "kept": "none", "stats": self.stats_unaffordable()}

    def stats_unaffordable(self) -> str | None:
        """Why ``auto`` does not try the statistics correction (``None``: it does)."""
        per_sample = runner.sample_bytes(self.session.prepared, self.calib.samples[0])
        if per_sample <= AUTO_STATS_SAMPLE_BYTES:
            return None
        return (f"not tried: {per_sample / 2**20:.0f} MB of activations per sample (the statistics correction runs "
                "the original beside the pruned model: 2-3x the refit's memory on U-Nets at 320x320; "
                "--reconstruction stats runs it)")

    def weigh_later(self, unreconstructed: onnx.ModelProto) -> None:
        """Under ``auto``: the session's model (a budget's chosen allocation) was reconstructed from
        ``unreconstructed``, which :meth:`fidelity` measures and weighs it against."""
        if self.auto_reconstruction and self.calib.holdout:
            self.unreconstructed, self._unreconstructed_model = None, unreconstructed

    def _weigh_stats(self, refit: dict[str, Any], none: dict[str, Any], unreconstructed: onnx.ModelProto
                     ) -> tuple[dict[str, Any], bool]:
        """Under ``auto``: the statistics correction from the same rewrite, on the held-out samples
        beside the refit (``refit``) and none (``none``); the nearest of the three is kept (True
        where that is the correction, the session's model then). ``self.choice`` says each one's."""
        figures = HELD_OUT_FIGURES
        errors = {"refit": fidelity_mod.deciding_rel_l2(refit), "none": fidelity_mod.deciding_rel_l2(none)}
        self.choice = {"tried": ["refit", "stats", "none"]}
        if self.refit_from is None or errors["refit"] is None or errors["none"] is None:
            self.choice["stats"] = "not tried: the held-out figures do not compare"
            return refit, False
        costly = fidelity_mod.stats_needless(errors["refit"], errors["none"]) or self.stats_unaffordable()
        if costly is not None:  # (refit or none: fidelity() undoes a refit that is not nearer)
            self.choice.update(tried=["refit", "none"], stats=costly, kept=min(("refit", "none"), key=errors.get),
                               rel_l2={k: fidelity_mod.reported_error(v) for k, v in errors.items()})
            return refit, False
        session, fitted, fitted_stats, seconds = self.session, self.session.model, self.pass_stats, self.refit_seconds
        analysis, plan, _ = refit_from = self.refit_from
        counted = {name: session.ctx.stats.pop(name) for name in fitted_stats if name in session.ctx.stats}

        def back() -> None:
            session.adopt(fitted)
            session.ctx.stats.update(counted)
            self.pass_stats, self.refit_from, self.refit_seconds = fitted_stats, refit_from, seconds

        session.adopt(unreconstructed)
        self.pass_stats = {}
        try:
            self.reconstruct(analysis, plan, kind="stats", stage="stats correction")
            with session.stage("stats correction"):
                stats = self._compare(session.model)
        except Exception as exc:  # noqa: BLE001 - the refit stays
            back()
            self.choice["stats"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            return refit, False
        errors["stats"] = fidelity_mod.deciding_rel_l2(stats)
        self.choice["rel_l2"] = {k: fidelity_mod.reported_error(v) for k, v in errors.items()}
        best = min(("refit", "none", "stats"), key=lambda k: math.inf if errors[k] is None else errors[k])
        self.choice["kept"] = best
        if best != "stats":
            for name in self.pass_stats:
                session.ctx.stats.pop(name, None)
            back()
            return refit, False
        self.refit_from = None  # (no final refit: see fidelity)
        stats["without_reconstruction"] = {k: none.get(k) for k in figures}
        stats["with_refit"] = {k: refit.get(k) for k in figures}
        stats["reconstruction_kept"] = (
            f"the statistics correction: the held-out samples were nearer the original with it (pooled relative L2 "
            f"{errors['stats']:.4g}) than with the refit ({errors['refit']:.4g}) or with none ({errors['none']:.4g})")
        return stats, True

    def no_final_refit(self, why: str) -> None:
        """The final refit does not run, for ``why`` (said in the report)."""
        self.refit_from, self.final_refit_skipped = None, why

    def _final_refit_skip(self) -> str | None:
        """Why the final refit does not run (``None``: it runs)."""
        if not self.calib.holdout:
            return "no sample was held out: the reconstruction used every sample"
        if self.options.final_refit == "off":
            return "final_refit off"
        if self.options.reconstruction in ("bn", "none"):
            return f"reconstruction {self.options.reconstruction} reads no samples"
        if self.refit_from is None:
            return self.final_refit_skipped or "no reconstruction changed the model"
        if self.options.final_refit == "auto":
            from graphprune.planning.search import candidate_seconds
            from graphprune.verify.metrics import count_macs

            # the original's MACs: the refit runs it beside the pruned model
            session = self.session
            macs = count_macs(session.prepared, session.store, session.cost_shapes())
            seconds = candidate_seconds(len(session.prepared.graph.node), macs, self.calib.total)
            if seconds > FINAL_REFIT_SECONDS:
                return (f"a reconstruction is estimated at {seconds:.0f} s here (over {FINAL_REFIT_SECONDS:.0f} s); "
                        "final_refit on runs it")
            # the estimate counts the runs, not the least-squares fits, whose cost grows with the
            # cube of a layer's inputs: a ResNet-50 at a small input took 177 s estimated under 30
            if self.refit_seconds is not None and self.refit_seconds > FINAL_REFIT_SECONDS:
                return (f"the reconstruction took {self.refit_seconds:.0f} s here (over "
                        f"{FINAL_REFIT_SECONDS:.0f} s); final_refit on runs it")
        return None

    def _recorder(self, graph: Any) -> RecordedTargets:
        """Refit targets of every linear layer of ``graph`` (the original's) on :attr:`batches`,
        to be filled by a run of the original."""
        opset = self.session.opset
        views = [v for n in graph.nodes if (v := linear_view(n, opset)) is not None]
        return RecordedTargets(self.session.prepared, views, self.batches.sizes, sequential.rows_budget, opset,
                               self.data_dir)

    def _record_targets(self) -> None:
        """For the final refit: the refit targets on :attr:`batches` (every sample) recorded by
        one run of the original, as the statistics run records them, instead of the refit
        running the original again in every wave."""
        if self.options.reconstruction != "refit" or not self.record_targets:
            return
        session = self.session
        recorded = self._recorder(ir.import_graph(session.prepared, getattr(session, "store", None)))
        if recorded.views:
            self.recorded = recorded
            stats_mod.collect(session.prepared, [], self.batches, data_dir=self.data_dir, record=recorded)

    def _final_refit(self, held_out: dict[str, Any]) -> None:
        """Reconstruct again from the rewrite with every sample (the held-out ones too) and
        keep that model; ``held_out`` (the fidelity of the model fitted without them) stays
        the reported fidelity. Kept unless the new model is further from the original on the
        held-out samples than the one fitted without them (a failure: it has seen them) or
        the reconstruction fails."""
        why = self._final_refit_skip()
        if why is not None:
            self.final = {"ran": False, "why": why}
            return
        assert self.refit_from is not None
        analysis, plan, rewrite = self.refit_from
        session, fitted, fitted_stats, batches = self.session, self.session.model, self.pass_stats, self.batches
        counted = {name: session.ctx.stats.pop(name) for name in fitted_stats if name in session.ctx.stats}
        every = [*self.calib.samples, *self.calib.holdout]

        def back(why: str) -> None:
            session.adopt(fitted)
            session.ctx.stats.update(counted)
            self.pass_stats, self.final = fitted_stats, {"ran": True, "kept": False, "why": why}

        try:  # (every step is timed as the stage "final refit")
            with session.stage("final refit"), session.blaming_input("the original model", every):
                self.batches = runner.batches(session.prepared, every, self.options.batch_size, self.data_dir)
                self.close_recorded()  # recorded for the samples without the held-out ones
                self._record_targets()
            session.adopt(rewrite)
            self.pass_stats = {}
            self.reconstruct(analysis, plan, stage="final refit")
            with session.stage("final refit"):
                after = self._compare(session.model)
        except Exception as exc:  # noqa: BLE001 - the model fitted without the held-out samples stays
            back(f"the final refit failed: {type(exc).__name__}: {exc}"[:300])
            return
        finally:
            self.batches = batches
        before_l2, after_l2 = fidelity_mod.deciding_rel_l2(held_out), fidelity_mod.deciding_rel_l2(after)
        if before_l2 is None or after_l2 is None or not after_l2 <= before_l2:
            back(f"refit on every sample, the held-out samples were further from the original "
                 f"(pooled relative L2 {before_l2} -> {after_l2})")
            return
        self.final = {"ran": True, "kept": True, "samples": len(every),
                      "held_out_in_sample": {k: after.get(k) for k in ("cosine", "rel_l2", "pooled_rel_l2",
                                                                           "top1_agreement")}}
        held_out["measured_before_final_refit"] = (
            f"these figures are the same prune's reconstructed without the held-out samples; the model "
            f"written was refit on all {len(every)} (calibration.final_refit)")

    def report(self) -> dict[str, Any]:
        return {
            **self.calib.summary(),
            "batches": len(self.batches.feeds),
            "criterion": self.criterion,
            "criterion_requested": self.options.criterion,
            "criteria_chosen": dict(self._scorer.chosen) if self._scorer is not None and self._scorer.chosen else None,
            **({"criterion_choice": self.criterion_choice} if self.criterion_choice else {}),
            "reconstruction": "stats" if (self.choice or {}).get("kept") == "stats" else self.options.reconstruction,
            **({"reconstruction_requested": "auto", "reconstruction_choice": self.choice}
               if self.auto_reconstruction else {}),
            "ridge": self.options.ridge,
            "statistics": stats_mod.summary(self.stats) if self.stats is not None else None,
            "passes": self.pass_stats,
            **({"reconstruction_reverted": True} if self.reverted else {}),
            **({"final_refit": self.final} if self.final is not None else {}),
        }
