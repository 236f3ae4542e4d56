"""ONNX Runtime's integer MatMuls: ``MatMulNBits`` (a 2-8 bit weight packed in blocks), pruned
by rows and by whole blocks of inputs, and the fused ``DynamicQuantizeMatMul`` /
``MatMulIntegerToFloat``, written as ONNX's dynamic quantization pattern again (mapped and
frozen where they cannot be).

``MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?)`` with attributes ``K``, ``N``,
``bits``, ``block_size``: ``A [..., K]`` times the weight ``B [N, K / block_size, blob]``
(each row's ``K`` inputs quantized in blocks of ``block_size``, packed ``bits`` to a byte,
lowest bits first), ``scales`` ``[N, blocks]`` (or flattened), ``zero_points`` packed like
``B`` (``[N, ceil(blocks * bits / 8)]`` bytes, or flattened; absent: ``2^(bits-1)``). What ONNX
Runtime's 4-bit quantizer (``MatMulNBitsQuantizer``) and its GenAI model builder write for
the MatMuls of an LLM.

Pruning. ``B``'s rows are the output channels (role producer; the optional bias goes with
them). Its block axis is a factor of ``A``'s last axis (index map ``Digit(block_size)``): the
inputs go a whole block at a time, so a channel group read by a ``MatMulNBits`` has units of
``block_size`` channels (an MLP's hidden neurons in blocks of 32; heads whose ``head_dim`` the
block divides lose nothing). Both slice whole bytes of ``B``; :meth:`MatMulNBitsRule.rewrite`
cuts the same rows and blocks from ``scales`` and ``zero_points`` (unpacking and repacking
sub-byte zero points) and sets ``N`` and ``K``. Removing keeps every stored integer and scale
of what stays, so the pruned layer computes exactly what the zeroed original does: there the
removed rows and blocks hold their zero point (a field that reads as 0). Frozen, with the
reason: computed weights or scales, float zero points (a zero that no stored integer may
hold), ``g_idx`` (act-order: blocks are not contiguous inputs), fields that straddle bytes
(3, 5, 6 or 7 bits) and a last block padded past ``K`` (inputs only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.index_maps import Digit
from graphprune.analysis.roles import CONSUMER, PRODUCER
from graphprune.io.block_quant import dequantize_blocks, quantize_blocks
from graphprune.io.tensors import pack_bits, unpack_bits
from graphprune.io.tensors import present_input as _present
from graphprune.rules.linear import MatMulRule
from graphprune.rules.registry import LinearInfo, OpRule, RescaledLinear, StoredWeight, register

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from graphprune.analysis.coupling import CouplingContext
    from graphprune.passes.rewrite_context import RewriteContext


@dataclass(frozen=True)
class Packed:
    """A ``MatMulNBits`` weight as stored: ``scale`` and ``zero`` (unpacked integers) are
    ``[N, blocks]``; ``whole_blocks``: ``K`` is a whole number of blocks."""

    bits: int
    block: int
    scale: np.ndarray
    zero: np.ndarray
    whole_blocks: bool

    def zero_bytes(self) -> np.ndarray:
        """``[N, blocks, 1]``: the byte whose every field holds its block's zero point."""
        per = 8 // self.bits
        if self.zero.strides == (0, 0):  # the default zero point, one value broadcast
            byte = sum(int(self.zero[0, 0]) << (self.bits * i) for i in range(per))
            return np.broadcast_to(np.uint8(byte), (*self.zero.shape, 1))
        zero = self.zero.astype(np.uint16)
        return sum(zero << (self.bits * i) for i in range(per)).astype(np.uint8)[..., None]


def _zero_grid(zp: gs.Constant | None, n: int, blocks: int, bits: int) -> np.ndarray:
    """Zero points ``[N, >= blocks]`` unpacked from ``zp`` (packed like ``B``, 2-D or
    flattened), or the default ``2^(bits-1)`` broadcast (no copy) without one."""
    if zp is None:
        return np.broadcast_to(np.uint8(1 << (bits - 1)), (n, blocks))
    return unpack_bits(np.asarray(zp.values).reshape(n, -1), bits)[:, :blocks]


def packed_weight(node: gs.Node) -> Packed | str:
    """How ``node``'s weight is stored, or why it is not understood."""
    bits, block = int(node.attrs.get("bits", 4)), int(node.attrs.get("block_size", 0) or 0)
    n, k = node.attrs.get("N"), node.attrs.get("K")
    b, scale = node.inputs[1], _present(node, 2)
    if bits not in (1, 2, 4, 8):
        return f"{bits}-bit weight fields that straddle bytes"
    if block <= 0 or not isinstance(n, int) or not isinstance(k, int):
        return "attributes N, K or block_size missing"
    if not isinstance(b, gs.Constant) or not isinstance(scale, gs.Constant):
        return "a packed weight or scales computed in the graph"
    blocks = -(-k // block)
    if tuple(b.shape) != (n, blocks, block * bits // 8) or np.size(scale.values) != n * blocks:
        return "a packed weight layout not understood"
    if _present(node, 4) is not None:
        return "act-order g_idx (blocks that are not contiguous inputs)"
    zp = _present(node, 3)
    if zp is not None and (not isinstance(zp, gs.Constant) or np.asarray(zp.values).dtype != np.uint8):
        return "zero points computed in the graph or stored as floats"
    zero = _zero_grid(zp, n, blocks, bits)
    if zero.shape[1] != blocks:
        return "zero points of a layout not understood"
    values = np.asarray(scale.values).reshape(n, blocks)
    return Packed(bits, block, values, zero, blocks * block == k)


class NBitsWeight(StoredWeight):
    """A ``MatMulNBits`` weight read as the float ``[N, K]`` it stands for (block by block
    ``(q - zero_point) * scale``), for the refit and the data-aware criteria. New values are
    quantized again on fresh per-block scales (and zero points, where they are stored; a
    symmetric weight keeps its default one), with the rounding error spread over the inputs
    not rounded yet when the input statistics are known (:mod:`graphprune.io.block_quant`)."""

    def __init__(self, node: gs.Node, packed: Packed) -> None:
        self.constant = node.inputs[1]
        self.scale_tensor = node.inputs[2]
        self.zero_tensor = _present(node, 3)
        self.bits, self.in_block = packed.bits, packed.block

    @property
    def dtype(self) -> np.dtype:
        return np.asarray(self.scale_tensor.values).dtype

    @property
    def shape(self) -> tuple[int, ...]:
        n, blocks = np.shape(self.constant.values)[:2]
        return int(n), int(blocks) * self.in_block

    def constants(self) -> list[gs.Constant]:
        return [c for c in (self.constant, self.scale_tensor, self.zero_tensor) if c is not None]

    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Scales and zero points ``[N, blocks]`` as currently stored."""
        n, blocks = np.shape(self.constant.values)[:2]
        scale = np.asarray(self.scale_tensor.values).reshape(n, blocks)
        return scale, _zero_grid(self.zero_tensor, n, blocks, self.bits)

    def decode(self) -> np.ndarray:
        n = np.shape(self.constant.values)[0]
        q = unpack_bits(np.asarray(self.constant.values), self.bits).reshape(n, -1)
        scale, zero = self._grid()
        return dequantize_blocks(q, scale, zero, self.in_block).astype(self.dtype)

    def encode(self, values: np.ndarray, grow: bool = False) -> tuple[float, np.ndarray | None]:
        return self.encode_fit(values, None)

    def encode_fit(self, values: np.ndarray, gram: np.ndarray | None,
                   in_axis: int | None = None) -> tuple[float, np.ndarray | None]:
        n, blocks = np.shape(self.constant.values)[:2]
        fixed = self._grid()[1] if self.zero_tensor is None else None
        q, scale, zero = quantize_blocks(np.asarray(values, np.float64), self.bits, self.in_block, gram=gram,
                                         zero=fixed, scale_dtype=self.dtype)
        self.constant.values = pack_bits(q.reshape(n, blocks, self.in_block), self.bits)
        self.scale_tensor.values = np.ascontiguousarray(scale.reshape(np.shape(self.scale_tensor.values)))
        if self.zero_tensor is not None:
            packed = pack_bits(zero, self.bits)
            self.zero_tensor.values = np.ascontiguousarray(packed.reshape(np.shape(self.zero_tensor.values)))
        return 0.0, None


@register
class MatMulNBitsRule(OpRule):
    """com.microsoft ``MatMulNBits`` (see the module docstring)."""

    op_types = ("MatMulNBits",)
    domain = "com.microsoft"

    def output_shape(self, op: str, attrs: dict, shapes: list[list | None]) -> tuple[list, int] | None:
        """``A``'s shape with its last axis ``N``."""
        a, n = shapes[0] if shapes else None, attrs.get("N")
        if not a or not isinstance(n, int):
            return None
        return [*a[:-1], n], 0

    def packed_parameters(self, attrs: dict, present: Sequence[bool]) -> dict[int, int]:
        """``B`` holds ``N x K`` weights (``bits`` of each byte per weight), counted with its
        scales and zero points (one per row and block; zero points packed like ``B``), which
        lose what ``B`` loses."""
        n, k, block = attrs.get("N"), attrs.get("K"), attrs.get("block_size")
        if not (isinstance(n, int) and isinstance(k, int) and isinstance(block, int) and block > 0):
            return {}
        blocks, bits = -(-k // block), int(attrs.get("bits", 4))
        zero_points = len(present) > 3 and present[3]
        total = n * k + n * blocks + (n * -(-blocks * bits // 8) if zero_points else 0)
        return {1: total, 2: 0, **({3: 0} if zero_points else {})}

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """``prod(Y) x K``, ``K`` read from ``A``'s shape where known (a budget's cost model
        asks at pruned widths: the attribute still says the full width)."""
        y, a, k = shape(node.outputs[0]), shape(node.inputs[0]), node.attrs.get("K")
        if a:
            k = a[-1]
        if y is None or not isinstance(k, int):
            return None
        return math.prod(y) * k

    def rescaled_linear(self, node: gs.Node) -> RescaledLinear | None:
        """The float layer ``A @ W^T (+ bias)`` with ``W [N, K]`` decoded from the blocks
        (:class:`NBitsWeight`), for the refit and the data-aware criteria."""
        packed = packed_weight(node)
        if isinstance(packed, str) or not packed.whole_blocks:
            return None
        bias = _present(node, 5)
        if bias is not None and not isinstance(bias, gs.Constant):
            return None
        info = LinearInfo(data=0, data_axis=-1, weight=1, in_axis=1, out_axis=0, out_channel_axis=-1,
                          bias=None, kernel="dense")
        return RescaledLinear(info, node.inputs[0], node.outputs[0], NBitsWeight(node, packed), bias=bias)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
        found = self.output_shape(node.op, node.attrs, [ctx.shape(a)])
        if found is not None:
            ctx.derive_shape(y, [d if isinstance(d, int) else None for d in found[0]])
        ranks = ctx.known_ranks(node, a, y)
        if ranks is None:
            return
        where = f"MatMulNBits '{node.name}'"
        if ranks[0] == ranks[1]:
            for axis in range(ranks[0] - 1):
                ctx.couple(a, axis, y, axis)
        ctx.role(a, -1, CONSUMER)
        packed = packed_weight(node)
        if isinstance(b, gs.Constant) and ctx.rank(b) == 3:
            ctx.couple(b, 0, y, -1)
            ctx.role(b, 0, PRODUCER)
            if isinstance(packed, str):
                ctx.integer_param(b)  # a weight (packed integers), so that its groups are reported
        if isinstance(packed, str):
            ctx.freeze(y, -1, f"{packed} at {where}")
            ctx.freeze(a, -1, f"{packed} at {where}")
            return
        ctx.integer_param(b, packed.zero_bytes())
        ctx.decoded(b, packed.scale[..., None], packed.zero[..., None], packed.bits)
        bias = _present(node, 5)
        if isinstance(bias, gs.Constant) and ctx.rank(bias) == 1:
            ctx.couple(bias, 0, y, -1)
            ctx.role(bias, 0, PRODUCER)
        elif bias is not None:
            ctx.freeze(y, -1, f"a bias computed in the graph at {where}")
        if not packed.whole_blocks:
            ctx.freeze(a, -1, f"inputs whose last block of {packed.block} is padded past K at {where}")
            return
        ctx.couple(b, 1, a, -1, Digit(packed.block))  # a block holds block_size inputs
        ctx.role(b, 1, CONSUMER)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        """Cut ``scales`` and ``zero_points`` like ``B`` (its rows and blocks are sliced
        already), and set ``N`` and ``K``."""
        b = node.inputs[1]
        rows, blocks = ctx.removed(b, 0), ctx.removed(b, 1)
        old = ctx.old_shape(b)
        if old is None or not (rows.size or blocks.size):
            return
        n, nblocks = int(old[0]), int(old[1])
        bits, block = int(node.attrs.get("bits", 4)), int(node.attrs["block_size"])
        for index in (2, 3):
            t = _present(node, index)
            if not isinstance(t, gs.Constant):
                continue
            values = np.asarray(t.values)
            packed = index == 3 and bits < 8
            grid = unpack_bits(values.reshape(n, -1), bits)[:, :nblocks] if packed else values.reshape(n, nblocks)
            grid = np.delete(np.delete(grid, rows, axis=0), blocks, axis=1)
            if packed:
                grid = pack_bits(grid, bits)
            ctx.set_input(node, index, grid if values.ndim == 2 else grid.reshape(-1))
        node.attrs["N"] = n - int(rows.size)
        node.attrs["K"] = int(node.attrs["K"]) - int(blocks.size) * block


#: ONNX Runtime's integer ops whose scales come from the data or are fused with the weights
CONTRIB_INTEGER_OPS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")


@register
class IntegerOpRule(MatMulRule):
    """com.microsoft ``DynamicQuantizeMatMul(A, B, b_scale, b_zero_point?, bias?)`` /
    ``MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zero_point?, b_zero_point?, bias?)``: what
    ONNX Runtime fuses ONNX's dynamic quantization pattern into (``DynamicQuantizeLinear`` of
    the float input, ``MatMulInteger``, ``Cast`` to float, ``Mul`` by the product of the
    scales, ``Add`` of the bias). :meth:`lowered` writes them as that pattern again, which the
    rules prune exactly and the refit reads (:meth:`OpRule.rescaled_linear`); an instance it
    cannot lower is mapped as a MatMul (so that the groups through it are reported) and frozen,
    with a reason that says why."""

    op_types = CONTRIB_INTEGER_OPS
    domain = "com.microsoft"
    zero_behaviour = "none"
    zero_output = OpRule.zero_output

    def lowered(self, node: gs.Node, opset: int) -> list[gs.Node] | None:
        dynamic = node.op == "DynamicQuantizeMatMul"
        a, b = node.inputs[0], node.inputs[1]
        # DynamicQuantizeMatMul: B's scale and zero point at 2, 3, bias 4; MatMulIntegerToFloat:
        # A's scale 2, B's 3, A's zero point 4, B's 5, bias 6
        b_scale, b_zero, bias = (_present(node, 2), _present(node, 3), _present(node, 4)) if dynamic else \
            (_present(node, 3), _present(node, 5), _present(node, 6))
        y = node.outputs[0]
        if b_scale is None or opset < 11 or (dynamic and a.dtype is not None and np.dtype(a.dtype) != np.float32):
            return None  # DynamicQuantizeLinear (opset 11) quantizes float32 only
        name = node.name
        nodes: list[gs.Node] = []
        if dynamic:
            a_q = gs.Variable(f"{name}__gp_a_q", dtype=np.uint8)
            a_scale, a_zero = gs.Variable(f"{name}__gp_a_scale", dtype=np.float32), \
                gs.Variable(f"{name}__gp_a_zero_point", dtype=np.uint8)
            nodes.append(gs.Node("DynamicQuantizeLinear", f"{name}/quantize", inputs=[a],
                                 outputs=[a_q, a_scale, a_zero]))
        else:
            a_q, a_scale, a_zero = a, node.inputs[2], _present(node, 4)
        empty = gs.Variable.empty()
        product = gs.Variable(f"{name}__gp_int32", dtype=np.int32)
        nodes.append(gs.Node("MatMulInteger", f"{name}/matmul", outputs=[product], inputs=[
            a_q, b, a_zero if a_zero is not None else empty, b_zero if b_zero is not None else empty]))
        while nodes[-1].inputs and nodes[-1].inputs[-1] is empty:
            nodes[-1].inputs.pop()
        as_float = gs.Variable(f"{name}__gp_float", dtype=np.float32)
        scales = gs.Variable(f"{name}__gp_scales", dtype=np.float32)
        nodes += [gs.Node("Cast", f"{name}/cast", attrs={"to": 1}, inputs=[product], outputs=[as_float]),
                  gs.Node("Mul", f"{name}/scales", inputs=[a_scale, b_scale], outputs=[scales])]
        if bias is None:
            return [*nodes, gs.Node("Mul", f"{name}/rescale", inputs=[as_float, scales], outputs=[y])]
        scaled = gs.Variable(f"{name}__gp_scaled", dtype=np.float32)
        return [*nodes, gs.Node("Mul", f"{name}/rescale", inputs=[as_float, scales], outputs=[scaled]),
                gs.Node("Add", f"{name}/bias", inputs=[scaled, bias], outputs=[y])]

    def linear(self, node: gs.Node) -> LinearInfo | None:
        return None

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        super().couple(node, ctx)
        if isinstance(node.inputs[1], gs.Constant):
            ctx.integer_param(node.inputs[1])  # a weight, so that its groups are reported
        ctx.freeze_node(node, f"integer op {node.op} '{node.name}' (scales from the data or "
                              "fused with the weights: removing is not zeroing)")
