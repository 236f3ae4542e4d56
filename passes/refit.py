"""Least-squares refit of the linear layers of a pruned model (no fine-tuning).

Every linear layer (Conv, Gemm, MatMul with a weight; grouped and depthwise convolutions per
group) whose input changed because of pruning gets new weights and a bias so that, on the
calibration samples, its output matches the ORIGINAL model's output at the same place, with
the pruned model's (already refit) activations as inputs: ridge least squares in closed form
from Gram statistics, wave by wave in topological order. See
:mod:`graphprune.calibration.sequential` for the maths.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graphprune.passes.base import Pass, PassContext, PassResult

from graphprune.calibration import recurrent, refit_targets, runner, sequential
from graphprune.io import ir
from graphprune.io.order import toposort_model


def sliced_parameters(removed: Iterable[tuple[str, int]], graph: gs.Graph) -> set[str]:
    """Names of the constants that channel removal sliced."""
    tensors = graph.tensors()
    return {name for name, _ in removed if isinstance(tensors.get(name), gs.Constant)}


class RefitPass(Pass):
    """Refit the linear layers downstream of the removed channels (``removed``: element
    indices per ``(tensor, axis)``, as :func:`removed_elements` gives them). ``ridge``:
    relative ridge strength; ``None`` chooses it per layer by two-fold cross-validation."""

    mode = "refit"

    def __init__(
        self,
        reference: onnx.ModelProto,
        batches: runner.Batches,
        removed: dict[tuple[str, int], np.ndarray],
        *,
        ridge: float | None = None,
        consumers_only: bool = False,
        store: Any = None,
        recorded: Any = None,
        ridges: Any = None,
    ) -> None:
        self.reference = reference
        #: cross-validated ridges recorded or recalled (graphprune.calibration.ridge.RidgeChoices)
        self.ridges = ridges
        self.batches = batches
        self.removed = removed
        self.ridge = ridge
        self.consumers_only = consumers_only
        self.store = store
        #: original outputs recorded by the statistics run (graphprune.calibration.targets)
        self.recorded = recorded
        self._done = False
        self._reference_outputs: list | None = None

    def __repr__(self) -> str:
        ridge = "cross-validated" if self.ridge is None else f"{self.ridge:g}"
        return f"{self.name}(samples={sum(self.batches.sizes)}, ridge={ridge})"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self._done or not self.removed:
            return PassResult(graph, False, {"layers": 0})
        skipped: dict[str, str] = {}
        targets = refit_targets.find_targets(
            graph, ctx.opset, changed=sliced_parameters(self.removed, graph),
            removed=self.removed, consumers_only=self.consumers_only, skipped=skipped,
            shared=self.mode == "refit",
        )
        rec = (recurrent.find_targets(graph, ctx.opset, changed=sliced_parameters(self.removed, graph),
                                      removed=self.removed, skipped=skipped) if self.mode == "refit" else [])
        if any(t.recurrent for t in targets):
            stats = self._with_unrolled(graph, targets, skipped, rec)
        elif rec:
            stats = self._with_recurrent(graph, targets, rec, skipped)
        else:
            stats = self._engine().run(graph, self.reference, targets)
        if skipped:
            stats["not_refit"] = len(skipped)
            stats["skipped"] = [f"{k}: {v}" for k, v in list(skipped.items())[:10]]
        elif not targets and not stats.get("layers"):
            stats["skipped"] = ["no linear layer with a float or dequantized constant weight reads the "
                                "changed tensors (weights computed in the graph are not refit)"]
        toposort_model(graph.cleanup(remove_unused_graph_inputs=False))
        self._done = True
        return PassResult(graph, bool(stats.get("layers")), stats)

    def _engine(self, recalled: bool = True) -> sequential.Reconstructor:
        """``recalled``: the layers' validated ridges are recorded or recalled (not in a layer's
        second refit, after the recurrent layers it reads were refit: kept only where it pays)."""
        return sequential.Reconstructor(
            self.reference, self.batches, mode=self.mode, ridge=self.ridge, store=self.store,
            recorded=self.recorded if self.mode == "refit" else None,
            ridges=self.ridges if self.mode == "refit" and recalled else None,
        )

    def _with_recurrent(self, graph: gs.Graph, targets: list[refit_targets.Target],
                        rec: list[recurrent.RecurrentTarget], skipped: dict[str, str]) -> dict[str, Any]:
        """The refit with recurrent layers (:mod:`graphprune.calibration.recurrent`): the linear
        layers not downstream of a recurrent one first, then the linear layers after them twice
        (without, and after the recurrent layers' input projections and recurrences are refit);
        the recurrent refit is kept only where the model's outputs on the calibration samples
        come closer to the original's (a change of the input sequence feeds back through time),
        else the input projections alone, where that brings them closer."""
        after_rec = refit_targets.affected_tensors(graph, {t.node.inputs[2].name for t in rec})
        later = [t for t in targets if t.view.data.name in after_rec
                 or (t.residual is not None and t.residual.stream in after_rec)]
        runs = [self._engine().run(graph, self.reference, [t for t in targets if t not in later])]
        start = _Snapshot(graph)
        if later:
            runs.append(self._engine().run(graph, self.reference, later))
        plain, plain_error = _Snapshot(graph), self._output_error(graph)
        start.restore()
        for recurrences in (True, False):  # the recurrences too, then (where that moved away) not
            stats, changed = recurrent.refit(graph, self.reference, self.reference, self.batches, rec,
                                             store=self.store, ridge=self.ridge, skipped=skipped,
                                             recurrences=recurrences)
            if not changed:
                break
            again = self._engine(recalled=False).run(graph, self.reference, later) if later else {}
            error = self._output_error(graph)
            stats["output_error_without"], stats["output_error"] = round(plain_error, 6), round(error, 6)
            if error < plain_error:
                runs[1:] = [again] if later else []
                runs.append({"layers": stats["layers"]})
                if not recurrences:
                    stats["recurrences_undone"] = True
                return {**_merge(runs), "recurrent": stats}
            start.restore()  # the outputs moved away
            stats["undone"] = True
            if not stats.get("recurrences") or not stats.get("input_projections"):
                break
        plain.restore()
        merged = _merge(runs)
        merged["recurrent"] = stats
        return merged

    def _with_unrolled(self, graph: gs.Graph, targets: list[refit_targets.Target], skipped: dict[str, str],
                       rec: list[recurrent.RecurrentTarget]) -> dict[str, Any]:
        """The refit with the readers of a weight that an unrolled recurrence reads at every
        step (:attr:`~graphprune.calibration.refit_targets.Target.recurrent`): the other layers
        first (with the recurrent layers ``rec``, as :meth:`_with_recurrent`: g2p-en's GRU
        encoder before its unrolled decoder), then one fit over all the steps on the original's
        inputs and the layers after them again; kept only where the model's outputs on the
        calibration samples come closer to the original's than with the steps left as pruned
        (a step's change feeds the next ones)."""
        unrolled = [t for t in targets if t.recurrent]
        rest = [t for t in targets if not t.recurrent]
        after = refit_targets.affected_tensors(graph, {t.view.output.name for t in unrolled})
        later = [t for t in rest if t.view.data.name in after or (t.residual is not None and t.residual.stream in after)]
        first = [t for t in rest if t not in later]
        runs = [self._with_recurrent(graph, first, rec, skipped) if rec else
                self._engine().run(graph, self.reference, first)]
        start = _Snapshot(graph)  # (a refit layer's output is renamed: it is refit once, from here)
        runs.append(self._engine().run(graph, self.reference, later))
        plain, plain_error = _Snapshot(graph), self._output_error(graph)
        start.restore()
        fit = self._engine(recalled=False).run(graph, self.reference, unrolled)
        again = self._engine(recalled=False).run(graph, self.reference, later)
        error = self._output_error(graph)
        stats = {"layers": fit.get("layers", 0), "output_error_without": round(plain_error, 6),
                 "output_error": round(error, 6)}
        if fit.get("layers") and error < plain_error:
            runs[1:] = [fit, again]
        else:
            plain.restore()
            stats["undone"] = True
            for t in unrolled:
                skipped[t.name] = (f"weight '{t.share}' is read at every step of an unrolled recurrence: "
                                   "its fit over the steps did not bring the outputs nearer the original: not refit")
        fused = runs[0].pop("recurrent", None)
        merged = _merge(runs)
        if fused is not None:
            merged["recurrent"] = fused
        merged["unrolled"] = stats
        return merged

    def _output_error(self, graph: gs.Graph) -> float:
        """Mean relative squared error of the float graph outputs on the calibration samples
        (``inf`` where there are none)."""
        if self._reference_outputs is None:
            self._reference_outputs = runner.outputs(self.reference, self.batches.feeds, "the original model",
                                                     getattr(self.store, "root", None))
        toposort_model(graph)
        model = ir.export_graph(graph, self.reference, self.store)
        pruned = runner.outputs(model, self.batches.feeds, "the pruned model", getattr(self.store, "root", None))
        errors = []
        for ref, got in zip(self._reference_outputs, pruned, strict=True):
            for o, p in zip(ref, got, strict=True):
                o, p = np.asarray(o), np.asarray(p)
                if o.dtype.kind == "f" and o.shape == p.shape and o.size:
                    errors.append(float(np.square(p - o, dtype=np.float64).sum()
                                        / max(float(np.square(o, dtype=np.float64).sum()), 1e-30)))
        return float(np.mean(errors)) if errors else float("inf")


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of several refit runs: counts added, mean errors weighted by layers."""
    out: dict[str, Any] = {}
    for run in runs:
        for key, value in run.items():
            if key in ("rel_error_before", "rel_error_after"):
                continue
            if key == "clipped_max":
                out[key] = max(out.get(key, 0.0), value)
            elif key == "ridge_median":
                out.setdefault(key, value)
            else:
                out[key] = out.get(key, 0) + value
    weights = [(run.get("layers", 0), run) for run in runs if "rel_error_before" in run]
    total = sum(w for w, _ in weights)
    for key in ("rel_error_before", "rel_error_after"):
        if total:
            out[key] = round(sum(w * run[key] for w, run in weights) / total, 5)
    out.setdefault("layers", 0)
    return out


class _Snapshot:
    """The nodes, their links and attributes, and every constant's values of ``graph``, to
    put back (the refit replaces values and inputs; it never changes an array in place)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.links = [(n, list(n.inputs), list(n.outputs), dict(n.attrs)) for n in self.nodes]
        self.values = [(t, t._values) for t in graph.tensors().values() if isinstance(t, gs.Constant)]

    def restore(self) -> None:
        known = {id(n) for n in self.nodes}
        for node in self.graph.nodes:  # nodes added since (a bias Add): unlinked
            if id(node) not in known:
                node.inputs.clear()
                node.outputs.clear()
        self.graph.nodes.clear()
        self.graph.nodes.extend(self.nodes)
        for node, inputs, outputs, attrs in self.links:
            node.inputs.clear()
            node.inputs.extend(inputs)
            node.outputs.clear()
            node.outputs.extend(outputs)
            node.attrs.clear()
            node.attrs.update(attrs)
        for tensor, values in self.values:
            tensor._values = values
