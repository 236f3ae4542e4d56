"""Random small, valid ONNX graphs from a seed, for the fuzz test (tests/test_fuzz.py).

``build(family, seed)`` returns a model that passes ``onnx.checker`` (full check) and runs in
ONNX Runtime; the same family and seed give the same model. Families:

* ``cnn``: Conv chains (plain, grouped, depthwise) with BatchNormalization, activations,
  residual Adds, Concat/Split branches, squeeze-excite Muls, pooling, Transpose round trips,
  InstanceNormalization, ConvTranspose and Resize upsampling, GroupNormalization (opset 21),
  and a Flatten/Reshape -> Gemm/MatMul head; some store their weights in Constant nodes
  (paddle2onnx style), some declare the batch dimension ``-1``;
* ``mlp``: MatMul/Gemm chains on ``[N, L, D]`` with LayerNormalization, residual Adds,
  activations, ORT's ``com.microsoft`` Gelu (no ONNX shape inference), Einsum linear layers
  and a small multi-head attention (Reshape/Transpose/Softmax);
* ``if``: a CNN with an ``If`` whose branches hold Convs (weights from the outer scope or the
  branch) and read the data path from the outer scope, on a scalar bool graph input, a
  condition computed from the data path, from a second input only, or from static shapes
  (constant-foldable); branches may be nested Ifs; one or two If outputs feed later layers;
* ``loop``: a ``Loop`` whose body applies an outer-scope MatMul to a loop-carried state,
  between MatMul layers;
* ``rnn``: ``LSTM``/``GRU``/``RNN`` (forward or bidirectional) between linear layers;
* ``qdq``: a CNN with int8 per-channel ``DequantizeLinear`` weights and
  ``QuantizeLinear``/``DequantizeLinear`` activations (ORT's QDQ format);
* ``int8``: ORT dynamic quantization's ops: ``DynamicQuantizeLinear`` -> ``ConvInteger`` /
  ``MatMulInteger`` -> Cast -> Mul by the scales;
* ``fp16``: a CNN or MLP entirely in float16.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FAMILIES = ("cnn", "mlp", "if", "loop", "rnn", "qdq", "int8", "fp16")
OPSET = 17
IR_VERSION = 8


class Builder:
    """Accumulates nodes and initializers; ``dtype`` is the float type of the graph."""

    def __init__(self, rng: np.random.Generator, dtype: type = np.float32) -> None:
        self.rng = rng
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, values: np.ndarray, prefix: str = "c") -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def weight(self, *shape: int, fan_in: int | None = None, positive: bool = False) -> str:
        if positive:
            values = self.rng.uniform(0.5, 1.5, shape)
        else:
            fan = fan_in or int(np.prod(shape[1:])) or 1
            values = self.rng.standard_normal(shape) / np.sqrt(fan)
        return self.const(values.astype(self.dtype), "w")

    def op(self, op_type: str, inputs: Sequence[str], outputs: int = 1, *,
           domain: str = "", **attrs: object) -> list[str]:
        names = [self.fresh("t") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type),
                                           domain=domain or None, **attrs))
        return names

    def op1(self, op_type: str, inputs: Sequence[str], **attrs: object) -> str:
        return self.op(op_type, inputs, **attrs)[0]

    def input(self, name: str, shape: Sequence[int | str], elem: int | None = None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem or self.elem, list(shape)))
        return name

    def model(self, outputs: Sequence[str], opset: int = OPSET,
              extra: dict[str, int] | None = None, constant_nodes: bool = False
              ) -> onnx.ModelProto:
        """The model; ``constant_nodes`` stores float weights in Constant nodes instead of
        initializers (as paddle2onnx does)."""
        nodes, initializers = self.nodes, self.initializers
        if constant_nodes:
            floats = [t for t in initializers if t.data_type == self.elem and len(t.dims)]
            initializers = [t for t in initializers if t not in floats]
            nodes = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
                     for t in floats] + nodes
        graph = helper.make_graph(nodes, "fuzz", self.inputs,
                                  [helper.make_tensor_value_info(o, self.elem, None)
                                   for o in outputs],
                                  initializers)
        imports = [helper.make_opsetid("", opset)]
        imports += [helper.make_opsetid(d, v) for d, v in (extra or {}).items()]
        ir_version = 10 if opset >= 21 else IR_VERSION
        model = helper.make_model(graph, opset_imports=imports, ir_version=ir_version)
        inferred = onnx.shape_inference.infer_shapes(model)
        for declared, found in zip(model.graph.output, inferred.graph.output, strict=True):
            if found.type.tensor_type.HasField("shape"):
                declared.CopyFrom(found)
        missing = [o for o in model.graph.output if not o.type.tensor_type.HasField("shape")]
        if missing:  # the checker wants output shapes: take them from a run (Loop outputs)
            import onnxruntime as ort

            session = ort.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
            feeds = {}
            for value in self.inputs:
                dims = [max(d.dim_value, 1) for d in value.type.tensor_type.shape.dim]
                dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
                feeds[value.name] = np.zeros(dims, dtype)
            results = dict(zip([o.name for o in session.get_outputs()],
                               session.run(None, feeds), strict=True))
            for value in missing:
                shape = value.type.tensor_type.shape
                for size in results[value.name].shape:
                    shape.dim.add().dim_value = size
        return model

    def choice(self, options: Sequence):
        return options[int(self.rng.integers(len(options)))]


# ------------------------------------------------------------------------------------ CNN


ACTIVATIONS = ("Relu", "Sigmoid", "LeakyRelu", "HardSwish", "Clip", "Tanh", "HardSigmoid", None)
FP16_ACTIVATIONS = ("Relu", "Sigmoid", "LeakyRelu", "Tanh", None)


def _act(b: Builder, x: str, fp16: bool = False) -> str:
    kind = b.choice(FP16_ACTIVATIONS if fp16 else ACTIVATIONS)
    if kind is None:
        return x
    if kind == "Clip":
        low = b.const(np.array(0, b.dtype))
        high = b.const(np.array(6, b.dtype))
        return b.op1("Clip", [x, low, high])
    return b.op1(kind, [x])


def _conv(b: Builder, x: str, cin: int, cout: int, *, k: int = 3, group: int = 1,
          bias: bool = True, bn: bool = False, act: bool = True, fp16: bool = False,
          weight: str | None = None) -> str:
    w = weight or b.weight(cout, cin // group, k, k)
    inputs = [x, w] + ([b.weight(cout, fan_in=cout)] if bias else [])
    y = b.op1("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)
    if bn:
        y = b.op1("BatchNormalization", [y, b.weight(cout, positive=True), b.weight(cout, fan_in=9),
                                         b.weight(cout, fan_in=9), b.weight(cout, positive=True)])
    return _act(b, y, fp16) if act else y


CNN_BLOCKS = ("conv", "residual", "concat", "split", "se", "pool", "group", "transpose",
              "instnorm", "upsample", "resize", "groupnorm")


def _cnn_body(b: Builder, x: str, c: int, hw: int, blocks: int, fp16: bool = False,
              quant=None, opset: int = OPSET) -> tuple[str, int, int]:
    """Random blocks on ``x`` with ``c`` channels and ``hw`` spatial size."""
    conv = quant or _conv
    for _ in range(blocks):
        kind = b.choice(CNN_BLOCKS if not quant else ("conv", "residual", "concat"))
        if kind == "conv":
            out = int(b.rng.integers(2, 17))
            x, c = conv(b, x, c, out, k=b.choice((1, 3)), bn=bool(b.rng.integers(2)),
                        fp16=fp16), out
        elif kind == "residual":
            mid = int(b.rng.integers(2, 17))
            y = conv(b, x, c, mid, bn=True, fp16=fp16)
            y = conv(b, y, mid, c, bn=bool(b.rng.integers(2)), act=False, fp16=fp16)
            x = _act(b, b.op1("Add", [x, y]), fp16)
        elif kind == "concat":
            c1, c2 = int(b.rng.integers(2, 9)), int(b.rng.integers(2, 9))
            y1 = conv(b, x, c, c1, k=1, fp16=fp16)
            y2 = conv(b, x, c, c2, fp16=fp16)
            x, c = b.op1("Concat", [y1, y2], axis=1), c1 + c2
        elif kind == "split" and c >= 2:
            first = int(b.rng.integers(1, c))
            parts = b.op("Split", [x, b.const(np.array([first, c - first], np.int64))], 2, axis=1)
            y1 = _conv(b, parts[0], first, 4, fp16=fp16)
            y2 = _conv(b, parts[1], c - first, 4, fp16=fp16)
            if b.rng.integers(2):
                x, c = b.op1("Add", [y1, y2]), 4
            else:
                x, c = b.op1("Concat", [y1, y2], axis=1), 8
        elif kind == "se":
            squeeze = max(1, c // 2)
            s = b.op1("GlobalAveragePool", [x])
            s = _conv(b, s, c, squeeze, k=1, act=False)
            s = b.op1("Relu", [s])
            s = b.op1("Sigmoid", [_conv(b, s, squeeze, c, k=1, act=False)])
            x = b.op1("Mul", [x, s])
        elif kind == "pool" and hw >= 4:
            x = b.op1(b.choice(("MaxPool", "AveragePool")), [x], kernel_shape=[2, 2],
                      strides=[2, 2])
            hw //= 2
        elif kind == "group" and c % 2 == 0:
            groups = c if b.rng.integers(2) else 2
            out = c if groups == c else 2 * int(b.rng.integers(1, 5))
            x, c = _conv(b, x, c, out, group=groups, bn=True, fp16=fp16), out
        elif kind == "transpose":
            t = b.op1("Transpose", [x], perm=[0, 2, 3, 1])
            t = _act(b, t, fp16)
            x = b.op1("Transpose", [t], perm=[0, 3, 1, 2])
        elif kind == "instnorm" and not fp16:
            x = b.op1("InstanceNormalization", [x, b.weight(c, positive=True),
                                                b.weight(c, fan_in=9)])
        elif kind == "upsample" and hw <= 12:  # ConvTranspose, stride 2, then a Conv
            out = int(b.rng.integers(2, 9))
            y = b.op1("ConvTranspose", [x, b.weight(c, out, 2, 2, fan_in=c * 4),
                                        b.weight(out, fan_in=out)],
                      kernel_shape=[2, 2], strides=[2, 2])
            x, c, hw = _conv(b, _act(b, y, fp16), out, out, fp16=fp16), out, hw * 2
        elif kind == "resize" and hw <= 12:
            scales = b.const(np.array([1, 1, 2, 2], np.float32))
            x = b.op1("Resize", [x, "", scales], mode="nearest")
            hw *= 2
        elif kind == "groupnorm" and opset >= 21 and not fp16:
            groups = b.choice([g for g in (1, 2, c) if c % g == 0])
            x = b.op1("GroupNormalization", [x, b.weight(c, positive=True),
                                             b.weight(c, fan_in=9)], num_groups=groups)
            x = _act(b, x)
        else:
            out = int(b.rng.integers(2, 17))
            x, c = conv(b, x, c, out, fp16=fp16), out
    return x, c, hw


def _head(b: Builder, x: str, c: int, hw: int) -> str:
    kind = b.choice(("conv", "gemm", "matmul", "flatten"))
    if kind == "conv":
        return _conv(b, x, c, int(b.rng.integers(1, 6)), k=1, act=False)
    if kind == "flatten":
        flat = b.op1("Flatten", [x], axis=1)
        return b.op1("Gemm", [flat, b.weight(5, c * hw * hw), b.weight(5, fan_in=5)], transB=1)
    pooled = b.op1("GlobalAveragePool", [x])
    if kind == "gemm":
        flat = b.op1("Flatten", [pooled], axis=1)
        return b.op1("Gemm", [flat, b.weight(c, 7), b.weight(7, fan_in=7)])
    flat = b.op1("Reshape", [pooled, b.const(np.array([0, -1], np.int64))])
    return b.op1("MatMul", [flat, b.weight(c, 6)])


def _cnn(rng: np.random.Generator, dtype: type = np.float32) -> onnx.ModelProto:
    """A CNN; a quarter at opset 21 (GroupNormalization), a third with Constant-node
    weights, some with a batch dimension declared -1."""
    b = Builder(rng, dtype)
    opset = 21 if rng.integers(4) == 0 else OPSET
    c, hw = int(b.choice((1, 3, 4))), int(b.choice((6, 8, 12)))
    x = b.input("x", [b.choice((1, "batch", -1)), c, hw, hw])
    x, c, hw = _cnn_body(b, x, c, hw, int(rng.integers(2, 6)), fp16=b.dtype == np.float16,
                         opset=opset)
    return b.model([_head(b, x, c, hw)], opset=opset, constant_nodes=rng.integers(3) == 0)


# ------------------------------------------------------------------------------------ MLP


def _linear(b: Builder, x: str, din: int, dout: int, act: bool = True) -> str:
    y = b.op1("Add", [b.op1("MatMul", [x, b.weight(din, dout, fan_in=din)]),
                      b.weight(dout, fan_in=dout)])
    return _act(b, y, b.dtype == np.float16) if act else y


def _attention(b: Builder, x: str, d: int, length: int) -> str:
    heads = b.choice([h for h in (1, 2, 4) if d % h == 0])
    head_dim = d // heads
    shape = b.const(np.array([0, length, heads, head_dim], np.int64))

    def split_heads(t: str, perm: list[int]) -> str:
        return b.op1("Transpose", [b.op1("Reshape", [t, shape])], perm=perm)

    q = split_heads(_linear(b, x, d, d, act=False), [0, 2, 1, 3])
    k = split_heads(_linear(b, x, d, d, act=False), [0, 2, 3, 1])
    v = split_heads(_linear(b, x, d, d, act=False), [0, 2, 1, 3])
    scale = b.const(np.array(1.0 / np.sqrt(head_dim), b.dtype))
    scores = b.op1("Softmax", [b.op1("Mul", [b.op1("MatMul", [q, k]), scale])], axis=-1)
    context = b.op1("Transpose", [b.op1("MatMul", [scores, v])], perm=[0, 2, 1, 3])
    merged = b.op1("Reshape", [context, b.const(np.array([0, length, d], np.int64))])
    return b.op1("Add", [x, _linear(b, merged, d, d, act=False)])


def _mlp(rng: np.random.Generator, dtype: type = np.float32) -> onnx.ModelProto:
    """Linear layers, residual MLPs (some with ORT's com.microsoft Gelu, which ONNX shape
    inference does not know), LayerNorm, attention and Einsum linear layers."""
    b = Builder(rng, dtype)
    d, length = int(b.choice((4, 8, 12))), int(b.choice((3, 5)))
    x = b.input("x", [b.choice((1, "batch")), length, d])
    extra: dict[str, int] = {}
    for _ in range(int(rng.integers(1, 4))):
        kind = b.choice(("linear", "residual", "norm", "attention", "einsum", "contrib"))
        if kind == "linear":
            out = int(b.rng.integers(2, 17))
            x, d = _linear(b, x, d, out), out
        elif kind == "einsum":
            out = int(b.rng.integers(2, 17))
            y = b.op1("Einsum", [x, b.weight(d, out, fan_in=d)], equation="bld,dk->blk")
            x, d = b.op1("Add", [y, b.weight(out, fan_in=out)]), out
        elif kind == "contrib" and b.dtype == np.float32:
            hidden = int(b.rng.integers(2, 33))
            y = b.op1("Gelu", [_linear(b, x, d, hidden, act=False)], domain="com.microsoft")
            x = b.op1("Add", [x, _linear(b, y, hidden, d, act=False)])
            extra["com.microsoft"] = 1
        elif kind == "residual":
            hidden = int(b.rng.integers(2, 33))
            x = b.op1("Add", [x, _linear(b, _linear(b, x, d, hidden), hidden, d, act=False)])
        elif kind == "norm":
            x = b.op1("LayerNormalization", [x, b.weight(d, positive=True), b.weight(d, fan_in=9)],
                      axis=-1)
        elif d % 2 == 0 or d % 3 == 0:
            x = _attention(b, x, d, length)
    return b.model([_linear(b, x, d, int(b.rng.integers(1, 6)), act=False)], extra=extra)


# ------------------------------------------------------------------------------------ If, Loop


def _branch(b: Builder, x: str, c: int, outer_weight: bool, outputs: int,
            nested: bool = False) -> onnx.GraphProto:
    """A branch graph computing act(Conv(x)) (and, for two outputs, Relu(x)) with ``x``
    read from the outer scope; ``nested``: the branch outputs come straight from an inner
    If on a data-dependent condition."""
    inner = Builder(b.rng, b.dtype)
    inner.count = b.count  # one counter: names stay unique across the scopes
    if nested:
        total = inner.op1("ReduceSum", [x], keepdims=0)
        cond = inner.op1("Greater", [total, inner.const(np.array(0, b.dtype))])
        b.count = inner.count
        then_branch = _branch(b, x, c, outer_weight, outputs)
        else_branch = _branch(b, x, c, outer_weight, outputs)
        inner.count = b.count
        names = [inner.fresh("branch_out") for _ in range(outputs)]
        inner.nodes.append(helper.make_node("If", [cond], names, name=inner.fresh("If"),
                                            then_branch=then_branch, else_branch=else_branch))
    else:
        weight = b.weight(c, c, 3, 3) if outer_weight else None  # outer-scope, read inside
        results = [_conv(inner, x, c, c, act=True, weight=weight, bias=not outer_weight)]
        if outputs == 2:
            results.append(inner.op1("Relu", [x]))
        names = [inner.fresh("branch_out") for _ in results]
        for result, name in zip(results, names, strict=True):
            inner.nodes.append(helper.make_node("Identity", [result], [name],
                                                name=inner.fresh("Identity")))
    b.count = inner.count
    return helper.make_graph(inner.nodes, inner.fresh("branch"), [],
                             [helper.make_tensor_value_info(n, b.elem, None) for n in names],
                             inner.initializers)


def _if(rng: np.random.Generator) -> onnx.ModelProto:
    b = Builder(rng)
    c, hw = int(b.choice((2, 3, 4))), 8
    x = image = b.input("x", [1, c, hw, hw])
    x, c, hw = _cnn_body(b, x, c, hw, int(rng.integers(1, 3)))
    condition = b.choice(("flag", "data", "state", "static"))
    if condition == "flag":  # a scalar bool graph input
        cond = b.input("flag", [], TensorProto.BOOL)
    elif condition == "data":  # computed from the data path
        total = b.op1("ReduceSum", [x], keepdims=0)
        cond = b.op1("Greater", [total, b.const(np.array(0, np.float32))])
    elif condition == "state":  # from a second input: the If reads the data path implicitly
        state = b.input("state", [2, 4])
        cond = b.op1("Greater", [b.op1("ReduceSum", [state], keepdims=0),
                                 b.const(np.array(0, np.float32))])
    else:  # static: batch == 1 from the input's declared shape (constant-foldable)
        batch = b.op1("Gather", [b.op1("Shape", [image]), b.const(np.array(0, np.int64))])
        cond = b.op1("Equal", [batch, b.const(np.array(1, np.int64))])
    outputs = int(b.rng.integers(1, 3))
    nested = bool(b.rng.integers(2))
    then_branch = _branch(b, x, c, bool(b.rng.integers(2)), outputs, nested)
    else_branch = _branch(b, x, c, bool(b.rng.integers(2)), outputs, nested)
    results = b.op("If", [cond], outputs, then_branch=then_branch, else_branch=else_branch)
    y = results[0]
    if outputs == 2:  # the second branch output is used later
        y = b.op1(b.choice(("Add", "Mul")), results)
    elif b.rng.integers(2):
        y = b.op1("Add", [y, x])
    y, c, hw = _cnn_body(b, y, c, hw, int(rng.integers(1, 3)))
    return b.model([_head(b, y, c, hw)])


def _loop(rng: np.random.Generator) -> onnx.ModelProto:
    b = Builder(rng)
    d = int(b.choice((4, 6, 8)))
    x = b.input("x", [2, d])
    hidden = int(b.rng.integers(2, 12))
    x = _linear(b, x, d, hidden)
    weight = b.weight(hidden, hidden)
    body = Builder(b.rng)
    body.count = b.count
    step = body.op1("MatMul", ["state_in", weight])
    step = body.op1("Tanh", [body.op1("Add", ["state_in", step])])
    body.nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_id"))
    body.nodes.append(helper.make_node("Identity", [step], ["state_out"], name="state_id"))
    graph = helper.make_graph(
        body.nodes, "loop_body",
        [helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [2, hidden])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, hidden])])
    b.count = body.count
    trips = b.const(np.array(int(b.rng.integers(1, 4)), np.int64))
    true = b.const(np.array(True))
    y = b.op1("Loop", [trips, true, x], body=graph)
    return b.model([_linear(b, y, hidden, int(b.rng.integers(1, 5)), act=False)])


# ------------------------------------------------------------------------------------ RNN


def _rnn(rng: np.random.Generator) -> onnx.ModelProto:
    b = Builder(rng)
    length, batch, d = int(b.choice((3, 5))), 2, int(b.choice((4, 6)))
    x = b.input("x", [length, batch, d])
    if b.rng.integers(2):
        out = int(b.rng.integers(2, 9))
        x, d = _linear(b, x, d, out), out
    kind = b.choice(("LSTM", "GRU", "RNN"))
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    direction = b.choice(("forward", "bidirectional"))
    dirs = 2 if direction == "bidirectional" else 1
    hidden = int(b.rng.integers(2, 9))
    inputs = [x, b.weight(dirs, gates * hidden, d, fan_in=d),
              b.weight(dirs, gates * hidden, hidden, fan_in=hidden),
              b.weight(dirs, 2 * gates * hidden, fan_in=hidden)]
    y, y_h = b.op(kind, inputs, 2, hidden_size=hidden, direction=direction)[:2]
    if b.rng.integers(2):  # Y: [L, dirs, N, H] -> [L, N, dirs*H]
        t = b.op1("Transpose", [y], perm=[0, 2, 1, 3])
        flat = b.op1("Reshape", [t, b.const(np.array([length, batch, dirs * hidden], np.int64))])
        return b.model([_linear(b, flat, dirs * hidden, 3, act=False)])
    t = b.op1("Transpose", [y_h], perm=[1, 0, 2])  # [N, dirs, H]
    flat = b.op1("Reshape", [t, b.const(np.array([batch, dirs * hidden], np.int64))])
    return b.model([_linear(b, flat, dirs * hidden, 3, act=False)])


# ------------------------------------------------------------------------------------ quantized


def _qdq_conv(b: Builder, x: str, cin: int, cout: int, *, k: int = 3, bn: bool = False,
              act: bool = True, fp16: bool = False, **_: object) -> str:
    """QuantizeLinear/DequantizeLinear on the activation, int8 per-channel weights."""
    scale = b.const(np.array(0.05, np.float32), "s")
    zero = b.const(np.array(128, np.uint8), "z")
    xq = b.op1("DequantizeLinear", [b.op1("QuantizeLinear", [x, scale, zero]), scale, zero])
    weights = b.rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
    w_scale = (b.rng.uniform(0.5, 1.5, cout) / (127 * np.sqrt(cin * k * k))).astype(np.float32)
    w = b.op1("DequantizeLinear", [b.const(weights, "wq"), b.const(w_scale, "ws"),
                                   b.const(np.zeros(cout, np.int8), "wz")], axis=0)
    y = b.op1("Conv", [xq, w, b.weight(cout, fan_in=cout)], kernel_shape=[k, k],
              pads=[k // 2] * 4)
    return _act(b, y) if act else y


def _qdq(rng: np.random.Generator) -> onnx.ModelProto:
    b = Builder(rng)
    c, hw = int(b.choice((1, 3))), 8
    x = b.input("x", [1, c, hw, hw])
    x, c, hw = _cnn_body(b, x, c, hw, int(rng.integers(2, 5)), quant=_qdq_conv)
    return b.model([_qdq_conv(b, x, c, int(b.rng.integers(1, 5)), k=1, act=False)])


def _dynamic_quant(b: Builder, x: str) -> tuple[str, str, str]:
    return tuple(b.op("DynamicQuantizeLinear", [x], 3))  # type: ignore[return-value]


def _int8_conv(b: Builder, x: str, cin: int, cout: int, k: int) -> str:
    xq, xs, xz = _dynamic_quant(b, x)
    weights = b.rng.integers(0, 256, (cout, cin, k, k)).astype(np.uint8)
    w_zero = b.const(np.array(128, np.uint8), "wz")
    w_scale = b.const(np.array(1.0 / (127 * np.sqrt(cin * k * k)), np.float32), "ws")
    acc = b.op1("ConvInteger", [xq, b.const(weights, "wq"), xz, w_zero], kernel_shape=[k, k],
                pads=[k // 2] * 4)
    scale = b.op1("Mul", [xs, w_scale])
    y = b.op1("Mul", [b.op1("Cast", [acc], to=TensorProto.FLOAT), scale])
    return b.op1("Relu", [b.op1("Add", [y, b.const(
        b.rng.standard_normal((1, cout, 1, 1)).astype(np.float32) * 0.1, "bias")])])


def _int8_matmul(b: Builder, x: str, din: int, dout: int) -> str:
    xq, xs, xz = _dynamic_quant(b, x)
    weights = b.rng.integers(-127, 128, (din, dout)).astype(np.int8)
    w_scale = b.const(np.array(1.0 / (127 * np.sqrt(din)), np.float32), "ws")
    acc = b.op1("MatMulInteger", [xq, b.const(weights, "wq"), xz,
                                  b.const(np.array(0, np.int8), "wz")])
    y = b.op1("Mul", [b.op1("Cast", [acc], to=TensorProto.FLOAT), b.op1("Mul", [xs, w_scale])])
    return b.op1("Add", [y, b.weight(dout, fan_in=dout)])


def _int8(rng: np.random.Generator) -> onnx.ModelProto:
    b = Builder(rng)
    if b.rng.integers(2):
        c, hw = int(b.choice((1, 3))), 8
        x = b.input("x", [1, c, hw, hw])
        for _ in range(int(rng.integers(1, 4))):
            out = int(b.rng.integers(2, 12))
            x, c = _int8_conv(b, x, c, out, int(b.choice((1, 3)))), out
        pooled = b.op1("Flatten", [b.op1("GlobalAveragePool", [x])], axis=1)
        return b.model([_int8_matmul(b, pooled, c, 4)])
    d = int(b.choice((4, 8)))
    x = b.input("x", [2, d])
    for _ in range(int(rng.integers(1, 4))):
        out = int(b.rng.integers(2, 12))
        x, d = b.op1("Relu", [_int8_matmul(b, x, d, out)]), out
    return b.model([_int8_matmul(b, x, d, 3)])


def _fp16(rng: np.random.Generator) -> onnx.ModelProto:
    return _cnn(rng, np.float16) if rng.integers(3) else _mlp(rng, np.float16)


_BUILDERS = {"cnn": _cnn, "mlp": _mlp, "if": _if, "loop": _loop, "rnn": _rnn, "qdq": _qdq,
             "int8": _int8, "fp16": _fp16}


def build(family: str, seed: int) -> onnx.ModelProto:
    """A random valid model of ``family`` from ``seed`` (checked with onnx.checker)."""
    rng = np.random.default_rng([FAMILIES.index(family), seed])
    model = _BUILDERS[family](rng)
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Random feeds for ``model`` (independent of graphprune's own): an unknown or ``-1``
    dimension (only ever the batch axis here) gets ``batch``; a bool input a coin flip."""
    rng = np.random.default_rng(seed)
    result = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch
                      for d in tensor_type.shape.dim)
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype == np.bool_:
            result[value.name] = np.asarray(rng.random(shape) < 0.5)
        else:
            result[value.name] = rng.standard_normal(shape).astype(dtype)
    return result
