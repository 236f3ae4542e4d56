"""The measured rounds of a latency budget: timing candidates against the original, and
choosing among them (:func:`graphprune.pipeline.budget.prune_budget` with a latency target).

Each round's candidate is timed with the original, interleaved, on the execution provider
in use; when there were several rounds they are timed again all together (the machine's
speed drifts between rounds more than candidates differ), and :func:`latency_choice`
keeps one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from graphprune.errors import InvalidModelError
from graphprune.pipeline import blame
from graphprune.pipeline.session import Session

#: measured latency ratios this close are equally fast (when none meets the target)
LATENCY_SLACK = 0.03
#: a round whose modelled latency is at most this share of the round before cut the model for real
FLOOR_CUT = 0.75


def unstable_timing(rounds: list[dict[str, Any]]) -> str | None:
    """Why the latency measurements cannot be trusted, where a candidate timed twice (in its
    round and side by side) differs more than 2x: its run time follows its values, not its widths
    (FaceBoxes' NMS loop over the boxes it outputs); ``None`` where they agree."""
    for entry in rounds:
        pair = (entry["measured_ratio"], entry.get("side_by_side_ratio", entry["measured_ratio"]))
        if max(pair) > 2 * min(pair):
            return (f"one candidate timed {pair[0]:.3g} and {pair[1]:.3g} of the original: the run time "
                    "depends on the values (a loop or NMS over the outputs); the measured fraction may "
                    "not hold on real inputs")
    return None


@contextlib.contextmanager
def blaming_input(session: Session) -> Iterator[None]:
    """Timing is the first run of the original in a latency budget: where it cannot load a
    model, the input's own fault (an op no runtime has) is the error, not a temporary path."""
    try:
        yield
    except InvalidModelError:
        fault = blame.input_fault(session)
        if fault is None:
            raise
        raise fault from None


def measured_ratio(session: Session, candidate: Session, provider: str, runs: int, threads: int | None) -> float:
    """Latency ratio of ``candidate`` to the original, timed interleaved on ``provider``."""
    from graphprune.verify.timing import time_models

    with session.stage("latency check"), blaming_input(session):
        original, pruned = time_models(
            [session.path_of(session.prepared), candidate.path_of(candidate.model)],
            provider=provider, warmup=3, runs=runs, threads=threads,
            input_shapes=session.cost_shapes(), values=session.tested_values() or None,
            data=session.data_feeds[0] if session.data_feeds else None)
    return pruned.median_ms / original.median_ms if original.median_ms > 0 else 1.0


def side_by_side_ratios(session: Session, candidates: list[Session], provider: str, runs: int,
                        threads: int | None) -> list[float]:
    """Latency ratios of ``candidates`` to the original, all timed in one interleaved run."""
    from graphprune.verify.timing import time_models

    with session.stage("latency check"), blaming_input(session):
        paths = [session.path_of(session.prepared), *(c.path_of(c.model) for c in candidates)]
        original, *timed = time_models(paths, provider=provider, warmup=3, runs=runs, threads=threads,
                                       input_shapes=session.cost_shapes(), values=session.tested_values() or None,
                                       data=session.data_feeds[0] if session.data_feeds else None)
    return [t.median_ms / original.median_ms if original.median_ms > 0 else 1.0 for t in timed]


def latency_choice(ratios: list[float], removed: list[int], target: float) -> int:
    """The candidate to keep: the least pruned one that meets the target (the nearest under
    it); where none does, the one that removes least among those within ``LATENCY_SLACK`` of
    the fastest (a GPU run at batch 1 is bound by kernel launches: its latency stops following
    the widths, and the last rounds only cut more of the model for the timing's noise)."""
    meeting = [k for k, r in enumerate(ratios) if r <= target]
    if meeting:
        return max(meeting, key=lambda k: ratios[k])
    near = [k for k, r in enumerate(ratios) if r <= min(ratios) + LATENCY_SLACK]
    return min(near, key=lambda k: (removed[k], ratios[k]))


def latency_floor(before: float, ratio: float, target: float, modelled_before: float, modelled: float,
                  same_plan: bool) -> bool:
    """Whether the measured latency stopped following the widths: a round still over the
    target, less than ``LATENCY_SLACK`` faster than the round before although it cut the
    modelled latency by a quarter or more (or could cut nothing more: the same plan). On the
    CPU the rounds' modelled cuts are smaller than that (the 22 latency entries of
    ``bench/results/budget_zoo.json``: none would stop); on an H200 at batch 1 ResNet-18's
    rounds went from 0.10 to 0.055 of the modelled latency for 0.776 -> 0.758 measured."""
    if ratio <= target or before - ratio >= LATENCY_SLACK:
        return False
    return same_plan or modelled <= FLOOR_CUT * modelled_before


def node_times(analysis: Any, options: Any, shape_of: Any) -> tuple[dict[int, float], Any]:
    """Each node's latency at its allocated shape from the latency table (measured where not cached),
    and the table."""
    from graphprune.planning.latency import LatencyTable, OpSpec

    table = LatencyTable(provider=options.provider, threads=options.threads)
    nodes, specs = [], []
    for node in analysis.graph.nodes:
        spec = OpSpec.from_node(node, shape_of, analysis.opset)
        if spec is not None:
            nodes.append(node)
            specs.append(spec)
    times = table.latency(specs) if specs else []
    return {id(n): float(t) for n, t in zip(nodes, times, strict=True)}, table


def choose_fast_widths(model: Any, table: Any, opset: int) -> int:
    """Move each group's kept width to the fastest measured width within 1/16 of it: ORT's
    kernels run some widths much faster than their neighbours. Every candidate of every
    group is measured in one batch (the other groups at their allocated widths), then the
    moves are made together."""
    from graphprune.planning.latency import OpSpec

    plans: list[tuple[int, int, list[int], dict[int, list[Any]]]] = []
    wanted: list[Any] = []
    for si, st in enumerate(model.states):
        if not st.removed:
            continue
        window = max(1, st.group.num_units // 16)
        here = st.index
        candidates = [i for i, s in enumerate(st.steps) if abs(s - st.removed) <= window and s > 0]
        if len(candidates) < 2:
            continue
        nodes = [model.items[i][0] for i in model.items_of[si]]
        specs: dict[int, list[Any]] = {}
        for index in candidates:
            st.index = index
            specs[index] = [sp for sp in (OpSpec.from_node(nd, model.shape, opset) for nd in nodes)
                            if sp is not None]
            wanted.extend(specs[index])
        st.index = here
        plans.append((si, here, candidates, specs))
    if not plans:
        return 0
    times = dict(zip(wanted, table.latency(wanted), strict=True))
    changed = 0
    for si, here, candidates, specs in plans:
        st = model.states[si]
        costs = {i: float(sum(times[sp] for sp in specs[i])) for i in candidates}
        fastest = min(costs.values())
        # the fastest candidate; among those within 5 % of it (the noise of a loaded machine), the widest
        best = min(candidates, key=lambda i: (costs[i] > fastest * 1.05, st.steps[i]))
        if best != here and (costs[best] < costs[here] * 0.95
                             or (costs[best] <= costs[here] * 1.05 and st.steps[best] < st.removed)):
            model.set_index(si, best)
            changed += 1
    return changed
