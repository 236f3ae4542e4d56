"""Pruning inside ``If`` branches: each branch pruned as a model of its own.

Streaming models (voice activity detectors) keep their whole network inside the two
branches of an ``If`` on an input (the sample rate); the main graph's analysis stops at the
``If``. Each branch is a graph whose only links to the outside are the outer values it reads
and the outputs it returns, so it can be pruned as a model of its own:

1. the branch becomes a standalone model: the outer values it reads are graph inputs (their
   types from the main graph), the outer constants it reads become private initializers
   (renamed: the other branch reads them too), its outputs are graph outputs (never pruned);
2. :func:`graphprune.prune` prunes it at the same ratio and verifies it on its own (the
   branch against the branch with the removed channels zeroed);
3. the pruned branch replaces the original one; the main model's self-check compares with
   the zeroed original whose branch is the zeroed branch (:func:`zero_branches`).

Fail closed: a branch whose outer inputs have no known type, that fails its own prune or
removes nothing, stays as it was. Loop/Scan bodies are left alone (their values depend on
the iteration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.analysis.roles import CONSUMER, PRODUCER
from graphprune.errors import GraphPruneError
from graphprune.io.branch_models import BRANCH_ATTRS, if_nodes, standalone_branch
from graphprune.io.graph_reads import all_reads, outer_reads, subgraphs
from graphprune.io.shared_constants import share_subgraph_constants


def has_branches(model: onnx.ModelProto) -> bool:
    """Whether the main graph has an ``If`` (whose branches :func:`prune_branches` prunes)."""
    return bool(if_nodes(model.graph))


@dataclass
class BranchPrune:
    """The pruned and the zeroed version of one branch (standalone graphs)."""

    node: str
    attr: str
    pruned: onnx.GraphProto
    zeroed: onnx.GraphProto
    removed: int
    params_before: int
    params_after: int
    #: the branch's own held-out fidelity when it was pruned with calibration data
    fidelity: dict[str, Any] | None = None
    #: groups of the branch pruned across a normalisation over the cut axis (inexact: its
    #: own self-check held only its exact groups to the zeroed branch)
    inexact_groups: int = 0


@dataclass
class BranchReport:
    pruned: list[BranchPrune] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: constant copies shared by both branches, hoisted to the main graph
    hoisted: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "hoisted_constants": self.hoisted,
            "pruned": [{"if": b.node, "branch": b.attr, "units_removed": b.removed,
                        "params_before": b.params_before, "params_after": b.params_after,
                        **({"fidelity": b.fidelity} if b.fidelity else {}),
                        **({"inexact_groups": b.inexact_groups} if b.inexact_groups else {})}
                       for b in self.pruned],
            "skipped": self.skipped,
        }


def _zeroed(graph: onnx.GraphProto, result: Any) -> onnx.GraphProto | None:
    """``graph`` (the standalone branch) with the producer/consumer slices ``result``'s plan
    removed set to zero (initializers and Constant nodes, by name); ``None`` when a sliced
    weight is not a constant of ``graph`` (the branch's own preparation renamed it)."""
    roles = result.analysis.context.roles if result.analysis is not None else {}
    cuts: dict[str, list[tuple[int, list[int]]]] = {}
    for group in result.plan.groups:
        for tensor, axes in group.channels.items():
            for axis, indices in axes.items():
                if roles.get((tensor, int(axis))) in (PRODUCER, CONSUMER):
                    cuts.setdefault(tensor, []).append((int(axis), list(indices)))
    zeroed = onnx.GraphProto()
    zeroed.CopyFrom(graph)
    found: dict[str, onnx.TensorProto] = {t.name: t for t in zeroed.initializer if t.name in cuts}
    for node in zeroed.node:
        for a in node.attribute:
            if (a.name == "value" and a.type == onnx.AttributeProto.TENSOR and node.output
                    and node.output[0] in cuts):
                found[node.output[0]] = a.t
    if set(cuts) - set(found):
        return None
    for name, tensor in found.items():
        values = numpy_helper.to_array(tensor).copy()
        for axis, indices in cuts[name]:
            index: list[Any] = [slice(None)] * values.ndim
            index[axis] = np.asarray(indices, dtype=np.int64)
            values[tuple(index)] = 0
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return zeroed


def _holds_weights(branch: onnx.GraphProto, constants: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``branch`` (nested subgraphs included) holds or reads a constant of more than
    one element: something a prune could cut. A branch without one (torch's
    ``squeeze`` on a dynamic size: ``Squeeze(x)`` or ``Identity(x)``) passes channels the main
    graph's analysis follows through it (:mod:`graphprune.rules.branching`)."""
    def weight(tensor: onnx.TensorProto) -> bool:
        return tensor.data_location == onnx.TensorProto.EXTERNAL or (
            tensor.data_type != onnx.TensorProto.STRING and int(np.prod(tensor.dims)) > 1)

    for graph in (branch, *subgraphs(branch)):
        if any(weight(t) for t in graph.initializer):
            return True
        if any(a.name == "value" and a.type == onnx.AttributeProto.TENSOR and weight(a.t)
               for n in graph.node if not n.input for a in n.attribute):  # (a constant: reads nothing)
            return True
    return any(weight(constants[name]) for name in outer_reads(branch) if name in constants)


def _as_branch(graph: onnx.GraphProto, name: str) -> onnx.GraphProto:
    """A standalone graph back as a branch: no graph inputs (they are outer values)."""
    branch = onnx.GraphProto()
    branch.CopyFrom(graph)
    del branch.input[:]
    branch.name = name
    return branch


def prune_branches(model: onnx.ModelProto, ratio: float, prune: Any, **options: Any) -> BranchReport:
    """Prune every ``If`` branch of ``model`` (materialised, main graph only) with
    ``prune(branch_model, ratio=ratio, branch=(if_name, attr), **options)``; see the module
    docstring."""
    from graphprune.io import model_io

    report = BranchReport()
    ifs = if_nodes(model.graph)
    if not ifs:
        return report
    inferred = model_io.infer_shapes(model, inplace=False)
    types = {v.name: v.type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                       *inferred.graph.output)}
    constants = {t.name: t for t in model.graph.initializer}
    for node in ifs:
        for attr in BRANCH_ATTRS:
            where = f"If '{node.name}' {attr}"
            branch = next(a.g for a in node.attribute if a.name == attr)
            if not branch.node:
                # (torchvision's detectors: the empty-input case, its Constant folded)
                report.skipped.append(f"{where}: no operators (it returns a constant or an outer value)")
                continue
            if not _holds_weights(branch, constants):
                continue  # nothing to cut inside (what passes through is the main graph's)
            built = standalone_branch(model, node, attr, types, constants)
            if built is None:
                report.skipped.append(f"{where}: outer values or outputs of unknown shape")
                continue
            standalone, _ = built
            try:
                result = prune(standalone, ratio=ratio, branch=(node.name, attr), **options)
            except GraphPruneError as exc:
                report.skipped.append(f"{where}: {str(exc).splitlines()[0][:200]}")
                continue
            inner: BranchReport | None = getattr(result, "branches", None)
            removed = result.plan.units_removed + sum(b.removed for b in (inner.pruned if inner else []))
            if not removed:
                report.skipped.append(f"{where}: {result.report.get('nothing_prunable', 'nothing removed')}")
                continue
            inexact = len((result.report.get("verification") or {}).get("inexact_groups") or ())
            if inexact:
                # a normalisation over a cut axis: the branch cannot equal its zeroed self, and
                # its own self-check held its exact groups to that; the whole model's
                # self-check takes the branch as pruned (the main graph's cut stays checked)
                zeroed: onnx.GraphProto | None = onnx.GraphProto()
                zeroed.CopyFrom(result.model.graph)
            else:
                zeroed = _zeroed(standalone.graph, result)
            if zeroed is not None and inner is not None:  # nested Ifs: their zeroed branches
                apply_to_graph(zeroed, inner, zeroed=True)
            if zeroed is None:
                report.skipped.append(f"{where}: a pruned weight is not a constant of the branch")
                continue
            fidelity = result.report.get("fidelity") or {}
            report.pruned.append(BranchPrune(
                node.name, attr, _as_branch(result.model.graph, standalone.graph.name),
                _as_branch(zeroed, standalone.graph.name),
                removed, result.report["params_before"], result.report["params_after"],
                {k: fidelity[k] for k in ("samples", "cosine", "rel_l2") if k in fidelity} or None, inexact))
        _undo_growth(model, node, report)
    return report


def _undo_growth(model: onnx.ModelProto, node: onnx.NodeProto, report: BranchReport) -> None:
    """Both branches of ``node`` read outer weights; pruned, each holds its own copy of what
    it keeps of them. Where they keep different channels (their own data or heads choose), or
    one branch is not pruned and still reads the originals, the copies can hold more than the
    originals did: the written model would be larger than the input (params 1.036 at
    ``--ratio 0.3``, 1.575 with calibration). Counted as the written model is (``apply``, the
    shared copies hoisted, :func:`~graphprune.verify.metrics.count_params`); such a prune of
    ``node``'s branches is undone and said so."""
    from graphprune.verify.metrics import count_params

    mine = [b for b in report.pruned if b.node == node.name]
    if not mine:
        return
    written = onnx.ModelProto()
    written.CopyFrom(model)
    apply(written, BranchReport(pruned=mine))
    hoist_shared_constants(written)
    before, after = count_params(model, _bytes), count_params(written, _bytes)
    if after > before:
        report.pruned = [b for b in report.pruned if b.node != node.name]
        report.skipped.append(
            f"If '{node.name}': its branches read the same outer weights and keep different parts of them: "
            f"their copies would hold {after} parameters where the model holds {before}: left as they were")


def branch_calibration(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]
                       ) -> dict[tuple[str, str], list[dict[str, np.ndarray]]]:
    """The calibration data of each ``If`` branch of ``model`` (materialised) pruned as a
    model of its own: per sample, the outer values the branch reads, for the samples whose
    condition takes that branch (ONNX Runtime runs the main graph with those values and the
    conditions exposed). A branch that no sample takes has none."""
    import onnxruntime as ort

    from graphprune.io import runtime

    ifs = if_nodes(model.graph)
    constants = {t.name for t in model.graph.initializer}
    given = {i.name for i in model.graph.input}
    reads = {(n.name, a.name): sorted(outer_reads(a.g) - constants)
             for n in ifs for a in n.attribute if a.name in BRANCH_ATTRS}
    wanted = sorted(({n.input[0] for n in ifs} | {r for names in reads.values() for r in names})
                    - given - constants)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name)
                              for name in wanted if name not in outputs)
    options = runtime.session_options()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {key: [] for key in reads}
    fixed = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
             if t.name in {n.input[0] for n in ifs}}  # a condition folded to a constant
    for sample in samples:
        values = {**fixed, **sample}
        if wanted:
            values.update(zip(wanted, session.run(wanted, sample), strict=True))
        for node in ifs:
            condition = bool(np.asarray(values[node.input[0]]).reshape(-1)[0])
            attr = BRANCH_ATTRS[0] if condition else BRANCH_ATTRS[1]
            out[(node.name, attr)].append({name: values[name] for name in reads[(node.name, attr)]})
    return out


def apply(model: onnx.ModelProto, branches: BranchReport, *, zeroed: bool = False) -> None:
    """Put the pruned (or, for the self-check's reference, the zeroed) branches into
    ``model`` in place, and drop outer initializers that nothing reads any more."""
    apply_to_graph(model.graph, branches, zeroed=zeroed)


def apply_to_graph(graph: onnx.GraphProto, branches: BranchReport, *, zeroed: bool = False) -> None:
    """:func:`apply` on a graph (a branch with nested ``If`` nodes)."""
    chosen = {(b.node, b.attr): (b.zeroed if zeroed else b.pruned) for b in branches.pruned}
    if not chosen:
        return
    model = onnx.ModelProto()
    model.graph.CopyFrom(graph)
    for node in model.graph.node:
        for attr in node.attribute:
            key = (node.name, attr.name)
            if key in chosen:
                attr.g.CopyFrom(chosen[key])
    used = all_reads(model.graph)  # (an unpruned branch may read an outer constant)
    used |= {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    graph.CopyFrom(model.graph)


def hoist_shared_constants(model: onnx.ModelProto) -> int:
    """Constants that branches hold with the same values (constant folding of an outer
    weight read in both branches makes such copies; so does pruning both the same way)
    become one initializer of the main graph that they read; return how many copies were
    dropped (:func:`graphprune.io.shared_constants.share_subgraph_constants` on a
    materialised model)."""
    return share_subgraph_constants(model, _bytes)


def _bytes(tensor: onnx.TensorProto) -> bytes:
    """A materialised constant's value bytes (what tells equal copies apart)."""
    return tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
