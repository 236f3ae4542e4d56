"""Choosing a calibrated ratio prune's criterion end to end, on the held-out samples.

``auto`` picks a criterion per group from the statistics of the group's own consumers: the
removal set whose refit leaves the least error in those layers (:mod:`graphprune.planning.data_aware`).
That is a local figure. Where errors add up across layers it can pick the worse whole model:
a 2.1 k-parameter voice-activity CNN (int8 QDQ) at ``--ratio 0.5`` kept 0.767 accuracy with
auto's choice (``obs`` in 7 groups of 8) and 0.898 with the data-free ``l1`` order, both with
the same refit; its float twin 0.786 against ``wanda``'s 0.885.

So where a candidate is cheap, the whole models are compared: the plans of ``auto``, of
``wanda`` (:data:`ALTERNATIVES`) and of the data-free criterion the ratio options name
(``l1`` by default) are each rewritten on a sibling session, reconstructed in full (the screening
refit a budget ranks its candidates with ranked them otherwise on a 42 k-parameter name
classifier: ``wanda`` 0.379 against auto's 0.312, 0.253 against 0.309 in full) and run on the
held-out calibration samples. Each plan's figure is the deciding relative L2
(:func:`graphprune.calibration.fidelity.deciding_rel_l2`, the nearer of with and without the
reconstruction under ``reconstruction="auto"``). Plans that remove the same units are measured once.

The nearest plan replaces auto's only where the held-out samples say so with confidence: it must
be the nearer on :data:`CONFIDENCE` of bootstrap draws of them (:func:`nearer_share`). Ten or
so held-out samples decide little: on the name classifier at ``--ratio 0.3`` the ``l1`` plan was
nearer on 10 held-out names (0.146 against 0.169; 87 % of draws) and, written (with the
statistics correction auto then kept), flipped 11 of 140 other names where auto's flipped none;
on the int8 VAD above ``l1`` was nearer on 72 % of draws
(0.356 against 0.479) and would have gained 13 points. The ratio driver applies, verifies and
reconstructs the plan kept. ``report["calibration"]["criterion_choice"]`` gives each plan's
figures, the plan kept, the share of draws, and auto's own choice per group (``auto_per_group``),
or why nothing was compared.

Not compared (the per-group ``auto`` stands): a criterion the user named; fewer than
:data:`MIN_HOLDOUT` held-out samples; ``If`` branches (each is pruned on its own); a model and data
set whose reconstruction is estimated at over :data:`CRITERION_SECONDS` for all the plans
(:func:`graphprune.planning.search.candidate_seconds`: all-MiniLM-L6-v2 on 150 sentences, a
ResNet-50 on 128 images), and the plans left once measuring them would pass :data:`MEASURED_SECONDS`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from graphprune.analysis import Analysis
from graphprune.calibration.data import MIN_HOLDOUT
from graphprune.pipeline.branches import has_branches
from graphprune.pipeline.session import Session
from graphprune.planning.plan import Plan

#: data-aware criteria whose whole plans are compared with ``auto``'s (the data-free criterion of
#: the ratio options is compared too)
ALTERNATIVES = ("wanda",)
#: the plans are compared where reconstructing all of them is estimated at this many seconds or fewer
CRITERION_SECONDS = 30.0
#: another plan than auto's is kept where it is the nearer on at least this share of bootstrap draws
#: of the held-out samples (:func:`nearer_share`): ten samples decide little
CONFIDENCE = 0.9
BOOTSTRAP_DRAWS = 1000
#: no further plan is measured once the next one would take the measurement over this many seconds
#: (a QOperator digits CNN whose refit the estimate put under 10 s took 22-32 s for its plans)
MEASURED_SECONDS = 30.0


def _removal(plan: Plan) -> tuple:
    """What ``plan`` removes, comparable between plans of one analysis."""
    return tuple(sorted((g.group, tuple(sorted(g.remove))) for g in plan.groups if g.remove))


def skip_reason(session: Session, analysis: Analysis, calibrated: Any, plans: int) -> str | None:
    """Why the criteria's plans are not compared (``None``: they are)."""
    if calibrated.options.criterion != "auto":
        return f"criterion '{calibrated.options.criterion}' asked for"
    if calibrated.stats is None:
        return "no calibration statistics"
    if len(calibrated.calib.holdout) < MIN_HOLDOUT:
        return (f"{len(calibrated.calib.holdout)} held-out calibration samples; the comparison needs "
                f"{MIN_HOLDOUT} (more samples or a larger --holdout)")
    if has_branches(session.prepared):
        return "the model has If branches (each branch is pruned on its own)"
    from graphprune.planning import budget as budget_mod
    from graphprune.planning.search import candidate_seconds

    macs = budget_mod.CostModel(analysis, [], "macs", shape_of=session.cost_shape(analysis.graph)).full_total
    each = candidate_seconds(len(analysis.graph.nodes), macs, calibrated.calib.total)
    if each * plans > CRITERION_SECONDS:
        return (f"{plans} plans to reconstruct, estimated at {each:.0f} s each here "
                f"(over {CRITERION_SECONDS:.0f} s in all); --criterion names one")
    return None


def choose_criterion(session: Session, analysis: Analysis, options: Any, calibrated: Any, plan: Plan,
                     make_plan: Any) -> Plan:
    """The plan to apply: ``plan`` (``auto``'s) or another criterion's whose reconstructed model is
    nearer the original on the held-out samples (module docstring). ``make_plan(scorer, criterion)``
    plans the same ratio prune with another scorer (``None``: data-free ``criterion``). Sets
    ``calibrated.criterion_choice`` (the report's) and, where another plan is kept, the criterion
    the report names."""
    from graphprune.planning.data_aware import consumer_views, make_scorer

    plans: dict[str, tuple[Plan, Any]] = {"auto": (plan, calibrated._scorer)}
    same: dict[str, str] = {}
    why = skip_reason(session, analysis, calibrated, 1 + len(ALTERNATIVES) + 1)
    if why is not None:
        calibrated.criterion_choice = {"compared": False, "why": why}
        return plan
    views = consumer_views(analysis)
    for name in (*ALTERNATIVES, options.criterion):
        scorer = make_scorer(analysis, views, calibrated.stats, name) if name in ALTERNATIVES else None
        other = make_plan(scorer, name)
        twin = next((k for k, (p, _) in plans.items() if _removal(p) == _removal(other)), None)
        if twin is not None:
            same[name] = twin
        else:
            plans[name] = (other, scorer)
    if len(plans) == 1:
        calibrated.criterion_choice = {"compared": False, "why": "every criterion removes the same units",
                                       "same_as": same}
        return plan
    errors, squares = _measure(session, calibrated, {k: p for k, (p, _) in plans.items()})
    kept, decided = decide({k: v["error"] for k, v in errors.items()}, squares.get)
    calibrated.criterion_choice = {
        "compared": True, "kept": kept, "samples": len(calibrated.calib.holdout), **decided,
        "auto_per_group": dict(getattr(calibrated._scorer, "chosen", None) or {}),
        "held_out": {k: {f: ((round(x, 6) if math.isfinite(x) else None) if isinstance(x, float) else x)
                         for f, x in v.items()} for k, v in errors.items()},
        **({"same_as": same} if same else {}),
    }
    if kept == "auto":
        return plan
    chosen, calibrated._scorer = plans[kept]  # (the report's criteria_chosen: the kept scorer's)
    calibrated.kept_criterion = kept
    return chosen


def decide(errors: dict[str, float | None], squares_of: Any) -> tuple[str, dict[str, Any]]:
    """The plan kept of the measured ones (``errors``: name -> deciding relative L2, ``auto`` first)
    and what the report says of it: the nearest where it is nearer than auto's on :data:`CONFIDENCE`
    of the bootstrap draws (``squares_of(name)``: :func:`sample_squares` of its model), else auto's."""
    finite = {k: v for k, v in errors.items() if v is not None and math.isfinite(v)}
    nearest = min(finite, key=finite.__getitem__) if finite else "auto"  # (dict order: auto wins ties)
    if nearest == "auto":
        return "auto", {}
    share = nearer_share(squares_of(nearest), squares_of("auto"))
    if share is not None and share >= CONFIDENCE:
        return nearest, {"confidence": round(share, 4)}
    return "auto", {"nearest": nearest, "confidence": None if share is None else round(share, 4),
                    "why": f"the held-out samples resampled favour {nearest!r} in {share or 0:.0%} of draws "
                           f"(auto is left for under {CONFIDENCE:.0%})"}


def sample_squares(reference: list, outputs: list) -> tuple[np.ndarray, np.ndarray] | None:
    """Per held-out sample and float output: the squared error of ``outputs`` and the original's
    squared size (``None``: no float output of one shape on every sample)."""
    columns = [k for k, r in enumerate(reference[0]) if isinstance(r, np.ndarray) and r.dtype.kind == "f"
               and all(isinstance(o[k], np.ndarray) and np.shape(o[k]) == np.shape(x[k])
                       for o, x in zip(outputs, reference, strict=True))]
    if not columns:
        return None
    error = np.array([[np.square(o[k].astype(np.float64) - x[k]).sum() for k in columns]
                      for o, x in zip(outputs, reference, strict=True)])
    size = np.array([[np.square(x[k].astype(np.float64)).sum() for k in columns] for x in reference])
    return error, size


def nearer_share(other: tuple[np.ndarray, np.ndarray] | None, auto: tuple[np.ndarray, np.ndarray] | None,
                 draws: int = BOOTSTRAP_DRAWS) -> float | None:
    """The share of bootstrap draws of the held-out samples on which ``other`` is nearer the
    original than ``auto``: pooled relative L2 per output, geometric mean over the outputs
    (``None``: not comparable)."""
    if other is None or auto is None or other[0].shape != auto[0].shape:
        return None
    samples = other[0].shape[0]
    counts = np.random.default_rng(0).multinomial(samples, np.full(samples, 1.0 / samples), size=draws)
    size = np.maximum(counts @ auto[1], 1e-30)

    def figure(error: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(counts @ error, 1e-30) / size).mean(axis=1)

    return float(np.mean(figure(other[0]) < figure(auto[0])))


def _measure(session: Session, calibrated: Any, plans: dict[str, Plan]
             ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each plan rewritten on a sibling session, reconstructed (in full: ridges cross-validated per
    layer), and its deciding relative L2 to the original on the held-out samples, with and without
    the reconstruction (``error``: the figure compared); and per plan the :func:`sample_squares` of
    the model compared."""
    from graphprune.calibration import fidelity as fidelity_mod
    from graphprune.pipeline.candidates import Judged, apply_plan

    feeds = calibrated.calib.holdout
    judged = Judged(*fidelity_mod.compared_names(session.prepared), calibrated.data_dir)
    with session.stage("criteria"):
        reference = judged.run(session.prepared, feeds, "the original model")
    auto = calibrated.auto_reconstruction
    out: dict[str, dict[str, Any]] = {}
    squares: dict[str, Any] = {}
    started = time.perf_counter()
    for name, plan in plans.items():
        spent = time.perf_counter() - started
        if out and spent * (len(out) + 1) / len(out) > MEASURED_SECONDS:  # (the estimate was short)
            out[name] = {"units_removed": plan.units_removed, "error": None,
                         "not_measured": f"the plans before it took {spent:.0f} s"}
            continue
        with session.stage("criteria"):
            candidate, fresh, replayed = apply_plan(session, plan)
        unreconstructed = candidate.model
        calibrated.session, calibrated.pass_stats = candidate, {}
        row: dict[str, Any] = {"units_removed": plan.units_removed}
        try:
            calibrated.reconstruct(fresh, replayed, keep_recorded=True, stage="criteria")
        except Exception as exc:  # noqa: BLE001 - this plan is not chosen
            row.update(error=math.inf, failed=f"{type(exc).__name__}: {exc}"[:200])
            out[name] = row
            continue
        finally:
            calibrated.session, calibrated.pass_stats = session, {}
        with session.stage("criteria"):
            outputs = judged.run(candidate.model, feeds, "a criterion's plan")
            _, error = judged.score(reference, outputs)
            row["reconstructed"] = error
            if candidate.model is not unreconstructed and auto:  # (as fidelity() would undo it)
                plain_outputs = judged.run(unreconstructed, feeds, "a criterion's plan")
                _, plain = judged.score(reference, plain_outputs)
                row["none"] = plain
                if plain < error:
                    error, outputs = plain, plain_outputs
            squares[name] = sample_squares(reference, outputs)
        row["error"] = error
        out[name] = row
    return out, squares


# ---------------------------------------------------------------------- budgets
def budget_criteria(session: Session, analysis: Analysis, calibrated: Any, criterion: str, seed: int = 0
                    ) -> dict[str, Any]:
    """For a calibrated budget (and a measured allocation) under ``auto``: the other criteria whose
    units the chosen allocation is measured with (:func:`graphprune.pipeline.choose.choose`, at the
    same widths), ``name -> group scores``; empty where they are not weighed (the report says why)."""
    from graphprune.planning.data_aware import consumer_views, make_scorer
    from graphprune.planning.importance import score_group

    why = skip_reason(session, analysis, calibrated, 1 + len(ALTERNATIVES) + 1)
    if why is not None:
        calibrated.criterion_choice = {"compared": False, "why": why}
        return {}
    views, tensors, rng = consumer_views(analysis), analysis.context.tensors, np.random.default_rng(seed)
    out: dict[str, Any] = {name: make_scorer(analysis, views, calibrated.stats, name) for name in ALTERNATIVES}
    out[criterion] = lambda group: score_group(group, tensors, criterion, rng)
    return out


def other_orders(states: list, scores_of: Any, min_channels: int) -> list | None:
    """Each state's removal orders (its group's and its tied groups') by ``scores_of``, as long as
    the state's own (``None`` where one is shorter: a floor leaves fewer units, or where every
    order is the state's own)."""
    from graphprune.planning.budget import removal_order

    out, same = [], True
    for st in states:
        orders = []
        for group, order in st.members:
            other = removal_order(group, np.asarray(scores_of(group), dtype=np.float64), len(order), min_channels)
            if len(other) < len(order):
                return None
            orders.append(other)
            same = same and set(other[: st.removed].tolist()) == set(order[: st.removed].tolist())
        out.append(orders)
    return None if same else out


def swap_orders(states: list, orders: list) -> list:
    """Put ``orders`` (:func:`other_orders`) into ``states``; returns the orders they had."""
    held = []
    for st, (first, *rest) in zip(states, orders, strict=True):
        held.append([st.order, *(o for _, o in st.extra)])
        st.order = first
        st.extra = [(g, o) for (g, _), o in zip(st.extra, rest, strict=True)]
    return held


def keep_other(calibrated: Any, name: str, scorer: Any, record: dict[str, Any]) -> None:
    """``calibrated`` reports ``name``'s units as the ones kept (``scorer``: its data-aware scorer, else
    ``None``) and ``record`` as ``criterion_choice``."""
    record["auto_per_group"] = dict(getattr(calibrated._scorer, "chosen", None) or {})
    calibrated.criterion_choice = record
    if name != "auto":
        calibrated._scorer = scorer if name in ALTERNATIVES else None
        calibrated.kept_criterion = name
