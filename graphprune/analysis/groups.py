"""Channel groups: connected components of the dependency graph that carry parameters.

Inside a group, the index maps of its couplings are expanded to element level and unioned
(a vectorised union-find): each resulting equivalence class is a *unit*, the smallest set
of elements (across every member tensor) that can be removed together. For a plain group a
unit is one channel; a Concat group's unit is one channel of one input; a grouped conv's
unit is one conv group; a head is one unit once attention is understood.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.dims import Coupling, Dim, ShapeElement
from graphprune.analysis.roles import PRODUCER
from graphprune.io.shared_constants import TIE

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext


@dataclass
class ChannelGroup:
    """A connected component of coupled dimensions that carries parameters."""

    id: int
    dims: list[Dim]
    sizes: dict[Dim, int | None]
    params: list[Dim]
    roles: dict[Dim, str]
    nodes: list[str]
    frozen: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)
    shape_elements: list[ShapeElement] = field(default_factory=list)
    #: per member dimension: the unit id of each of its elements
    unit_of: dict[Dim, np.ndarray] = field(default_factory=dict)
    num_units: int = 0
    #: integer (quantized) parameters' float readings, ``(scale, zero_point, bits)`` per name
    #: (:meth:`CouplingContext.decoded`)
    decodings: dict[str, tuple[np.ndarray, np.ndarray, int]] = field(default_factory=dict)
    #: constant members that an op reads as a per-channel scale or shift, not as a weight
    #: (:meth:`OpRule.affine_operands`)
    affine: set[str] = field(default_factory=set)
    #: elements no unit may take away (label -1 in ``unit_of``): how many units they made,
    #: and the reasons (the freezes of the member dimensions they belong to)
    pinned_units: int = 0
    pinned: list[str] = field(default_factory=list)
    #: weight members found holding NaN when scored (:func:`graphprune.planning.importance.norm_scores`;
    #: scored as 0 there): the original computes NaN where they are read
    non_finite: list[str] = field(default_factory=list)

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen)

    @property
    def is_exact(self) -> bool:
        return not self.inexact

    @property
    def producers(self) -> list[Dim]:
        return [d for d in self.params if self.roles.get(d) == PRODUCER]

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.num_units >= 2 and bool(self.producers)

    @property
    def anchor(self) -> Dim:
        """A stable member that names the group (first producer parameter, else first param;
        a constant's own name before a copy made by untying it)."""
        members = self.producers or self.params or self.dims
        return next((d for d in members if TIE not in d[0]), members[0])

    def removed_elements(self, units: Iterable[int]) -> dict[Dim, np.ndarray]:
        """Map removed unit ids to the element indices each member loses."""
        units = np.asarray(sorted(set(units)), dtype=np.int64)
        out: dict[Dim, np.ndarray] = {}
        for dim, labels in self.unit_of.items():
            idx = np.nonzero(np.isin(labels, units))[0]
            if idx.size:
                out[dim] = idx
        return out

    def units_of_elements(self, dim: Dim, elements: Iterable[int]) -> list[int]:
        labels = self.unit_of[dim]
        return sorted({int(labels[i]) for i in elements if labels[i] >= 0})

    def summary(self) -> dict[str, object]:
        return {
            "id": self.id,
            "anchor": f"{self.anchor[0]}:{self.anchor[1]}",
            "size": self.num_units,
            "channels": self.sizes.get(self.anchor),
            "members": len(self.dims),
            "params": len(self.params),
            "ops": sorted({n for n in self.nodes})[:50],
            "num_ops": len(set(self.nodes)),
            "prunable": self.prunable,
            "frozen": self.frozen[:10],
            "inexact": self.inexact[:10],
            **({"pinned_units": self.pinned_units, "pinned_by": self.pinned[:10]} if self.pinned_units else {}),
        }


def form_groups(ctx: CouplingContext) -> list[ChannelGroup]:
    """One group per connected component with a float parameter, with its units; a
    component is frozen by any reason stated on one of its dimensions or tensors."""
    edges_by_dim: dict[Dim, list[Coupling]] = defaultdict(list)
    for c in ctx.couplings:
        edges_by_dim[c.a].append(c)
    shape_by_dim: dict[Dim, list[ShapeElement]] = defaultdict(list)
    for s in ctx.shape_elements:
        shape_by_dim[s.dim].append(s)

    groups: list[ChannelGroup] = []
    components = [sorted(c) for c in nx.connected_components(ctx.dim_graph)]
    components.sort()
    for comp in components:
        params = [d for d in comp if _is_float_param(ctx.tensors.get(d[0]))
                  or d[0] in ctx.quantized_params]
        if not params:
            continue
        sizes = {d: ctx.member_size(ctx.tensors[d[0]], d[1]) for d in comp if d[0] in ctx.tensors}
        if all(sizes.get(d) == 1 for d in comp) and any(d in ctx.spatial_dims for d in comp):
            continue  # the batch axis met a constant's size-1 axis ([1, C, 1, 1]): no channel
        frozen: list[str] = []
        frozen_at: set[Dim] = set()
        inexact: list[str] = []
        nodes: list[str] = []
        couplings: list[Coupling] = []
        for d in comp:
            reasons = [*ctx.dim_freeze.get(d, []), *ctx.tensor_freeze.get(d[0], [])]
            if reasons:
                frozen_at.add(d)
                frozen.extend(reasons)
            inexact.extend(ctx.dim_inexact.get(d, []))
            if sizes.get(d) is None:
                frozen.append(f"size of '{d[0]}' axis {d[1]} unknown")
            for c in edges_by_dim.get(d, []):
                couplings.append(c)
                nodes.append(c.node)
                if not c.exact:
                    inexact.append(f"not channel-separable at node '{c.node}'")
        group = ChannelGroup(
            id=len(groups),
            dims=comp,
            sizes=sizes,
            params=params,
            roles={d: ctx.roles[d] for d in params if d in ctx.roles},
            nodes=sorted(set(nodes)),
            frozen=list(dict.fromkeys(frozen)),
            inexact=list(dict.fromkeys(inexact)),
            shape_elements=[s for d in comp for s in shape_by_dim.get(d, [])],
            decodings={d[0]: ctx.decodings[d[0]] for d in params if d[0] in ctx.decodings},
            affine={d[0] for d in params if _affine_operand(ctx, ctx.tensors.get(d[0]))},
        )
        if all(sizes.get(d) is not None for d in comp):
            try:
                _compute_units(group, couplings)
            except Exception as exc:  # inconsistent maps: never guess
                group.frozen.append(f"index maps inconsistent: {exc}")
                group.unit_of = {}
                group.num_units = 0
            else:
                _pin(group, frozen_at)
        groups.append(group)
    return groups


def _affine_operand(ctx: CouplingContext, tensor: gs.Tensor | None) -> bool:
    """Does some op read ``tensor`` as a per-channel scale or shift of another input?"""
    if not isinstance(tensor, gs.Constant):
        return False
    for node in tensor.outputs:
        rule = ctx.rule_for(node)
        if rule is not None and any(node.inputs[i] is tensor for i in rule.affine_operands(node)):
            return True
    return False


def _is_float_param(tensor: gs.Tensor | None) -> bool:
    if not isinstance(tensor, gs.Constant):
        return False
    dtype = getattr(tensor, "dtype", None)
    try:
        return bool(np.issubdtype(np.dtype(dtype), np.floating))
    except TypeError:
        return True


def _compute_units(group: ChannelGroup, couplings: list[Coupling]) -> None:
    dims = group.dims
    sizes = [int(group.sizes[d]) for d in dims]  # type: ignore[arg-type]
    if len(set(sizes)) == 1 and all(c.imap.is_identity for c in couplings):
        n = sizes[0]
        group.unit_of = {d: np.arange(n, dtype=np.int64) for d in dims}
        group.num_units = n
        return
    offsets: dict[Dim, int] = {}
    total = 0
    for d, n in zip(dims, sizes, strict=True):
        offsets[d] = total
        total += n
    a_parts, b_parts = [], []
    for c in couplings:
        na, nb = int(group.sizes[c.a]), int(group.sizes[c.b])  # type: ignore[arg-type]
        if c.imap.check(na, nb) is not None:
            raise ValueError(c.imap.check(na, nb))
        ia, ib = c.imap.pairs(na, nb)
        a_parts.append(ia + offsets[c.a])
        b_parts.append(ib + offsets[c.b])
    parent = np.arange(total, dtype=np.int64)
    if a_parts:
        pa, pb = np.concatenate(a_parts), np.concatenate(b_parts)
        while True:
            parent = _compress(parent)
            ra, rb = parent[pa], parent[pb]
            diff = ra != rb
            if not diff.any():
                break
            hi = np.maximum(ra[diff], rb[diff])
            lo = np.minimum(ra[diff], rb[diff])
            np.minimum.at(parent, hi, lo)
    labels = _compress(parent)
    _, unit = np.unique(labels, return_inverse=True)
    group.unit_of = {d: unit[offsets[d] : offsets[d] + n] for d, n in zip(dims, sizes, strict=True)}
    group.num_units = int(unit.max()) + 1 if total else 0


def _pin(group: ChannelGroup, frozen_at: set[Dim]) -> None:
    """A freeze says a dimension keeps its size: only the units its elements belong to are
    bound by it. Where the other units are still two or more (a fused projection whose
    key/value part is frozen while its query heads are not; a Concat of channels with a
    graph input), those units stay prunable: the bound elements get label -1 (no unit),
    the freezes become the group's ``pinned`` reasons. Otherwise the group stays frozen, and
    so does an inexact one. A member of one element keeps its unit too (the planners' floors
    would never take it): it is pinned, so that ratios count only units that can go."""
    single = [d for d, labels in group.unit_of.items() if len(labels) == 1]  # kept by the floors anyway
    bound_at = [d for d in (*frozen_at, *single) if d in group.unit_of]
    if not bound_at or (frozen_at and (not group.frozen or group.inexact)):
        return  # an inexact group (through a normalisation: YOLOv8's DFL bins) stays frozen whole
    bound = np.unique(np.concatenate([group.unit_of[d] for d in bound_at]))
    free = group.num_units - len(bound)
    if free < 2:
        return
    if single and not frozen_at:
        reasons = [f"'{single[0][0]}' axis {single[0][1]} has one element (a member keeps one unit)"]
    else:
        reasons = group.frozen
    relabel = np.full(group.num_units, -1, dtype=np.int64)
    keep = np.setdiff1d(np.arange(group.num_units), bound.astype(np.int64))
    relabel[keep] = np.arange(len(keep))
    group.unit_of = {d: relabel[labels] for d, labels in group.unit_of.items()}
    group.num_units = len(keep)
    group.pinned_units = len(bound)
    group.pinned, group.frozen = reasons, []


def _compress(parent: np.ndarray) -> np.ndarray:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand

