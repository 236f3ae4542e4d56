"""How each module type is sliced: prunable axes per parameter, attributes to update.

One :class:`ModuleHandler` per module type, registered with :func:`register_module_handler`
(a custom layer registers its own). :func:`~graphprune.frontends.torch.apply_plan` asks
:func:`handler_for` about every module it touches.
"""

from __future__ import annotations

import numpy as np
from graphprune.frontends.torch.attention import PrunedMultiheadAttention, mha_layout, mha_row_cuts
from graphprune.frontends.torch.duck_handlers import (
    DUCK_HANDLERS,
    Conv1DHandler,
    ExpertsHandler,
    HeadCountsHandler,
    OwnParametersHandler,
)
from graphprune.frontends.torch.errors import PlanMappingError
from graphprune.frontends.torch.module_handler import ModuleHandler
from torch import nn

from graphprune.errors import UsageError

__all__ = ["DUCK_HANDLERS", "HANDLERS", "Conv1DHandler", "ExpertsHandler", "HeadCountsHandler", "ModuleHandler",
           "OwnParametersHandler", "handler_for", "register_module_handler"]


HANDLERS: dict[type[nn.Module], ModuleHandler] = {}


def register_module_handler(handler_cls: type[ModuleHandler]) -> type[ModuleHandler]:
    """Class decorator: register a handler for its ``module_types`` (refuses duplicates)."""
    handler = handler_cls()
    for cls in handler_cls.module_types:
        if cls in HANDLERS:
            raise UsageError(f"a module handler for {cls.__name__} is already registered")
        HANDLERS[cls] = handler
    return handler_cls


def handler_for(module: nn.Module) -> ModuleHandler | None:
    for cls in type(module).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    return next((h for h in DUCK_HANDLERS if h.matches(module)), None)  # type: ignore[attr-defined]


@register_module_handler
class ConvHandler(ModuleHandler):
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    axes = {"weight": (0, 1), "bias": (0,)}

    def check(self, module, cuts, where):
        super().check(module, cuts, where)
        if module.groups > 1 and 1 in cuts.get("weight", {}):
            raise PlanMappingError(f"cannot cut the per-group input columns of grouped conv '{where}'")

    def update(self, module, cuts, old):
        w = module.weight.shape
        if module.groups == 1:
            module.in_channels = int(w[1])
        else:
            per_group = old["weight"][0] // module.groups
            if w[0] % per_group:
                raise PlanMappingError("a grouped conv lost part of a conv group")
            module.groups = int(w[0] // per_group)
            module.in_channels = module.groups * int(w[1])
        module.out_channels = int(w[0])


@register_module_handler
class ConvTransposeHandler(ModuleHandler):
    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    axes = {"weight": (0, 1), "bias": (0,)}

    def check(self, module, cuts, where):
        super().check(module, cuts, where)
        if module.groups > 1 and 1 in cuts.get("weight", {}):
            raise PlanMappingError(f"cannot cut the per-group output columns of grouped '{where}'")

    def update(self, module, cuts, old):
        w = module.weight.shape
        if module.groups == 1:
            module.out_channels = int(w[1])
        else:
            per_group = old["weight"][0] // module.groups
            module.groups = int(w[0] // per_group)
            module.out_channels = module.groups * int(w[1])
        module.in_channels = int(w[0])


@register_module_handler
class LinearHandler(ModuleHandler):
    module_types = (nn.Linear,)
    axes = {"weight": (0, 1), "bias": (0,)}

    def update(self, module, cuts, old):
        module.out_features, module.in_features = (int(s) for s in module.weight.shape)


@register_module_handler
class BatchNormHandler(ModuleHandler):
    module_types = (nn.modules.batchnorm._NormBase,)  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    axes = {"weight": (0,), "bias": (0,), "running_mean": (0,), "running_var": (0,)}

    def update(self, module, cuts, old):
        for name in ("weight", "running_mean", "bias", "running_var"):
            t = getattr(module, name, None)
            if t is not None:
                module.num_features = int(t.shape[0])
                return


@register_module_handler
class LayerNormHandler(ModuleHandler):
    module_types = (nn.LayerNorm, nn.RMSNorm)
    axes = {"weight": (0, 1, 2, 3), "bias": (0, 1, 2, 3)}

    def update(self, module, cuts, old):
        t = module.weight if module.weight is not None else module.bias
        module.normalized_shape = tuple(int(s) for s in t.shape)


@register_module_handler
class GroupNormHandler(ModuleHandler):
    module_types = (nn.GroupNorm,)
    axes = {"weight": (0,), "bias": (0,)}

    def update(self, module, cuts, old):
        per_group = module.num_channels // module.num_groups
        channels = int(module.weight.shape[0])
        if channels % per_group:
            raise PlanMappingError("a GroupNorm lost part of a group")
        module.num_channels, module.num_groups = channels, channels // per_group


@register_module_handler
class EmbeddingHandler(ModuleHandler):
    module_types = (nn.Embedding,)
    axes = {"weight": (0, 1)}

    def update(self, module, cuts, old):
        rows = cuts.get("weight", {}).get(0)
        if rows is not None and module.padding_idx is not None:
            if module.padding_idx in set(rows.tolist()):
                module.padding_idx = None
            else:
                module.padding_idx -= int(np.count_nonzero(rows < module.padding_idx))
        module.num_embeddings, module.embedding_dim = (int(s) for s in module.weight.shape)


@register_module_handler
class PReLUHandler(ModuleHandler):
    module_types = (nn.PReLU,)
    axes = {"weight": (0,)}

    def update(self, module, cuts, old):
        module.num_parameters = int(module.weight.shape[0])


@register_module_handler
class MultiheadAttentionHandler(ModuleHandler):
    module_types = (nn.MultiheadAttention,)
    axes = {
        "in_proj_weight": (0, 1), "in_proj_bias": (0,),
        "q_proj_weight": (0, 1), "k_proj_weight": (0, 1), "v_proj_weight": (0, 1),
    }

    def check(self, module, cuts, where):
        super().check(module, cuts, where)
        if module.bias_k is not None or module.add_zero_attn:
            raise PlanMappingError(
                f"pruning MultiheadAttention '{where}' with bias_k/bias_v or add_zero_attn "
                "is not supported"
            )
        rows = mha_row_cuts(module, cuts)
        mha_layout(module, rows, where)  # raises when heads are cut unevenly

    def update(self, module, cuts, old):
        PrunedMultiheadAttention.convert(module, mha_row_cuts(module, cuts, old))



@register_module_handler
class RecurrentHandler(ModuleHandler):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: a hidden unit of layer ``k`` owns rows
    ``g * H + h`` of its ``weight_ih_lk``, ``weight_hh_lk`` and biases, column ``h`` of
    ``weight_hh_lk`` and of the next layer's ``weight_ih``. The layers prune apart (each layer
    is a channel group of its own), but the module has one ``hidden_size``: every layer and
    direction must keep as many units (a ratio does; a budget may not, and then this refuses)."""

    module_types = (nn.LSTM, nn.GRU, nn.RNN)
    prefixes = ("weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l")

    def check(self, module, cuts, where):
        if getattr(module, "proj_size", 0):
            raise PlanMappingError(f"cannot prune {type(module).__name__} '{where}' with proj_size")
        for name, by_axis in cuts.items():
            allowed = (0,) if name.startswith("bias") else (0, 1)
            if not name.startswith(self.prefixes) or any(a not in allowed for a in by_axis):
                raise PlanMappingError(f"cannot cut {name} axes {sorted(by_axis)} of "
                                       f"{type(module).__name__} '{where}'")
        kept = {module.hidden_size - len(cuts.get(name, {}).get(1, ()))
                for name in module._flat_weights_names if name.startswith("weight_hh_l")}
        if len(kept) > 1:
            raise PlanMappingError(
                f"{type(module).__name__} '{where}' would keep {sorted(kept)} hidden units in different "
                "layers, but it has one hidden_size: prune it with a ratio, or keep=[...] it")

    def update(self, module, cuts, old):
        module.hidden_size = int(module.weight_hh_l0.shape[1])
        module.input_size = int(module.weight_ih_l0.shape[1])
        module._init_flat_weights()  # the parameters were replaced under the module's list
