"""Compare a (pruned) module with an ONNX model on the same inputs."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import onnx
import torch
from graphprune.frontends.torch.export import ExampleInputs, as_tuple, eval_mode
from torch import nn

from graphprune.errors import UsageError, VerificationError

__all__ = ["check_module", "copy_module"]


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _flat_outputs(v)]
    return []


def check_module(
    module: nn.Module,
    model: onnx.ModelProto,
    example_inputs: ExampleInputs,
    *,
    tolerance: float = 1e-4,
) -> float:
    """Run ``module`` (eval mode) and ``model`` (ONNX Runtime) on the same inputs.

    Returns the largest difference relative to each output's largest magnitude; raises
    :class:`VerificationError` above ``tolerance``.
    """
    from graphprune.verify.validate import differences, run

    args = as_tuple(example_inputs)
    with eval_mode(module), torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in _flat_outputs(module(*args))]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != len(tensors):
        raise UsageError(f"the model has {len(names)} inputs, {len(tensors)} tensors were given")
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
    got = run(model, feeds, "the pruned model")
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected, strict=False)):
        raise VerificationError(
            f"module outputs {[e.shape for e in expected]} differ in shape from the ONNX "
            f"outputs {[g.shape for g in got]}"
        )
    _, rel = differences(got, expected)
    if rel > tolerance:
        raise VerificationError(
            f"module and ONNX outputs differ: max relative difference {rel:.3g} > {tolerance:g}"
        )
    return rel


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy (the plan is applied in place; keep the original when comparing)."""
    return copy.deepcopy(module)
