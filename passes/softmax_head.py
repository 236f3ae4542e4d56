"""Distil a softmax head: the layer whose output's softmax is a graph output, refit to the
original's class distribution on the calibration samples (after the least-squares refit or
the statistics correction). See :mod:`graphprune.calibration.softmax_head` for the maths and
how the head is found."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import onnx
import onnx_graphsurgeon as gs
from graphprune.passes.base import Pass, PassContext, PassResult

from graphprune.calibration import runner
from graphprune.calibration import softmax_head as heads
from graphprune.io import ir
from graphprune.io.order import toposort_model


class SoftmaxHeadPass(Pass):
    """Refit each confirmed softmax head (``reference``: the original model, whose outputs
    are the targets; ``batches``: the calibration samples; ``logits``: graph outputs that
    are class logits, whose layer is distilled to their softmax; ``targets``: a dict the
    caller keeps between the passes of one ``reference`` (the candidates of one prune): the
    original's rows a head was fitted to, per ``batches``, so that the original runs once for
    them, not once for every candidate)."""

    def __init__(self, reference: onnx.ModelProto, batches: runner.Batches, *, store: Any = None,
                 logits: Iterable[str] = (), targets: dict[int, tuple[runner.Batches, dict]] | None = None) -> None:
        self.reference = reference
        self.batches = batches
        self.store = store
        #: graph outputs that are class logits (the softmax is applied outside the model)
        self.logits = frozenset(logits)
        #: id(batches) -> (batches, {(head output, kind, rows per batch): the original's rows of every batch})
        self.targets = targets
        self._done = False

    def __repr__(self) -> str:
        return f"{self.name}(samples={sum(self.batches.sizes)})"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self._done:
            return PassResult(graph, False, {"layers": 0})
        self._done = True
        found = heads.candidates(graph, ctx.opset)
        if not found:
            return PassResult(graph, False, self._unserved({"layers": 0}, []))
        data_dir = getattr(self.store, "root", None)
        toposort_model(graph)
        model = ir.export_graph(graph, self.reference, self.store)
        # the first batch alone confirms the heads: an unconfirmed candidate (an LLM's logits)
        # is not run over every sample
        first: dict[str, Any] = {}
        names = [n for h in found for n in (h.view.output.name, h.output)]
        runner.stream(model, names, self.batches.feeds[:1], lambda _, name, value: first.__setitem__(name, value),
                      what="the pruned model", data_dir=data_dir)
        confirmed = [h for h in found if h.view.output.name in first and h.output in first
                     and heads.confirm(h, first[h.view.output.name], first[h.output], h.output in self.logits)]
        if not confirmed:
            return PassResult(graph, False, self._unserved({"layers": 0}, []))
        held = self._held()
        by_input: dict[str, list[heads.Head]] = {}
        by_output: dict[str, list[heads.Head]] = {}
        for h in confirmed:
            h.per_batch = heads.rows_per_batch(h, len(self.batches.feeds))
            by_input.setdefault(h.view.data.name, []).append(h)
            if (h.output, h.kind, h.per_batch) in held:  # (the same rows: the selection depends on these alone)
                h.rows.p = list(held[h.output, h.kind, h.per_batch])
            else:
                by_output.setdefault(h.output, []).append(h)

        def take_x(batch: int, name: str, value: Any) -> None:
            for h in by_input.get(name, ()):
                heads.take_rows(h, batch, x=value)

        def take_p(batch: int, name: str, value: Any) -> None:
            for h in by_output.get(name, ()):
                heads.take_rows(h, batch, out=value)

        runner.stream(model, list(by_input), self.batches.feeds, take_x, what="the pruned model", data_dir=data_dir)
        if by_output:
            runner.stream(self.reference, list(by_output), self.batches.feeds, take_p, what="the original model",
                          data_dir=data_dir)
        for h in (h for hs in by_output.values() for h in hs):
            held[h.output, h.kind, h.per_batch] = list(h.rows.p)
        names_in_graph = set(graph.tensors())
        done = [heads.distil(h, graph, names_in_graph, share=1.0 / len(confirmed)) for h in confirmed]
        written = sum(1 for d in done if d["written"])
        toposort_model(graph.cleanup(remove_unused_graph_inputs=False))
        return PassResult(graph, bool(written), self._unserved({"layers": written, "heads": done}, confirmed))

    def _held(self) -> dict[tuple[str, str, int], list[Any]]:
        """The original's rows kept for :attr:`batches` (empty where nothing is kept)."""
        entry = None if self.targets is None else self.targets.get(id(self.batches))
        if entry is None or entry[0] is not self.batches:
            entry = (self.batches, {})
            if self.targets is not None:
                self.targets[id(self.batches)] = entry
        return entry[1]

    def _unserved(self, stats: dict[str, Any], confirmed: list[heads.Head]) -> dict[str, Any]:
        """``stats``, with the outputs declared to be class logits that no confirmed head
        computes (a linear layer with a float weight of its own, plus per-channel constants)."""
        served = {h.output for h in confirmed}
        missing = sorted(self.logits - served)
        if missing:
            stats["skipped"] = [f"class scores '{name}': not the output of a linear layer with a float weight of "
                                "its own (plus per-channel constants): not distilled" for name in missing]
        return stats
