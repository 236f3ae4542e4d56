"""``prune_module`` on a mixture of experts whose experts are stacked 3-D parameters.

Hugging Face's MoE layers keep the experts in one module per family (``MixtralExperts``,
``OlmoeExperts``, ...) holding ``gate_up_proj [experts, 2 x inner, hidden]`` and ``down_proj
[experts, hidden, inner]`` and read the routed expert's weights per token. This module is
built the same way in plain PyTorch (a token's expert picked by ``weight[index]``, gate and up
taken apart with ``chunk``): the dynamo export reads the weights with ``GatherND`` and writes
``chunk`` as ``SplitToSequence`` (the frontend exports without the optimiser), the plan cuts
the inner width, and ``apply_plan`` finds the experts module by its parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from graphprune.frontends.torch import apply_plan, check_module, prune_module
from graphprune.frontends.torch.errors import PlanMappingError
from torch import nn

HIDDEN, INNER, EXPERTS, TOKENS = 8, 12, 4, 10


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = EXPERTS, HIDDEN, INNER
        self.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, 2 * INNER, HIDDEN) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(EXPERTS, HIDDEN, INNER) * 0.3)

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(self.gate_up_proj[expert], x.unsqueeze(-1)).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        return torch.bmm(self.down_proj[expert], (nn.functional.silu(gate) * up).unsqueeze(-1)).squeeze(-1)


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(HIDDEN, EXPERTS)
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.experts(x, self.router(x).argmax(-1))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_the_experts_inner_width_maps_back(exporter: str) -> None:
    torch.manual_seed(0)
    model = MoE().eval()
    x = torch.randn(TOKENS, HIDDEN)
    result = prune_module(model, (x,), ratio=0.5, exporter=exporter)
    assert result.report.get("normalised", {}).get("sequences_sliced") == (1 if exporter == "dynamo" else None)
    cut = {name for group in result.plan.groups for name in group.channels}
    assert {"experts.gate_up_proj", "experts.down_proj"} <= cut
    pruned = apply_plan(copy.deepcopy(model), result.plan)
    assert tuple(pruned.experts.gate_up_proj.shape) == (EXPERTS, INNER, HIDDEN)
    assert tuple(pruned.experts.down_proj.shape) == (EXPERTS, HIDDEN, INNER // 2)
    assert pruned.experts.intermediate_dim == INNER // 2
    check_module(pruned, result.model, (x,))  # the module computes what the pruned ONNX does


def test_an_experts_module_without_a_width_attribute_is_refused() -> None:
    torch.manual_seed(0)
    model = MoE().eval()
    x = torch.randn(TOKENS, HIDDEN)
    result = prune_module(model, (x,), ratio=0.5)
    del model.experts.intermediate_dim
    with pytest.raises(PlanMappingError, match="keeps its inner width in no attribute"):
        apply_plan(model, result.plan)


class Scale(nn.Module):
    """A learned per-channel scale of its own class, as Hugging Face's per-model RMSNorms are."""

    def __init__(self, width: int, keep_width: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        if keep_width:
            self.width = width  # read nowhere here, but a forward could

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_a_module_of_channel_vectors_maps_back_without_a_handler_of_its_own() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(HIDDEN, 16), Scale(16), nn.ReLU(), nn.Linear(16, HIDDEN)).eval()
    x = torch.randn(TOKENS, HIDDEN)
    result = prune_module(model, (x,), ratio=0.5)
    pruned = apply_plan(copy.deepcopy(model), result.plan)
    assert tuple(pruned[1].weight.shape) == (8,)
    check_module(pruned, result.model, (x,))
    keeping = nn.Sequential(nn.Linear(HIDDEN, 16), Scale(16, keep_width=True), nn.ReLU(), nn.Linear(16, HIDDEN))
    keeping.load_state_dict(model.state_dict())
    with pytest.raises(PlanMappingError, match=r"keeps its width in \['width'\]"):
        apply_plan(keeping, result.plan)
