"""Slice a module in place by a plan keyed by ``state_dict`` names.

Parameters and buffers are sliced once each (tied ones stay tied) into new ``nn.Parameter``
objects; module attributes are updated by the module's handler
(:mod:`graphprune.frontends.torch.handlers`). Everything is checked before anything changes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from graphprune.frontends.torch.errors import PlanMappingError
from graphprune.frontends.torch.handlers import handler_for
from graphprune.frontends.torch.module_handler import ModuleHandler
from torch import nn

from graphprune.planning.plan import Plan

__all__ = ["ParamCuts", "apply_plan", "module_cuts"]

ParamCuts = dict[str, dict[int, np.ndarray]]


def module_cuts(plan: Plan | Mapping[str, Mapping[Any, Sequence[int]]]) -> ParamCuts:
    """``{name: {axis: sorted removed indices}}`` of a module-keyed plan or mapping."""
    if isinstance(plan, Plan):
        merged: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
        for gp in plan.groups:
            if not gp.remove:
                continue
            for name, axes in gp.channels.items():
                for axis, idx in axes.items():
                    merged[name][int(axis)].update(int(i) for i in idx)
        raw: Mapping[str, Mapping[Any, Any]] = merged
    else:
        raw = plan
    return {
        name: {int(a): np.asarray(sorted({int(i) for i in idx}), dtype=np.int64) for a, idx in axes.items() if len(idx)}
        for name, axes in raw.items()
    }


def apply_plan(module: nn.Module, plan: Plan | Mapping[str, Mapping[Any, Sequence[int]]]) -> nn.Module:
    """Slice ``module`` in place by a plan keyed by ``state_dict`` names; returns ``module``.

    ``plan`` is the ``plan`` of :func:`~graphprune.frontends.torch.prune_module` (or
    :func:`~graphprune.frontends.torch.map_plan`), or a mapping
    ``{name: {axis: removed indices}}``. Everything is checked before anything changes.
    Parameters become new ``nn.Parameter`` objects: create the optimiser afterwards.
    """
    cuts = module_cuts(plan)
    state = module.state_dict(keep_vars=True)
    missing = sorted(set(cuts) - set(state))
    if missing:
        hint = " (was this plan made on the ONNX export? map it with map_plan)"
        raise PlanMappingError(f"the plan names {missing[:5]}, not in the module's state_dict{hint}")
    # owner module and local name of every state entry; tied parameters have several
    owners: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for local, t in [*sub._parameters.items(), *sub._buffers.items()]:
            if t is not None:
                full = f"{prefix}.{local}" if prefix else local
                owners[id(t)].append((full, sub, local))
    per_tensor: dict[int, dict[int, np.ndarray]] = {}
    by_id: dict[int, torch.Tensor] = {}
    for name, by_axis in cuts.items():
        key = id(state[name])
        by_id[key] = state[name]
        previous = per_tensor.get(key)
        if previous is not None and (
            previous.keys() != by_axis.keys()
            or any(not np.array_equal(previous[a], by_axis[a]) for a in by_axis)
        ):
            raise PlanMappingError(f"tied parameter '{name}' is cut two different ways")
        per_tensor[key] = by_axis
    # check every touched module before changing anything
    touched: dict[int, tuple[str, nn.Module, dict[str, dict[int, np.ndarray]]]] = {}
    for key, by_axis in per_tensor.items():
        tensor = by_id[key]
        for axis, idx in by_axis.items():
            if not 0 <= axis < tensor.dim() or idx.min() < 0 or idx.max() >= tensor.shape[axis]:
                raise PlanMappingError(f"the plan cuts outside '{owners[key][0][0]}' {tuple(tensor.shape)}")
            if idx.size >= tensor.shape[axis]:
                raise PlanMappingError(f"the plan removes every slice of '{owners[key][0][0]}' axis {axis}")
        for full, sub, local in owners[key]:
            prefix = full[: -len(local) - 1] if full != local else ""
            touched.setdefault(id(sub), (prefix, sub, {}))[2][local] = by_axis
    chosen: dict[int, ModuleHandler] = {}  # asked once: a duck handler may not match the sliced module
    for prefix, sub, sub_cuts in touched.values():
        handler = handler_for(sub)
        if handler is None:
            raise PlanMappingError(
                f"no handler for {type(sub).__name__} '{prefix}' (cut: {sorted(sub_cuts)}); "
                "register one with register_module_handler or protect it with keep=[...]"
            )
        handler.check(sub, _as_handled(sub, sub_cuts), prefix or type(sub).__name__)
        chosen[id(sub)] = handler
    containers = []
    for prefix, sub in module.named_modules():
        handler = handler_for(sub)
        if handler is None or not handler.container:
            continue
        start = f"{prefix}." if prefix else ""
        below = {n[len(start):]: c for n, c in cuts.items() if n.startswith(start)}
        if below:
            handler.check_below(sub, below, prefix or type(sub).__name__)
            containers.append((handler, sub, below))
    # slice
    new: dict[int, torch.Tensor] = {}
    for key, by_axis in per_tensor.items():
        tensor = by_id[key]
        data = tensor.detach()
        for axis, idx in by_axis.items():
            keep_idx = np.setdiff1d(np.arange(data.shape[axis]), idx)
            data = data.index_select(axis, torch.as_tensor(keep_idx, device=data.device))
        data = data.clone().contiguous()
        if isinstance(tensor, nn.Parameter):
            new[key] = nn.Parameter(data, requires_grad=tensor.requires_grad)
        else:
            new[key] = data
    for _prefix, sub, sub_cuts in touched.values():
        old = {}
        for local in sub_cuts:
            t = sub._parameters.get(local)
            if t is None:
                t = sub._buffers.get(local)
            old[local] = tuple(t.shape)
            if local in sub._parameters:
                sub._parameters[local] = new[id(t)]  # type: ignore[assignment]  # a Parameter
            else:
                sub._buffers[local] = new[id(t)]
        for name in set(_pruning_masks(sub).values()) & set(_as_handled(sub, sub_cuts)):
            # the pruning hook computes the weight before each forward: now, for the handler
            setattr(sub, name, getattr(sub, f"{name}_orig") * getattr(sub, f"{name}_mask"))
        chosen[id(sub)].update(sub, _as_handled(sub, sub_cuts), _as_handled(sub, old))
    for handler, sub, below in containers:
        handler.update(sub, below, {})
    return module


def _pruning_masks(module: nn.Module) -> dict[str, str]:
    """``{"weight_orig": "weight", "weight_mask": "weight"}`` for each tensor that
    ``torch.nn.utils.prune`` reparametrises on ``module`` (the stored tensor and its mask,
    multiplied by a forward pre-hook): the plan cuts both where the handler knows ``weight``."""
    from torch.nn.utils import prune

    names = [h._tensor_name for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
    return {f"{n}{suffix}": n for n in names for suffix in ("_orig", "_mask")}


def _as_handled(module: nn.Module, by_name: Mapping[str, Any]) -> dict[str, Any]:
    """``by_name`` keyed as the module's handler knows its tensors (a pruning mask and the
    tensor it masks under the masked tensor's name)."""
    aliases = _pruning_masks(module)
    return {aliases.get(name, name): value for name, value in by_name.items()}
