"""The prune session: one object carries a model from load to report.

``load -> analysis -> plan -> passes -> verification -> report``. Every mode (ratio,
lossless, depth, calibrated, budgeted) is a thin driver over a :class:`Session`:

>>> s = Session("model.onnx")                      # doctest: +SKIP
>>> analysis = s.analyze()                          # doctest: +SKIP
>>> s.apply([PruneChannelsPass(analysis, plan), DeadCodeEliminationPass()])  # doctest: +SKIP
>>> model = s.export()                              # doctest: +SKIP
>>> verification = s.verify_against(s.prepared, "the original", tolerance=1e-5)  # doctest: +SKIP
>>> result = s.finish("ratio", plan, verification)  # doctest: +SKIP

The session times each stage (``progress`` is told the stage name as it starts), runs passes through
one :class:`~graphprune.passes.base.PassManager` context (so statistics and timings of every pass end up
in the report), verifies with the one verifier (:mod:`graphprune.verify.validate`) and builds the one report
shape (:mod:`graphprune.pipeline.report`). With ``debug=True`` every pass that changes the graph is followed
by an export, ``onnx.checker`` and an ONNX Runtime session, naming the pass that broke it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune import crash_guard
from graphprune.analysis import Analysis, analyze_graph
from graphprune.errors import (
    GraphPruneError,
    OutputShapesDiffer,
    RewriteError,
    UsageError,
    VerificationError,
)
from graphprune.io import (
    custom_shapes,
    declared_shapes,
    expansions,
    ir,
    model_io,
    runtime,
    stale_shapes,
)
from graphprune.io.feeds import declare_ranks, input_specs, make_feeds
from graphprune.io.order import toposort_model
from graphprune.io.shared_constants import retie_constants, retie_shapes, share_subgraph_constants
from graphprune.io.weights import WeightStore
from graphprune.passes.base import Pass, PassContext, PassManager, PassResult
from graphprune.pipeline import blame
from graphprune.pipeline import report as reports
from graphprune.pipeline.feed_values import DATA_CHECK_SAMPLES, FeedValues
from graphprune.pipeline.result import PruneResult
from graphprune.pipeline.selections import within_own_noise
from graphprune.planning.plan import Plan
from graphprune.rules import random_draws
from graphprune.verify import noise, preparation, saturation, validate
from graphprune.verify.metrics import count_params

Progress = Callable[[str], None]

#: models below this opset are converted to it before analysis
UPGRADE_BELOW = 11
UPGRADE_TO = 13
#: default verification tolerance of models that compute in float16/bfloat16 (their
#: rounding step is ~1e-3 relative; a pruned and a zeroed model round differently)
LOW_PRECISION_TOLERANCE = 1e-2
#: outputs the verification's feeds compared little or nothing of: checked again on data
IDLE_OUTPUTS = ("empty_outputs", "constant_outputs", "non_finite_outputs")


def normalize_keep(keep: Iterable[str] | str | None) -> tuple[str, ...]:
    """``keep`` as a tuple of names (a single string is one name, not its characters)."""
    if keep is None:
        return ()
    if isinstance(keep, str):
        return (keep,)
    names = tuple(keep)
    for name in names:
        if not isinstance(name, str):
            raise UsageError(f"keep takes node or tensor names, got {name!r}")
    return names




class Session(FeedValues):
    """A model on its way through the pipeline (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        *,
        keep: Iterable[str] | str | None = (),
        progress: Progress | None = None,
        debug: bool = False,
        input_shapes: dict[str, Any] | None = None,
    ) -> None:
        self.progress = progress
        #: shapes of graph inputs given by the caller; :meth:`feeds` chooses the other open sizes (analysis.probe_sizes)
        self.input_shapes = dict(input_shapes) if input_shapes else None
        self._probes: tuple[Any, dict] = (None, {})  # (a prepared model, its graphs' shape probes)
        self._probe_shapes: dict[str, Any] | None | bool = False
        self._counting: dict[str, Any] | None | bool = False  # see cost_shapes
        self._batch: int | None = None  # the verification's batch (see _verify_batch)
        self._tested: dict[str, Any] | None = None  # see tested_values (and index_highs, value_ranges:)
        self._index_highs: dict[str, int] | None = None
        self._ranges: dict[str, tuple[float, float]] | None = None
        self.verify_threads: int | None = None  # verification sessions' threads (1: results depend on their order)
        #: input shapes of the data the model will see (set by calibration: its samples')
        self.data_shapes: dict[str, tuple[int, ...]] | None = None
        #: a few calibration samples (set by calibration); verification runs on them instead of generated feeds where set
        self.data_feeds: list[dict[str, np.ndarray]] | None = None
        self.feeds_from_data: str | None = None
        self.branches_taken: dict[str, set[str]] | None = None  # If branches the data takes
        self.debug = debug
        self.keep = normalize_keep(keep)
        self.timings: dict[str, float] = {}
        self._timed_apart = 0.0  # seconds of sections timed apart from the stage they ran in (see stage)
        self._start = time.perf_counter()
        self.store = WeightStore()
        with self.stage("load"):
            loaded = self.store.take(model)
            self.seeded = random_draws.seed_unseeded(loaded)  # drawing ops, seeded for the work (not in the output)
            self.opset = model_io.check_opset(loaded)
            runtime.use_extensions_for(loaded)  # onnxruntime-extensions' ops, where installed
            converted_from = None
            as_loaded = None  # the graph the prepared one is checked against, when converted
            #: the graph as ONNX's version converter wrote it, before the rest of the preparation (a
            #: skeleton), where it ran: who is at fault when the prepared one fails
            self.as_converted: onnx.ModelProto | None = None
            if self.opset < UPGRADE_BELOW:
                as_loaded = onnx.ModelProto()
                as_loaded.CopyFrom(loaded)
                loaded = model_io.upgrade_opset(loaded, UPGRADE_TO)
                converted_from, self.opset = self.opset, UPGRADE_TO
                self.as_converted = onnx.ModelProto()
                self.as_converted.CopyFrom(loaded)
            #: parameters as the model came (constant folding may change the count)
            self.params_as_loaded = count_params(loaded, self.store.tensor_bytes)
            #: the inputs' and outputs' types as the user's file declares them (see :meth:`export`)
            self._declared_outputs = {v.name: onnx.TypeProto.FromString(v.type.SerializeToString())
                                      for v in (*loaded.graph.input, *loaded.graph.output)}
            #: what the normalisation rewrote that a reader of the result should know
            self.normalised: dict[str, Any] = {}  # (functions inlined, fused kernels lowered)
            ranks = declare_ranks(loaded, self.input_shapes)  # inputs that declare no shape
            if ranks:
                self.normalised["input_ranks_declared"] = ranks
            if self.store.densified:
                self.normalised["sparse_densified"] = list(self.store.densified)
            stale = stale_shapes.drop_stale(loaded)  # declared shapes the nodes contradict
            if stale:
                self.normalised["stale_shapes_dropped"] = stale
            #: the intermediate tensors whose shapes the user's file declares
            self.declared_shapes = {v.name for v in loaded.graph.value_info}
            if converted_from is not None:  # by ONNX's version converter, before anything else
                self.normalised["opset_converted"] = {"from": converted_from, "to": UPGRADE_TO}
            #: the graph as loaded (weights are references into the store: a small copy), which the prepared one is
            #: checked against (:mod:`graphprune.verify.preparation`); before ONNX's version converter, where it ran
            self.loaded = as_loaded if as_loaded is not None else onnx.ModelProto()
            if as_loaded is None:
                self.loaded.CopyFrom(loaded)
            #: folded tensors far larger than the values they are computed from, written back as
            #: their computation where the prune leaves them (:mod:`graphprune.io.expansions`)
            self.expansions: dict[str, Any] = {}
            self.prepared = ir.prepare(loaded, copy_model=False, store=self.store, notes=self.normalised,
                                       expansions=self.expansions)
            #: the original, as far as comparisons go (the prepared model computes the same)
            self.original = self.prepared
            self.verify_threads = noise.verification_threads(self.prepared)
            if self.input_shapes:  # a name or shape that does not fit: a usage error now
                from graphprune.io.feeds import input_specs, resolve_shapes

                resolve_shapes(input_specs(self.original), input_shapes=self.input_shapes)
        self.graph: gs.Graph | None = None
        self.analysis: Analysis | None = None
        self.model: onnx.ModelProto | None = None
        self.ctx = PassContext(opset=self.opset, debug=debug, debug_check=self._debug_check)
        self._paths: dict[int, tuple[onnx.ModelProto, Any]] = {}

    # ------------------------------------------------------------------ stages
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (times of a stage entered twice add up; a section timed apart inside it,
        the size probe, is not counted in it too: the listed times add up to the total)."""
        if self.progress is not None:
            self.progress(name)
        crash_guard.note(f"in the {name} stage")
        t0, apart = time.perf_counter(), self._timed_apart
        try:
            with validate.threads(self.verify_threads):
                yield
        finally:
            inner = self._timed_apart - apart
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0 - inner, 4)

    #: seconds between two progress lines inside a stage (:meth:`counter`)
    COUNTER_EVERY = 10.0

    def counter(self, label: str) -> Callable[[int, int], None] | None:
        """Progress inside a long stage: ``(done, total)`` reported as ``"label done/total"``
        at most every :attr:`COUNTER_EVERY` seconds (``None`` without a progress callback)."""
        if self.progress is None:
            return None
        last = [time.perf_counter()]

        def report(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] >= self.COUNTER_EVERY and done < total:
                last[0] = now
                self.progress(f"{label} {done}/{total}")

        return report

    def elapsed(self) -> float:
        return round(time.perf_counter() - self._start, 4)

    # ------------------------------------------------------------------ graph
    def import_graph(self, model: onnx.ModelProto | None = None) -> gs.Graph:
        """Start (or restart) the working graph from ``model`` (default: the prepared model)."""
        self.graph = ir.import_graph(self.prepared if model is None else model, self.store)
        self.analysis = None
        return self.graph

    def adopt(self, model: onnx.ModelProto) -> None:
        """Make ``model`` (one this session exported) the working model and graph again, the analysis kept."""
        analysis = self.analysis
        self.import_graph(model)
        self.model, self.analysis = model, analysis

    def analyze(self, *, stage: str = "analysis") -> Analysis:
        """Analyse the working graph as it is now (imported from the prepared model first)."""
        with self.stage(stage):
            fresh = self.graph is None  # as imported from the prepared model: its shape probes are reused
            if fresh:
                self.import_graph()  # (siblings share the parent's probes)
                self._probes = self._probes if self._probes[0] is self.prepared else (self.prepared, {})
            self.check_keep()
            self.analysis = analyze_graph(self.graph, self.opset, keep=self.keep, input_shapes=self.input_shapes,
                                          probe_cache=self._probes[1] if fresh else None)
        return self.analysis

    @property
    def low_precision(self) -> bool:
        """The model computes in 16-bit floats (its weights or inputs are float16/bfloat16)."""
        return reports.is_low_precision(self.prepared)

    def default_tolerance(self, base: float) -> float:
        """``base`` for float32 models; a tolerance that fits 16-bit floats, or activations
        quantized at run time (a rounding difference upstream can move a value by one
        quantization step), otherwise."""
        loose = self.low_precision or reports.quantizes_activations(self.prepared, self.opset)
        return max(base, LOW_PRECISION_TOLERANCE) if loose else base

    def check_keep(self) -> None:
        """Every ``keep`` name must name a node or a tensor of the model."""
        assert self.graph is not None
        known = {n.name for n in self.graph.nodes} | set(self.graph.tensors())
        known |= {n.name for n in self.prepared.graph.node} | {o for n in self.prepared.graph.node for o in n.output}
        missing = [k for k in self.keep if k not in known]
        if missing:
            raise UsageError(
                f"--keep names nothing in the model: {', '.join(missing[:5])}"
                + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            )

    def sibling(self) -> Session:
        """A session on the same loaded model with a working graph of its own (for a check
        model or an alternative rewrite); stage times go to this session's timings."""
        other = object.__new__(Session)
        other.__dict__.update(self.__dict__)
        other.graph, other.analysis, other.model = None, None, None
        other.ctx = PassContext(opset=self.opset, debug=self.debug, debug_check=other._debug_check)
        return other

    def apply(self, passes: list[Pass], *, fixed_point: bool = False,
              max_iterations: int = 10) -> PassResult:
        """Run ``passes`` on the working graph; their stats and times go to the report, and
        the result's ``stats`` hold this run's (per pass name)."""
        if self.graph is None:
            self.import_graph()
        assert self.graph is not None
        manager = PassManager(passes, fixed_point=fixed_point, max_iterations=max_iterations)
        result = manager.run(self.graph, self.ctx)
        self.graph = result.graph
        return result

    def export(self, *, declared_only: bool = False) -> onnx.ModelProto:
        """The working graph as a shape-inferred ``ModelProto`` (also kept as ``self.model``);
        ``declared_only``: with the intermediate shapes the user's file declares and no others
        (a final model that must compute as its original does: ONNX Runtime's layout pass
        chooses kernels from the shapes it is told)."""
        if self.graph is None:
            self.import_graph()
        assert self.graph is not None
        toposort_model(self.graph.cleanup(remove_unused_graph_inputs=False))
        model = ir.export_graph(self.graph, self.prepared, self.store)
        share_subgraph_constants(model, self.store.tensor_bytes)
        retie_constants(model, self.store.tensor_bytes)
        retie_shapes(model)
        # intermediate shapes are the prepared model's where they did not change, else inferred
        # afresh: those the analysis refined at two probe sizes (``shape_probe.refine_shapes``) are never written
        known = {v.name: v for v in self.prepared.graph.value_info}
        kept = [v for v in model.graph.value_info if known.get(v.name) == v]
        if len(kept) < len(model.graph.value_info):
            del model.graph.value_info[:]
            model.graph.value_info.extend(kept)
        # what custom operators' runs gave (a tokenizer's outputs): inference cannot redo it
        learnt = custom_shapes.learnt(self.prepared.graph.value_info, model.graph, self.opset)
        custom_shapes.put(model, learnt)
        self.model = model_io.infer_shapes(model, inplace=True)
        custom_shapes.put(self.model, learnt)  # the inference wrote them back without a shape
        # an ONNX-ML op that passes pruned channels (a Scaler) has new sizes: run it again
        if custom_shapes.annotate(self.model):
            self.model = model_io.infer_shapes(self.model, inplace=True)
        declared_shapes.keep_open_outputs(self.model, self._declared_outputs)
        if declared_only:
            model_io.keep_value_info(self.model, self.declared_shapes)
        return self.model

    def _debug_check(self, graph: gs.Graph, pass_name: str) -> None:
        try:
            model = model_io.infer_shapes(
                ir.export_graph(graph.copy(), self.prepared, self.store), inplace=True)
            self.check(model)
            validate.session(self.path_of(model))
        except Exception as exc:  # name the pass that broke the graph
            raise RewriteError(f"{pass_name} left an invalid graph: {str(exc).splitlines()[0]}") from exc

    def materialize(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A self-contained copy of a model of this session (weights in the proto)."""
        return self.store.materialize(model)

    def path_of(self, model: Any, *, keep: bool = True) -> Any:
        """A file of the store for a model proto (ORT and the checker read it with its external weights);
        paths pass through. ``keep=False``: a one-off model, not remembered (nor kept alive) for a later call."""
        if isinstance(model, onnx.ModelProto):
            cached = self._paths.get(id(model))
            if cached is not None and cached[0] is model:
                return cached[1]
            with declared_shapes.invented_cleared(model):  # (ORT folds shapes on them: see the module)
                path = self.store.write_model(model)
            if keep:
                self._paths[id(model)] = (model, path)
            return path
        return model

    def check(self, model: onnx.ModelProto) -> None:
        """``onnx.checker`` (full, by path) on a model of this session, held to the prepared
        original's standard (see :func:`graphprune.verify.validate.check_model`)."""
        validate.check_model(self.store.write_checker_model(model),
                             self.store.write_checker_model(self.prepared))

    # ------------------------------------------------------------------ verification
    def run_shapes(self) -> dict[str, Any] | None:
        """The input shapes verification runs at: the given ones, and for sizes left open, sizes
        the original runs with (:func:`~graphprune.analysis.probe_sizes.choose_input_shapes`)."""
        if self._probe_shapes is False:
            from graphprune.analysis.probe_sizes import choose_input_shapes, required_sizes
            from graphprune.io.feeds import input_specs

            started = time.perf_counter()  # no progress line: part of the stage running
            chosen = choose_input_shapes(self.path_of(self.original), specs := input_specs(self.original), self.input_shapes,
                                         values=self.tested_values(), required=required_sizes(self.original, specs, self.opset),
                                         float_ranges=self.value_ranges())
            self.timings["probe sizes"] = round(time.perf_counter() - started, 4)
            self._timed_apart += self.timings["probe sizes"]
            self._probe_shapes = chosen or self.input_shapes
        return self._probe_shapes or None

    def feeds(self, count: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
        """Random feeds for the original's inputs (the same for every comparison), at
        :meth:`run_shapes`; a dynamic batch of 2 where channels are merged with it
        (:attr:`Analysis.merges_batch`). Once :meth:`use_data_feeds` switched, the calibration
        samples instead (repeated where there are fewer than ``count``)."""
        if self.feeds_from_data and self.data_feeds:
            return [self.data_feeds[(seed + i) % len(self.data_feeds)] for i in range(count)]
        shapes = self.run_shapes()  # first: the batch is tried at these sizes
        return make_feeds(self.original, seed=seed, batch=self._verify_batch(), count=count, input_shapes=shapes,
                          values=self.tested_values(), int_highs=self.index_highs(), float_ranges=self.value_ranges())

    def _verify_batch(self) -> int:
        """2 where channels are merged with a dynamic batch and the original runs at batch 2
        (one run, once; a model exported for batch 1 only keeps batch 1), else 1."""
        if self.analysis is None:
            return 1  # nothing analysed, nothing merged (not cached: an analysis may follow)
        if self._batch is None:
            self._batch = 1
            if self.analysis.merges_batch:
                feeds = make_feeds(self.original, seed=0, batch=2, count=1, input_shapes=self.run_shapes(),
                                   values=self.tested_values(), float_ranges=self.value_ranges())
                if not any(v.ndim and v.shape[0] == 2 for v in feeds[0].values()):
                    return self._batch  # the given shapes fix the batch: nothing to try
                try:
                    validate.run(self.path_of(self.prepared), feeds[0], "the original")
                    self._batch = 2
                except Exception:  # VerificationError: batch 1 as before
                    pass
        return self._batch

    def cost_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Concrete input shapes at which MACs are counted (report, budget, latency table)
        where the original's inputs leave sizes open beyond the batch axis, or a layer has a
        size no input names, or the calibration sizes an open axis 0 other than 1 (a graph's atoms):
        the calibration samples' shapes where the user gave none (``--input-shape``), else :func:`~graphprune.analysis.probe_sizes.counting_shapes`; ``None``: nothing to size."""
        from graphprune.analysis.probe_sizes import counting_shapes, leading_sizes, open_dimensions

        specs = input_specs(self.original)
        # (sizes the user gave count, the batch too: four rows cost four times one)
        opened = bool(open_dimensions(specs)) or bool(self.input_shapes)
        if not opened and self.analysis is None:
            return None
        if self.data_shapes and not self.input_shapes and (opened or leading_sizes(specs, self.data_shapes)):
            return dict(self.data_shapes)
        if self._counting is False:  # decided on the analysed graph (its shapes derived) once there is one
            graph = self.analysis.graph if self.analysis is not None else ir.import_graph(self.prepared, self.store)
            shapes = counting_shapes(self.prepared, graph, specs, self.input_shapes, self.run_shapes)
            if self.analysis is None:
                return shapes
            self._counting = shapes
        return self._counting

    def cost_shape(self, graph: gs.Graph) -> Any:
        """The shape function that counts ``graph`` (the prepared model's) at :meth:`cost_shapes`
        (:func:`graphprune.verify.metrics.sized_shapes`); where the analysed graph cannot be
        sized there (behind an ``If`` whose branches differ in rank), the loaded one's sizes."""
        from graphprune.verify.metrics import sized_shapes

        shape = sized_shapes(self.prepared, graph, self.cost_shapes(), or_none=True, data_dir=self.store.root)
        return shape or sized_shapes(self.prepared, ir.import_graph(self.prepared, self.store), self.cost_shapes())

    def verify_against(
        self,
        reference: Any,
        what: str,
        *,
        tolerance: float,
        candidate: Any = None,
        overrides: dict[str, np.ndarray] | None = None,
        feeds: list[dict[str, np.ndarray]] | None = None,
        stage: str = "verify",
        optimize_reference: bool | None = None,
        emulate_quantization: bool = False,
        segment_candidate: bool = False,
        samples: int = 1,
    ) -> dict[str, Any]:
        """Compare ``candidate`` (default: the exported model) with ``reference``, on ``feeds``
        or ``samples`` of :meth:`feeds` (their fallbacks where the original does not run on them).
        Failures to check or run become ``{"ok": False, "error": ...}`` with the exception
        kept for :meth:`finish` to raise."""
        candidate = self.model if candidate is None else candidate
        compare = {"tolerance": tolerance, "reference_overrides": overrides, "optimize_reference": optimize_reference,
                   "emulate_quantization": emulate_quantization, "segment_candidate": segment_candidate,
                   "samples": samples}
        result = self._verify(reference, what, candidate, feeds, stage, compare)
        error = result.get("_error")
        if feeds is None and blame.did_not_run(error, what) and self.use_data_feeds(error):
            result = self._verify(reference, what, candidate, feeds, stage, compare)
        if blame.did_not_run(result.get("_error"), what):  # the input's fault, or the preparation's?
            fault = blame.input_fault(self, feeds)
            result = result if fault is None else {**result, "error": str(fault), "_error": fault}
        if self.feeds_from_data and feeds is None:
            result["feeds"] = self.feeds_from_data
        elif feeds is None and any(result.get(key) for key in IDLE_OUTPUTS) and self.data_feeds:
            result = self._verify_on_data(reference, what, candidate, stage, compare, result)
        return result

    def _verify_on_data(self, reference: Any, what: str, candidate: Any, stage: str, compare: dict[str, Any],
                        result: dict[str, Any]) -> dict[str, Any]:
        """Where some outputs had no element on the random feeds (a detector's boxes: no score
        passes its threshold on noise), one value throughout (a quantized model's 0s) or no
        finite value (swift-f0's pitch for a negative frequency bound), the
        comparison again on the calibration samples, kept where fewer outputs are so there
        (whatever its verdict)."""
        data = self.data_feeds[:DATA_CHECK_SAMPLES]
        again = self._verify(reference, what, candidate, data, stage, compare)

        def idle(found: dict[str, Any]) -> list[str]:
            return [name for key in IDLE_OUTPUTS for name in found.get(key, [])]

        if len(idle(again)) >= len(idle(result)):
            return result
        how = ("had no element" if result.get("empty_outputs") else "were constant" if result.get("constant_outputs")
               else "had no finite value")
        return {**again, "feeds": f"{len(data)} calibration samples (on random inputs "
                                  f"{', '.join(idle(result)[:3])} {how})"}

    def _verify(self, reference: Any, what: str, candidate: Any, feeds: list[dict[str, np.ndarray]] | None,
                stage: str, compare: dict[str, Any]) -> dict[str, Any]:
        compare = dict(compare)
        samples = compare.pop("samples", 1)
        with self.stage(stage):
            try:
                checked = isinstance(candidate, onnx.ModelProto)
                if checked:
                    self.check(candidate)
                result = validate.compare(
                    self.path_of(candidate), self.path_of(reference, keep=False),
                    feeds if feeds is not None else self.feeds(count=samples), what=what,
                    check=not isinstance(candidate, onnx.ModelProto), original=self.path_of(self.prepared),
                    pair_safe=saturation.may_saturate(self.prepared), **compare,
                )
                result["checker"] = result["checker"] or checked
                for key in IDLE_OUTPUTS:  # (by name: the prepared graph's outputs)
                    if key in result:
                        result[key] = [self.prepared.graph.output[j].name for j in result[key]]
                return result
            except OutputShapesDiffer as exc:
                return {"ok": False, "reference": what, "error": str(exc), "_error": exc, "shapes_differ": exc.outputs}
            except VerificationError as exc:
                return {"ok": False, "reference": what, "error": str(exc), "_error": exc}

    def check_preparation(self, tolerance: float) -> dict[str, Any]:
        """The prepared original against the loaded one on a calibration sample, else the verification's
        feeds (:func:`graphprune.verify.preparation.check_preparation`): the whole chain, checked."""
        if preparation.same_computation(self.loaded, self.prepared):
            return {"checked": True, "ok": True, "identical": True}
        with self.stage("verify"):
            return preparation.check_preparation(self.loaded, self.prepared, self.path_of,  # (on data: it runs)
                                                 (self.data_feeds or [])[:1] or self.feeds(), tolerance)

    def within_float_noise(self, candidate: Any, verification: dict[str, Any],
                           reference: Any = None) -> dict[str, Any]:
        """Accept a difference that is float noise of this model (:func:`selections.within_own_noise`)."""
        with validate.threads(self.verify_threads):
            return within_own_noise(self, candidate, verification, reference)

    def blaming_input(self, what: str, data: list[dict[str, np.ndarray]] | None = None) -> Any:
        """:func:`graphprune.pipeline.blame.blaming` of this session (a context manager)."""
        return blame.blaming(self, what, data)

    # ------------------------------------------------------------------ results
    def report(self, mode: str, plan: Plan, *, analysis: Analysis | None = None) -> dict[str, Any]:
        """The one report shape, for the exported model (see :mod:`graphprune.pipeline.report`)."""
        assert self.model is not None, "export() before report()"
        with self.stage("count"):  # (MACs at concrete sizes: half of a 40 k-node MAXIM's run, untimed before)
            report = reports.base_report(
                mode, self.prepared, self.model, plan,
                analysis if analysis is not None else self.analysis, self.ctx, self.store,
                input_shapes=self.cost_shapes(), taken=self.branches_taken,
            )
        report["params_before"] = self.params_as_loaded  # what the user's file held
        shapes = self.cost_shapes() if self.input_shapes else None
        if shapes and "macs_input_shapes" not in report:  # (the user's sizes, a batch too)
            report["macs_input_shapes"] = {k: list(v) for k, v in shapes.items()}
        if self.normalised:
            report["normalised"] = dict(self.normalised)
        return report

    def finish(self, report: dict[str, Any], plan: Plan, verification: dict[str, Any] | None, *,
               analysis: Analysis | None = None, model: onnx.ModelProto | None = None) -> PruneResult:
        """Attach verification and timings; raise :class:`VerificationError` on a failure (its ``result``
        carries the unverified result; the model is run once more as written; drawing ops lose the seeds given)."""
        error: GraphPruneError | None = None  # InvalidModelError: the input does not run
        if verification is None:
            verification = {"ok": None, "skipped": True}
        else:
            error = verification.pop("_error", None)
        if not verification.get("skipped") and verification.get("ok"):
            verification["preparation"] = self.check_preparation(verification.get("tolerance", 1e-5))
            if verification["preparation"].get("ok") is False:
                verification["ok"] = False
                error = (blame.conversion_fault(self, verification.get("tolerance", 1e-5))
                         or VerificationError(preparation.failure_message(verification["preparation"])))
                verification["error"] = str(error)
        report["verification"] = verification
        final = self.model if model is None else model
        if final is not None and self.expansions:  # (checked bit for bit: expansions.restore)
            recomputed = expansions.restore(final, self.expansions, self.store.tensor_bytes, self.check)
            if recomputed:
                report["params_after"], report["nodes_after"] = count_params(final), len(final.graph.node)
                report["constants_recomputed"] = recomputed
        report["timings"] = {**self.timings, "total": self.elapsed()}
        declared_shapes.forget_invented(final, declared_shapes.declared_sizes(self.loaded),
                                        reports.cut_axes(analysis if analysis is not None else self.analysis, plan))
        declared_shapes.restore_negative_sizes(self.model if model is None else model, self._declared_outputs)
        if verification.get("ok") and final is not None and (fault := validate.written_fault(  # (on data: it runs)
                self.store.write_model, final, (self.data_feeds or self.feeds())[0])) is not None:
            verification.update(ok=False, error=str(fault))
            error = fault
        if self.seeded and final is not None:  # (checked seeded; written to draw anew, as it came)
            random_draws.unseed(final)
        result = PruneResult(
            self.model if model is None else model, report, plan,
            analysis if analysis is not None else self.analysis, store=self.store,
        )
        result.verification_feeds = self.data_feeds if self.feeds_from_data else None
        if not verification.get("skipped") and not verification.get("ok"):
            exc = error or VerificationError(
                f"pruned model differs from {verification.get('reference', 'the reference')}: "
                f"max relative difference {verification.get('max_rel_diff', float('nan')):.3g} > "
                f"{verification.get('tolerance', 0):g}" + reports.tolerance_hint(self.prepared, self.opset)
            )
            exc.result = result  # type: ignore[attr-defined]
            raise exc
        return result
