"""Candidate plans on sibling sessions: their structural rewrite, and what they are judged on.

A calibrated budget (:mod:`graphprune.pipeline.choose`) and the criteria's whole plans
(:mod:`graphprune.pipeline.criterion_choice`) rewrite each candidate on a sibling session of
the one they prune and compare it with the original on the held-out samples; the ratio driver
applies the same rewrite to the session itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from graphprune.analysis import Analysis
from graphprune.passes.cleanup import DeadCodeEliminationPass, IdentityEliminationPass
from graphprune.passes.prune_channels import PruneChannelsPass
from graphprune.pipeline.session import Session
from graphprune.planning.plan import Plan
from graphprune.planning.planner import replay


def channel_passes(analysis: Analysis, plan: Plan) -> list:
    """The structural rewrite of a plan: channel removal, then cleanup."""
    return [PruneChannelsPass(analysis, plan), IdentityEliminationPass(), DeadCodeEliminationPass()]


def apply_plan(session: Session, plan: Plan) -> Any:
    """The structural rewrite of ``plan`` on a fresh working graph of a sibling session."""
    candidate = session.sibling()
    fresh = candidate.analyze(stage="prune")
    replayed = replay(fresh, plan)
    with candidate.stage("prune"):
        candidate.apply(channel_passes(fresh, replayed))
        candidate.export()
    return candidate, fresh, replayed


def _score(names: list[str], reference: list, outputs: list, decided: dict | None = None
           ) -> tuple[dict[str, Any], float]:
    """The fidelity figures of ``outputs`` and their relative L2 pooled over the samples,
    channel by channel where channels differ in size (``inf`` when none:
    :func:`~graphprune.calibration.fidelity.deciding_rel_l2`): the figure that keeps or undoes a reconstruction
    (:meth:`~graphprune.pipeline.calibrated.CalibratedRun.fidelity`), which samples whose
    original output is near zero cannot dominate as they do a per-sample mean."""
    from graphprune.calibration import fidelity as fidelity_mod

    score = fidelity_mod.compare_outputs(names, reference, outputs, decided=decided)
    error = fidelity_mod.deciding_rel_l2(score)
    return score, error if error is not None else math.inf


@dataclass
class Judged:
    """What the candidates are compared on: the original's outputs and the scores its ids are
    chosen from (:func:`~graphprune.calibration.fidelity.compared_names`)."""

    names: list[str]
    decided: dict[str, Any]
    data_dir: Any

    def run(self, model: Any, feeds: list, what: str) -> list:
        from graphprune.calibration import runner

        return runner.outputs(model, feeds, what, data_dir=self.data_dir, also=list(self.decided))

    def score(self, reference: list, outputs: list) -> tuple[dict[str, Any], float]:
        return _score(self.names, reference, outputs, self.decided)
