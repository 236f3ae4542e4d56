"""Lossless pruning and depth pruning.

Lossless mode (:func:`prune_lossless`) removes only what provably does not change the function,
round after round until nothing is left to remove:

1. **Erase operators** (:class:`~graphprune.passes.erase_operators.EraseOperatorsPass`): a
   branch whose output is identically known is replaced at its frontier (``Add(x, 0) -> x``,
   a constant branch becomes a per-channel constant), and its producing chain dies.
2. **Fold constants**: a unit whose consumers all read a known constant ``c`` (``Sigmoid(0)``,
   a BN shift, a Conv bias) gets ``c`` folded into each consumer's bias
   (``b[o] += c sum_k W[o, u, k]``, exact for an unpadded Conv and for Gemm) and the consumer's
   weights for ``u`` zeroed — which makes the unit a zero unit.
3. **Remove zero units** (:func:`graphprune.analysis.zero_analysis.find_zero_groups`): units whose
   consumers all read zero (or have zero weights) are removed with the channel-removal pass.
   A group is never emptied: a Concat input that would lose every channel is dropped from the
   Concat instead, and where that is not possible one unit is kept.

The result is compared with the original on random inputs; a relative difference above the
tolerance raises :class:`~graphprune.errors.VerificationError`.

Depth pruning (:func:`erase_blocks`) finds residual blocks — ``Add(x, branch(x))`` where the
branch starts at the other operand — scores each branch data-free by an estimate of its
output scale from its weights, and erases the least important ones (``Add -> x``).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.io import ir
from graphprune.io import model_io
from graphprune.analysis import Analysis, ChannelGroup, Dim, analyze_graph
from graphprune.errors import UsageError, VerificationError
from graphprune.io.feeds import make_feeds
from graphprune.verify.metrics import count_macs, count_params
from graphprune.passes.base import PassContext
from graphprune.passes.cleanup import DeadCodeEliminationPass, IdentityEliminationPass
from graphprune.passes.erase_operators import EraseOperatorsPass
from graphprune.passes.prune_channels import PruneChannelsPass
from graphprune.planning.plan import GroupPlan, Plan
from graphprune.planning.planner import group_plan
from graphprune.analysis.roles import CHANNELWISE, PRODUCER
from graphprune.verify.validate import check_model, differences, output_shapes_match, run, session
from graphprune.analysis.zero_analysis import (
    GroupZeros,
    analyze_constants,
    consumer_nodes,
    find_zero_groups,
)

Progress = Callable[[str], None]

#: lossless verification tolerance on the relative output difference
LOSSLESS_TOLERANCE = 1e-5
#: rounds of erase / fold / remove before giving up on a fixed point
MAX_ROUNDS = 25

__all__ = [
    "LOSSLESS_TOLERANCE",
    "PlantRecord",
    "ResidualBlock",
    "branch_scale",
    "propagate_rms",
    "relative_branch_scales",
    "erase_blocks",
    "find_residual_blocks",
    "plant_zeros",
    "prune_lossless",
]


class _Timer:
    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.timings: dict[str, float] = defaultdict(float)
        self.start = time.perf_counter()

    def stage(self, name: str) -> _Stage:
        if self.progress is not None:
            self.progress(name)
        return _Stage(self, name)

    def report(self) -> dict[str, float]:
        out = {k: round(v, 4) for k, v in self.timings.items()}
        out["total"] = round(time.perf_counter() - self.start, 4)
        return out


class _Stage:
    def __init__(self, timer: _Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.timings[self.name] += time.perf_counter() - self.t0


def _export(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return model_io.infer_shapes(ir.export_graph(graph, template))


# ---------------------------------------------------------------------- constant folding
def _fold_constants(graph: gs.Graph, analysis: Analysis, findings: list[GroupZeros]) -> int:
    """Fold the constants of ``constant_units`` into consumer biases; return the count."""
    tensors = analysis.context.tensors
    names = set(graph.tensors())
    folded = 0
    for info in findings:
        if not info.constant_units or info.skipped:
            continue
        removed = info.group.removed_elements(info.constant_units)
        for use, read in zip(info.consumers, info.inputs, strict=True):
            w_idx = removed.get(use.param)
            if w_idx is None or read is None or use.activation is None:
                continue
            x_idx = removed.get(use.activation)
            if x_idx is None or not np.array_equal(x_idx, w_idx):
                continue
            c = read[x_idx]
            if np.isnan(c).any():
                continue
            weight = tensors[use.param[0]]
            w = np.array(weight.values, copy=True)
            axis = use.param[1]
            taken = np.take(w, w_idx, axis=axis).astype(np.float64)
            if not (c != 0).any() or not taken.any():
                continue
            node = use.node
            if node.op == "Conv":
                delta = taken.reshape(taken.shape[0], taken.shape[1], -1).sum(axis=2) @ c
                _add_bias(node, 2, delta, names, w.dtype, beta=1.0)
            elif node.op == "Gemm":
                alpha = float(node.attrs.get("alpha", 1.0))
                beta = float(node.attrs.get("beta", 1.0))
                rows = taken.T if axis == 1 else taken  # [k, n]
                delta = alpha * (c @ rows)
                if _given(node, 2) and beta == 0.0:
                    continue
                _add_bias(node, 2, delta, names, w.dtype, beta=beta if beta != 0.0 else 1.0)
            else:
                continue
            index: list[Any] = [slice(None)] * w.ndim
            index[axis] = w_idx
            w[tuple(index)] = 0
            weight.values = w
            folded += 1
    return folded


def _given(node: gs.Node, index: int) -> bool:
    return index < len(node.inputs) and bool(node.inputs[index].name)


def _add_bias(
    node: gs.Node, index: int, delta: np.ndarray, names: set[str], dtype: np.dtype, beta: float
) -> None:
    """``node.inputs[index] += delta / beta`` as a private constant (created when absent)."""
    delta = delta / beta
    if _given(node, index):
        current = np.asarray(node.inputs[index].values).astype(np.float64)
        shape = np.broadcast_shapes(current.shape, delta.shape)
        value = (np.broadcast_to(current, shape) + delta.reshape([1] * (len(shape) - 1) + [-1]))
    else:
        value = delta
    base = f"{node.name or node.op}_gp_bias"
    name, k = base, 0
    while name in names:
        k += 1
        name = f"{base}_{k}"
    names.add(name)
    const = gs.Constant(name, np.ascontiguousarray(value.astype(dtype)))
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = const


# ---------------------------------------------------------------------- zero-unit plans
def _live_tensors(graph: gs.Graph, dropped: set[tuple[int, str]], keep: Iterable[str] = ()) -> set[str]:
    """Tensors that reach a graph output (or a kept node or tensor) once the
    (Concat node id, input) pairs are cut."""
    keep = set(keep)
    live = {t.name for t in graph.outputs} | keep
    live |= {o.name for n in graph.nodes if n.name in keep for o in n.outputs}
    for node in reversed(graph.nodes):
        if not any(o.name in live for o in node.outputs):
            continue
        for t in node.inputs:
            if t.name and (id(node), t.name) not in dropped:
                live.add(t.name)
    return live


def _plan_group(
    graph: gs.Graph,
    group: ChannelGroup,
    units: set[int],
    users: dict[str, list[gs.Node]],
    keep: Iterable[str] = (),
) -> tuple[set[int], set[tuple[int, str]]]:
    """Shrink ``units`` so that no live dimension is emptied; Concat inputs may be dropped."""
    drops: set[tuple[int, str]] = set()
    while units:
        removed = group.removed_elements(units)
        emptied = [d for d, idx in removed.items() if idx.size == group.sizes.get(d)]
        if not emptied:
            return units, set()
        drops = set()
        for name, axis in emptied:
            for node in users.get(name, []):
                if node.op == "Concat" and node.outputs[0].shape is not None:
                    rank = len(node.outputs[0].shape)
                    if int(node.attrs["axis"]) % rank == axis:
                        drops.add((id(node), name))
        live = _live_tensors(graph, drops, keep)
        offending = [d for d in emptied if d[0] in live]
        if not offending:
            return units, drops
        for dim in offending:
            units.discard(int(group.unit_of[dim][0]))
    return units, set()


def _apply_drops(graph: gs.Graph, drops: set[tuple[int, str]]) -> int:
    count = 0
    for node in graph.nodes:
        if node.op != "Concat":
            continue
        keep = [t for t in node.inputs if (id(node), t.name) not in drops]
        if len(keep) < len(node.inputs) and keep:
            count += len(node.inputs) - len(keep)
            node.inputs.clear()
            node.inputs.extend(keep)
    return count


# ---------------------------------------------------------------------- lossless entry
def prune_lossless(
    model: Any,
    *,
    verify: bool = True,
    tolerance: float = LOSSLESS_TOLERANCE,
    progress: Progress | None = None,
    keep: Iterable[str] = (),
) -> Any:
    """Remove exactly the zero-invariant channels and operators of ``model``.

    ``model`` is a path, bytes or ``onnx.ModelProto``. Returns a
    :class:`graphprune.api.PruneResult` whose model computes the same function; with
    ``verify`` the outputs are compared with the original's on random inputs and a relative
    difference above ``tolerance`` raises :class:`~graphprune.errors.VerificationError`
    (its ``result`` attribute carries the unverified result).
    """
    from graphprune.api import PruneResult, load_and_prepare

    if not isinstance(tolerance, int | float) or not tolerance >= 0:
        raise UsageError(f"tolerance must be a non-negative number, got {tolerance!r}")
    keep = tuple(keep)
    timer = _Timer(progress)
    with timer.stage("load"):
        prep = load_and_prepare(model)
    current = prep.prepared
    plan = Plan(meta={"mode": "lossless", "replayable": False})
    rounds: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    first_analysis: Analysis | None = None
    for number in range(MAX_ROUNDS):
        graph = ir.import_graph(current)
        pctx = PassContext(opset=prep.opset)
        with timer.stage("erase"):
            erased = EraseOperatorsPass(keep=keep).run(graph, pctx)
        with timer.stage("analysis"):
            analysis = analyze_graph(graph, prep.opset, keep=keep)
            constants = analyze_constants(graph, prep.opset)
            findings = find_zero_groups(analysis, constants)
        if first_analysis is None:
            first_analysis = analysis
        for info in findings:
            if info.skipped:
                anchor = f"{info.group.anchor[0]}:{info.group.anchor[1]}"
                skipped.setdefault(anchor, info.skipped)
        info_round: dict[str, Any] = {
            "round": number,
            "nodes_erased": erased.stats.get("nodes_erased", 0),
            "erase": {k: v for k, v in erased.stats.items() if k != "erased"},
        }
        plan.erase.extend(erased.stats.get("erased", []))
        with timer.stage("fold"):
            folded = _fold_constants(graph, analysis, findings)
        if folded:
            info_round["constants_folded"] = folded
            rounds.append(info_round)
            with timer.stage("export"):
                current = _export(graph, prep.prepared)
            continue
        with timer.stage("plan"):
            users = consumer_nodes(graph)
            tensors = analysis.context.tensors
            group_plans: list[GroupPlan] = []
            drops: set[tuple[int, str]] = set()
            for info in findings:
                if info.skipped or not info.zero_units:
                    continue
                units, group_drops = _plan_group(graph, info.group, set(info.zero_units), users, keep)
                if units:
                    group_plans.append(group_plan(info.group, sorted(units), tensors))
                    drops |= group_drops
        if group_plans:
            with timer.stage("prune"):
                dropped = _apply_drops(graph, drops)
                graph.cleanup(remove_unused_graph_inputs=False).toposort()
                live_nodes = {n.name for n in graph.nodes}
                for gp in group_plans:
                    group = next(g for g in analysis.groups if g.id == gp.group)
                    group.shape_elements = [s for s in group.shape_elements if s.node_name in live_nodes]
                round_plan = Plan(groups=group_plans)
                PruneChannelsPass(analysis, round_plan).run(graph, pctx)
            info_round.update(
                groups_pruned=len(group_plans),
                units_removed=round_plan.units_removed,
                concat_inputs_dropped=dropped,
            )
            plan.groups.extend(group_plans)
        rounds.append(info_round)
        if not group_plans and not erased.modified:
            break
        with timer.stage("export"):
            current = _export(graph, prep.prepared)
    else:
        raise VerificationError(f"lossless pruning did not reach a fixed point in {MAX_ROUNDS} rounds")

    with timer.stage("cleanup"):
        graph = ir.import_graph(current)
        pctx = PassContext(opset=prep.opset)
        changed = IdentityEliminationPass().run(graph, pctx).modified
        changed |= DeadCodeEliminationPass().run(graph, pctx).modified
        pruned = _export(graph, prep.prepared) if changed else current

    report: dict[str, Any] = {
        "mode": "lossless",
        "params_before": count_params(prep.prepared),
        "params_after": count_params(pruned),
        "macs_before": count_macs(prep.prepared),
        "macs_after": count_macs(pruned),
        "nodes_before": len(prep.prepared.graph.node),
        "nodes_after": len(pruned.graph.node),
        "channels": {"removed": plan.units_removed},
        "groups": {"pruned": len(plan.groups)},
        "erased_nodes": list(plan.erase),
        "constants_folded": sum(r.get("constants_folded", 0) for r in rounds),
        "rounds": rounds,
        "skipped_groups": [{"anchor": k, "why": v} for k, v in list(skipped.items())[:50]],
    }
    result = PruneResult(pruned, report, plan, first_analysis)
    _finish(result, prep.original, pruned, verify, tolerance, timer, "the original")
    return result


def _compare(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, what: str, tolerance: float
) -> dict[str, Any]:
    check_model(candidate)
    feeds_list = make_feeds(reference, seed=0, batch=1, count=2)
    ref_session = _session(reference, what)
    session = _session(candidate, "the pruned model")
    max_abs = max_rel = 0.0
    for feeds in feeds_list:
        ref_out = _run(ref_session, feeds, what)
        out = _run(session, feeds, "the pruned model")
        if not output_shapes_match(ref_out, out):
            raise VerificationError(
                f"pruned model output shapes differ from {what}: "
                f"{[o.shape for o in ref_out]} vs {[o.shape for o in out]}"
            )
        a, r = differences(ref_out, out)
        max_abs, max_rel = max(max_abs, a), max(max_rel, r)
    return {
        "ok": bool(max_rel <= tolerance),
        "checker": True,
        "ort": True,
        "output_shapes_match": True,
        "reference": what,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "tolerance": tolerance,
    }


def _session(model: onnx.ModelProto, what: str) -> Any:
    try:
        return session(model)
    except Exception as exc:
        raise VerificationError(f"{what} does not load in ONNX Runtime: {str(exc).splitlines()[0]}") from exc


def _run(sess: Any, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    try:
        return [np.asarray(v) for v in sess.run(None, feeds)]
    except Exception as exc:
        raise VerificationError(f"{what} does not run in ONNX Runtime: {str(exc).splitlines()[0]}") from exc


def _finish(
    result: Any,
    reference: onnx.ModelProto,
    pruned: onnx.ModelProto,
    verify: bool,
    tolerance: float,
    timer: _Timer,
    what: str,
) -> None:
    verification: dict[str, Any] = {"ok": None, "skipped": True}
    error: VerificationError | None = None
    if verify:
        with timer.stage("verify"):
            try:
                verification = _compare(reference, pruned, what, tolerance)
            except VerificationError as exc:
                verification = {"ok": False, "error": str(exc)}
                error = exc
    result.report["verification"] = verification
    result.report["timings"] = timer.report()
    if verify and not verification.get("ok"):
        failure = error or VerificationError(
            f"pruned model differs from {what}: max relative difference "
            f"{verification.get('max_rel_diff'):.3g} > {tolerance:g}"
        )
        failure.result = result  # type: ignore[attr-defined]
        raise failure


# ---------------------------------------------------------------------- residual blocks
@dataclass
class ResidualBlock:
    """``add = Add(skip, branch_output)`` where the branch starts at ``skip``."""

    add: str
    skip: str
    branch_output: str
    nodes: list[str]
    score: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "num_nodes": len(self.nodes)}


def _branch(graph: gs.Graph, out: gs.Tensor, start: gs.Tensor) -> list[gs.Node] | None:
    """Nodes computing ``out`` from ``start`` (and constants) alone; ``None`` if not a branch."""
    inputs = {t.name for t in graph.inputs}
    seen: dict[int, gs.Node] = {}
    stack = [out]
    visited: set[str] = set()
    while stack:
        t = stack.pop()
        if t.name in visited:
            continue
        visited.add(t.name)
        if t is start or t.name == start.name:
            continue
        if isinstance(t, gs.Constant):
            continue
        if t.name in inputs or not t.inputs:
            return None
        node = t.inputs[0]
        if id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(x for x in node.inputs if x.name)
    if start.name not in visited or not seen:
        return None
    return list(seen.values())


def find_residual_blocks(graph: gs.Graph) -> list[ResidualBlock]:
    """Every ``Add(x, branch(x))`` whose branch is self-contained (used only by the Add)."""
    graph.toposort()
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    outputs = {t.name for t in graph.outputs}
    blocks: list[ResidualBlock] = []
    for node in graph.nodes:
        if node.op not in ("Add", "Sum") or len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        a, b = node.inputs
        if not all(isinstance(t, gs.Variable) for t in (a, b)) or a is b:
            continue
        y = node.outputs[0]
        for skip, out in ((a, b), (b, a)):
            if skip.shape is None or list(skip.shape) != list(y.shape or []):
                continue
            nodes = _branch(graph, out, skip)
            if nodes is None:
                continue
            inside = {id(n) for n in nodes}
            private = all(
                all(id(c) in inside or c is node for c in o.outputs) and o.name not in outputs
                for n in nodes for o in n.outputs
            )
            if not private:
                continue
            nodes.sort(key=lambda n: order[id(n)])
            blocks.append(ResidualBlock(node.name, skip.name, out.name, [n.name for n in nodes]))
            break
    return blocks


_RELU_LIKE = ("Relu", "LeakyRelu", "Clip", "HardSwish", "Elu", "Selu", "Celu", "Gelu", "Mish", "Softplus")
_GATES = ("Sigmoid", "HardSigmoid")


def _rms(v: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(v)))) if v.size else 0.0


def _unit_rms(tensor: gs.Tensor) -> np.ndarray:
    shape = tensor.shape or []
    channels = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else 1
    return np.ones(int(channels))


def branch_scale(graph: gs.Graph, block: ResidualBlock) -> float:
    """Data-free importance: the branch's output RMS for a unit-RMS, zero-mean input."""
    skip = graph.tensors()[block.skip]
    nodes = {n.name: n for n in graph.nodes}
    rms = propagate_rms([nodes[name] for name in block.nodes], {block.skip: _unit_rms(skip)})
    return _rms(rms.get(block.branch_output, np.zeros(1)))


def relative_branch_scales(graph: gs.Graph, blocks: list[ResidualBlock]) -> list[float]:
    """Data-free importance of each block: branch output RMS over skip RMS.

    One RMS estimate is pushed through the whole graph from unit-RMS inputs, so every branch
    is judged against the size of the stream it is added to (the default depth-pruning score).
    """
    graph.toposort()
    rms = propagate_rms(list(graph.nodes), {t.name: _unit_rms(t) for t in graph.inputs})
    scores = []
    for block in blocks:
        branch = _rms(rms.get(block.branch_output, np.zeros(1)))
        skip = _rms(rms.get(block.skip, np.ones(1)))
        scores.append(branch / skip if skip > 0 else math.inf)
    return scores


def propagate_rms(nodes: list[gs.Node], rms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Push per-channel RMS estimates through ``nodes`` (in topological order).

    A Conv/Gemm/MatMul output channel gets ``sqrt(sum_i r_i^2 sum_k W[o, i, k]^2 + b_o^2)``
    (independent inputs), BN scales by ``gamma / sqrt(var + eps)`` and adds its shift,
    ReLU-like ops halve the energy, gates give 0.5, a ``Mul`` multiplies the operands' scales
    and an ``Add`` adds their energies; other ops pass their first input's scale through.
    """
    rms = dict(rms)

    def of(t: gs.Tensor, size: int | None = None) -> np.ndarray:
        if isinstance(t, gs.Constant):
            v = np.abs(np.asarray(t.values, dtype=np.float64))
            if size is not None and v.ndim >= 1 and v.size == size:
                return v.reshape(-1)
            return np.array([_rms(v.reshape(-1))])
        r = rms.get(t.name, np.ones(1))
        if size is not None and r.size != size:
            return np.full(size, _rms(r))
        return r

    for node in nodes:
        op = node.op
        if not node.inputs:
            continue
        x = node.inputs[0]
        out: np.ndarray
        if op in ("Conv", "ConvTranspose") and isinstance(node.inputs[1], gs.Constant):
            w = np.asarray(node.inputs[1].values, dtype=np.float64)
            if op == "ConvTranspose":
                w = np.swapaxes(w, 0, 1)
            cout, cin_g = w.shape[0], w.shape[1]
            group = int(node.attrs.get("group", 1))
            r = of(x, cin_g * group)
            energy = np.square(w).reshape(cout, cin_g, -1).sum(axis=2)
            first = (np.arange(cout) // max(1, cout // group)) * cin_g
            r_in = r[first[:, None] + np.arange(cin_g)[None, :]] if r.size == cin_g * group else np.full((cout, cin_g), _rms(r))
            out = np.sqrt((energy * np.square(r_in)).sum(axis=1))
            if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                out = np.sqrt(np.square(out) + np.square(np.asarray(node.inputs[2].values, dtype=np.float64).reshape(-1)))
        elif op in ("Gemm", "MatMul") and isinstance(node.inputs[1], gs.Constant):
            w = np.asarray(node.inputs[1].values, dtype=np.float64)
            if w.ndim != 2:
                out = of(x)
            else:
                if op == "Gemm" and int(node.attrs.get("transB", 0)):
                    w = w.T
                r = of(x, w.shape[0])
                out = np.sqrt((np.square(w) * np.square(r)[:, None]).sum(axis=0))
                if op == "Gemm" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                    c = np.abs(np.asarray(node.inputs[2].values, dtype=np.float64)).reshape(-1)
                    out = np.sqrt(np.square(out) + np.square(c if c.size == out.size else _rms(c)))
        elif op == "BatchNormalization" and all(isinstance(t, gs.Constant) for t in node.inputs[1:5]):
            scale, shift, mean, var = (np.asarray(t.values, dtype=np.float64).reshape(-1) for t in node.inputs[1:5])
            s = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
            r = of(x, s.size)
            out = np.sqrt(np.square(s * r) + np.square(shift - s * mean))
        elif op in _RELU_LIKE:
            out = of(x) / math.sqrt(2)
        elif op in _GATES:
            out = np.full(of(x).size, 0.5)
        elif op == "Tanh":
            out = np.minimum(of(x), 1.0)
        elif op in ("Mul", "Div") and len(node.inputs) == 2:
            a, b = (of(t) for t in node.inputs)
            n = max(a.size, b.size)
            a = a if a.size == n else np.full(n, _rms(a))
            b = b if b.size == n else np.full(n, _rms(b))
            out = a * b if op == "Mul" else a / np.maximum(b, 1e-12)
        elif op in ("Add", "Sub", "Sum"):
            parts = [of(t) for t in node.inputs]
            n = max(p.size for p in parts)
            out = np.sqrt(sum(np.square(p if p.size == n else np.full(n, _rms(p))) for p in parts))
        elif op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization"):
            scale = of(node.inputs[1]) if len(node.inputs) > 1 else np.ones(1)
            shift = of(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(1)
            n = max(scale.size, shift.size)
            out = np.sqrt(np.square(np.resize(scale, n)) + np.square(np.resize(shift, n)))
        else:
            out = of(x)
        for o in node.outputs:
            rms[o.name] = np.asarray(out, dtype=np.float64).reshape(-1)
    return rms


def _bypass_add(graph: gs.Graph, node: gs.Node, skip_name: str) -> None:
    outputs = {t.name for t in graph.outputs}
    skip = next(t for t in node.inputs if t.name == skip_name)
    y = node.outputs[0]
    if y.name in outputs:
        node.op = "Identity"
        node.attrs.clear()
        node.inputs.clear()
        node.inputs.extend([skip])
        return
    ir.redirect_uses(y, skip)
    node.inputs.clear()
    node.outputs.clear()


def _count(k: int | float, total: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | float) or k < 0 or not math.isfinite(k):
        raise UsageError(f"erase-blocks needs a count or a fraction >= 0, got {k!r}")
    if isinstance(k, float) and k < 1:
        return int(round(k * total))
    if float(k) != int(k):
        raise UsageError(f"erase-blocks count must be an integer or a fraction below 1, got {k}")
    if int(k) > total:
        raise UsageError(f"cannot erase {int(k)} residual blocks: the model has {total}")
    return int(k)


Scorer = Callable[[gs.Graph, ResidualBlock], float]


def _score_name(scorer: Scorer | None) -> str:
    if scorer is None:
        return "relative_branch_scales (branch RMS / skip RMS, data-free)"
    return getattr(scorer, "__name__", repr(scorer))


def erase_blocks(
    model: Any,
    k: int | float,
    *,
    verify: bool = True,
    tolerance: float = LOSSLESS_TOLERANCE,
    scorer: Scorer | None = None,
    progress: Progress | None = None,
) -> Any:
    """Depth pruning: erase the ``k`` least important residual blocks (``k < 1``: a fraction).

    A residual block is ``Add(x, branch(x))``; erasing it leaves ``x``. Blocks are ranked by
    ``scorer(graph, block)`` (default :func:`relative_branch_scales`, data-free), lowest first. The
    result is verified by construction: it must equal the original with the erased branches
    multiplied by zero (checker, ONNX Runtime, output shapes, relative difference within
    ``tolerance``). ``report["blocks"]`` lists every block with its score and whether it was
    erased; ``report["max_rel_diff_vs_original"]`` says how much the function changed.
    """
    from graphprune.api import PruneResult, load_and_prepare

    timer = _Timer(progress)
    with timer.stage("load"):
        prep = load_and_prepare(model)
    graph = ir.import_graph(prep.prepared)
    with timer.stage("blocks"):
        blocks = find_residual_blocks(graph)
        if scorer is None:
            for block, value in zip(blocks, relative_branch_scales(graph, blocks), strict=True):
                block.score = float(value)
        else:
            for block in blocks:
                block.score = float(scorer(graph, block))
    n = _count(k, len(blocks))
    chosen: list[ResidualBlock] = []
    taken: set[str] = set()
    for block in sorted(blocks, key=lambda b: (b.score, b.add)):
        if len(chosen) == n:
            break
        if block.add in taken or taken & set(block.nodes):
            continue  # nested in (or containing) a block already erased
        chosen.append(block)
        taken |= {block.add, *block.nodes}
    if len(chosen) < n:
        raise UsageError(f"only {len(chosen)} non-overlapping residual blocks can be erased, asked {n}")
    with timer.stage("erase"):
        nodes = {nd.name: nd for nd in graph.nodes}
        for block in chosen:
            _bypass_add(graph, nodes[block.add], block.skip)
        pruned = _export(graph, prep.prepared)
    erased_names = sorted(taken)
    plan = Plan(erase=erased_names, meta={"mode": "erase_blocks", "blocks": [b.add for b in chosen]})
    chosen_adds = {b.add for b in chosen}
    report: dict[str, Any] = {
        "mode": "erase_blocks",
        "params_before": count_params(prep.prepared),
        "params_after": count_params(pruned),
        "macs_before": count_macs(prep.prepared),
        "macs_after": count_macs(pruned),
        "nodes_before": len(prep.prepared.graph.node),
        "nodes_after": len(pruned.graph.node),
        "blocks_found": len(blocks),
        "blocks_erased": [b.add for b in chosen],
        "blocks": [{**b.to_dict(), "erased": b.add in chosen_adds, "nodes": b.nodes[:3] + (["..."] if len(b.nodes) > 3 else [])} for b in blocks],
        "erased_nodes": erased_names,
        "score": _score_name(scorer),
    }
    result = PruneResult(pruned, report, plan, None)
    reference = _zeroed_branches(prep.prepared, chosen)
    _finish(result, reference, pruned, verify, tolerance, timer, "the original with the erased branches zeroed")
    if verify:
        feeds = make_feeds(prep.original, seed=0, batch=1)[0]
        _, rel = differences(run(prep.original, feeds, "the original"), run(pruned, feeds, "the pruned model"))
        report["max_rel_diff_vs_original"] = rel
    return result


def _zeroed_branches(prepared: onnx.ModelProto, blocks: list[ResidualBlock]) -> onnx.ModelProto:
    """The original with each erased branch's output multiplied by zero before its Add."""
    graph = ir.import_graph(prepared)
    nodes = {n.name: n for n in graph.nodes}
    for block in blocks:
        add = nodes[block.add]
        for k, t in enumerate(add.inputs):
            if t.name == block.branch_output:
                zero = gs.Constant(f"{block.add}_gp_zero", np.zeros((), dtype=np.dtype(t.dtype or np.float32)))
                out = gs.Variable(f"{block.add}_gp_zeroed", dtype=t.dtype, shape=t.shape)
                graph.nodes.append(gs.Node("Mul", name=f"{block.add}_gp_mul0", inputs=[t, zero], outputs=[out]))
                add.inputs[k] = out
    graph.toposort()
    return ir.export_graph(graph, prepared)


# ---------------------------------------------------------------------- planting zeros
@dataclass
class PlantRecord:
    """What :func:`plant_zeros` zeroed, to measure what a lossless run removes."""

    #: per planted group: producer parameter dims (name, axis) -> planted element indices
    groups: list[dict[str, Any]] = field(default_factory=list)
    #: per planted branch: the Add node name and the branch node names
    branches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def planted_units(self) -> int:
        return sum(int(g["units"]) for g in self.groups)

    def measure(self, pruned: onnx.ModelProto) -> dict[str, Any]:
        """How many planted units and branches are gone from ``pruned``."""
        inits = {t.name: t for t in pruned.graph.initializer}
        node_names = {n.name for n in pruned.graph.node}
        removed_units = 0
        for g in self.groups:
            remaining = None
            for name, axis, _ in g["producers"]:
                if name in inits:
                    w = onnx.numpy_helper.to_array(inits[name])
                    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
                    remaining = int((~(rows != 0).any(axis=1)).sum())
                    break
            remaining = 0 if remaining is None else min(remaining, int(g["units"]))
            removed_units += int(g["units"]) - remaining
        removed_branches = sum(
            1 for b in self.branches if b["add"] not in node_names and not set(b["producers"]) & node_names
        )
        return {
            "planted_units": self.planted_units,
            "removed_units": removed_units,
            "planted_branches": len(self.branches),
            "removed_branches": removed_branches,
        }


_ZEROED_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2), "InstanceNormalization": (1, 2),
}


def plant_zeros(
    model: Any,
    *,
    groups: float = 0.3,
    units: float = 0.3,
    branches: int = 2,
    seed: int = 0,
) -> tuple[onnx.ModelProto, PlantRecord]:
    """Zero what a group-sparse optimiser would: channels and whole residual branches.

    A fraction ``groups`` of the exact prunable channel groups lose a fraction ``units`` of
    their units (``units >= 1``: all of them): producer weights and biases and the scale and
    shift of the norm that follows (BatchNormalization, or Mul/Add constants) are zeroed.
    ``branches`` residual blocks get every weight, bias and norm scale/shift of their branch
    zeroed. Returns the (prepared) planted model and what was planted.
    """
    from graphprune.api import load_and_prepare

    rng = np.random.default_rng(seed)
    prep = load_and_prepare(model)
    graph = ir.import_graph(prep.prepared)
    analysis = analyze_graph(graph, prep.opset)
    tensors = analysis.context.tensors
    users = consumer_nodes(graph)
    record = PlantRecord()

    blocks = find_residual_blocks(graph)
    order = rng.permutation(len(blocks))
    taken: set[str] = set()
    nodes = {n.name: n for n in graph.nodes}
    for i in order:
        if len(record.branches) >= branches:
            break
        block = blocks[int(i)]
        if block.add in taken or taken & set(block.nodes):
            continue
        taken |= {block.add, *block.nodes}
        branch_producers: list[str] = []
        for name in block.nodes:
            node = nodes[name]
            for slot in _ZEROED_INPUTS.get(node.op, ()):
                if slot < len(node.inputs) and isinstance(node.inputs[slot], gs.Constant):
                    c = node.inputs[slot]
                    c.values = np.zeros_like(np.asarray(c.values))
            if node.op in ("Mul",) and any(isinstance(t, gs.Constant) for t in node.inputs):
                for t in node.inputs:
                    if isinstance(t, gs.Constant):
                        t.values = np.zeros_like(np.asarray(t.values))
            if node.op in _ZEROED_INPUTS:
                branch_producers.append(name)
        record.branches.append({"add": block.add, "producers": branch_producers})

    candidates = [
        g for g in analysis.groups
        if g.prunable and g.is_exact and not (set(g.nodes) & taken)
    ]
    chosen = rng.permutation(len(candidates))[: int(round(groups * len(candidates)))]
    for i in sorted(int(c) for c in chosen):
        group = candidates[i]
        n = group.num_units if units >= 1 else min(group.num_units - 1, max(1, int(round(units * group.num_units))))
        picked = sorted(int(u) for u in rng.choice(group.num_units, size=n, replace=False))
        removed = group.removed_elements(picked)
        producers: list[tuple[str, int, list[int]]] = []
        for dim, idx in removed.items():
            t = tensors.get(dim[0])
            if not isinstance(t, gs.Constant) or not _plantable(dim, group, users):
                continue
            values = np.array(t.values, copy=True)
            index: list[Any] = [slice(None)] * values.ndim
            index[dim[1]] = idx
            values[tuple(index)] = 0
            t.values = values
            if group.roles.get(dim) == PRODUCER and values.ndim >= 2:
                producers.append((dim[0], dim[1], [int(e) for e in idx]))
        if producers:
            record.groups.append({"anchor": f"{group.anchor[0]}:{group.anchor[1]}", "units": n, "producers": producers})
    planted = model_io.infer_shapes(ir.export_graph(graph, prep.prepared))
    return planted, record


def _plantable(dim: Dim, group: ChannelGroup, users: dict[str, list[gs.Node]]) -> bool:
    """Producer axes, and a norm's scale and shift (BatchNormalization, or Mul/Add constants)."""
    role = group.roles.get(dim)
    if role == PRODUCER:
        return True
    if role != CHANNELWISE:
        return False
    for node in users.get(dim[0], []):
        if node.op == "BatchNormalization" and any(
            node.inputs[i].name == dim[0] for i in (1, 2) if i < len(node.inputs)
        ):
            return True
        if node.op in ("Mul", "Add"):
            return True
    return False
