"""Budget planning: remove units across all groups until a MACs, parameter or latency
target is met (global, non-uniform allocation).

Each prunable group loses a prefix of its *removal order*: its units sorted by importance,
lowest first, honouring the planner's floors (``min_channels``, no member emptied, at most
``max_ratio`` of the group). A tensor axis that belongs to a group shrinks by the elements
of the removed units, so the cost of the graph at any allocation is computed exactly from
the operators' own rules (:meth:`OpRule.macs`), the constants' sizes (parameters) or
per-operator latencies scaled by each operator's work (:class:`CostModel`).

Allocation is greedy on marginal value: the step taken next (one alignment block of one
group) is the one that loses the least importance per unit of cost it saves; a step's cost
is re-evaluated when a neighbouring group changed (the cost of a convolution is bilinear in
its input and output widths). Importance is comparable between groups:

- data-free: the unit scores divided by the group's mean score, summed over removed units
  (every group's average unit weighs 1);
- with calibration: the measured output deviation of pruning the group alone at a few
  ratios (:mod:`graphprune.planning.sensitivity`), interpolated between them; the greedy
  allocation is then one candidate among several measured after reconstruction
  (:mod:`graphprune.planning.search`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import Analysis, ChannelGroup
from graphprune.analysis.dims import Dim
from graphprune.errors import UsageError
from graphprune.planning.importance import weight_members
from graphprune.planning.plan import Plan
from graphprune.planning.planner import group_plan, group_round_to
from graphprune.rules import registry
from graphprune.verify.metrics import counted_shape, is_parameter_dtype

TARGET_KINDS = ("macs", "params", "latency")

#: default largest share of one group the allocator may remove
DEFAULT_MAX_RATIO = 0.9
#: data-free: a group's loss grows as the number of weight tensors its units span to this
#: power (1: as the cost it saves, so a residual stream was cut as readily as a block's inner
#: channels; HiFi-GAN at 0.7x MACs: log-mel L1 4.29 -> 2.35, onnxsim's L2 3.13)
SPAN_EXPONENT = 1.5


def check_target(kind: str, fraction: Any) -> float:
    if kind not in TARGET_KINDS:
        raise UsageError(f"unknown target '{kind}' (choose from {', '.join(TARGET_KINDS)})")
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise UsageError(f"target-{kind} must be a number in (0, 1), got {fraction!r}") from None
    if isinstance(fraction, bool) or not math.isfinite(value) or not 0.0 < value < 1.0:
        raise UsageError(f"target-{kind} must be a fraction of the original in (0, 1), got {fraction!r}")
    return value


# ---------------------------------------------------------------------------- group states
@dataclass
class GroupState:
    """One prunable group during allocation: its removal order, allowed steps and losses."""

    group: ChannelGroup
    order: np.ndarray  # removable units, least important first
    steps: list[int]  # allowed numbers of removed units, ascending, starting at 0
    loss: np.ndarray  # loss[m]: importance lost by removing order[:m]
    kind: str = ""
    index: int = 0  # position in ``steps``
    #: groups tied to this one (a shape literal they share must hold one size): they lose
    #: the same number of units, each in its own order
    extra: list[tuple[ChannelGroup, np.ndarray]] = field(default_factory=list)

    @property
    def members(self) -> list[tuple[ChannelGroup, np.ndarray]]:
        return [(self.group, self.order), *self.extra]

    @property
    def removed(self) -> int:
        return self.steps[self.index]

    @property
    def kept(self) -> int:
        return self.group.num_units - self.removed

    def next_step(self) -> int | None:
        return self.steps[self.index + 1] if self.index + 1 < len(self.steps) else None


def removal_order(group: ChannelGroup, scores: np.ndarray, limit: int, min_channels: int = 1) -> np.ndarray:
    """Units in the order the planner would remove them, at most ``limit``: lowest score
    first, skipping a unit whose removal would leave a member with fewer than its floor
    (:func:`graphprune.planning.planner.select_units`; a prefix of this order is exactly
    what ``select_units`` returns for that count)."""
    order = np.argsort(scores, kind="stable")
    remaining: list[int] = []
    floors: list[int] = []
    unit_members: list[list[int]] = [[] for _ in range(group.num_units)]
    for labels in group.unit_of.values():
        units = np.unique(labels[labels >= 0])  # -1: pinned elements, never removed
        index = len(remaining)
        remaining.append(len(units))
        floors.append(max(min(min_channels, len(units)) if len(units) > 1 else len(units), 1))
        for u in units:
            unit_members[int(u)].append(index)
    out: list[int] = []
    for u in order:
        if len(out) >= limit:
            break
        touched = unit_members[int(u)]
        if any(remaining[m] - 1 < floors[m] for m in touched):
            continue
        for m in touched:
            remaining[m] -= 1
        out.append(int(u))
    return np.asarray(out, dtype=np.int64)


def allowed_steps(units: int, removable: int, align: int, min_channels: int) -> list[int]:
    """Removal counts whose kept count is a multiple of ``align`` (and >= the floors)."""
    steps = [0]
    floor = max(align, min_channels, 1)
    for kept in range(units - 1, 0, -1):
        removed = units - kept
        if removed > removable:
            break
        if kept % align == 0 and kept >= floor:
            steps.append(removed)
    return steps


def data_free_loss(scores: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Cumulative importance of a removal prefix as a share of the group: each unit weighs
    its score over the group's mean score, divided by the group's size, and more the less
    of the group is left (``1 / kept_fraction**2``): a layer's damage grows faster than
    linearly as it narrows, which keeps the allocation from emptying the layers that are
    cheapest per unit of importance."""
    scores = np.asarray(scores, dtype=np.float64)
    mean = float(np.mean(scores)) if scores.size else 0.0
    normed = scores / mean if mean > 0 else np.ones_like(scores)
    n = max(scores.size, 1)
    kept = (n - np.arange(1, len(order) + 1)) / n
    # per unit of the group's *fraction*: a layer that loses a quarter of its channels loses
    # about a quarter of its signal whether it has 32 or 512 of them
    return np.concatenate([[0.0], np.cumsum(normed[order] / np.maximum(kept, 1.0 / n) ** 2)]) / n


def curve_loss(ratios: Sequence[float], deviations: Sequence[float], units: int,
               order: np.ndarray) -> np.ndarray:
    """Loss per removal count interpolated from a measured deviation curve (monotone)."""
    ratios = np.asarray([0.0, *ratios], dtype=np.float64)
    values = np.maximum.accumulate(np.asarray([0.0, *deviations], dtype=np.float64))
    m = np.arange(len(order) + 1, dtype=np.float64) / max(units, 1)
    # past the last measured ratio: extend with the last slope
    slope = (values[-1] - values[-2]) / max(ratios[-1] - ratios[-2], 1e-9) if len(values) > 1 else 0.0
    out = np.interp(m, ratios, values)
    beyond = m > ratios[-1]
    out[beyond] = values[-1] + max(slope, 0.0) * (m[beyond] - ratios[-1])
    return out


# ---------------------------------------------------------------------------- cost model
def _is_parameter(tensor: gs.Tensor) -> bool:
    """A constant of an element type the parameter count counts (:func:`count_params`)."""
    return isinstance(tensor, gs.Constant) and tensor.dtype is not None and is_parameter_dtype(tensor.dtype)


def _parameters_per_element(graph: gs.Graph, opset: int) -> dict[str, float]:
    """Constants that pack several parameters into an element (a 4-bit weight, two to a byte:
    :meth:`OpRule.packed_parameters`), by name: parameters per element."""
    out: dict[str, float] = {}
    for node in graph.nodes:
        rule = registry.packing_rule(node.domain or "", node.op, opset)
        if rule is None:
            continue
        for index, count in rule.packed_parameters(node.attrs, [bool(t.name) for t in node.inputs]).items():
            tensor = node.inputs[index] if index < len(node.inputs) else None
            if isinstance(tensor, gs.Constant) and tensor.shape is not None:
                out[tensor.name] = count / max(math.prod(tensor.shape), 1)
    return out


class CostModel:
    """The graph's cost as a function of how many units each group has lost.

    ``kind``: ``macs`` (the rules' MAC counts), ``params`` (parameters of float and 8-bit
    constants, packed ones counted per parameter) or
    ``latency`` (``node_time[id(node)]`` seconds at full width, scaled by the node's work: its
    MACs where the rule counts them, else its output elements); ``shape_of``: full shapes."""

    def __init__(self, analysis: Analysis, states: list[GroupState], kind: str,
                 node_time: dict[int, float] | None = None,
                 shape_of: Callable[[gs.Tensor], list[int] | None] | None = None) -> None:
        if kind not in TARGET_KINDS:
            raise UsageError(f"unknown target '{kind}'")
        self.kind = kind
        self.shape_of = shape_of or counted_shape  # full-width shapes (verify.metrics.sized_shapes)
        self.analysis = analysis
        self.states = states
        self.node_time = node_time or {}
        tensors = analysis.context.tensors
        # per member dimension: (state index, elements removed after the first m units, its
        # elements as the analysis labelled them)
        self.dim_cum: dict[Dim, tuple[int, np.ndarray, int]] = {}
        for si, st in enumerate(states):
            for group, order in st.members:
                n_rem = len(order)
                position = np.full(group.num_units, n_rem, dtype=np.int64)
                position[order] = np.arange(n_rem)
                for dim, labels in group.unit_of.items():
                    pos = position[labels[labels >= 0]]  # pinned elements always stay
                    counts = np.bincount(pos[pos < n_rem], minlength=n_rem)
                    self.dim_cum[dim] = (si, np.concatenate([[0], np.cumsum(counts)]), len(labels))
        self.items: list[Any] = []
        self.items_of: list[set[int]] = [set() for _ in states]
        self._build_items(tensors)
        self.base = np.array([self._full_cost(i) for i in range(len(self.items))], dtype=np.float64)
        self.current = np.array([self.item_cost(i) for i in range(len(self.items))], dtype=np.float64)
        self.neighbours: list[set[int]] = [set() for _ in states]
        owners: dict[int, set[int]] = {}
        for si, items in enumerate(self.items_of):
            for i in items:
                owners.setdefault(i, set()).add(si)
        for si, items in enumerate(self.items_of):
            for i in items:
                self.neighbours[si] |= owners[i]
            self.neighbours[si].discard(si)

    # ------------------------------------------------------------------ items
    def _build_items(self, tensors: dict[str, gs.Tensor]) -> None:
        graph = self.analysis.graph
        if self.kind == "params":
            consts = [t for t in graph.tensors().values() if _is_parameter(t)]
            self.per_element = _parameters_per_element(graph, self.analysis.opset)
            index = {t.name: i for i, t in enumerate(consts)}
            self.items = consts
            for si, st in enumerate(self.states):
                for dim in (d for g, _ in st.members for d in g.dims):
                    if dim[0] in index:
                        self.items_of[si].add(index[dim[0]])
            return
        opset = self.analysis.opset
        nodes = list(graph.nodes)
        index = {id(n): i for i, n in enumerate(nodes)}
        self.items = [(n, registry.lookup(n.domain or "", n.op, opset)) for n in nodes]
        for si, st in enumerate(self.states):
            for dim in (d for g, _ in st.members for d in g.dims):
                t = tensors.get(dim[0])
                if t is None:
                    continue
                for n in list(t.inputs) + list(t.outputs):
                    if id(n) in index:
                        self.items_of[si].add(index[id(n)])

    def shape(self, tensor: gs.Tensor) -> list[int] | None:
        base = self.shape_of(tensor)
        if base is None:
            return None
        for axis in range(len(base)):
            entry = self.dim_cum.get((tensor.name, axis))
            if entry is not None:
                si, cum, labelled = entry
                removed = int(cum[self.states[si].removed])
                if labelled and base[axis] != labelled:
                    # an axis that merges an open size with the units (a TorchScript attention's
                    # batch x heads) was labelled at the analysis' probe size: the share removed
                    removed = round(removed * base[axis] / labelled)
                base[axis] = max(base[axis] - removed, 0)
        return base

    def _work(self, i: int, shape: Callable[[gs.Tensor], list[int] | None]) -> float:
        node, rule = self.items[i]
        macs = rule.macs(node, shape) if rule is not None else None
        if macs:
            return float(macs)
        total = 0.0
        for t in node.outputs:
            s = shape(t)
            if s is not None:
                total += float(math.prod(s))
        return total

    def _full_cost(self, i: int) -> float:
        return self._cost(i, self.shape_of)

    def _cost(self, i: int, shape: Callable[[gs.Tensor], list[int] | None]) -> float:
        if self.kind == "params":
            s = shape(self.items[i])
            return float(math.prod(s)) * self.per_element.get(self.items[i].name, 1.0) if s is not None else 0.0
        node, rule = self.items[i]
        if self.kind == "macs":
            macs = rule.macs(node, shape) if rule is not None else None
            return float(macs or 0)
        seconds = self.node_time.get(id(node), 0.0)
        if seconds <= 0:
            return 0.0
        full = getattr(self, "_full_work", {}).get(i)
        if full is None:
            full = self._work(i, self.shape_of)
            self.__dict__.setdefault("_full_work", {})[i] = full
        return seconds * (self._work(i, shape) / full if full > 0 else 1.0)

    def item_cost(self, i: int) -> float:
        return self._cost(i, self.shape)

    # ------------------------------------------------------------------ totals
    @property
    def full_total(self) -> float:
        return float(self.base.sum())

    @property
    def total(self) -> float:
        return float(self.current.sum())

    def step_saving(self, si: int, to: int) -> float:
        """Cost saved if state ``si`` went to ``to`` removed units (others unchanged)."""
        st = self.states[si]
        old = st.index
        st.index = st.steps.index(to)
        try:
            return float(sum(self.current[i] - self.item_cost(i) for i in self.items_of[si]))
        finally:
            st.index = old

    def set_index(self, si: int, index: int) -> None:
        self.states[si].index = index
        for i in self.items_of[si]:
            self.current[i] = self.item_cost(i)


# ---------------------------------------------------------------------------- allocation
@dataclass
class Allocation:
    target: float  # fraction of the full cost asked for
    full: float
    achieved: float  # the cost model's fraction after allocation
    reached: bool
    steps_taken: int
    widths: list[dict[str, Any]] = field(default_factory=list)
    #: widths kept to multiples of ORT's fast kernels where the group is large enough
    #: (``False``: :func:`graphprune.planning.search.unaligned` allowed any width to land near the goal)
    aligned: bool = True


#: a landing further than this share of the full cost below the goal is refined
LANDING_SLACK = 0.01
#: how near the goal a landing meets it (the reports' ``met``), at most; and as a share of a
#: small goal (:func:`met_within`: ``--target-macs 0.02`` reported 0.040 met, twice the goal)
MET_WITHIN = 0.03
MET_RELATIVE = 0.1


def met_within(fraction: float) -> float:
    """How near the goal ``fraction`` a landing meets it: :data:`MET_WITHIN`, or
    :data:`MET_RELATIVE` of the goal where that is less."""
    return min(MET_WITHIN, MET_RELATIVE * max(fraction, 0.0))


def take_steps(model: CostModel, goal: float, frozen: frozenset[int] = frozenset()) -> int:
    """Take the cheapest-loss steps (not of ``frozen`` states) until the cost is <= ``goal``."""
    version = [0] * len(model.states)
    heap: list[tuple[float, int, int]] = []

    def push(si: int) -> None:
        st = model.states[si]
        nxt = st.next_step()
        if nxt is None or si in frozen:
            return
        saving = model.step_saving(si, nxt)
        dloss = float(st.loss[nxt] - st.loss[st.removed])
        priority = dloss / saving if saving > 0 else math.inf
        heapq.heappush(heap, (priority, si, version[si]))

    for si in range(len(model.states)):
        push(si)
    taken = 0
    while model.total > goal + 1e-9 and heap:
        priority, si, ver = heapq.heappop(heap)
        if ver != version[si] or math.isinf(priority):
            continue  # stale, or the group saves nothing at its next step
        model.set_index(si, model.states[si].index + 1)
        taken += 1
        version[si] += 1
        push(si)
        for other in model.neighbours[si]:
            version[other] += 1
            push(other)
    return taken


def fraction_at(analysis: Analysis, states: list[GroupState], kind: str, removed: dict[int, int],
                shape_of: Callable[[gs.Tensor], list[int] | None] | None = None) -> float:
    """The modelled cost (a fraction of the full one) with ``removed[group id]`` units removed
    from each state's group (where a count is not an allowed step: the nearest one below)."""
    import bisect

    model = CostModel(analysis, states, kind, None, shape_of)
    for si, st in enumerate(states):
        model.set_index(si, max(0, bisect.bisect_right(st.steps, removed.get(st.group.id, 0)) - 1))
    fraction = model.total / model.full_total if model.full_total > 0 else 1.0
    for si in range(len(states)):
        model.set_index(si, 0)
    return fraction


def snapshot(model: CostModel) -> list[int]:
    return [st.index for st in model.states]


def restore(model: CostModel, indexes: list[int]) -> None:
    for si, index in enumerate(indexes):
        if model.states[si].index != index:
            model.set_index(si, index)


def _loss(model: CostModel) -> float:
    return float(sum(st.loss[st.removed] for st in model.states))


def allocate(model: CostModel, fraction: float, above: float = 0.0) -> Allocation:
    """Take the cheapest-loss steps until the modelled cost is at most ``fraction`` of full,
    give back what the last steps made unnecessary, and, when coarse steps (grouped convs,
    heads) land far below the goal, try undoing each taken step and filling the gap with
    other groups instead (the landing nearest the goal wins, then the smaller loss). With
    ``above > 0`` a last undone step may land up to ``above`` (a share of the full cost)
    over the goal when that is nearer to it than the best landing below (up to
    :func:`met_within` when the landing below misses the goal by more than that)."""
    full = model.full_total
    goal = fraction * full
    taken = take_steps(model, goal)
    taken -= give_back(model, goal)
    if model.total <= goal + 1e-9 and goal - model.total > LANDING_SLACK * full:
        best = (goal - model.total, _loss(model), snapshot(model))
        start = best[2]
        for si, index in enumerate(start):
            if index == 0:
                continue
            model.set_index(si, index - 1)
            take_steps(model, goal, frozenset({si}))
            give_back(model, goal)
            if model.total <= goal + 1e-9:
                option = (goal - model.total, _loss(model), snapshot(model))
                if (option[0], option[1]) < (best[0], best[1]):
                    best = option
            restore(model, start)
        restore(model, best[2])
    if above > 0 and model.total <= goal + 1e-9 and goal - model.total > LANDING_SLACK * full:
        nearer = None
        if goal - model.total > met_within(fraction) * full:  # the landing below misses: one that meets
            above = max(above, met_within(fraction) - 1e-6)
        for si, st in enumerate(model.states):
            if st.index:
                over = model.total + undo_cost(model, si) - goal
                if 0 < over <= above * full and over < goal - model.total and (nearer is None or over < nearer[0]):
                    nearer = (over, si)
        if nearer is not None:
            model.set_index(nearer[1], model.states[nearer[1]].index - 1)
    achieved = model.total / full if full > 0 else 1.0
    return Allocation(target=fraction, full=full, achieved=achieved,
                      reached=model.total <= goal + above * full + 1e-9, steps_taken=sum(snapshot(model)),
                      widths=width_table(model.states))


def undo_cost(model: CostModel, si: int) -> float:
    """Cost added back if state ``si`` went one step back."""
    st = model.states[si]
    old = st.index
    st.index = old - 1
    try:
        return float(sum(model.item_cost(i) - model.current[i] for i in model.items_of[si]))
    finally:
        st.index = old


def give_back(model: CostModel, goal: float) -> int:
    """Undo steps the last greedy steps made unnecessary, as long as the cost stays within
    ``goal`` (most importance recovered per unit of cost first)."""
    undone = 0
    while True:
        best = None
        for si, st in enumerate(model.states):
            if st.index == 0:
                continue
            added = undo_cost(model, si)
            if model.total + added > goal + 1e-9:
                continue
            gain = float(st.loss[st.removed] - st.loss[st.steps[st.index - 1]])
            value = gain / added if added > 0 else math.inf
            if best is None or value > best[0]:
                best = (value, si)
        if best is None:
            break
        model.set_index(best[1], model.states[best[1]].index - 1)
        undone += 1
    return undone


def width_table(states: list[GroupState]) -> list[dict[str, Any]]:
    return [
        {"group": group.id, "anchor": f"{group.anchor[0]}:{group.anchor[1]}",
         "kind": st.kind, "units": group.num_units, "kept": st.kept,
         "removed_fraction": round(st.removed / max(group.num_units, 1), 4),
         **({"tied_to": st.group.id} if group is not st.group else {})}
        for st in states for group, _ in st.members
    ]


def tied_groups(analysis: Analysis) -> list[list[ChannelGroup]]:
    """Classes of groups that share a tracked shape literal (one element of one shape input
    of one node, e.g. a head count in a Reshape shape that an exporter shared between
    layers): the literal can hold only one size, so they must keep the same width."""
    parent = {g.id: g.id for g in analysis.groups}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner: dict[tuple[str, int, int], int] = {}
    for group in analysis.groups:
        for se in group.shape_elements:
            key = (se.node_name, se.input_index, se.element)
            if key in owner:
                parent[find(group.id)] = find(owner[key])
            else:
                owner[key] = group.id
    classes: dict[int, list[ChannelGroup]] = {}
    for group in analysis.groups:
        classes.setdefault(find(group.id), []).append(group)
    return [c for c in classes.values() if len(c) > 1]


def build_states(
    analysis: Analysis,
    scores_of: Callable[[ChannelGroup], np.ndarray],
    *,
    eligible: Callable[[ChannelGroup], bool],
    kinds: dict[int, str] | None = None,
    round_to: int | None = None,
    min_channels: int = 1,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> list[GroupState]:
    """One state per prunable, eligible group; groups tied by a shared shape literal move
    together as one state (left whole when they differ in size or one of them cannot move)."""
    states = []
    tensors = analysis.context.tensors
    tied: dict[int, list[ChannelGroup]] = {}
    for cls in tied_groups(analysis):
        for g in cls:
            tied[g.id] = cls
    done: set[int] = set()
    for group in analysis.groups:
        if group.id in done:
            continue
        members = tied.get(group.id, [group])
        done.update(g.id for g in members)
        if not all(g.prunable and eligible(g) for g in members):
            continue
        n = group.num_units
        if any(g.num_units != n for g in members):
            continue
        limit = min(n - 1, int(math.floor(max_ratio * n + 1e-9)))
        align = group_round_to(group) if round_to is None else round_to
        orders, loss = [], np.zeros(1)
        for g in members:
            scores = np.asarray(scores_of(g), dtype=np.float64)
            order = removal_order(g, scores, limit, min_channels)
            orders.append(order)
            # a residual-stream unit is a channel of every block it passes through, and what
            # one block loses with it the next reads again: it weighs more than the weights it
            # spans (their count ** SPAN_EXPONENT; docs/budgets.md, "round 62")
            part = data_free_loss(scores, order) * max(len(weight_members(g, tensors)), 1) ** SPAN_EXPONENT
            size = min(len(loss), len(part)) if len(loss) > 1 else len(part)
            loss = (loss[:size] if len(loss) > 1 else np.zeros(size)) + part[:size]
        removable = min(len(o) for o in orders)
        steps = allowed_steps(n, removable, align, min_channels)
        if len(steps) < 2:
            continue
        states.append(GroupState(group=group, order=orders[0][:removable], steps=steps,
                                 loss=loss[: removable + 1], kind=(kinds or {}).get(group.id, ""),
                                 extra=[(g, o[:removable]) for g, o in zip(members[1:], orders[1:], strict=True)]))
    return states


def to_plan(analysis: Analysis, states: list[GroupState], meta: dict[str, Any]) -> Plan:
    tensors = analysis.context.tensors
    plan = Plan(meta=dict(meta))
    for st in states:
        if st.removed:
            for group, order in st.members:
                plan.groups.append(group_plan(group, sorted(int(u) for u in order[: st.removed]), tensors))
    return plan
