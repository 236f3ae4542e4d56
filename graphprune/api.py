"""Public API: ``analyze`` and ``prune``.

>>> res = graphprune.prune("model.onnx", ratio=0.5)          # doctest: +SKIP
>>> res.model, res.report, res.plan                           # doctest: +SKIP

``prune`` validates its arguments and hands the model to one of the pipeline's drivers
(:mod:`graphprune.pipeline`): ratio (or a replayed plan), lossless, depth (erase residual
blocks), or depth followed by lossless. Every driver runs on a
:class:`~graphprune.pipeline.session.Session` and returns the same
:class:`~graphprune.pipeline.session.PruneResult` with the same report shape. A model that
holds no weight tensor (a tree ensemble keeps its parameters in node attributes) is answered
before any session: nothing to prune (:mod:`graphprune.pipeline.weightless`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

from graphprune.analysis import Analysis, targets
from graphprune.errors import UsageError
from graphprune.pipeline.report import prunable_fraction
from graphprune.pipeline.session import PruneResult, Session, normalize_keep
from graphprune.planning.importance import CRITERIA
from graphprune.planning.plan import Plan

ModelSource = Any  # str | os.PathLike | bytes | onnx.ModelProto
Progress = Callable[[str], None]

#: verification tolerance on the relative difference (ratio mode)
DEFAULT_TOLERANCE = 1e-4
#: the share of every group a ratio prune removes when no ratio is given
DEFAULT_RATIO = 0.5

__all__ = ["DEFAULT_TOLERANCE", "PruneResult", "analyze", "load_and_prepare",
           "prunable_fraction", "prune"]


def load_and_prepare(model: ModelSource) -> Session:
    """Load, check, upgrade and normalise ``model``: a session with ``original``,
    ``prepared`` and ``opset``."""
    return Session(model)


def analyze(model: ModelSource, *, keep: Iterable[str] | str = (),
            input_shapes: dict[str, Any] | None = None) -> Analysis:
    """Dependency analysis of ``model``: channel groups, frozen groups and reasons (a model
    that holds no weight tensor: no group, and ``nothing_prunable`` says why, without the
    preparation; :mod:`graphprune.pipeline.weightless`). ``input_shapes``: the sizes the
    model runs at, as :func:`prune` takes them (the analysis reads a model that cannot run at
    other sizes with them)."""
    from graphprune.pipeline import weightless

    found = weightless.find(model)
    if found is not None:
        return weightless.analysis(found, keep=normalize_keep(keep))
    session = Session(model, keep=keep, input_shapes=input_shapes)
    analysis = session.analyze()
    analysis.normalised = dict(session.normalised)
    return analysis


def _number(name: str, value: Any, low: float, high: float, *, high_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise UsageError(f"{name} must be a number in [{low:g}, {high:g}), got {value!r}")
    value = float(value)
    if not low <= value or not (value < high if high_open else value <= high):
        bracket = ")" if high_open else "]"
        raise UsageError(f"{name} must be in [{low:g}, {high:g}{bracket}, got {value:g}")
    return value


def _validate_args(ratio: Any, criterion: str, round_to: int | None, min_channels: int,
                   tolerance: Any) -> float:
    ratio = _number("ratio", ratio, 0.0, 1.0)
    if criterion not in CRITERIA:
        from graphprune.pipeline.calibrated import CALIBRATED_CRITERIA

        if criterion in CALIBRATED_CRITERIA:  # (checked after check_options: no calibration here)
            raise UsageError(f"criterion '{criterion}' reads activations: it needs calibration data "
                             f"(--calibration DATA, or --calibration random); without it choose from "
                             f"{', '.join(CRITERIA)}")
        raise UsageError(f"unknown criterion '{criterion}' (choose from {', '.join(CRITERIA)})")
    if round_to is not None and (isinstance(round_to, bool) or int(round_to) != round_to or round_to < 1):
        raise UsageError(f"round_to must be an integer >= 1, got {round_to}")
    if isinstance(min_channels, bool) or int(min_channels) != min_channels or min_channels < 1:
        raise UsageError(f"min_channels must be an integer >= 1, got {min_channels}")
    if tolerance is not None:
        _number("tolerance", tolerance, 0.0, math.inf)
    return ratio


def prune(
    model: ModelSource,
    *,
    ratio: float | None = None,
    criterion: str | None = None,
    round_to: int | None = None,
    min_channels: int = 1,
    keep: Iterable[str] | str = (),
    plan: Plan | str | None = None,
    verify: bool = True,
    tolerance: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    lossless: bool = False,
    erase_blocks: int | float | None = None,
    head_ratio: float | None = None,
    mlp_ratio: float | None = None,
    hidden_ratio: float | None = None,
    prune_hidden: bool = False,
    debug: bool = False,
    calibration: Any = None,
    reconstruction: str = "auto",
    holdout: float = 0.2,
    class_scores: Iterable[str] | str = (),
    target_macs: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    max_ratio: float | None = None,
    provider: str = "cpu",
    threads: int | None = None,
    latency_runs: int | None = None,
    input_shapes: dict[str, Any] | None = None,
    allow_depth: bool = False,
    search: int | None = None,
    allocation: str = "auto",
    final_refit: str = "auto",
) -> PruneResult:
    """Prune ``model`` (a path, bytes or ``onnx.ModelProto``) and verify the result.

    ``lossless=True`` removes only what is exactly removable (zero-invariant channel groups,
    identically zero branches and operators; see :mod:`graphprune.pipeline.lossless`) and
    checks that the outputs are unchanged (tolerance 1e-4 by default); ``ratio``,
    ``criterion`` and ``plan`` do not apply then. ``erase_blocks=K`` erases the K (or the
    fraction K < 1) least important residual blocks (depth pruning), verified against the
    original with those branches zeroed; with ``lossless`` the lossless pass runs after it.
    Otherwise every prunable group loses about ``ratio`` (default 0.5; an error together with a
    target, ``lossless`` or ``erase_blocks``) of its units and the result must
    match the original with those channels zeroed (1e-4). ``round_to=None`` (default) keeps
    multiples of 8 in groups of 32 units or more (ORT's blocked CPU kernels), no rounding
    below; ``round_to=1`` turns rounding off.

    Transformers: attention heads, MLP neurons and the hidden size (residual stream) are
    told apart (:mod:`graphprune.analysis.targets`); ``head_ratio`` and ``mlp_ratio`` default
    to ``ratio`` (0 means none); the hidden size is pruned only with ``prune_hidden`` (at
    ``hidden_ratio``, default ``ratio``) and is reported inexact. Where only per-kind ratios
    are given (``mlp_ratio=0.5`` and no ``ratio``), only those kinds are pruned, and a model
    with no prunable group of those kinds is a :class:`UsageError` (it would have been cut by
    the default ratio everywhere).

    ``debug=True`` verifies the graph after every pass that changes it.

    ``calibration`` (a ``.npz`` path, a folder of ``.npz`` files, a dict of stacked arrays
    or an iterable of feed dicts; see :mod:`graphprune.calibration.data`; or ``"random"`` /
    ``"random:N"`` where there is no data: synthetic feeds, :mod:`graphprune.calibration.synthetic`) makes the prune
    data-aware: the criterion defaults to ``auto`` (a reconstruction-aware score from
    activation statistics; ``criterion`` overrides it), the structural rewrite is still
    checked exactly against the zeroed original, then ``reconstruction`` (``refit``:
    least-squares refit of the affected layers, ``stats``: statistics correction, ``bias``:
    bias compensation, ``none``; ``auto``, the default: the refit, or the statistics
    correction or nothing where the held-out samples are nearer the original with that)
    restores the function without fine-tuning, and
    ``report["fidelity"]`` compares the result with the original on the ``holdout`` share
    of the samples (``report["calibration"]`` says what was used and changed). A layer whose
    output's softmax is a graph output is then refit to the original's class distribution
    (:mod:`graphprune.calibration.softmax_head`); ``class_scores`` names graph outputs that
    are class *logits* (the softmax is applied outside the model, as torchvision's and timm's
    classifiers leave it), whose layer is distilled the same way. Without ``calibration``
    nothing of this runs.

    Budgets: ``target_macs``, ``target_params`` or ``target_latency`` (a fraction of the
    original in (0, 1); one of them, instead of ``ratio``) allocate the removal across all
    groups (:mod:`graphprune.pipeline.budget`): units are ranked globally by importance per
    unit of cost saved (with ``calibration``: by the measured output deviation of each
    group), at most ``max_ratio`` (default 0.9) of any group. A latency target uses
    per-operator latencies measured with ONNX Runtime on ``provider`` (cached on disk) and
    checks the pruned model's measured latency (median of ``latency_runs`` runs, default 20, on ``threads``
    ONNX Runtime threads), re-allocating when it misses.
    ``report["budget"]`` gives target, achieved value, how it was measured and the kept
    width of every group. ``allow_depth=True`` (MACs/params targets): when width alone
    cannot reach the target, the least important residual blocks are erased first (one
    more at a time) and the width allocated on what is left. With ``calibration`` (MACs/params
    targets) the allocation is chosen by measurement among the greedy one, uniform, a blend
    and ``search`` perturbations of the best so far, each rewritten and reconstructed
    (default ``None``: as many as fit in about a minute by an estimate of their cost from the
    graph's size and the MACs on the calibration samples, at most 12).

    ``allocation`` (ratio prunes with ``calibration``): ``auto`` (default) allocates the
    removal across groups by measurement where every group cut is an attention-head group of
    one size (``head_ratio=0.25, mlp_ratio=0``: a quarter of all heads, not necessarily a
    quarter of each layer's; :mod:`graphprune.pipeline.measured_ratio`), ``measured`` does the
    same for MLP neurons too, ``uniform`` cuts every group by the same share.
    ``report["allocation"]`` says which ran and why.

    ``final_refit`` (with ``calibration``): once the reconstruction is kept, it runs again with
    every sample, the held-out ones too, and that model is written; ``report["fidelity"]``
    stays the figures of the same prune reconstructed without the held-out samples (measured
    on samples it never saw). ``auto`` (default) does so where one reconstruction is
    estimated cheap (:data:`graphprune.pipeline.calibrated.FINAL_REFIT_SECONDS`), ``on``
    always, ``off`` never; ``report["calibration"]["final_refit"]`` says what ran.

    ``input_shapes`` (``{input name: shape}``) fixes the shapes verification feeds; sizes
    the model leaves open otherwise are chosen so that it runs
    (:mod:`graphprune.analysis.probe_sizes`).

    A model that holds no weight tensor (no initializer or constant of two or more numbers:
    a tree ensemble, a tokenizer) has nothing to prune: after the argument checks it comes
    back unchanged (same opset, same bytes), checked to load and run in ONNX Runtime, with
    ``report["nothing_prunable"]`` saying so; a MACs or parameter target, or blocks to erase,
    are usage errors there (:mod:`graphprune.pipeline.weightless`).

    Raises :class:`~graphprune.errors.VerificationError` when the pruned model fails a check;
    the exception's ``result`` attribute carries the (unverified) result for inspection.
    """
    keep = normalize_keep(keep)
    if tolerance is not None:
        tolerance = _number("tolerance", tolerance, 0.0, math.inf)
    if calibration is None and reconstruction not in ("auto", "none"):
        # the default (auto) and none mean nothing without data; anything else would be silently ignored
        raise UsageError(f"reconstruction '{reconstruction}' needs calibration data (--calibration); "
                         "without it no reconstruction runs")
    if calibration is None and holdout != 0.2:
        raise UsageError("holdout (--holdout) applies with calibration data (--calibration) only")
    if calibration is None and class_scores:
        raise UsageError("class_scores (--class-scores) needs calibration data (--calibration)")
    if calibration is None and final_refit != "auto":
        raise UsageError("final_refit (--final-refit) applies with calibration data (--calibration) only")
    budget = _budget(target_macs, target_params, target_latency)
    if ratio is not None and (budget is not None or lossless or erase_blocks is not None):
        # it would be ignored: say so rather than prune to something else than asked
        mode = "a MACs/params/latency target" if budget is not None else (
            "lossless mode" if lossless else "erase_blocks")
        raise UsageError(f"ratio does not apply with {mode} (give one or the other)")
    if budget is not None and (lossless or erase_blocks is not None or plan is not None):
        raise UsageError("a MACs/params/latency target cannot be combined with lossless mode, "
                         "erase_blocks or a saved plan")
    given = [n for n, v in (("ratio", ratio), ("head_ratio", head_ratio), ("mlp_ratio", mlp_ratio),
                            ("hidden_ratio", hidden_ratio)) if v is not None]
    if plan is not None and given:  # (they were ignored: the replay removed what the plan says)
        raise UsageError(f"a saved plan says what to remove: {', '.join(given)} does not apply with it")
    tuning = [f"{n} (--{n.replace('_', '-')})" for n, v in (("criterion", criterion is not None), (
        "round_to", round_to is not None), ("min_channels", min_channels != 1)) if v]
    if tuning and (plan is not None or lossless or erase_blocks is not None):  # (they wrote the same model)
        what = "a saved plan" if plan is not None else "lossless mode" if erase_blocks is None else "erase_blocks"
        raise UsageError(f"{', '.join(tuning)} does not apply with {what}: nothing is ranked or rounded there")
    if latency_runs is not None and (budget is None or budget[0] != "latency"):
        raise UsageError("latency_runs applies to a latency target (target_latency) only")
    if latency_runs is not None and (isinstance(latency_runs, bool) or int(latency_runs) != latency_runs
                                     or latency_runs < 1):
        raise UsageError(f"latency_runs must be an integer >= 1, got {latency_runs!r}")
    if not verify and tolerance is not None:
        raise UsageError("tolerance (--tolerance) is the verification's: it does not apply with verify=False "
                         "(--no-verify)")
    if budget is None and (max_ratio is not None or allow_depth):
        raise UsageError("max_ratio and allow_depth apply to a MACs/params/latency target only")
    if search is not None:
        if isinstance(search, bool) or int(search) != search or search < 0:
            raise UsageError(f"search must be an integer >= 0, got {search!r}")
        if budget is None or budget[0] == "latency" or calibration is None:
            raise UsageError("search applies to a MACs/params target with calibration data only")
    from graphprune.pipeline.measured_ratio import ALLOCATIONS

    if allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation {allocation!r} (choose from {', '.join(ALLOCATIONS)})")
    if allocation != "auto" and (budget is not None or calibration is None):
        raise UsageError("allocation applies to a ratio prune with calibration data only")
    if lossless or erase_blocks is not None:
        if given:  # (ratio is refused above): per-kind ratios were ignored
            raise UsageError(f"{', '.join(given)} does not apply with "
                             f"{'lossless mode' if erase_blocks is None else 'erase_blocks'} (give one or the other)")
        if plan is not None:
            raise UsageError("a plan cannot be combined with lossless mode or erase_blocks")
        if calibration is not None:
            raise UsageError("calibration cannot be combined with lossless mode or erase_blocks")
        mode = "lossless" if erase_blocks is None else "erase_blocks" + ("+lossless" if lossless else "")
        answered = _weightless(model, mode, erase_blocks=erase_blocks, keep=keep, verify=verify,
                               tolerance=tolerance, progress=progress, input_shapes=input_shapes)
        if answered is not None:
            return answered
        return _prune_exact(model, lossless=lossless, erase_blocks=erase_blocks, keep=keep,
                            verify=verify, tolerance=tolerance, progress=progress,
                            input_shapes=input_shapes)
    from graphprune.pipeline.ratio import RatioOptions, prune_ratio

    calibration_options = None
    if calibration is not None:
        from graphprune.pipeline.calibrated import CalibrationOptions, check_options

        check_options(criterion or "auto", reconstruction, final_refit)
        calibration_options = CalibrationOptions(
            criterion=criterion or "auto", reconstruction=reconstruction, final_refit=final_refit,
            holdout=_number("holdout", holdout, 0.0, 1.0),
            class_scores=(class_scores,) if isinstance(class_scores, str) else tuple(class_scores),
        )
        criterion = criterion if criterion in CRITERIA else "l1"
    criterion = criterion or "l1"
    if hidden_ratio is not None and not prune_hidden:
        raise UsageError("hidden_ratio (--hidden-ratio) applies with prune_hidden (--prune-hidden): the hidden size "
                         "(residual stream) is pruned only when asked")
    # per-kind ratios alone name what to prune: every other group stays (with the default ratio,
    # `--mlp-ratio 0.5` had halved the heads too, and a model without MLP groups was cut everywhere)
    kinds_only = ratio is None and any(v is not None for v in (head_ratio, mlp_ratio, hidden_ratio))
    if kinds_only and prune_hidden and hidden_ratio is None:
        hidden_ratio = DEFAULT_RATIO
    ratio = _validate_args((0.0 if kinds_only else DEFAULT_RATIO) if ratio is None else ratio, criterion, round_to,
                           min_channels, tolerance)
    targets.check_ratios(head_ratio=head_ratio, mlp_ratio=mlp_ratio, hidden_ratio=hidden_ratio)
    options = RatioOptions(
        ratio=ratio, criterion=criterion, round_to=round_to, min_channels=int(min_channels),
        seed=seed, head_ratio=head_ratio, mlp_ratio=mlp_ratio, hidden_ratio=hidden_ratio,
        prune_hidden=prune_hidden, allocation=allocation, require_kinds=kinds_only,
    )
    session_options = {"keep": keep, "progress": progress, "debug": debug, "input_shapes": input_shapes}
    if budget is not None:
        from graphprune.pipeline.budget import BudgetOptions, prune_budget
        from graphprune.planning.budget import DEFAULT_MAX_RATIO

        if threads is not None and (isinstance(threads, bool) or int(threads) != threads or threads < 1):
            raise UsageError(f"threads must be an integer >= 1, got {threads!r}")
        budget_options = BudgetOptions(
            kind=budget[0], target=budget[1], criterion=criterion, round_to=round_to,
            min_channels=int(min_channels), seed=seed, head_ratio=head_ratio, mlp_ratio=mlp_ratio,
            prune_hidden=prune_hidden, provider=provider, threads=threads,
            latency_runs=BudgetOptions.latency_runs if latency_runs is None else int(latency_runs),
            max_ratio=DEFAULT_MAX_RATIO if max_ratio is None else _number("max_ratio", max_ratio, 0.0, 1.0),
            search=None if search is None else int(search),
        )
        answered = _weightless(model, "budget", budget=budget, max_ratio=budget_options.max_ratio,
                               calibration=calibration, holdout=holdout, keep=keep, progress=progress,
                               input_shapes=input_shapes, verify=verify, tolerance=tolerance)
        if answered is not None:
            return answered
        if allow_depth:
            from graphprune.pipeline.budget import prune_budget_with_depth

            return prune_budget_with_depth(
                model, budget_options, verify=verify, tolerance=tolerance, calibration=calibration,
                calibration_options=calibration_options, session_options=session_options)
        return prune_budget(Session(model, **session_options), budget_options, verify=verify, tolerance=tolerance,
                            calibration=calibration, calibration_options=calibration_options)
    replayed = Plan.load(plan) if isinstance(plan, str) else plan  # (a plan that removes nothing replays as none)
    empty = plan is None or (isinstance(replayed, Plan) and not replayed.groups and not replayed.erase)
    answered = None if not empty else _weightless(
        model, "ratio", calibration=calibration, holdout=holdout, keep=keep, progress=progress,
        input_shapes=input_shapes, verify=verify, tolerance=tolerance)
    if answered is not None:
        return answered
    session = Session(model, **session_options)
    if calibration is not None and plan is None:
        from graphprune.pipeline.measured_ratio import prune_calibrated

        return prune_calibrated(session, options, calibration, calibration_options, verify=verify,
                                tolerance=tolerance)
    return prune_ratio(session, options, plan=plan, verify=verify,
                       tolerance=tolerance, calibration=calibration, calibration_options=calibration_options)


def _weightless(model: ModelSource, mode: str, **options: Any) -> PruneResult | None:
    """``model`` returned unchanged, checked and reported, where it holds no weight tensor:
    nothing to prune, no preparation run (:mod:`graphprune.pipeline.weightless`); ``None``
    otherwise."""
    from graphprune.pipeline import weightless

    found = weightless.find(model)
    return None if found is None else weightless.unchanged(found, mode, **options)


def _budget(macs: Any, params: Any, latency: Any) -> tuple[str, float] | None:
    """The one budget asked for, as ``(kind, fraction)`` (``None``: a ratio prune)."""
    from graphprune.planning.budget import check_target

    given = [(k, v) for k, v in (("macs", macs), ("params", params), ("latency", latency)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise UsageError("give one target: " + ", ".join(f"target_{k}" for k, _ in given) + " are exclusive")
    kind, value = given[0]
    return kind, check_target(kind, value)


def _prune_exact(
    model: ModelSource,
    *,
    lossless: bool,
    erase_blocks: int | float | None,
    keep: tuple[str, ...],
    verify: bool,
    tolerance: float | None,
    progress: Progress | None,
    input_shapes: dict[str, Any] | None = None,
) -> PruneResult:
    """Depth and/or lossless pruning (depth first, then lossless on its result)."""
    from graphprune.pipeline import depth as depth_mode
    from graphprune.pipeline import lossless as lossless_mode

    tol = tolerance  # None: each driver's default for the model's precision
    if erase_blocks is None:
        return lossless_mode.prune_lossless(  # type: ignore[no-any-return]
            model, verify=verify, progress=progress, keep=keep, tolerance=tol,
            input_shapes=input_shapes)
    depth = depth_mode.erase_blocks(model, erase_blocks, verify=verify, tolerance=tol,
                                    progress=progress, input_shapes=input_shapes)
    if not lossless:
        return depth  # type: ignore[no-any-return]
    result = lossless_mode.prune_lossless(depth.model, verify=verify, tolerance=tol,
                                          progress=progress, keep=keep, input_shapes=input_shapes)
    result.report["depth"] = depth.report["depth"]
    result.report["mode"] = "erase_blocks+lossless"
    # "before" is the model given, not the one with the blocks erased (the table read 1.000), and
    # the lossless step's exact check is against that one
    result.report.update({k: depth.report[k] for k in ("params_before", "macs_before", "nodes_before")
                          if k in depth.report})
    if isinstance(result.report.get("verification"), dict) and result.report["verification"].get("reference"):
        result.report["verification"]["reference"] = "the model with the blocks erased"
    return result  # type: ignore[no-any-return]
