"""Models that hold no weight tensor: nothing to prune, answered before any preparation.

Structural pruning removes slices of weight tensors. A model with none — no initializer,
sparse initializer or ``Constant`` tensor of two or more numbers, in the main graph, any
subgraph or any local function — has nothing to prune: a tree ensemble exported by
skl2onnx or onnxmltools keeps its parameters in node attributes (a 194 MB LightGBM
classifier: millions of entries in the attributes of one ``TreeEnsembleClassifier``), a
tokenizer keeps its vocabulary there. The ordinary session would convert its opset, prepare
and analyse it, verify and count it, only to say that nothing was found (255 s and 9.7 GB on
that classifier). Here the model is loaded once, checked (``onnx.checker``, one ONNX Runtime
run on generated inputs), counted, and returned unchanged with the one report shape and a
``nothing_prunable`` line that says why; :func:`analysis` is the dependency analysis
``graphprune.analyze`` returns for it (no channel group).

The test reads tensors only, no op's meaning: :func:`find` first walks the top-level
initializers of a file's protobuf wire format (:mod:`graphprune.io.wire`), so a model with
weights is recognised without being parsed, then parses the rest and looks at every tensor.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.analysis import Analysis
from graphprune.analysis.coupling import CouplingContext
from graphprune.errors import InvalidModelError, UsageError, VerificationError
from graphprune.io import model_io, runtime, wire
from graphprune.io.graph_reads import subgraphs
from graphprune.pipeline.result import PruneResult
from graphprune.planning.plan import Plan
from graphprune.rules import registry

Progress = Callable[[str], None]

#: element types that are not numbers: a tensor of these is no weight
NOT_NUMBERS = frozenset({onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING, onnx.TensorProto.BOOL,
                         onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128})
#: ``Constant`` attributes that hold a tensor (lists of numbers included)
CONSTANT_TENSORS = ("value", "sparse_value", "value_floats", "value_ints")
#: op types named as holding the parameters: those with at least this share of the
#: attribute entries (list elements, tensor elements), at most :data:`NAMED_OPS`
NAMED_SHARE = 0.1
NAMED_OPS = 3
#: the verification tolerance reported where none was given (nothing is compared)
DEFAULT_TOLERANCE = 1e-4


@dataclass
class WeightlessModel:
    """A model found to hold no weight tensor (see the module docstring)."""

    #: the model as loaded (external data not read); the caller's own for a ``ModelProto``
    model: onnx.ModelProto
    #: the file it was loaded from (ONNX Runtime and the checker read it), else ``None``
    path: Path | None
    opset: int
    #: where its parameters are instead (``"its parameters are attributes of ..."``)
    where: str
    #: ``model`` is the caller's own ``ModelProto`` (a result gets a copy)
    borrowed: bool = False
    #: seconds :func:`find` took (the report's ``load``)
    seconds: float = 0.0


@dataclass
class WeightlessAnalysis(Analysis):
    """The analysis of a model without weight tensors: no channel group, the ops without a
    rule, and the reason (``nothing_prunable``) that ``graphprune analyze`` prints."""

    nothing_prunable: str = ""


# --------------------------------------------------------------------------- detection


def _is_weight(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type not in NOT_NUMBERS and math.prod(tensor.dims) >= 2


def _graphs(model: onnx.ModelProto) -> list[onnx.GraphProto | onnx.FunctionProto]:
    """The main graph, every local function and every subgraph of their nodes."""
    tops = [model.graph, *model.functions]
    return [*tops, *(sub for top in tops for sub in subgraphs(top))]


def _constant_holds_weight(node: onnx.NodeProto) -> bool:
    for attr in node.attribute:
        if attr.name not in CONSTANT_TENSORS:
            continue  # (a scalar, a string)
        if attr.name == "value" and _is_weight(attr.t):
            return True
        if attr.name == "sparse_value" and (attr.sparse_tensor.values.data_type not in NOT_NUMBERS
                                            and math.prod(attr.sparse_tensor.dims) >= 2):
            return True
        if attr.name in ("value_floats", "value_ints") and len(attr.floats) + len(attr.ints) >= 2:
            return True
    return False


def holds_weight_tensor(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds a weight tensor (see the module docstring), or a tensor whose
    data lies in an external file (left to the ordinary path, which reads it)."""
    for graph in _graphs(model):
        if isinstance(graph, onnx.GraphProto):
            for tensor in graph.initializer:
                if _is_weight(tensor) or tensor.data_location == onnx.TensorProto.EXTERNAL:
                    return True
            for sparse in graph.sparse_initializer:
                if (sparse.values.data_type not in NOT_NUMBERS and math.prod(sparse.dims) >= 2) or (
                        sparse.values.data_location == onnx.TensorProto.EXTERNAL):
                    return True
        for node in graph.node:  # (a node that reads nothing and holds a tensor: a Constant)
            if not node.input and (
                    _constant_holds_weight(node)
                    or any(a.t.data_location == onnx.TensorProto.EXTERNAL for a in node.attribute)):
                return True
    return False


def top_level_weight(buf: Any) -> bool | None:
    """From a serialized ``ModelProto``: ``True`` when one of the main graph's initializers
    or sparse initializers is a weight tensor (read from the wire format: nothing parsed,
    no weight read), ``False`` when none is (constants and subgraphs are not looked at),
    ``None`` when the bytes are not a protobuf the reader understands."""
    try:
        return any(data_type not in NOT_NUMBERS and math.prod(dims) >= 2
                   for dims, data_type in wire.top_level_tensors(buf))
    except (wire.WireError, IndexError):
        return None


def find(source: Any) -> WeightlessModel | None:
    """``source`` (a path, bytes or a ``ModelProto``) loaded, where it holds no weight tensor;
    ``None`` where it does (the ordinary path takes it, nothing kept). A source that does
    not load raises what the ordinary load raises (:func:`graphprune.io.model_io.load_model`)."""
    started = time.perf_counter()
    path = None
    if isinstance(source, onnx.ModelProto):
        model = source  # (not copied: inspected, and copied for the result only if weightless)
        model_io.check_structure(model, "the given ModelProto")
    elif isinstance(source, bytes | bytearray | memoryview):
        if top_level_weight(memoryview(source)):
            return None
        model = model_io.load_model(bytes(source), load_external_data=False)
    elif isinstance(source, str | os.PathLike):
        path = Path(os.fspath(source))
        if (path.is_file() and path.suffix.lower() not in model_io.TEXT_SUFFIXES
                and wire.in_file(path, top_level_weight)):
            return None
        model = model_io.load_model(path, load_external_data=False)
    else:
        return None  # the ordinary load says what it takes
    if holds_weight_tensor(model):
        return None
    opset = model_io.check_opset(model)
    return WeightlessModel(model, path, opset, _where(model), borrowed=model is source,
                           seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------- explanation


def _attribute_entries(attr: onnx.AttributeProto) -> int:
    """How many values an attribute holds as a list or a tensor (one value: none counted)."""
    count = len(attr.floats) + len(attr.ints) + len(attr.strings)
    if attr.HasField("t"):
        count += math.prod(attr.t.dims)
    count += sum(math.prod(t.dims) for t in attr.tensors)
    if attr.HasField("sparse_tensor"):
        count += math.prod(attr.sparse_tensor.dims)
    return count


def _op_key(node: onnx.NodeProto) -> str:
    domain = node.domain or ""
    return f"{domain}::{node.op_type}" if domain not in ("", "ai.onnx") else node.op_type


def parameter_ops(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """The op types whose attributes hold most of the model's values (``NAMED_SHARE`` of
    them or more, at most ``NAMED_OPS``, most first), each with its count of such nodes."""
    entries: Counter[str] = Counter()
    nodes: Counter[str] = Counter()
    for graph in _graphs(model):
        for node in graph.node:
            held = sum(_attribute_entries(a) for a in node.attribute)
            if held >= 2:
                entries[_op_key(node)] += held
                nodes[_op_key(node)] += 1
    total = sum(entries.values())
    return [(op, nodes[op]) for op, held in entries.most_common(NAMED_OPS) if held >= NAMED_SHARE * total]


def _where(model: onnx.ModelProto) -> str:
    ops = parameter_ops(model)
    return ("its parameters are attributes of " + ", ".join(f"{op} (x{n})" for op, n in ops)
            if ops else "no initializer or constant of two or more numbers")


def explain(found: WeightlessModel, *, pruned: bool = True) -> str:
    """The one line of ``report["nothing_prunable"]`` (``pruned=False``: of the analysis)."""
    return (f"nothing prunable: the model holds no weight tensor ({found.where}), and structural "
            "pruning removes slices of weight tensors" + (": the output is the input unchanged" if pruned else ""))


# --------------------------------------------------------------------------- analysis


def _working_opset(opset: int) -> int:
    """The opset the ordinary path analyses at (models below it are converted first)."""
    from graphprune.pipeline.session import UPGRADE_BELOW, UPGRADE_TO

    return UPGRADE_TO if opset < UPGRADE_BELOW else opset


def _unsupported(model: onnx.ModelProto, opset: int) -> dict[str, list[str]]:
    """The main graph's nodes without a rule that couples, by op type (as the analysis
    lists them, at the opset it works at)."""
    found: dict[str, list[str]] = {}
    working = _working_opset(opset)
    for index, node in enumerate(model.graph.node):
        rule = registry.lookup(node.domain or "", node.op_type, working)
        if rule is None or not rule.couples:
            found.setdefault(_op_key(node), []).append(node.name or f"{node.op_type}_{index}")
    return found


def check_keep(model: onnx.ModelProto, keep: Iterable[str]) -> None:
    """Every ``keep`` name must name a node or a tensor of the main graph (as the session checks)."""
    graph = model.graph
    known = {n.name for n in graph.node} | {t for n in graph.node for t in (*n.input, *n.output)}
    known |= {v.name for v in (*graph.input, *graph.output, *graph.initializer)}
    missing = [k for k in keep if k not in known]
    if missing:
        raise UsageError(f"--keep names nothing in the model: {', '.join(missing[:5])}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))


def analysis(found: WeightlessModel, *, keep: Iterable[str] = (), graph: gs.Graph | None = None) -> WeightlessAnalysis:
    """The dependency analysis of ``found``: no channel group (no weight makes one), the ops
    without a rule, the reason. ``graph``: the graph it is of (default: the model imported
    as loaded, at its own opset; no conversion or preparation ran)."""
    from graphprune.io import ir

    check_keep(found.model, keep)
    if graph is None:
        graph = ir.import_graph(found.model)
    opset = found.opset

    def rule_for(node: gs.Node) -> registry.OpRule | None:
        return registry.lookup(node.domain or "", node.op, opset)

    return WeightlessAnalysis(graph=graph, opset=opset, groups=[], unsupported=_unsupported(found.model, opset),
                              context=CouplingContext(graph, opset, rule_for), nothing_prunable=explain(found, pruned=False))


# --------------------------------------------------------------------------- prune


def _interface(model: onnx.ModelProto, input_shapes: dict[str, Any] | None) -> onnx.ModelProto:
    """A model of ``model``'s graph inputs and (small) initializers only, inputs that declare
    no shape given the rank of their ``input_shapes`` (what the session declares on its copy,
    :func:`~graphprune.io.feeds.declare_ranks`; the model itself stays as given); the given
    shapes checked against it. Usage errors as the session's."""
    from graphprune.io.feeds import declare_ranks, input_specs, resolve_shapes

    interface = onnx.ModelProto()
    interface.graph.input.extend(model.graph.input)
    interface.graph.initializer.extend(model.graph.initializer)
    declare_ranks(interface, input_shapes)
    if input_shapes:
        resolve_shapes(input_specs(interface), input_shapes=input_shapes)
    return interface


def _run_once(found: WeightlessModel, interface: onnx.ModelProto, input_shapes: dict[str, Any] | None,
              samples: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """One ONNX Runtime run on generated inputs (on the first calibration sample where those
    fail), and ``onnx.checker``: the verification's entries. An input that does not run is
    the input's fault (:class:`InvalidModelError`, exit 2), as in the ordinary path; the
    checker's verdict is recorded, not enforced (the output is the input: the ordinary path
    checks the graph it prepared, with the shapes it declared, never the file as given)."""
    from graphprune.analysis.probe_sizes import open_dimensions
    from graphprune.io.feeds import input_specs, make_feeds
    from graphprune.verify import validate

    model = found.path if found.path is not None else found.model
    runtime.use_extensions_for(found.model)
    feeds = make_feeds(interface, input_shapes=input_shapes)
    ran: dict[str, Any] = {}
    try:
        validate.run(model, feeds[0], "the input model")
    except VerificationError as fault:
        for sample in samples[:1]:
            try:
                validate.run(model, sample, "the input model")
                ran = {"feeds": "calibration samples (the model does not run on random inputs: "
                                f"{str(fault)[:160]})"}
            except VerificationError:
                pass
        if not ran:
            unknown = validate.unregistered_op(found.model)  # says more than ORT's loader
            if unknown:
                raise InvalidModelError(f"the input model fails onnx.checker: {unknown}") from fault
            specs = input_specs(interface)
            chosen = sorted({name for dims in open_dimensions(specs, input_shapes).values() for name, _ in dims})
            at = ", ".join(f"{n}={'x'.join(map(str, feeds[0][n].shape))}" for n in chosen[:4] if n in feeds[0])
            hint = (f" (run at sizes chosen for the open dimensions: {at}; if the model needs others, give "
                    "them with --input-shape NAME=d0,d1,...)") if at else ""
            raise InvalidModelError(str(fault) + hint) from fault
    try:
        onnx.checker.check_model(os.fspath(model) if isinstance(model, Path) else model)
        ran["checker"] = True
    except onnx.checker.ValidationError as exc:
        ran.update(checker=False, checker_error=str(exc).splitlines()[0])
    return ran


def _calibration_samples(interface: onnx.ModelProto, calibration: Any, holdout: float) -> list[dict[str, np.ndarray]]:
    """``calibration`` read and checked as the ordinary path checks it (its errors are
    usage errors); the samples, none for synthetic data."""
    from graphprune.calibration import synthetic
    from graphprune.calibration.data import load_calibration

    if calibration is None or synthetic.parse(calibration) is not None:
        return []
    data = load_calibration(calibration, interface, holdout=holdout)
    return [*data.samples, *data.holdout]


def _count(model: onnx.ModelProto) -> tuple[int, int]:
    """Parameters and MACs as the counters give them; MACs counted only where an op that
    counts them is there at all (a graph import of a model of large attributes is costly)."""
    from graphprune.verify.metrics import count_macs, count_params

    opset = _working_opset(model_io.default_opset(model))
    layers = any(registry.overriding_rule(n.domain or "", n.op_type, opset, "macs") is not None
                 for graph in _graphs(model) for n in graph.node)
    return count_params(model), count_macs(model) if layers else 0


def _check_erase_blocks(found: WeightlessModel, k: Any) -> None:
    """As depth pruning checks its count, on a model of no residual block."""
    from graphprune.pipeline.depth import check_count

    check_count(k)
    what = (f"{k:g} of the residual blocks" if isinstance(k, float) and k < 1
            else f"{int(k)} residual block{'s' if int(k) != 1 else ''}")
    if k > 0:
        raise UsageError(f"cannot erase {what}: the model has 0 (it holds no weight tensor; {found.where})")


def unchanged(
    found: WeightlessModel,
    mode: str,
    *,
    verify: bool = True,
    tolerance: float | None = None,
    keep: Iterable[str] = (),
    input_shapes: dict[str, Any] | None = None,
    progress: Progress | None = None,
    calibration: Any = None,
    holdout: float = 0.2,
    budget: tuple[str, float] | None = None,
    max_ratio: float | None = None,
    erase_blocks: int | float | None = None,
) -> PruneResult:
    """The prune of a model without weight tensors in ``mode`` (``ratio``, ``lossless``,
    ``erase_blocks``, ``erase_blocks+lossless`` or ``budget``): the input unchanged, checked
    to load and run, with the report every mode gives. A MACs or parameter target, or blocks
    to erase, cannot be met: usage errors, as on any model without those."""
    from graphprune.analysis.targets import kind_summary
    from graphprune.pipeline.report import analysis_sections
    from graphprune.verify.metrics import uncounted_bodies

    started = time.perf_counter()
    timings: dict[str, float] = {}
    if erase_blocks is not None:
        _check_erase_blocks(found, erase_blocks)
    if budget is not None and budget[0] != "latency":
        raise UsageError(f"--target-{budget[0]} has nothing to reduce: the model holds no weight "
                         f"tensor ({found.where})")
    the_analysis = analysis(found, keep=keep, graph=gs.Graph())  # (the report's sections: no group)
    interface = _interface(found.model, input_shapes)
    samples = _calibration_samples(interface, calibration, holdout)
    timings["load"] = round(found.seconds + time.perf_counter() - started, 4)
    verification: dict[str, Any] = {"ok": None, "skipped": True}
    if verify:
        if progress is not None:
            progress("verify")
        start = time.perf_counter()
        ran = _run_once(found, interface, input_shapes, samples)
        verification = {"ok": True, "reference": "the original: the output is the input unchanged",
                        "ort": True, "output_shapes_match": True, "samples": 1,
                        "max_abs_diff": 0.0, "max_rel_diff": 0.0,
                        "tolerance": DEFAULT_TOLERANCE if tolerance is None else tolerance,
                        "unchanged": True, **ran}
        timings["verify"] = round(time.perf_counter() - start, 4)
    start = time.perf_counter()
    model = found.model
    params, macs = _count(model)
    report: dict[str, Any] = {"mode": mode, "params_before": params, "params_after": params,
                              "macs_before": macs, "macs_after": macs,
                              "nodes_before": len(model.graph.node), "nodes_after": len(model.graph.node),
                              "untied_constants": 0}
    uncounted = uncounted_bodies(model)
    if uncounted:
        report["macs_uncounted"] = uncounted
    report.update(analysis_sections(the_analysis, Plan()))
    why = explain(found)
    if calibration is not None:
        why += "; the calibration data is not needed (an unchanged model has no fidelity to measure)"
    report["nothing_prunable"] = why
    report["erased_nodes"] = []
    report["passes"], report["pass_stats"] = {}, {}
    if mode == "ratio" or mode == "budget":
        report["kinds"] = kind_summary(the_analysis)
    if "lossless" in mode:
        report["lossless"] = {"rounds": [], "constants_folded": 0, "skipped_groups": []}
    if mode.startswith("erase_blocks"):
        report["depth"] = {"blocks_found": 0, "blocks_erased": [], "blocks": []}
    if budget is not None:
        report["budget"] = {"target": budget[0], "fraction": budget[1], "max_ratio": max_ratio,
                            "groups_allocated": 0, "achieved": 1.0, "met": False, "widths": [],
                            "measured_by": "not measured: the output is the input unchanged"}
    timings["count"] = round(time.perf_counter() - start, 4)
    report["verification"] = verification
    report["timings"] = {**timings, "total": round(found.seconds + time.perf_counter() - started, 4)}
    if found.borrowed:
        model = onnx.ModelProto()  # the caller's proto stays theirs
        model.CopyFrom(found.model)
    return PruneResult(model, report, Plan())
