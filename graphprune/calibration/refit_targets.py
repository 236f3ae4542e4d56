"""Which linear layers a refit rewrites, and in which order (waves).

:func:`find_targets` lists every linear layer downstream of a pruning change that the refit
of :mod:`graphprune.calibration.sequential` can rewrite, with the original output channels
it still computes, the rows of its output that remain, the residual addition it is refit
towards, and the layers sharing its weight (one joint fit); the others are named with the
reason. Waves order them: a layer is refit after every target its input depends on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.calibration.linear import LinearView, linear_view
from graphprune.calibration.residual import Residual, residual_of

#: most inputs per output (channels x kernel per conv group) a layer is refit with: its
#: two Gram folds take 16 K^2 bytes (1 GB here) and each solve K^3 / 3 (CREPE's 1,024-channel
#: conv with a 64-tap kernel has K = 65,537: 69 GB). Beyond it the layer is bias-compensated
#: (:func:`too_large`, ``pipeline/calibrated.py``)
MAX_REFIT_INPUTS = 8192


def refit_inputs(view: LinearView) -> int:
    """Inputs per output of the least-squares problem (with the bias column)."""
    return view.in_channels() * view.kernel_size() // max(view.group, 1) + 1


def too_large(view: LinearView) -> str | None:
    """Why ``view`` is too large to refit (``None``: it is not)."""
    k = refit_inputs(view)
    if k - 1 <= MAX_REFIT_INPUTS:  # CREPE's 128 channels x 64 taps are refit
        return None
    return (f"{k - 1} inputs per output (channels x kernel) exceed the refit's {MAX_REFIT_INPUTS} "
            f"(a {k} x {k} Gram): bias-compensated instead")


@dataclass
class Target:
    view: LinearView
    index: int
    wave: int = 0
    #: original output channels that the pruned layer still computes (``None``: all)
    kept: np.ndarray | None = None
    #: the residual addition after the layer (refit target on the stream, see .residual)
    residual: Residual | None = None
    #: removed elements per row axis of a dense layer's output (``None``: rows unchanged;
    #: e.g. a token-mixing MatMul whose rows are the pruned channels)
    row_cuts: dict[int, np.ndarray] | None = None
    #: the weight this layer shares with other targets (one joint fit of all their rows)
    share: str | None = None
    #: the layers sharing the weight read one another's outputs (a recurrence unrolled over
    #: its steps): they are fit on the ORIGINAL model's inputs, less the channels in
    #: :attr:`input_cut` (a fit on the pruned model's own steps feeds its error back)
    recurrent: bool = False
    #: elements that pruning removed from the layer's input, per axis (as the analysis
    #: recorded them), and its input channels cut as the weight's input axis says (used where
    #: the input's channel axis is not recorded)
    input_cut: dict[int, np.ndarray] | None = None
    channel_cut: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.view.node.name

    @property
    def key(self) -> int | str:
        """What its statistics accumulate under: the layer, or the weight it shares."""
        return self.index if self.share is None else self.share


def affected_tensors(graph: gs.Graph, changed: set[str]) -> set[str]:
    """Names of tensors computed from a node that reads a changed parameter."""
    affected: set[str] = set()
    for node in graph.nodes:  # topological order
        if any(t.name in changed or t.name in affected for t in node.inputs):
            affected.update(o.name for o in node.outputs)
    return affected


def find_targets(
    graph: gs.Graph,
    opset: int,
    *,
    changed: set[str],
    removed: dict[tuple[str, int], np.ndarray],
    consumers_only: bool = False,
    skipped: dict[str, str] | None = None,
    residual_targets: bool = True,
    shared: bool = False,
) -> list[Target]:
    """Linear layers whose input differs from the original's, in waves.

    ``changed``: parameter tensors the pruning sliced; ``removed``: element indices removed
    per ``(tensor, axis)``; ``consumers_only``: only layers whose own input channels were
    cut (default: every linear layer downstream of a change); ``residual_targets``: a layer
    followed by a residual addition is refit towards the original stream after the
    addition (:mod:`.residual`); ``shared``: the layers of a weight that several linear
    layers read are refit together (:attr:`Target.share`: one least-squares problem over
    all their rows, solved in one wave; otherwise they are not refit).
    """
    skipped = {} if skipped is None else skipped
    affected = affected_tensors(graph, changed)
    uses: dict[str, int] = defaultdict(int)
    for node in graph.nodes:
        for t in node.inputs:
            uses[t.name] += 1
    views = {node.name: linear_view(node, opset) for node in graph.nodes}
    shares = _shared_weights(graph, views, uses, affected) if shared else {}
    targets: list[Target] = []
    for node in graph.nodes:
        view = views[node.name]
        if view is None:
            reason = _not_refit(node, opset, affected)
            if reason:
                skipped[node.name] = reason
            continue
        wname = view.weight.name
        if view.data.name not in affected and wname not in shares:
            continue
        if consumers_only and view.weight_dim(view.info.in_axis) not in removed:
            continue
        if uses[wname] > 1 and wname not in shares:
            skipped[node.name] = (f"weight '{wname}' is shared by several nodes (refit together only when all "
                                  "of them are float linear layers of one kind and nothing else reads it)")
            continue
        large = too_large(view)
        if large:
            skipped[node.name] = large
            continue
        cut = removed.get(view.weight_dim(view.info.out_axis))
        kept = None
        if cut is not None and len(cut):
            total = view.out_channels() + len(cut)
            kept = np.setdiff1d(np.arange(total), cut)
        rows = _row_cuts(view, removed, kept is not None)
        if isinstance(rows, str):
            skipped[node.name] = rows
            continue
        share = wname if wname in shares else None
        residual = (residual_of(view, opset) if kept is None and rows is None and share is None
                    and residual_targets and not view.rectified else None)
        targets.append(Target(view, len(targets), kept=kept, residual=residual, row_cuts=rows, share=share))
    targets = _complete_shares(targets, shares, skipped)
    _assign_waves(graph, targets)
    for t in [t for t in targets if t.share is not None and t.wave < 0]:
        skipped[t.name] = (f"weight '{t.share}' is shared by layers that read each other's outputs "
                           "(no joint fit): not refit")
    for t in targets:
        if t.recurrent and t.row_cuts:  # the original's rows are not the pruned model's
            t.wave = -1
        elif t.recurrent and t.wave >= 0:
            cut = removed.get(t.view.weight_dim(t.view.info.in_axis))
            t.input_cut = {axis: idx for (name, axis), idx in removed.items() if name == t.view.data.name}
            t.channel_cut = t.view.input_channels(cut if cut is not None else np.zeros(0, np.int64))
    targets = [t for t in targets if t.wave >= 0]
    for index, t in enumerate(targets):
        t.index = index
    return targets


def _shared_weights(graph: gs.Graph, views: dict[str, LinearView | None], uses: dict[str, int],
                    affected: set[str]) -> dict[str, int]:
    """Weights read by several linear layers of one kind and nothing else (a detection head
    applied to every level of a feature pyramid, a siamese branch), at least one of which
    reads a changed tensor: their layers are refit together. Name -> number of readers."""
    readers: dict[str, list[LinearView]] = defaultdict(list)
    for view in views.values():
        if view is not None and uses[view.weight.name] > 1:
            readers[view.weight.name].append(view)
    shares: dict[str, int] = {}
    for name, group in readers.items():
        first = group[0]
        same = all(_same_storage(v, first) and v.info.kernel == first.info.kernel and v.group == first.group
                   and v.info.in_axis == first.info.in_axis and v.info.out_axis == first.info.out_axis
                   and v.info.alpha == first.info.alpha and v.bias_fixed == first.bias_fixed
                   and list(v.node.inputs).count(v.weight) == 1 for v in group)
        if same and len(group) == uses[name] and any(v.data.name in affected for v in group):
            shares[name] = len(group)
    return shares


def _same_storage(view: LinearView, first: LinearView) -> bool:
    """Both read a float weight, or decode the same stored constants the same way (an int8
    weight that quantize_dynamic's unrolled time-distributed layer reads 21 times: one fit,
    written once on its grid)."""
    if view.stored is None or first.stored is None:
        return view.stored is None and first.stored is None
    return type(view.stored) is type(first.stored) and [id(c) for c in view.stored.constants()] == [
        id(c) for c in first.stored.constants()]


def _complete_shares(targets: list[Target], shares: dict[str, int], skipped: dict[str, str]) -> list[Target]:
    """Drop the layers of a shared weight when not all of its readers became targets."""
    count: dict[str, int] = defaultdict(int)
    for t in targets:
        if t.share is not None:
            count[t.share] += 1
    out = []
    for t in targets:
        if t.share is not None and count[t.share] != shares[t.share]:
            skipped.setdefault(t.name, f"weight '{t.share}' is shared with layers that are not refit: not refit")
            continue
        out.append(t)
    return out


def _row_cuts(view: LinearView, removed: dict[tuple[str, int], np.ndarray], channel_cut: bool
              ) -> dict[int, np.ndarray] | str | None:
    """Removed elements per axis of ``view``'s output when some of them run along its rows
    (a token-mixing MatMul reading pruned channels as rows), or why such a layer is not
    refit. The rows are the axes before the last (resolved when the output is read)."""
    axes = {axis: cut for (tensor, axis), cut in removed.items() if tensor == view.output.name and len(cut)}
    if view.is_conv:
        if any(axis != 1 for axis in axes):
            return ("the pruned channels run along the positions of its output, which the refit "
                    "cannot map: not refit")
        return None
    if len(axes) <= int(channel_cut):
        return None  # at most the output channels' own cut
    return axes


def _not_refit(node: gs.Node, opset: int, affected: set[str]) -> str | None:
    """Why a linear layer downstream of a change is not refit (``None``: not such a layer)."""
    from graphprune.rules import registry

    rule = registry.lookup(node.domain or "", node.op, opset)
    info = rule.linear(node) if rule is not None else None
    if info is None or info.data >= len(node.inputs) or node.inputs[info.data].name not in affected:
        return None
    weight = node.inputs[info.weight] if info.weight < len(node.inputs) else None
    if not isinstance(weight, gs.Constant):
        return ("its weight is computed in the graph in a way the refit cannot write back (it writes "
                "constants, DequantizeLinear of integer constants and Mul(Cast(integer), scale)): not refit")
    if not np.issubdtype(np.asarray(weight.values).dtype, np.floating):
        return f"{node.op} has an integer weight: not refit"
    if info.kernel == "conv_transpose":
        return (f"{node.op} is refit only ungrouped with explicit pads (its padding here comes from "
                "output_shape or SAME auto-padding, or it is grouped): not refit")
    return f"{node.op} is not refit (no least-squares view of this layer kind)"


#: passes that may move the readers of shared weights to a common wave (each pass moves every
#: share apart to its latest reader; readers that read one another never settle)
MAX_WAVE_ROUNDS = 16


def _assign_waves(graph: gs.Graph, targets: list[Target]) -> None:
    """A target's wave is one more than the latest wave its input depends on; the layers of
    a shared weight are fit together, in the latest of their waves.

    Readers of a shared weight that read one another's outputs (a recurrence unrolled over
    its steps: a decoder reads one weight at every step) never settle so: they are marked
    :attr:`Target.recurrent` and fit together in the wave of their earliest reader, on the
    original's inputs. Where even that leaves a share apart, its wave is -1."""
    pinned: dict[str, int] = {}
    for _ in range(2):
        unequal = _settle(graph, targets, pinned)
        if not unequal:
            return
        for t in targets:
            if t.share in unequal:
                pinned[t.share] = min(pinned.get(t.share, t.wave), t.wave)
                t.recurrent = True
    for t in targets:  # still apart: given up
        if t.share in unequal:
            t.wave = -1


def _settle(graph: gs.Graph, targets: list[Target], pinned: dict[str, int]) -> set[str]:
    """Waves from the inputs' depths, each share moved to its latest reader (a ``pinned``
    share stays at its wave); the shares whose readers stay apart (at their first waves)."""
    by_node = {t.name: t for t in targets}
    forced: dict[str, int] = {}
    first: dict[str, int] = {}
    unequal: set[str] = set()
    for round_ in range(min(len(targets) + 1, MAX_WAVE_ROUNDS)):
        depth: dict[str, int] = {}
        for node in graph.nodes:
            level = max((depth.get(t.name, 0) for t in node.inputs), default=0)
            target = by_node.get(node.name)
            if target is not None:
                target.wave = pinned[target.share] if target.share in pinned else max(
                    depth.get(target.view.data.name, 0) + 1, forced.get(target.share or "", 0))
                level = max(level, target.wave)
            for out in node.outputs:
                depth[out.name] = level
        if not round_:
            first = {t.name: t.wave for t in targets}
        latest: dict[str, int] = defaultdict(int)
        for t in targets:
            if t.share is not None:
                latest[t.share] = max(latest[t.share], t.wave)
        unequal = {t.share for t in targets if t.share is not None and t.wave != latest[t.share]}
        if not unequal:
            return unequal
        forced.update({name: latest[name] for name in unequal})
    for t in targets:
        if t.share in unequal:
            t.wave = first[t.name]
    return unequal
