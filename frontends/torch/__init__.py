"""PyTorch frontend: export with the module's names, prune, map the plan back, slice the module.

The round trip::

    >>> from graphprune.frontends import torch as gpt                       # doctest: +SKIP
    >>> result = gpt.prune_module(model, (x,), ratio=0.5)                   # doctest: +SKIP
    >>> gpt.apply_plan(model, result.plan)     # the module is now smaller  # doctest: +SKIP
    >>> gpt.check_module(model, result.model, (x,))  # equals the pruned ONNX  # doctest: +SKIP

One module per job:

- :mod:`~graphprune.frontends.torch.export`: :func:`to_onnx` keeps every parameter and
  buffer under its ``state_dict`` key (and checks it);
- :mod:`~graphprune.frontends.torch.provenance`: :func:`parameter_sources` finds the
  parameter chains the exporter left (``Transpose`` of a Linear weight, ``Slice`` of a
  packed QKV weight) and reads, from graphprune's own dependency analysis of those chains,
  which parameter slices a cut of a folded constant removes;
- :mod:`~graphprune.frontends.torch.mapping`: :func:`map_plan` re-keys a plan by
  ``state_dict`` names and checks that every use of a parameter is cut the same way;
- :mod:`~graphprune.frontends.torch.prune`: :func:`prune_module` (export, prune, map);
- :mod:`~graphprune.frontends.torch.handlers`, :mod:`~graphprune.frontends.torch.attention`
  and :mod:`~graphprune.frontends.torch.apply`: :func:`apply_plan` slices the module in
  place through one handler per module type (:func:`register_module_handler` adds a custom
  layer); a pruned ``nn.MultiheadAttention`` becomes :class:`PrunedMultiheadAttention`;
- :mod:`~graphprune.frontends.torch.checks`: :func:`check_module` compares the module with
  the pruned ONNX in ONNX Runtime.

:class:`~graphprune.frontends.sparsity.GroupSparsity` (group-sparse training) is also
reachable here as ``GroupSparsity``.
"""

from __future__ import annotations

from typing import Any

from graphprune.frontends.torch.apply import ParamCuts as ParamCuts
from graphprune.frontends.torch.apply import apply_plan
from graphprune.frontends.torch.apply import module_cuts as module_cuts
from graphprune.frontends.torch.attention import PrunedMultiheadAttention
from graphprune.frontends.torch.checks import check_module
from graphprune.frontends.torch.checks import copy_module as copy_module
from graphprune.frontends.torch.errors import ExportError, PlanMappingError
from graphprune.frontends.torch.export import EXPORTERS, to_onnx
from graphprune.frontends.torch.export import TORCHSCRIPT_OPSET as TORCHSCRIPT_OPSET
from graphprune.frontends.torch.export import ExampleInputs as ExampleInputs
from graphprune.frontends.torch.export import check_names as check_names
from graphprune.frontends.torch.export import state_arrays as state_arrays
from graphprune.frontends.torch.handlers import HANDLERS as _HANDLERS  # noqa: F401  (tests)
from graphprune.frontends.torch.handlers import ModuleHandler, register_module_handler
from graphprune.frontends.torch.handlers import handler_for as handler_for
from graphprune.frontends.torch.mapping import map_plan
from graphprune.frontends.torch.mapping import map_plan_with as map_plan_with
from graphprune.frontends.torch.provenance import ParameterSources, parameter_sources
from graphprune.frontends.torch.prune import TorchPruneResult, prune_module

__all__ = [
    "EXPORTERS",
    "ExportError",
    "ModuleHandler",
    "ParameterSources",
    "PlanMappingError",
    "PrunedMultiheadAttention",
    "TorchPruneResult",
    "apply_plan",
    "check_module",
    "map_plan",
    "parameter_sources",
    "prune_module",
    "register_module_handler",
    "to_onnx",
]


def __getattr__(name: str) -> Any:
    if name == "GroupSparsity":
        from graphprune.frontends.sparsity import GroupSparsity

        return GroupSparsity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
