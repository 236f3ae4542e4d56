"""Recurrent layers that an exporter wrote as a ``Loop``: lowered to ONNX's LSTM, GRU and RNN.

tf2onnx converts a Keras 3 ``LSTM``, ``GRU`` or ``SimpleRNN`` (TensorFlow 2.16 on) to a
``Loop`` whose body computes the cell one time step at a time: ``Gather`` the step's input
from the time-major sequence, a ``MatMul`` (or ``Gemm``) by the kernel and one by the
recurrent kernel, the gates, and the new states as loop-carried values and as the one scan
output. No rule reads a ``Loop`` body, so every group around the layer froze and the layer
itself never pruned. :meth:`LoopRule.lowered` recognises such a body and writes the layer as
the standard op (:mod:`graphprune.rules.recurrent` prunes its hidden units, refits what it
feeds), with the Keras gate order and bias layout converted (GRU ``reset_after`` is
``linear_before_reset``).

Recognising is two steps, both before anything is built:

1. **shape of the body**: only the ops a cell uses (:data:`BODY_OPS`: no ``Where`` of a
   masked sequence, no nested subgraph), exactly one sequence read (``Gather`` on axis 0 by a
   loop counter) from the outer scope (tf2onnx) or carried unchanged through the loop
   (jax2onnx), the kernel ``[input, G*H]`` read from the step's input and the recurrent kernel
   ``[H, G*H]`` from one float state (G = 1 RNN, 3 GRU, 4 LSTM with a second state), in one
   product each or one per gate on ``Split``/``Slice`` parts (Keras with dropout), at most one bias of ``G*H`` or ``2*G*H`` values, every other
   input constant or an initial state, comparisons only of the loop's counters (a comparison
   of data, a mask or an early stop, might never fire on the check's random inputs);
2. **the same function**: the ``Loop`` (with what computes its trip count and condition from
   constants and the sequence's shape) and each candidate standard op run in ONNX Runtime on
   the same random sequence and random initial states, at the sequence length of the model
   (two lengths where it is not fixed); the first candidate whose final states and scanned
   outputs match (relative difference :data:`TOLERANCE`) is the lowering.

A ``Loop`` that is anything else stays, and its groups freeze as before (``no rule for
Loop``: :attr:`LoopRule.couples` is false, the rule only lowers), with what it lacks in the
reason (:meth:`LoopRule.unlowered_reason`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from graphprune.rules.registry import OpRule, register

#: the ops of a recurrent cell's body (tf2onnx's Keras 3 cells, their loop condition)
BODY_OPS = frozenset({
    "MatMul", "Gemm", "Add", "Sub", "Mul", "Sigmoid", "Tanh", "Relu", "Split", "Slice", "Squeeze",
    "Unsqueeze", "Gather", "Identity", "Cast", "Less", "LessOrEqual", "Greater", "And", "Constant",
    "Reshape", "Expand", "Concat",  # jax2onnx broadcasts the bias
    "Clip", "Min", "Max", "Div",  # a hard sigmoid: Keras 3's relu6(x + 3) / 6, Keras 2's clip(0.2 x + 0.5, 0, 1)
})
#: the (alpha, beta) of ``HardSigmoid`` (``max(0, min(1, alpha x + beta))``) a body that clips may compute:
#: Keras 3's ``relu6(x + 3) / 6``, and Keras 2's (ONNX's default)
HARD_SIGMOIDS = ((1 / 6, 0.5), (0.2, 0.5))
#: largest relative difference between the Loop and its lowered form on the check's inputs
TOLERANCE = 1e-4
#: comparisons: in a cell's body only on the loop's counters (:func:`_compares_counters_only`)
_COMPARISONS = frozenset({"Less", "LessOrEqual", "Greater", "And"})
#: the ops that may read a value from outside the loop other than the sequence (its length)
_BOUND_READERS = _COMPARISONS | {"Cast"}
#: ONNX LSTM's gate order (i, o, f, c) from Keras's (i, f, c, o)
_LSTM_ORDER = (0, 3, 1, 2)
#: most nodes computing a Loop's trip count and condition that the check reproduces
_MAX_CONE = 64


@dataclass
class _Cell:
    x: gs.Tensor  # the sequence, time-major [T, B, input]
    kx: np.ndarray  # [input, G*H]
    kh: np.ndarray  # [H, G*H]
    bias: np.ndarray | None
    states: list[int]  # carried indices: h (the one the recurrent kernel reads), then c
    counters: list[int]  # carried integer values (the time index)
    invariants: dict[int, gs.Tensor] = field(default_factory=dict)  # carried unchanged
    limits: list[gs.Tensor] = field(default_factory=list)  # other outer values (loop bounds)
    ops: frozenset[str] = frozenset()  # the body's op types

    @property
    def gates(self) -> int:
        return self.kh.shape[1] // self.kh.shape[0]


def _subgraphs(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and any(isinstance(g, gs.Graph) for g in v))
               for v in node.attrs.values())


def _dtype(tensor: gs.Tensor) -> np.dtype | None:
    try:
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values).dtype
        return np.dtype(tensor.dtype) if tensor.dtype is not None else None
    except TypeError:
        return None


def _recognise(node: gs.Node) -> _Cell | str:
    """The cell of a Loop whose body is a recurrent layer's step, or why it is not one."""
    body = node.attrs.get("body")
    n = len(node.inputs) - 2
    if not isinstance(body, gs.Graph) or n < 1 or len(body.inputs) != n + 2 or len(body.outputs) != n + 2:
        return "no carried state or not one scanned output"  # a cell scans its hidden states
    other = sorted({b.op for b in body.nodes
                    if b.op not in BODY_OPS or (b.domain or "") not in ("", "ai.onnx") or _subgraphs(b)})
    if other:
        return f"its body has {', '.join(other[:4])}"
    carried = body.inputs[2:]
    invariants = {i: node.inputs[2 + i] for i in range(n) if _passed_on(body.outputs[1 + i], carried[i])}
    by_name = {t.name: i for i, t in enumerate(carried)}

    def constant(t: gs.Tensor) -> np.ndarray | None:
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        i = by_name.get(t.name)
        return np.asarray(invariants[i].values) if isinstance(invariants.get(i), gs.Constant) else None

    produced = {t.name for b in body.nodes for t in b.outputs}
    local = produced | {t.name for t in body.inputs}
    outer = {t.name: t for b in body.nodes for t in b.inputs
             if t.name and t.name not in local and not isinstance(t, gs.Constant)}
    # the sequence: read from the outer scope (tf2onnx) or carried unchanged (jax2onnx)
    sequences = {**outer, **{carried[i].name: t for i, t in invariants.items() if not isinstance(t, gs.Constant)}}
    gathers = [b for b in body.nodes if b.op == "Gather" and b.inputs[0].name in sequences]
    if len(gathers) != 1 or int(gathers[0].attrs.get("axis", 0)) != 0:
        return "no one step read from a sequence"
    gather = gathers[0]
    x = sequences[gather.inputs[0].name]
    if any(not isinstance(t, gs.Constant) and t is not x and (k := _dtype(t)) is not None and k.kind == "f"
           for t in invariants.values()):
        return "a weight computed outside the loop"  # a float carried unchanged, not the sequence
    index = gather.inputs[1].name
    varying = [i for i in range(n) if i not in invariants]
    kinds = {i: _dtype(node.inputs[2 + i]) for i in varying}
    if any(k is None for k in kinds.values()):
        return "a carried value of unknown type"
    counters = [i for i in varying if kinds[i].kind in "iu"]
    states = [i for i in varying if kinds[i].kind == "f"]
    if len(counters) + len(states) != len(varying) or index not in (body.inputs[0].name, *(carried[i].name for i in counters)):
        return "the step is not read by the loop counter"
    found = _kernel(gather.outputs[0], constant)
    readers = [(i, k) for i, k in ((i, _kernel(carried[i], constant)) for i in states) if k is not None]
    if found is None or len(readers) != 1:
        return "no constant kernel read from the step and the state"
    kx, x_source = found
    h, (kh, h_source) = readers[0]
    units, width = kh.shape
    gates = width // units if units else 0
    if gates not in (1, 3, 4) or gates * units != width or kx.shape[1] != width or len(states) != (2 if gates == 4 else 1):
        return "kernels of no LSTM/GRU/RNN's shape"
    unique: dict[str, np.ndarray] = {}  # the bias: any other float constant of the gates' size
    for t in {t.name: t for b in body.nodes for t in b.inputs if t.name not in (x_source, h_source)}.values():
        v = constant(t)
        if v is not None and v.dtype.kind == "f" and v.size in (width, 2 * width) and v.size > 1:
            unique[t.name] = v
    if len(unique) > 1:
        return "more than one bias"
    bounds = [t for name, t in outer.items() if name != x.name]
    if any(b.op not in _BOUND_READERS for b in body.nodes for t in b.inputs if t.name in outer and t.name != x.name):
        return "another value read from outside the loop (a mask?)"  # only the sequence and its bounds
    counted = {body.inputs[0].name, body.inputs[1].name, *(carried[i].name for i in counters),
               *(carried[i].name for i, t in invariants.items() if t is not x and (k := _dtype(t)) is not None and k.kind != "f"),
               *(t.name for t in bounds)}
    if not _compares_counters_only(body, counted):
        return "a comparison of data (a mask or an early stop)"
    return _Cell(x, kx, kh, next(iter(unique.values()), None), [h, *(i for i in states if i != h)],
                 counters, invariants, bounds,
                 frozenset(b.op for b in body.nodes))


def _compares_counters_only(body: gs.Graph, counted: set[str]) -> bool:
    """Whether every comparison in the body (and the loop condition) reads only values computed
    from the loop's counters, bounds and constants: a comparison of data (a mask, an early
    stop) may never fire on the check's random inputs and yet on real ones."""
    derived = set(counted)
    for b in body.nodes:  # a body is in topological order
        if all(isinstance(t, gs.Constant) or not t.name or t.name in derived for t in b.inputs):
            derived |= {t.name for t in b.outputs}
        elif b.op in _COMPARISONS:
            return False
    return body.outputs[0].name in derived


def _passed_on(out: gs.Tensor, carried: gs.Tensor) -> bool:
    """Whether a body output is its carried input unchanged (the same tensor or an Identity)."""
    if out.name == carried.name:
        return True
    return len(out.inputs) == 1 and out.inputs[0].op == "Identity" and out.inputs[0].inputs[0].name == carried.name


def _kernel(value: gs.Tensor, constant) -> tuple[np.ndarray, str] | None:
    """The 2-D constant weight ``[in, out]`` that the MatMul/Gemm readers of ``value`` apply,
    with the name of the body tensor holding it: one reader, or several that each read a
    ``Slice``/``Split`` part of one weight (Keras's per-gate products when dropout is set, a GRU
    without ``reset_after`` slicing its z, r gates' part)."""
    readers = [b for b in value.outputs if b.op in ("MatMul", "Gemm")]
    if not readers or any(r.inputs[0] is not value or len(r.inputs) < 2 for r in readers):
        return None
    found = [_reader_weight(r, constant) for r in readers]
    if any(f is None for f in found) or len({name for _, name, _ in found}) != 1:
        return None
    w, held, sliced = found[0]
    if len(readers) > 1 and not all(s for _, _, s in found):
        return None  # several readers of one unsliced weight: not one product
    return w, held


def _reader_weight(reader: gs.Node, constant) -> tuple[np.ndarray, str, bool] | None:
    """The weight a MatMul/Gemm applies to its first input (through a ``Slice`` or ``Split`` of
    a constant: the whole constant), its tensor's name and whether it was sliced."""
    held = reader.inputs[1]
    w = constant(held)
    source = held.inputs[0] if held.inputs else None
    sliced = w is None and source is not None and source.op in ("Slice", "Split")
    if sliced:
        held = source.inputs[0]
        w = constant(held)
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return None
    if reader.op == "Gemm":
        attrs = reader.attrs
        if int(attrs.get("transA", 0)) or float(attrs.get("alpha", 1.0)) != 1.0 or \
                float(attrs.get("beta", 1.0)) not in (0.0, 1.0):
            return None  # beta 0: C is not read (jax2onnx); 1: C is added (the bias, or h's part)
        if int(attrs.get("transB", 0)):
            w = w.T
    return w, held.name, sliced


def _gate_order(a: np.ndarray, gates: int) -> np.ndarray:
    """``a`` with its first axis's gate blocks in ONNX's order."""
    if gates != 4:
        return a
    blocks = np.split(a, 4, axis=0)
    return np.concatenate([blocks[i] for i in _LSTM_ORDER], axis=0)


def _candidates(cell: _Cell) -> Iterator[tuple[str, dict, list[np.ndarray]]]:
    """(op, attributes, [W, R, B]) of each standard op the cell may be, most likely first."""
    gates, units = cell.gates, cell.kh.shape[0]
    width = gates * units
    dtype = cell.kx.dtype
    w = _gate_order(cell.kx.T, gates)[None]
    r = _gate_order(cell.kh.T, gates)[None]
    zeros = np.zeros(width, dtype)
    if cell.bias is None:
        biases = [(zeros, zeros)]
    elif cell.bias.size == 2 * width:
        pair = cell.bias.reshape(2, width)
        biases = [(pair[0], pair[1])]
    else:
        biases = [(cell.bias.reshape(width), zeros)]
    # the gates' activation and the cell's: sigmoid and tanh (Keras's defaults), relu where the body has
    # one, a hard sigmoid where it clips (Keras's ``hard_sigmoid``: shakkala's diacritizers)
    hard = [("HardSigmoid", ab) for ab in HARD_SIGMOIDS] if cell.ops & {"Clip", "Min", "Max"} else []
    gate_acts = ([("Sigmoid", None)] if "Sigmoid" in cell.ops or not hard else []) + hard
    acts = [(a, None) for a in ("Tanh", "Relu") if a in cell.ops] + hard
    for wb, rb in biases:
        b = np.concatenate([_gate_order(wb.astype(dtype), gates), _gate_order(rb.astype(dtype), gates)])[None]
        attrs = {"hidden_size": units}
        for act in acts:
            if gates == 1:
                yield "RNN", {**attrs, **_activations([act])}, [w, r, b]
                continue
            for gate in gate_acts:
                if gates == 3:
                    for lbr in ((1,) if cell.bias is not None and cell.bias.size == 2 * width else (0, 1)):
                        yield "GRU", {**attrs, "linear_before_reset": lbr, **_activations([gate, act])}, [w, r, b]
                else:
                    yield "LSTM", {**attrs, **_activations([gate, act, act])}, [w, r, b]


def _activations(acts: list[tuple[str, tuple[float, float] | None]]) -> dict:
    """The ``activations`` attribute, with ``activation_alpha`` / ``_beta`` where one takes them
    (listed in the order of the activations that do)."""
    attrs: dict = {"activations": [name for name, _ in acts]}
    taken = [ab for _, ab in acts if ab is not None]
    if taken:
        attrs["activation_alpha"] = [float(a) for a, _ in taken]
        attrs["activation_beta"] = [float(b) for _, b in taken]
    return attrs


def _cone(tensors: list[gs.Tensor], stop: set[str]) -> list[gs.Node] | None:
    """The nodes computing ``tensors`` from constants and the ``stop`` tensors, in order
    (``None``: something else feeds them)."""
    order: list[gs.Node] = []
    seen: set[int] = set()

    def visit(t: gs.Tensor) -> bool:
        if isinstance(t, gs.Constant) or not t.name or t.name in stop:
            return True
        if not t.inputs:
            return False
        producer = t.inputs[0]
        if id(producer) in seen:
            return True
        if _subgraphs(producer) or len(order) >= _MAX_CONE or not all(visit(i) for i in producer.inputs):
            return False
        seen.add(id(producer))
        order.append(producer)
        return True

    return order if all(visit(t) for t in tensors) else None


def _value_info(name: str, dtype: np.dtype) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)


@dataclass
class _Check:
    """What the check runs: the Loop's inputs fed at random, and the outputs compared."""

    inputs: list[gs.Tensor]  # the sequence, then initial states that are not constants
    outputs: list[int]  # Loop output positions compared
    cone: list[gs.Node]


def _plan_check(node: gs.Node, cell: _Cell) -> _Check | None:
    n = len(node.inputs) - 2
    stop = {cell.x.name}
    inits = [node.inputs[2 + i] for i in cell.states]
    fed = list({t.name: t for t in (cell.x, *inits) if not isinstance(t, gs.Constant)}.values())  # h0 = c0 once
    stop |= {t.name for t in fed}
    cone = _cone([node.inputs[0], node.inputs[1], *(node.inputs[2 + i] for i in cell.counters),
                  *cell.invariants.values(), *cell.limits], stop)
    if cone is None:
        return None
    return _Check(fed, [*cell.states, n], cone)


def _loop_model(node: gs.Node, check: _Check, dtype: np.dtype, opset: int) -> onnx.ModelProto:
    outputs = [node.outputs[i] for i in check.outputs]
    from graphprune.io import gs_export  # noqa: PLC0415 (io imports the rules)

    graph = gs.Graph(nodes=[*check.cone, node], inputs=list(check.inputs), outputs=outputs, opset=opset)
    model = gs_export.export_onnx(graph)
    _materialise(model.graph, graph)
    del model.graph.input[:]
    model.graph.input.extend(_value_info(t.name, dtype) for t in check.inputs)
    del model.graph.output[:]
    model.graph.output.extend(_value_info(t.name, dtype) for t in outputs)
    return model


def _materialise(proto: onnx.GraphProto, graph: gs.Graph) -> None:
    """Give the check model's weights their values (a store keeps them as external stubs)."""
    values: dict[str, gs.Constant] = {}

    def collect(g: gs.Graph) -> None:
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                values[t.name] = t
        for b in g.nodes:
            for v in b.attrs.values():
                if isinstance(v, gs.Graph):
                    collect(v)

    def fix(g: onnx.GraphProto) -> None:
        for i, t in enumerate(g.initializer):
            if t.data_location == onnx.TensorProto.EXTERNAL and t.name in values:
                g.initializer[i].CopyFrom(onnx.numpy_helper.from_array(np.asarray(values[t.name].values), t.name))
        for b in g.node:
            for a in b.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    fix(a.g)

    collect(graph)
    fix(proto)


def _op_model(node: gs.Node, cell: _Cell, check: _Check, found: tuple[str, dict, list[np.ndarray]],
              dtype: np.dtype, opset: int) -> onnx.ModelProto:
    """The nodes :func:`_build` writes for a candidate, on stand-ins of the Loop's tensors (the
    same names; building on the real ones would attach the nodes to the graph), writing the
    compared outputs: the check runs exactly what the lowering emits."""
    stand: dict[str, gs.Tensor] = {}

    def like(t: gs.Tensor) -> gs.Tensor:
        if t.name not in stand:
            stand[t.name] = gs.Constant(t.name, np.asarray(t.values)) if isinstance(t, gs.Constant) \
                else gs.Variable(t.name, dtype=dtype)
        return stand[t.name]

    states = [like(node.inputs[2 + i]) for i in cell.states]
    outs = [gs.Variable(node.outputs[i].name, dtype=dtype) for i in check.outputs]  # states, then the sequence
    nodes = _build(node.name, cell, found, opset, like(cell.x), states, outs[:-1], outs[-1], [])
    graph = gs.Graph(nodes=nodes, inputs=[stand[t.name] for t in check.inputs], outputs=outs, opset=opset)
    from graphprune.io import gs_export  # noqa: PLC0415 (io imports the rules)

    model = gs_export.export_onnx(graph)
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    return model


def _lengths(cell: _Cell) -> tuple[tuple[int, ...], int]:
    shape = cell.x.shape or []
    time = shape[0] if len(shape) == 3 and isinstance(shape[0], int) and shape[0] > 0 else None
    batch = shape[1] if len(shape) == 3 and isinstance(shape[1], int) and shape[1] > 0 else 2
    return ((time,) if time else (3, 6)), batch


def _matches(node: gs.Node, cell: _Cell, opset: int) -> tuple[str, dict, list[np.ndarray]] | None:
    """The first candidate that computes what the Loop computes (``None``: none does)."""
    import onnxruntime as ort

    dtype = cell.kx.dtype
    if dtype != np.float32:
        return None  # ONNX Runtime's LSTM/GRU/RNN run float32 (and the check with them)
    check = _plan_check(node, cell)
    if check is None:
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a candidate that fails is expected, not an error
    try:
        loop = ort.InferenceSession(_loop_model(node, check, dtype, opset).SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - a Loop the check cannot run is not lowered
        return None
    rng = np.random.default_rng(0)
    times, batch = _lengths(cell)
    units, width = cell.kh.shape[0], cell.kx.shape[0]
    feeds = [{check.inputs[0].name: rng.standard_normal((t, batch, width)).astype(dtype),
              **{s.name: (0.5 * rng.standard_normal((batch, units))).astype(dtype) for s in check.inputs[1:]}}
             for t in times]
    try:
        expected = [loop.run(None, f) for f in feeds]
    except Exception:  # noqa: BLE001
        return None
    for op, attrs, weights in _candidates(cell):
        try:
            session = ort.InferenceSession(
                _op_model(node, cell, check, (op, attrs, weights), dtype, opset).SerializeToString(), options,
                providers=["CPUExecutionProvider"])
            got = [session.run(None, f) for f in feeds]
        except Exception:  # noqa: BLE001
            continue
        if all(_close(a, b) for run_a, run_b in zip(expected, got, strict=True)
               for a, b in zip(run_a, run_b, strict=True)):
            return op, attrs, weights
    return None


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    scale = max(float(np.abs(a).max(initial=0.0)), 1e-6)
    return float(np.abs(a - b).max(initial=0.0)) <= TOLERANCE * scale


def _build(name: str, cell: _Cell, found: tuple[str, dict, list[np.ndarray]], opset: int, x: gs.Tensor,
           inits: list[gs.Tensor], finals: list[gs.Tensor], sequence: gs.Tensor,
           carried: list[tuple[gs.Tensor, gs.Tensor]]) -> list[gs.Node]:
    """The standard op computing the Loop: reads ``x`` and the initial states ``inits`` (h, c),
    writes the final states ``finals``, the scanned ``sequence`` and each carried-unchanged
    value (``carried``: input, output)."""
    op, attrs, weights = found
    dtype = cell.kx.dtype
    consts = [gs.Constant(f"{name}__gp_{k}", a) for k, a in zip("WRB", weights, strict=True)]
    nodes: list[gs.Node] = []

    def axes_input(axis: int, tag: str) -> list[gs.Tensor]:
        return [gs.Constant(f"{name}__gp_{tag}_axes", np.array([axis], np.int64))] if opset >= 13 else []

    def axes_attr(axis: int) -> dict:
        return {} if opset >= 13 else {"axes": [axis]}

    states: list[gs.Tensor] = []
    for k, t in enumerate(inits):
        if isinstance(t, gs.Constant) and not np.any(np.asarray(t.values)):
            states.append(gs.Variable.empty())  # zeros: the op's default
            continue
        s = gs.Variable(f"{name}__gp_initial_{k}", dtype=dtype)
        nodes.append(gs.Node("Unsqueeze", f"{name}/initial_{k}", attrs=axes_attr(0),
                             inputs=[t, *axes_input(0, f"initial_{k}")], outputs=[s]))
        states.append(s)
    while states and not states[-1].name:
        states.pop()
    y = gs.Variable(f"{name}__gp_Y", dtype=dtype)
    ys = [gs.Variable(f"{name}__gp_Y_{c}", dtype=dtype) for c in ("h", "c")[:len(inits)]]
    inputs = [x, *consts, *([gs.Variable.empty(), *states] if states else [])]
    nodes.append(gs.Node(op, name, attrs=attrs, inputs=inputs, outputs=[y, *ys]))
    for k, final in enumerate(finals):
        nodes.append(gs.Node("Squeeze", f"{name}/state_{k}", attrs=axes_attr(0),
                             inputs=[ys[k], *axes_input(0, f"state_{k}")], outputs=[final]))
    nodes.append(gs.Node("Squeeze", f"{name}/sequence", attrs=axes_attr(1),
                         inputs=[y, *axes_input(1, "sequence")], outputs=[sequence]))
    for k, (t, out) in enumerate(carried):
        nodes.append(gs.Node("Identity", f"{name}/carried_{k}", inputs=[t], outputs=[out]))
    return nodes


def _lower(node: gs.Node, cell: _Cell, found: tuple[str, dict, list[np.ndarray]], opset: int) -> list[gs.Node]:
    n = len(node.inputs) - 2
    return _build(node.name, cell, found, opset, cell.x, [node.inputs[2 + i] for i in cell.states],
                  [node.outputs[i] for i in cell.states], node.outputs[n],
                  [(t, node.outputs[i]) for i, t in cell.invariants.items()])


@register
class LoopRule(OpRule):
    """``Loop``: lowered where it is a recurrent layer (:func:`_recognise`), else an op without
    a rule (its groups freeze)."""

    op_types = ("Loop",)
    couples = False
    repeats_body = True
    lowered_as = "recurrent layers the exporter wrote as Loops, written as ONNX's LSTM/GRU/RNN"

    def lowered(self, node: gs.Node, opset: int) -> list[gs.Node] | None:
        cell = _recognise(node)
        found = _matches(node, cell, opset) if isinstance(cell, _Cell) else None
        return _lower(node, cell, found, opset) if found is not None else None

    def unlowered_reason(self, node: gs.Node) -> str:
        """Why a Loop that stayed is not a recurrent layer (one that looks like one failed the
        check: no standard op computes what it computes, or it writes an output the op has not)."""
        cell = _recognise(node)
        return ("not lowered: no LSTM/GRU/RNN computes what it computes, checked in ONNX Runtime"
                if isinstance(cell, _Cell) else f"not a recurrent cell: {cell}")


@register
class ScanRule(OpRule):
    """``Scan``: an op without a rule to the analysis (its groups freeze); its body runs once
    per element of the scanned sequence (not counted as MACs)."""

    op_types = ("Scan",)
    since_opset = 9
    couples = False
    repeats_body = True
