"""Shapes behind the ops ONNX shape inference does not know (com.microsoft: ``MatMulNBits``,
the QOperator ops, fused kernels).

ONNX inference stops at such an op: its outputs, and every shape computed from them
(``Shape -> Gather -> Div`` into a ``Slice`` or ``Reshape``), stay unknown, so constant folding
cannot fold those computations and the analysis freezes what they touch ("bounds computed at
run time"). ONNX Runtime's symbolic shape inference knows most of these ops, and is taught the
rest by the rules that give an op's output shape (:meth:`OpRule.output_shape`).
:func:`annotate` writes what it finds into the model's ``value_info``, for ONNX inference to go
on from.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from graphprune.io.ort_schemas import ORT_ONNX_DOMAIN_OPS
from graphprune.io.tensor_protos import _detach
from graphprune.rules import registry

ONNX_DOMAINS = ("", "ai.onnx")


def _add_rule_handlers(engine: Any) -> None:
    """Teach the symbolic inference (which stops at the first op it does not know) the ops
    whose rules give their output shape, where it has no handler of its own."""

    def handler(rule: registry.OpRule) -> Any:
        def infer(node: onnx.NodeProto) -> None:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            shapes = [engine._get_shape(node, k) if name else None for k, name in enumerate(node.input)]
            for output, found in zip(node.output, rule.output_shapes(node.op_type, attrs, shapes), strict=False):
                if found is not None and output:
                    shape, like = found
                    elem = engine.known_vi_[node.input[like]].type.tensor_type.elem_type
                    engine.known_vi_[output].CopyFrom(helper.make_tensor_value_info(output, elem, shape))
        return infer

    for op, rule in registry.shape_rules().items():
        engine.dispatcher_.setdefault(op, handler(rule))


# Above this many operations an expression the symbolic inference asks sympy to simplify is
# kept as it is (the same value, unsimplified). Its expressions grow with every size a graph
# computes from another, and ``sympy.simplify`` is exponential in them: torchvision's Faster
# R-CNN computes its anchor counts through a dozen ``floor``s of the padded image size
# (200 operations, 11 s per simplification, 230 s of a 290 s prune; 3.8 s with the bound and
# not one size fewer found as a number). Expressions this large never simplify to a number.
SIMPLIFY_MAX_OPS = 40


class _BoundedSympy(types.ModuleType):
    """``sympy`` as the symbolic inference sees it: ``simplify`` bounded by
    :data:`SIMPLIFY_MAX_OPS`, everything else sympy's own."""

    def __init__(self, sympy: types.ModuleType) -> None:
        super().__init__("sympy")
        self._sympy = sympy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sympy, name)

    def simplify(self, expr: Any, *args: Any, **kwargs: Any) -> Any:
        if self._sympy.count_ops(expr) > SIMPLIFY_MAX_OPS:
            return expr
        return self._sympy.simplify(expr, *args, **kwargs)


def _symbolic_shape_infer() -> Any:
    """ONNX Runtime's ``tools/symbolic_shape_infer.py``, loaded as a module of its own: the
    ``onnxruntime.tools`` package imports torch when it is installed (2-3 s and a few hundred
    MB that pruning an ONNX file does not need). Its ``sympy`` is :class:`_BoundedSympy`."""
    import importlib.util
    import sys

    name = "graphprune._ort_symbolic_shape_infer"
    if name not in sys.modules:
        import onnxruntime

        path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"no {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.sympy = _BoundedSympy(module.sympy)
        # its warnings ("Unable to determine if a <= b, treat as equal") reached stderr through
        # the root logger's last resort on successful runs: what it could not decide is ours to handle
        logging.getLogger(name).setLevel(logging.ERROR)
        sys.modules[name] = module
    return sys.modules[name]


def symbolic_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The ranks ONNX Runtime's symbolic inference gives ``model``'s tensors (weightless:
    the weights are detached first); empty when it is not available."""
    skeleton, _ = _detach(model)
    inferred = symbolic_inference(skeleton)
    if inferred is None:
        return {}
    return {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` (a weightless skeleton will do) with ONNX Runtime's symbolic shape
    inference's ``value_info``; ``None`` when it is not available. Where it stops at a node it
    cannot handle (an ``If`` whose branch outputs carry no type), what it found before stands."""
    try:
        SymbolicShapeInference = _symbolic_shape_infer().SymbolicShapeInference  # noqa: N806
        # its ``infer_shapes`` writes a file into the working directory when some shape
        # stays unknown; run its loop directly and keep the partial result instead
        engine = SymbolicShapeInference(2**31 - 1, True, False, 0)
        _add_rule_handlers(engine)
        engine._preprocess(model)
    except Exception:  # optional (it needs sympy): fused graphs keep their unknown sizes
        return None
    # the values of external tensors (a weight store's, a skeleton's) cannot be read here:
    # they are unknown like a computed tensor's (their shapes stay known); reading one
    # raised and lost every shape (a bias added to a computed tensor)
    engine.initializers_ = {k: v for k, v in engine.initializers_.items()
                            if v.data_location != onnx.TensorProto.EXTERNAL}
    try:
        while engine.run_:
            engine._infer_impl()
    except Exception:  # noqa: BLE001 - the node it failed on ends the loop, not the results
        pass
    try:
        engine._update_output_from_vi()
    except Exception:  # noqa: BLE001
        return None
    return engine.out_mp_


def contrib_shapes(model: onnx.ModelProto) -> dict[str, list] | None:
    """Shapes (``None`` for a symbolic dim) of every tensor the symbolic inference sizes."""
    inferred = symbolic_inference(model)
    if inferred is None:
        return None
    shapes: dict[str, list] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def _shaped(graph: onnx.GraphProto) -> set[str]:
    values = [*graph.value_info, *graph.input, *graph.output]
    return {v.name for v in values if v.type.tensor_type.HasField("shape")} | {i.name for i in graph.initializer}


def annotate(model: onnx.ModelProto) -> bool:
    """Give the outputs of ops outside the ONNX domain (or ONNX Runtime's in it,
    :mod:`.ort_schemas`, or ONNX ops whose rule gives their shape where ONNX's inference gives
    up: ``STFT`` of a signal of open length) that ONNX inference left without a
    shape the shape the symbolic inference finds, in ``model``'s ``value_info`` (in place).
    ``True`` when any was added: infer again, for the shapes computed from them."""
    graph = model.graph
    shaped = _shaped(graph)
    given = registry.shape_rules()  # ONNX ops whose inference may give up (STFT of an open length)
    unknown = [n for n in graph.node
               if n.domain not in ONNX_DOMAINS or n.op_type in ORT_ONNX_DOMAIN_OPS or n.op_type in given]
    if not any(o and o not in shaped for n in unknown for o in n.output):
        return False
    skeleton, _ = _detach(model)
    inferred = symbolic_inference(skeleton)
    if inferred is None:
        return False
    added = [v for v in inferred.graph.value_info
             if v.name not in shaped and v.type.tensor_type.HasField("shape")
             and v.type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED]
    for value in added:
        dims = value.type.tensor_type.shape.dim
        for dim in dims:  # the symbolic inference's own names for unknown sizes mean nothing here
            if dim.HasField("dim_param"):
                dim.Clear()
    graph.value_info.extend(added)
    return bool(added)


def annotate_ranks(model: onnx.ModelProto) -> bool:
    """Give the main graph's computed tensors that ONNX inference left without any shape the
    rank (only: every size unknown) that the symbolic inference finds, in ``value_info`` (in
    place). A ``Reshape`` to a shape computed from open sizes (a TorchScript export's
    ``data.view(b, c, 1, 1)``) has none from ONNX inference, nor has anything after it, and
    every channel group behind it froze ("coupled with an axis of unknown rank"). ``True``
    when any was given: infer again."""
    graph = model.graph
    shaped = _shaped(graph)
    # where inference stopped: outputs without a shape of a node whose inputs all have one
    # (inference goes on from there); not of a node with a body (an If whose branches differ
    # in rank has no one rank, whatever the symbolic inference picks)
    open_ = {o for n in graph.node for o in n.output
             if o and o not in shaped and all(not i or i in shaped for i in n.input)
             and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)}
    if not open_:
        return False
    skeleton, _ = _detach(model)
    inferred = symbolic_inference(skeleton)
    found = {v.name: v for v in (inferred.graph.value_info if inferred is not None else ())
             if v.name in open_ and v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
             and v.type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED}
    if not found:
        return False
    declared = {v.name: v for v in graph.value_info}
    for name, value in found.items():
        rank = len(value.type.tensor_type.shape.dim)
        target = declared.get(name)
        if target is None:
            target = graph.value_info.add()
            target.name = name
            target.type.tensor_type.elem_type = value.type.tensor_type.elem_type
        if not target.type.HasField("tensor_type"):
            continue
        shape = target.type.tensor_type.shape
        shape.Clear()
        shape.dim.extend(onnx.TensorShapeProto.Dimension() for _ in range(rank))
    return True


def annotate_read_sizes(model: onnx.ModelProto, opset: int,
                        probes: Callable[[onnx.ModelProto], dict[str, tuple[list, list]]]) -> bool:
    """Give the tensors whose shape a node reads (``OpRule.reads_only_shape``: ``Shape``) the
    static sizes the symbolic inference finds where ONNX inference left a size open (in
    place). A TorchScript export with a dynamic batch computes its views from ``Shape``
    reads (ShuffleNet's ``chunk`` and channel shuffle: ``C // 2``, ``C // groups``); ONNX
    inference does not follow ``Div`` and ``Cast`` on sizes, so the channels after the first
    shuffle stay open, the ``Shape`` reads of them cannot fold and every later split froze
    ("bounds computed at run time"). The symbolic inference keeps the batch a symbol: a size
    it gives as a number is meant not to depend on the inputs' open sizes, but it also
    guesses sizes behind data-dependent ops (JetMoE's routed token counts came out as 32):
    a size is given only where ``probes(model)`` (the two shape probes, ``{name: (shape at
    one set of input sizes, shape at another)}``) finds that same number at both. ``True``
    when any was given: infer and fold again."""
    graph = model.graph
    values = {v.name: v for v in graph.value_info}
    read = set()
    for node in graph.node:
        rule = registry.lookup(node.domain or "", node.op_type, opset)
        if rule is not None and rule.reads_only_shape and node.input and node.input[0] in values:
            dims = values[node.input[0]].type.tensor_type.shape.dim
            # a size ONNX inference lost (it names those ``unk__N``), not an input's own symbol
            if any(not d.HasField("dim_value") and (not d.dim_param or d.dim_param.startswith("unk__"))
                   for d in dims):
                read.add(node.input[0])
    if not read:
        return False
    skeleton, _ = _detach(model)
    inferred = symbolic_inference(skeleton)
    if inferred is None:
        return False
    candidates: dict[tuple[str, int], int] = {}  # (name, axis): the size the symbolic inference gives
    for found in inferred.graph.value_info:
        if found.name not in read or not found.type.tensor_type.HasField("shape"):
            continue
        dims, known = values[found.name].type.tensor_type.shape.dim, found.type.tensor_type.shape.dim
        if len(dims) != len(known):
            continue
        for axis, (dim, size) in enumerate(zip(dims, known, strict=True)):
            if not dim.HasField("dim_value") and size.dim_value > 0:
                candidates[(found.name, axis)] = size.dim_value
    if not candidates:
        return False
    try:
        probed = probes(model)
    except Exception:  # noqa: BLE001 - no confirmation, nothing given
        return False
    given = False
    for (name, axis), size in candidates.items():
        pair = probed.get(name)
        if pair is not None and all(len(p) > axis and p[axis] == size for p in pair):
            dim = values[name].type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_value = size
            given = True
    return given
