"""Handlers found by what a module holds rather than by its type (:data:`DUCK_HANDLERS`).

Hugging Face gives every model family its own classes (``MixtralExperts``, ``Phi3Attention``,
``LlamaRMSNorm``, GPT-2's ``Conv1D``) built from the same few patterns, so these handlers
match the pattern (:meth:`matches`): stacked expert weights, a transposed linear layer, an
attention that keeps its head counts in attributes, a module whose own parameters are cut
along their channel axes. :func:`~graphprune.frontends.torch.handlers.handler_for` asks them,
in this order, after the handlers registered by type.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from graphprune.frontends.torch.errors import PlanMappingError
from graphprune.frontends.torch.module_handler import ModuleHandler
from torch import nn

__all__ = ["DUCK_HANDLERS", "Conv1DHandler", "ExpertsHandler", "HeadCountsHandler", "OwnParametersHandler"]


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class ExpertsHandler(ModuleHandler):
    """A mixture of experts' stacked expert weights as Hugging Face's ``*Experts`` modules hold
    them: 3-D ``gate_up_proj`` (or ``up_proj``) and ``down_proj``, ``[experts, ...]``, optional
    ``*_bias``, and the inner width in an attribute (``intermediate_dim``,
    ``intermediate_size``, ``expert_dim``). Each model family has its own class
    (``MixtralExperts``, ``OlmoeExperts``, ...), so it is found by those parameters
    (:meth:`matches`), not by type. The plan may cut the inner axis only (never the experts,
    never the hidden size): ``k`` neurons off ``down_proj``, ``2 k`` elements off
    ``gate_up_proj`` (``k`` off ``up_proj``)."""

    INNER = ("intermediate_dim", "intermediate_size", "expert_dim")
    WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")

    @staticmethod
    def matches(module: nn.Module) -> bool:
        params = module._parameters
        down = params.get("down_proj")
        up = params.get("gate_up_proj", params.get("up_proj"))
        return down is not None and up is not None and down.dim() == 3 and up.dim() == 3

    def _inner(self, module: nn.Module) -> int | None:
        return next((v for a in self.INNER if isinstance(v := getattr(module, a, None), int)), None)

    def check(self, module, cuts, where):
        inner = self._inner(module)
        if inner is None:
            raise PlanMappingError(f"{type(module).__name__} '{where}' keeps its inner width in no attribute "
                                   f"({', '.join(self.INNER)}): register a handler for it")
        removed: dict[str, int] = {}
        for name, by_axis in cuts.items():
            t = getattr(module, name, None)
            packed = name.startswith("gate_up_proj")
            axes = [a for a, idx in by_axis.items() if len(idx)]
            ok = (name.removesuffix("_bias") in self.WEIGHTS and name != "down_proj_bias" and t is not None
                  and len(axes) == 1 and axes[0] != 0 and int(t.shape[axes[0]]) == (2 if packed else 1) * inner)
            if not ok:
                raise PlanMappingError(f"cannot cut {name} axes {sorted(by_axis)} of {type(module).__name__} "
                                       f"'{where}' (only the experts' inner width, {inner})")
            removed[name] = len(by_axis[axes[0]]) // (2 if packed else 1)
        if "down_proj" not in removed or len(set(removed.values())) != 1:
            raise PlanMappingError(f"the plan cuts the experts of '{where}' unevenly: {removed}")

    def update(self, module, cuts, old):
        inner = self._inner(module)
        removed = sum(len(idx) for idx in cuts["down_proj"].values())
        for name in self.INNER:
            if getattr(module, name, None) == inner:
                setattr(module, name, inner - removed)


class Conv1DHandler(ModuleHandler):
    """A linear layer stored transposed, ``weight [in, out]``, with its output width in
    ``nf`` (and input width in ``nx``): transformers' ``Conv1D`` (GPT-2, GPT-J's ancestors,
    CTRL) and its copies."""

    axes = {"weight": (0, 1), "bias": (0,)}

    @staticmethod
    def matches(module: nn.Module) -> bool:
        weight = module._parameters.get("weight")
        nf = _int(getattr(module, "nf", None))
        return (nf is not None and weight is not None and weight.dim() == 2 and int(weight.shape[1]) == nf
                and not any(True for _ in module.children()))

    def update(self, module, cuts, old):
        module.nx, module.nf = (int(s) for s in module.weight.shape)


class _Counts(NamedTuple):
    heads: int
    new: int
    kv: int | None
    new_kv: int | None
    size: int
    new_size: int


def _linear_axes(child: nn.Module) -> tuple[int, int] | None:
    """``(input axis, output axis)`` of a child linear layer's weight (``None``: not one)."""
    weight = child._parameters.get("weight") if isinstance(child, nn.Module) else None
    if weight is None or weight.dim() != 2:
        return None
    return (0, 1) if Conv1DHandler.matches(child) else (1, 0)


class HeadCountsHandler(ModuleHandler):
    """An attention module that keeps its head counts in attributes and whose children are
    its projections: Hugging Face's per-family attention classes (``OPTAttention``,
    ``FalconAttention``, ``T5Attention``, GPT-2's, Phi-3's, StableLM's), which reshape by
    ``self.num_heads`` or split by ``self.split_size``. Found by what it holds
    (:meth:`matches`): an integer head size and head count, and an output projection among its
    children (or, for BERT's self-attention, whose output is a sibling module, a value
    projection).

    After its children lost whole heads, the counts follow: query heads from the output
    projection's input width (or the value projection's output width), key/value heads from
    the key projection's output width (or a fused projection's: ``q + 2 kv`` heads). The
    widths kept as ``heads x head size`` (``split_size``, ``all_head_size``, ``inner_dim``,
    ``kv_dim``; not ``embed_dim``, which CodeGen lays its fused projection out by) and
    ``num_key_value_groups`` follow too; a module that reads its counts from the model's
    ``config`` (Phi-3) gets a copy of it with its own counts (the model's other layers keep
    theirs). Where there is one head, its size may be cut instead (SegFormer's first stage):
    the head size follows where the module keeps its score scale (``scaling``), and the plan
    is refused where it computes the scale from the head size (GLPN, PVTv2). Its own per-head
    parameters (GPT-OSS's sinks) are cut with it. A cut that is not whole heads is refused
    before anything changes. What it cannot know is a count kept outside the module (Bloom's
    and MPT's ALiBi slopes, built by the model for all layers at once): run
    :func:`~graphprune.frontends.torch.check_module` after :func:`apply_plan`."""

    container = True
    HEAD_SIZE = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
    QUERY = ("num_heads", "num_attention_heads", "n_heads", "n_head")
    KV = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads")
    #: attributes that hold key/value heads x head size
    KV_WIDTHS = ("kv_dim",)
    #: attributes that hold query heads x head size
    WIDTHS = ("split_size", "all_head_size", "inner_dim")
    OUTPUT = ("o_proj", "out_proj", "dense", "c_proj", "o", "wo", "out_lin")
    QUERY_PROJ = ("q_proj", "query", "q", "q_lin", "query_proj")
    KEY = ("k_proj", "key", "k", "k_lin", "key_proj")
    VALUE = ("v_proj", "value", "v", "v_lin", "value_proj")
    FUSED = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv")

    @classmethod
    def _first(cls, module: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
        return next(((n, v) for n in names if (v := _int(getattr(module, n, None))) is not None), None)

    @classmethod
    def _child(cls, module: nn.Module, names: tuple[str, ...]) -> tuple[str, int, int] | None:
        """``(name, input axis, output axis)`` of the first child linear layer named in ``names``."""
        children = dict(module.named_children())
        for name in names:
            axes = _linear_axes(children[name]) if name in children else None
            if axes is not None:
                return name, *axes
        return None

    @classmethod
    def _heads(cls, module: nn.Module) -> int | None:
        """Its query heads: an attribute of its own, else its ``config``'s (Phi-3 reads it there)."""
        own = cls._first(module, cls.QUERY)
        return own[1] if own is not None else _int(getattr(getattr(module, "config", None), "num_attention_heads", None))

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (not isinstance(module, nn.MultiheadAttention) and cls._first(module, cls.HEAD_SIZE) is not None
                and cls._heads(module) is not None
                and (cls._child(module, cls.OUTPUT) is not None or cls._child(module, cls.VALUE) is not None))

    def check(self, module, cuts, where):
        """Its own parameters: per-head ones only, cut along their heads axis (GPT-OSS's sinks,
        SwinV2's logit scale, Donut-Swin's position bias table, MiniMax's decay rates)."""
        heads = self._heads(module)
        for name, by_axis in cuts.items():
            t = module._parameters.get(name)
            if t is None or len(by_axis) != 1 or any(int(t.shape[a]) != heads for a in by_axis):
                raise PlanMappingError(f"cannot cut {name} axes {sorted(by_axis)} of {type(module).__name__} "
                                       f"'{where}' (its own parameters: along an axis of its {heads} heads only)")

    def _counts(self, module: nn.Module, cuts: Mapping[str, Mapping[int, np.ndarray]], where: str) -> _Counts:
        """The head counts and head size before and after ``cuts``; raises on a cut of part of
        a head (except where there is one head: its size may shrink, SegFormer's first stage)."""
        size = self._first(module, self.HEAD_SIZE)[1]  # type: ignore[index]
        heads = self._heads(module)
        assert heads is not None  # matches() found them
        kv = self._first(module, self.KV)

        def removed(child: tuple[str, int, int] | None, axis: int) -> int:
            if child is None:
                return 0
            return len(cuts.get(f"{child[0]}.weight", {}).get(child[axis], ()))

        def whole(count: int, what: str) -> int:
            if count % size:
                raise PlanMappingError(f"the plan cuts {count} {what} of '{where}', not whole heads of {size}")
            return count // size

        output = self._child(module, self.OUTPUT)  # BERT's self-attention: the value projection
        out_cut = removed(output, 1) if output is not None else removed(self._child(module, self.VALUE), 2)
        if heads == 1 and out_cut % size:  # one head whose size is cut: q, k and v must lose as much
            projections = [self._child(module, names) for names in (self.QUERY_PROJ, self.KEY, self.VALUE)]
            if None in projections or {removed(p, 2) for p in projections} != {out_cut} or kv is not None:
                raise PlanMappingError(f"the plan cuts the one head of '{where}' to different sizes in its "
                                       "projections")
            if not any(isinstance(getattr(module, a, None), float) for a in ("scaling", "scale")):
                raise PlanMappingError(f"the plan cuts the size of the one head of '{where}', which keeps no score "
                                       "scale of its own (it may compute it from the head size): protect it with "
                                       "keep=[...]")
            return _Counts(1, 1, None, None, size, size - out_cut)
        dq = whole(out_cut, "inputs of its output projection")
        for name, by_axis in cuts.items():  # its own per-head parameters lose the same heads
            lost = sum(len(idx) for idx in by_axis.values())
            if "." not in name and lost != dq:
                raise PlanMappingError(f"the plan cuts '{where}.{name}' by {lost} heads and its output projection "
                                       f"by {dq}")
        if kv is None:
            new_kv = None
        else:
            key = self._child(module, self.KEY)
            fused = self._child(module, self.FUSED)
            if key is not None:
                dkv = whole(removed(key, 2), "outputs of its key projection")
            else:
                rest = whole(removed(fused, 2), "outputs of its fused projection") - dq
                if rest % 2:
                    raise PlanMappingError(f"the plan cuts the fused projection of '{where}' unevenly")
                dkv = rest // 2
            new_kv = kv[1] - dkv
        new = heads - dq
        if new < 1 or (new_kv is not None and (new_kv < 1 or new % new_kv)):
            raise PlanMappingError(f"the plan leaves '{where}' {new} query heads and {new_kv} key/value heads")
        return _Counts(heads, new, None if kv is None else kv[1], new_kv, size, size)

    def check_below(self, module, cuts, where):
        self._counts(module, cuts, where)

    def update(self, module, cuts, old):
        if old:  # its own vectors were sliced; the counts follow once its children are (old == {})
            return
        c = self._counts(module, cuts, type(module).__name__)
        if c.new == c.heads and c.new_kv == c.kv and c.new_size == c.size:
            return
        changes: dict[str, int] = {}
        for names, before, after in ((self.QUERY, c.heads, c.new), (self.KV, c.kv, c.new_kv),
                                     (self.HEAD_SIZE, c.size, c.new_size),
                                     (self.WIDTHS, c.heads * c.size, c.new * c.new_size),
                                     (self.KV_WIDTHS, None if c.kv is None else c.kv * c.size,
                                      None if c.new_kv is None else c.new_kv * c.new_size)):
            for name in names:
                if before is not None and after is not None and _int(getattr(module, name, None)) == before:
                    changes[name] = after
        if c.new_kv and _int(getattr(module, "num_key_value_groups", None)) is not None:
            changes["num_key_value_groups"] = c.new // c.new_kv
        for name, value in changes.items():
            setattr(module, name, value)
        config = getattr(module, "config", None)
        if config is not None and _int(getattr(config, "num_attention_heads", None)) == c.heads and c.new != c.heads:
            config = copy.copy(config)  # this layer's counts; the model's other layers keep theirs
            config.num_attention_heads = c.new
            if c.kv is not None and _int(getattr(config, "num_key_value_heads", None)) == c.kv:
                config.num_key_value_heads = c.new_kv
            module.config = config


class OwnParametersHandler(ModuleHandler):
    """A module whose own tensors are cut along their channel axes and that keeps no width of
    its own: Hugging Face's per-model RMSNorm classes (``LlamaRMSNorm``: ``weight`` and
    ``variance_epsilon``), a learned per-channel scale beside child layers (ConvNeXt's
    ``layer_scale_parameter``), a table of per-head biases (Swin's relative position bias),
    a ViT's class token and position embeddings, a batch norm whose statistics and affine are
    all buffers (DETR's ``FrozenBatchNorm2d``). Found by what it holds (:meth:`matches`): float
    tensors of its own (an index buffer beside them is fine). Refused: a module with an integer
    attribute equal to a width it loses (it may read that width in ``forward``), or with a float
    tensor of such a width that the plan leaves whole (a buffer the module computes with)."""

    @staticmethod
    def _tensors(module: nn.Module) -> dict[str, object]:
        return {n: t for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None}

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        floats = [t for t in cls._tensors(module).values() if t.is_floating_point()]  # type: ignore[attr-defined]
        return bool(floats) and all(t.dim() >= 1 for t in floats)  # type: ignore[attr-defined]

    def check(self, module, cuts, where):
        tensors = self._tensors(module)
        widths: set[int] = set()
        for name, by_axis in cuts.items():
            t = tensors.get(name)
            if t is None:
                raise PlanMappingError(f"cannot cut {name} of {type(module).__name__} '{where}'")
            widths.update(int(t.shape[a]) for a in by_axis)  # type: ignore[attr-defined]
        kept = [a for a, v in vars(module).items() if _int(v) is not None and v in widths]
        whole = [n for n, t in tensors.items() if n not in cuts and t.is_floating_point()  # type: ignore[attr-defined]
                 and any(int(d) in widths for d in t.shape)]  # type: ignore[attr-defined]
        if kept or whole:
            what = f"keeps its width in {kept}" if kept else f"keeps {whole} whole"
            raise PlanMappingError(f"{type(module).__name__} '{where}' {what}: register a handler for it or "
                                   "protect it with keep=[...]")


#: handlers found by what a module holds rather than by its type, in the order they are asked
DUCK_HANDLERS: list[ModuleHandler] = [ExpertsHandler(), Conv1DHandler(), HeadCountsHandler(), OwnParametersHandler()]
