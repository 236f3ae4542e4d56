"""Group-sparse training (OTO style) driven by graphprune's own channel groups.

graphprune's analysis of a module's export finds the channel groups and, inside each group,
the *units* that can only go together (a channel of a residual stream with every conv and
norm that writes it; a head; a conv group). :class:`GroupSparsity` maps each unit back to
the module's parameter slices (through :func:`graphprune.frontends.torch.parameter_sources`)
and drives whole units to exactly zero with a proximal group-lasso step, so that a lossless
prune (``graphprune prune --lossless``, or :meth:`GroupSparsity.plan`) then removes them
without changing the outputs.

Maths. Unit ``u`` owns the parameter slices ``w_u`` that *create* its channels (producer
weights and biases, norm scales and shifts: zeroing them makes the channel identically zero,
through BatchNorm too since ``gamma = beta = 0``). The regulariser is

    R(w) = sum_u  lambda_u ||w_u||_2,      lambda_u = strength * sqrt(|w_u|),

and after each optimiser step with learning rate ``lr`` the proximal step is

    w_u <- w_u * max(0, 1 - lr * lambda_u / ||w_u||_2),

which sets a unit *exactly* to zero once its norm falls below ``lr * lambda_u``. With a
``target`` fraction only the ``target`` share of units with the smallest normalised norm
``||w_u|| / sqrt(|w_u|)`` is shrunk at each step (the others train freely), so training
settles on a chosen sparsity instead of a strength-dependent one; the share is taken over
all units (``per_group=False``, layers compete) or within each channel group. After
:meth:`GroupSparsity.freeze`, steps only hold the units that are zero at that moment at zero
(a projection) and the rest of training recovers accuracy with the sparsity fixed.

>>> reg = GroupSparsity.from_module(model, (x,), strength=1e-3, target=0.5)   # doctest: +SKIP
>>> loss.backward(); opt.step(); reg.step(lr)                                  # doctest: +SKIP
>>> reg.summary()["zero_fraction"]                                             # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from graphprune.frontends.torch.apply import apply_plan
from graphprune.frontends.torch.export import ExampleInputs, to_onnx
from graphprune.frontends.torch.mapping import map_plan
from graphprune.frontends.torch.provenance import parameter_sources
from torch import nn

from graphprune.analysis import Analysis, ChannelGroup
from graphprune.analysis.roles import CHANNELWISE, PRODUCER
from graphprune.errors import UsageError
from graphprune.planning.plan import Plan
from graphprune.planning.planner import group_plan

__all__ = ["GroupSparsity", "UnitSlices"]


@dataclass(frozen=True)
class UnitSlices:
    """The parameter slices of one unit: ``(name, axis, indices)`` for each."""

    group: int
    unit: int
    slices: tuple[tuple[str, int, tuple[int, ...]], ...]


class _Entry:
    """One (parameter, axis) with the global unit id of each index along that axis."""

    def __init__(self, name: str, param: nn.Parameter, axis: int) -> None:
        self.name = name
        self.param = param
        self.axis = axis
        self.unit_of = torch.full((param.shape[axis],), -1, dtype=torch.long)

    def reduce_dims(self) -> list[int]:
        return [d for d in range(self.param.dim()) if d != self.axis]

    def view_shape(self) -> list[int]:
        shape = [1] * self.param.dim()
        shape[self.axis] = -1
        return shape


class GroupSparsity:
    """Group-lasso regulariser and proximal step over graphprune's units of ``module``.

    ``analysis`` is :func:`graphprune.analyze` of ``model``, an export of ``module`` by
    :func:`graphprune.frontends.torch.to_onnx`. Only prunable groups are used, and only
    exact ones unless ``exact_only=False`` (an inexact group, e.g. a hidden size under a
    LayerNorm, does not become identically zero when its producers do). ``roles`` selects
    which member parameters a unit owns (default: producers and channel-wise parameters).
    """

    def __init__(
        self,
        module: nn.Module,
        analysis: Analysis,
        model: onnx.ModelProto,
        *,
        strength: float = 1e-3,
        target: float | None = None,
        exact_only: bool = True,
        per_group: bool = False,
        roles: Iterable[str] = (PRODUCER, CHANNELWISE),
    ) -> None:
        if strength < 0:
            raise UsageError(f"strength must be >= 0, got {strength}")
        if target is not None and not 0.0 < target < 1.0:
            raise UsageError(f"target must be in (0, 1), got {target}")
        self.module = module
        self.analysis = analysis
        self.model = model
        self.strength = float(strength)
        self.target = target
        self.per_group = per_group
        self.roles = frozenset(roles)
        self._frozen: torch.Tensor | None = None
        self.units: list[UnitSlices] = []
        self._groups: dict[int, ChannelGroup] = {}
        params = dict(module.named_parameters())
        names = list(module.state_dict())
        sources = parameter_sources(model, names)
        entries: dict[tuple[str, int], _Entry] = {}
        for group in analysis.groups:
            if not group.prunable or (exact_only and not group.is_exact):
                continue
            per_unit: dict[int, list[tuple[str, int, tuple[int, ...]]]] = defaultdict(list)
            for dim in group.params:
                if group.roles.get(dim) not in self.roles or dim not in group.unit_of:
                    continue
                tensor, axis = dim
                labels = np.asarray(group.unit_of[dim])
                for unit in np.unique(labels[labels >= 0]):  # -1: pinned elements, never cut
                    idx = np.flatnonzero(labels == unit)
                    if tensor in params:
                        mapped = [(tensor, axis, [int(i) for i in idx])]
                    else:
                        mapped = sources.map_cut(tensor, axis, idx)
                    for name, paxis, pidx in mapped:
                        if name in params:  # buffers (BN running statistics) stay as they are
                            per_unit[int(unit)].append((name, paxis, tuple(pidx)))
            if not per_unit:
                continue
            self._groups[group.id] = group
            for unit in sorted(per_unit):
                slices = tuple(sorted(set(per_unit[unit])))
                uid = len(self.units)
                self.units.append(UnitSlices(group.id, unit, slices))
                for name, paxis, positions in slices:
                    entry = entries.get((name, paxis))
                    if entry is None:
                        entry = entries[(name, paxis)] = _Entry(name, params[name], paxis)
                    entry.unit_of[list(positions)] = uid
        if not self.units:
            raise UsageError("no prunable exact channel group maps to a module parameter")
        self._entries = list(entries.values())
        numel = torch.zeros(len(self.units))
        for e in self._entries:
            per_index = math.prod(s for d, s in enumerate(e.param.shape) if d != e.axis)
            mask = e.unit_of >= 0
            numel.index_add_(0, e.unit_of[mask], torch.full((int(mask.sum()),), float(per_index)))
        self.unit_numel = numel
        group_ids = torch.tensor([u.group for u in self.units])
        self._pools = (
            [torch.nonzero(group_ids == g).flatten() for g in torch.unique(group_ids)]
            if per_group else [torch.arange(len(self.units))]
        )

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        example_inputs: ExampleInputs,
        *,
        exporter: str = "dynamo",
        keep: Iterable[str] = (),
        **options: Any,
    ) -> GroupSparsity:
        """Export ``module``, analyse the export and build the regulariser."""
        from graphprune.api import analyze

        model = to_onnx(module, example_inputs, exporter=exporter)
        return cls(module, analyze(model, keep=keep), model, **options)

    # ------------------------------------------------------------------ norms and steps
    def _squared_norms(self) -> torch.Tensor:
        sq = torch.zeros(len(self.units), dtype=torch.float64)
        for e in self._entries:
            w = e.param.detach()
            per_index = w.double().pow(2).sum(dim=e.reduce_dims()) if w.dim() > 1 else w.double().pow(2)
            mask = e.unit_of >= 0
            sq.index_add_(0, e.unit_of[mask], per_index.cpu()[mask])
        return sq

    def norms(self) -> np.ndarray:
        """The L2 norm of each unit's parameters."""
        return self._squared_norms().sqrt().numpy()

    def _selected(self, norms: torch.Tensor) -> torch.Tensor:
        if self.target is None:
            return torch.ones(len(self.units), dtype=torch.bool)
        score = norms / self.unit_numel.double().sqrt()
        chosen = torch.zeros(len(self.units), dtype=torch.bool)
        for members in self._pools:
            k = math.ceil(self.target * len(members))
            order = members[torch.argsort(score[members], stable=True)]
            chosen[order[:k]] = True
        return chosen

    def penalty(self) -> torch.Tensor:
        """``sum_u lambda_u ||w_u||`` as a differentiable scalar (the regulariser form)."""
        with torch.no_grad():
            chosen = self._selected(self._squared_norms().sqrt())
        sq = None
        for e in self._entries:
            per_index = e.param.pow(2).sum(dim=e.reduce_dims()) if e.param.dim() > 1 else e.param.pow(2)
            mask = e.unit_of >= 0
            part = torch.zeros(len(self.units), dtype=per_index.dtype, device=per_index.device)
            part = part.index_add(0, e.unit_of[mask].to(per_index.device), per_index[mask.to(per_index.device)])
            sq = part if sq is None else sq + part
        assert sq is not None
        weights = self.strength * self.unit_numel.to(sq.device, sq.dtype).sqrt() * chosen.to(sq.device)
        return (weights * (sq + 1e-12).sqrt()).sum()

    def freeze(self) -> int:
        """From now on only keep today's zero units at zero; returns how many there are."""
        self._frozen = self._squared_norms() == 0
        return int(self._frozen.sum())

    @torch.no_grad()
    def step(self, lr: float) -> int:
        """Proximal group-lasso step after an optimiser step; returns the units now at zero.

        After :meth:`freeze` this is a projection: the frozen units are set back to zero and
        nothing else changes.
        """
        norms = self._squared_norms().sqrt()
        if self._frozen is not None:
            factor = torch.where(self._frozen, torch.zeros_like(norms), torch.ones_like(norms))
        else:
            chosen = self._selected(norms)
            threshold = lr * self.strength * self.unit_numel.double().sqrt()
            shrink = torch.clamp(1.0 - threshold / norms.clamp_min(1e-30), min=0.0)
            factor = torch.where(chosen, shrink, torch.ones_like(norms))
        for e in self._entries:
            mask = e.unit_of >= 0
            scale = torch.ones(e.param.shape[e.axis], dtype=torch.float64)
            scale[mask] = factor[e.unit_of[mask]]
            scale = scale.to(e.param.device, e.param.dtype).view(e.view_shape())
            e.param.mul_(scale)
        return int(((factor == 0) | (norms == 0)).sum())

    # ------------------------------------------------------------------ results
    def zero_units(self) -> list[UnitSlices]:
        """Units whose parameters are all exactly zero."""
        norms = self._squared_norms()
        return [u for u, n in zip(self.units, norms.tolist(), strict=True) if n == 0.0]

    def summary(self) -> dict[str, Any]:
        zero = self.zero_units()
        by_group: dict[int, int] = defaultdict(int)
        for u in zero:
            by_group[u.group] += 1
        first: dict[int, tuple[str, int, tuple[int, ...]]] = {}
        for u in self.units:
            first.setdefault(u.group, u.slices[0])
        return {
            "units": len(self.units),
            "zero_units": len(zero),
            "zero_fraction": round(len(zero) / len(self.units), 4),
            "groups": len(self._groups),
            # keyed by a module parameter of the group (the ONNX anchor may be a folded copy)
            "zero_by_group": {
                f"{first[gid][0]}:{first[gid][1]}": f"{by_group.get(gid, 0)}/{g.num_units}"
                for gid, g in self._groups.items()
            },
        }

    def plan(self) -> Plan:
        """A plan on the export's analysis that removes exactly the zero units.

        Replay it on a fresh export of the trained module (``graphprune.prune(export,
        plan=reg.plan())``): the export has the same names and groups.
        """
        tensors = self.analysis.context.tensors
        zero: dict[int, list[int]] = defaultdict(list)
        for u in self.zero_units():
            zero[u.group].append(u.unit)
        out = Plan(meta={"mode": "group-sparsity zero units"})
        for gid, units in sorted(zero.items()):
            group = self._groups[gid]
            if len(units) >= group.num_units:
                units = units[1:]  # never empty a group: keep one (zero) unit
            if units:
                out.groups.append(group_plan(group, sorted(units), tensors))
        return out

    def prune_module(self) -> Plan:
        """Remove the zero units from the module in place; returns the module-keyed plan.

        The module's parameters are replaced: this regulariser no longer applies to it.
        """
        mapped = map_plan(self.plan(), self.model, self.module)
        apply_plan(self.module, mapped)
        self._entries = []
        return mapped
