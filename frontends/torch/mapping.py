"""Re-key a plan made on an export by the module's ``state_dict`` names.

A cut ``(tensor, axis, indices)`` of the plan names a module parameter (mapped as it is), a
literal of the exporter (listed in ``meta["unmapped"]``) or a constant the preparation
folded from a parameter chain (mapped through the chain's analysis, see
:mod:`graphprune.frontends.torch.provenance`). The work is proportional to the plan: each
cut is looked up once, each touched chain group is expanded once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import onnx
from graphprune.frontends.torch.errors import PlanMappingError
from graphprune.frontends.torch.provenance import ParameterSources, parameter_sources
from torch import nn

from graphprune.io.shared_constants import TIE, tied_origin
from graphprune.planning.plan import GroupPlan, Plan

__all__ = ["map_plan", "map_plan_with", "plan_cuts"]


def plan_cuts(plan: Plan) -> dict[str, dict[int, set[int]]]:
    """Union of every group's removed indices, per tensor and axis."""
    cuts: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for gp in plan.groups:
        if not gp.remove:
            continue
        for tensor, axes in gp.channels.items():
            for axis, idx in axes.items():
                cuts[tensor][int(axis)].update(int(i) for i in idx)
    return cuts


def map_plan(plan: Plan, model: onnx.ModelProto, module: nn.Module | Iterable[str]) -> Plan:
    """Re-key ``plan`` (made on ``model``, an export of ``module``) by ``state_dict`` names.

    Each group keeps its id, anchor and units; its ``channels`` name module parameters and
    buffers with their own axes. Constants no parameter owns (exporter literals) are listed
    in ``meta["unmapped"]``. Raises :class:`PlanMappingError` when a cut is not a whole
    slice of a parameter or when two uses of one parameter would be cut differently.
    """
    names = list(module.state_dict()) if isinstance(module, nn.Module) else list(module)
    return map_plan_with(plan, parameter_sources(model, names))


def map_plan_with(plan: Plan, sources: ParameterSources, *, constants: Iterable[str] | None = None) -> Plan:
    """:func:`map_plan` with the export's :func:`parameter_sources` already at hand.
    ``constants``: the constants of the prepared graph the plan was made on (a shared
    constant's per-reader copies by their own names), where known: a tensor the preparation
    left computed from a parameter is then not expected in the plan (see
    :meth:`ParameterSources.check`)."""
    out = Plan(erase=list(plan.erase), meta={**plan.meta, "keys": "torch state_dict"})
    unmapped: set[str] = set()
    param_cuts: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    reader_cuts: dict[str, dict[str, dict[int, frozenset[int]]]] = defaultdict(lambda: defaultdict(dict))
    for gp in plan.groups:
        channels: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        if gp.remove:
            for tensor, axes in gp.channels.items():
                for axis, idx in axes.items():
                    origin = tied_origin(tensor)  # a reader's own copy of a shared constant
                    if origin in sources.readers:
                        reader_cuts[origin][tensor][int(axis)] = frozenset(int(i) for i in idx)
                    mapped = sources.map_cut(origin, int(axis), idx)
                    if not mapped and not sources.owners(origin):
                        unmapped.add(tensor)
                    for name, paxis, pidx in mapped:
                        channels[name][str(paxis)].update(pidx)
                        param_cuts[name][paxis].update(pidx)
        out.groups.append(
            GroupPlan(
                group=gp.group, anchor=gp.anchor, size=gp.size, remove=list(gp.remove),
                channels={
                    name: {axis: sorted(idx) for axis, idx in sorted(axes.items())}
                    for name, axes in sorted(channels.items())
                },
            )
        )
    _check_shared(reader_cuts, sources)
    stored = None if constants is None else {tied_origin(name) for name in constants}
    sources.check(plan_cuts(plan), param_cuts, stored)
    if unmapped:
        out.meta["unmapped"] = sorted(unmapped)
    return out


def _check_shared(reader_cuts: dict[str, dict[str, dict[int, frozenset[int]]]],
                  sources: ParameterSources) -> None:
    """A parameter that several nodes read (each with its own copy in the prepared export)
    is one tensor of the module: every reader must lose the same slices."""
    for name, uses in reader_cuts.items():
        if not any(TIE in tensor for tensor in uses):
            continue
        if len(uses) < sources.readers.get(name, 1) or len({frozenset(c.items()) for c in uses.values()}) > 1:
            raise PlanMappingError(
                f"parameter '{name}' is read by {sources.readers.get(name, 1)} nodes of the export "
                "and the plan cuts them differently; protect one use with keep=[...]"
            )
