"""``nn.MultiheadAttention`` after pruning: any input, per-head q/k/v and output widths.

``nn.MultiheadAttention`` ties three widths that pruning separates: the input width (the
residual stream), the projection width and the number of heads. A pruned one becomes
:class:`PrunedMultiheadAttention`, a subclass with the same parameters and ``state_dict``
keys whose forward handles any widths.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from graphprune.frontends.torch.errors import PlanMappingError
from torch import nn

__all__ = ["PrunedMultiheadAttention", "mha_layout", "mha_row_cuts"]


def mha_row_cuts(
    module: nn.MultiheadAttention, cuts: Mapping[str, Mapping[int, np.ndarray]],
    old: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """Removed projection rows of q, k and v, each numbered within its own projection."""
    dims = getattr(module, "_gp_dims", None) or (module.embed_dim,) * 3
    out: dict[str, np.ndarray] = {}
    packed = getattr(module, "in_proj_weight", None) is not None
    rows: set[int] = set()
    for name in ("in_proj_weight", "in_proj_bias"):
        rows |= {int(i) for i in cuts.get(name, {}).get(0, [])}
    bounds = np.cumsum([0, *dims])
    for k, which in enumerate("qkv"):
        own = {int(i) for i in cuts.get(f"{which}_proj_weight", {}).get(0, [])} if not packed else set()
        packed_rows = {r - bounds[k] for r in rows if bounds[k] <= r < bounds[k + 1]}
        out[which] = np.asarray(sorted(own | packed_rows), dtype=np.int64)
    return out


def mha_layout(module: nn.MultiheadAttention, rows: Mapping[str, np.ndarray], where: str) -> tuple[int, int, int]:
    """Heads left, q/k head width and v head width after removing ``rows``."""
    heads = module.num_heads
    dims = getattr(module, "_gp_dims", None) or (module.embed_dim,) * 3
    kept = {}
    for k, which in enumerate("qkv"):
        per_head = dims[k] // heads
        lost = np.bincount(rows[which] // per_head, minlength=heads) if rows[which].size else np.zeros(heads, int)
        kept[which] = per_head - lost
    alive = (kept["q"] > 0) | (kept["k"] > 0) | (kept["v"] > 0)
    q, k, v = (kept[w][alive] for w in "qkv")
    if not alive.any() or np.any(q != k) or np.unique(q).size > 1 or np.unique(v).size > 1 or np.any(v == 0):
        raise PlanMappingError(
            f"the plan cuts the heads of MultiheadAttention '{where}' unevenly "
            f"(q {kept['q'].tolist()}, k {kept['k'].tolist()}, v {kept['v'].tolist()} per head)"
        )
    return int(alive.sum()), int(q[0]), int(v[0])


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose input, projection and output widths may all differ.

    Same parameters and ``state_dict`` keys as the module it came from; ``_gp_dims`` holds
    the q, k and v projection widths and ``_gp_scale`` the original ``1/sqrt(head_dim)``.
    ``_qkv_same_embed_dim`` is ``False`` so that ``nn.TransformerEncoderLayer``'s fused fast
    path (which assumes equal widths) is never taken.
    """

    _gp_dims: tuple[int, int, int]
    _gp_scale: float
    _gp_packed: bool

    @classmethod
    def convert(cls, module: nn.MultiheadAttention, rows: Mapping[str, np.ndarray]) -> None:
        if not isinstance(module, cls):
            setattr(module, "_gp_scale", float(module.head_dim) ** -0.5)  # noqa: B010
            setattr(module, "_gp_packed", module.in_proj_weight is not None)  # noqa: B010
            setattr(module, "_gp_dims", (module.embed_dim,) * 3)  # noqa: B010
        heads, qk, v = mha_layout(module, rows, "")
        setattr(module, "_gp_dims", (heads * qk, heads * qk, heads * v))  # noqa: B010
        module.num_heads = heads
        module.head_dim = qk
        module.embed_dim = heads * qk
        module._qkv_same_embed_dim = False
        module.__class__ = cls

    def _projections(self) -> tuple[torch.Tensor, ...]:
        dq, dk, dv = self._gp_dims
        if self._gp_packed:
            wq, wk, wv = self.in_proj_weight.split([dq, dk, dv], dim=0)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split([dq, dk, dv], dim=0)
        else:
            bq = bk = bv = None
        return wq, wk, wv, bq, bk, bv

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        wq, wk, wv, bq, bk, bv = self._projections()
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        b, length, source = q.shape[0], q.shape[1], k.shape[1]
        h = self.num_heads
        q = q.view(b, length, h, -1).transpose(1, 2)
        k = k.view(b, source, h, -1).transpose(1, 2)
        v = v.view(b, source, h, -1).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * self._gp_scale
        mask = _additive(attn_mask, scores.dtype)
        if mask is not None:
            scores = scores + (mask.view(b, h, length, source) if mask.dim() == 3 else mask)
        elif is_causal:
            causal = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        padding = _additive(key_padding_mask, scores.dtype)
        if padding is not None:
            scores = scores + padding.view(b, 1, 1, source)
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = (weights @ v).transpose(1, 2).reshape(b, length, -1)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (``True`` = not allowed) as an additive ``-inf`` mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)

