"""Prune a module through its export: export, :func:`graphprune.prune`, map the plan back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx
from graphprune.frontends.torch.export import ExampleInputs, to_onnx
from graphprune.frontends.torch.mapping import map_plan_with
from graphprune.frontends.torch.provenance import ParameterSources, parameter_sources
from torch import nn

from graphprune.io.weights import graph_constants
from graphprune.planning.plan import Plan

__all__ = ["TorchPruneResult", "expand_keep", "prune_module"]


@dataclass
class TorchPruneResult:
    """``model``: the pruned ONNX; ``plan``: keyed by the module's ``state_dict`` names."""

    model: onnx.ModelProto
    plan: Plan
    onnx_plan: Plan
    report: dict[str, Any]
    exported: onnx.ModelProto = field(repr=False)
    result: Any = field(default=None, repr=False)


def expand_keep(
    keep: Iterable[str], names: Iterable[str], sources: ParameterSources,
    onnx_names: Iterable[str] = (),
) -> list[str]:
    """``keep`` for the export: a module or parameter name becomes the parameters it owns and
    every constant folded from them; an ONNX node or tensor name (``onnx_names``) stays, and
    so does anything else (the pruning pipeline reports names it does not know)."""
    state = list(names)
    known = set(onnx_names)
    out: list[str] = []
    for entry in keep:
        owned = [n for n in state if n == entry or n.startswith(entry + ".")]
        if entry in known or not owned:
            out.append(entry)
        for name in owned:
            out.extend([name, *sources.copies(name)])
    return list(dict.fromkeys(out))


def prune_module(
    module: nn.Module,
    example_inputs: ExampleInputs,
    *,
    ratio: float | None = None,
    criterion: str | None = None,
    keep: Iterable[str] = (),
    plan: Plan | str | None = None,
    exporter: str = "dynamo",
    opset: int | None = None,
    dynamic_shapes: Any = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    **prune_options: Any,
) -> TorchPruneResult:
    """Export ``module``, prune the export with :func:`graphprune.prune`, map the plan back.

    ``keep`` takes ONNX node/tensor names and module or parameter names (``"head"``,
    ``"layer4.1.conv2.weight"``). The module itself is not changed: pass the returned
    ``plan`` to :func:`~graphprune.frontends.torch.apply_plan`. ``ratio`` defaults to 0.5,
    as in :func:`graphprune.prune` (where it says which options exclude it).
    """
    from graphprune.api import prune

    exported = to_onnx(
        module, example_inputs, exporter=exporter, opset=opset,
        dynamic_shapes=dynamic_shapes, dynamic_axes=dynamic_axes,
    )
    names = list(module.state_dict())
    sources = parameter_sources(exported, names)
    onnx_names = {n.name for n in exported.graph.node}
    onnx_names.update(o for n in exported.graph.node for o in n.output)
    result = prune(
        exported, ratio=ratio, criterion=criterion, plan=plan,
        keep=expand_keep(keep, names, sources, onnx_names), **prune_options,
    )
    analysed = result.analysis.graph if result.analysis is not None else None
    constants = None if analysed is None else [t.name for t in graph_constants(analysed)]
    mapped = map_plan_with(result.plan, sources, constants=constants)
    model = result.model  # the weights are in the proto now: the temporary folder can go
    result.close()
    return TorchPruneResult(model, mapped, result.plan, result.report, exported, result)
