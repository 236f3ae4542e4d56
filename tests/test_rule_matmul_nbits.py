"""com.microsoft ``MatMulNBits`` (graphprune/rules/integer_matmul.py), as ONNX Runtime's own
low-bit quantizer (``MatMulNBitsQuantizer``) writes it for an MLP's MatMuls and as other
writers lay it out (flattened scales and zero points, a bias): rows and whole blocks of inputs
are removed, the packed weights, scales and zero points are cut without re-quantizing, and
the pruned model computes what the original computes with the removed neurons masked."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io.tensors import pack_bits, unpack_bits

#: the op types this file covers (tests/test_op_coverage.py counts them)
OPS_UNDER_TEST = ("com.microsoft::MatMulNBits",)


def float_mlp(opset: int = 17, seed: int = 0, weak_blocks: tuple[int, ...] = ()) -> onnx.ModelProto:
    """x [4, 64] -> MatMul W1 [64, 128] -> Relu -> MatMul W2 [128, 64] (float weights, for ONNX
    Runtime's 4-bit quantizer: tests/test_quantize_int4.py uses it too). ``weak_blocks``: hidden
    neurons ``32 j .. 32 j + 31`` get weights a thousand times smaller."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, 128)).astype(np.float32)
    w2 = rng.standard_normal((128, 64)).astype(np.float32)
    for j in weak_blocks:
        w1[:, 32 * j:32 * (j + 1)] *= 1e-3
        w2[32 * j:32 * (j + 1)] *= 1e-3
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _nbits_mlp(bits: int = 4, symmetric: bool = False, weak_blocks: tuple[int, ...] = ()) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(float_mlp(weak_blocks=weak_blocks), bits=bits, block_size=32,
                                     is_symmetric=symmetric)
    quantizer.process()
    model = quantizer.model.model
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "Relu", "MatMulNBits"]
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _masked(model: onnx.ModelProto, tensor: str, keep: np.ndarray, width: int) -> onnx.ModelProto:
    """``model`` with the ``width`` channels of ``tensor`` (last axis) outside ``keep`` multiplied by 0."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    mask = np.zeros(width, np.float32)
    mask[keep] = 1
    graph.initializer.append(numpy_helper.from_array(mask, "gp_test_mask"))
    for node in graph.node:
        node.input[:] = [f"{tensor}_masked" if i == tensor else i for i in node.input]
    position = next(k for k, n in enumerate(graph.node) if tensor in n.output) + 1
    graph.node.insert(position, helper.make_node("Mul", [tensor, "gp_test_mask"], [f"{tensor}_masked"]))
    return out


def _kept_rows(original: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """Which rows of ``original`` survive in ``pruned`` (both packed weights, rows unique)."""
    rows = {r.tobytes(): i for i, r in enumerate(original.reshape(original.shape[0], -1))}
    return np.array([rows[r.tobytes()] for r in pruned.reshape(pruned.shape[0], -1)])


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False), (2, False)])
def test_an_mlp_quantized_by_onnxruntime_loses_whole_blocks_of_neurons_exactly(bits: int, symmetric: bool) -> None:
    model = _nbits_mlp(bits, symmetric)
    hidden = [g for g in graphprune.analyze(model).groups if not g.frozen]
    assert len(hidden) == 1 and hidden[0].num_units == 4  # 128 neurons in blocks of 32

    result = graphprune.prune(model, ratio=0.5)
    assert result.report["groups"]["pruned"] == 1 and result.report["verification"]["ok"]
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    first, second = pruned.graph.node[0], pruned.graph.node[2]
    attrs = [{a.name: a.i for a in n.attribute} for n in (first, second)]
    assert (attrs[0]["N"], attrs[0]["K"], attrs[1]["N"], attrs[1]["K"]) == (64, 64, 64, 64)
    inits = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    originals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits[second.input[1]].shape == (64, 2, 32 * bits // 8)
    assert inits[second.input[2]].shape == (64, 2)
    if not symmetric:  # two blocks' zero points repacked: 2 bits 4 to a byte, 4 bits 2, 8 bits 1
        assert inits[second.input[3]].shape == (64, -(-2 * bits // 8))

    # independent of graphprune's verifier: the original with the removed neurons masked
    kept = _kept_rows(originals["W1_Q4" if bits == 4 else f"W1_Q{bits}"], inits[first.input[1]])
    assert kept.size == 64 and len({int(k) // 32 for k in kept}) == 2  # whole blocks
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    want = _run(_masked(model, "a", kept, 128), x)
    got = _run(pruned, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert not np.allclose(_run(model, x), want, atol=1e-3 * np.abs(want).max())  # the mask mattered


def test_blocks_are_scored_by_the_weights_they_decode_to() -> None:
    """Blocks 1 and 3 hold weights a thousand times smaller: their packed integers span the
    same range as the others' (each block has its own scale), only the decoded weights tell."""
    result = graphprune.prune(_nbits_mlp(weak_blocks=(1, 3)), ratio=0.5, criterion="l1")
    model = _nbits_mlp(weak_blocks=(1, 3))
    originals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    kept = _kept_rows(originals["W1_Q4"], inits[result.model.graph.node[0].input[1]])
    assert sorted({int(k) // 32 for k in kept}) == [0, 2]


def _hand_built(hidden: int = 64, bias: bool = True, g_idx: bool = False, float_zero: bool = False) -> onnx.ModelProto:
    """x [4, 64] -> MatMulNBits (4-bit, N ``hidden``, flattened scales and zero points, a bias)
    -> Relu -> MatMulNBits (N 16) -> y, as a writer other than ONNX Runtime's quantizer lays it out."""
    rng = np.random.default_rng(2)
    inits, nodes = [], []
    specs = (("1", 64, hidden, "x", "h"), ("2", hidden, 16, "a", "y"))
    for tag, kk, n, src, dst in specs:
        blocks = -(-kk // 32)
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (n, blocks, 16)).astype(np.uint8), f"B{tag}"))
        inits.append(numpy_helper.from_array((rng.random(n * blocks) * 0.05 + 0.01).astype(np.float32), f"S{tag}"))
        if float_zero:
            inits.append(numpy_helper.from_array(np.full(n * blocks, 7.5, np.float32), f"Z{tag}"))
        else:
            zero = rng.integers(0, 16, (n, blocks)).astype(np.uint8)
            inits.append(numpy_helper.from_array(pack_bits(zero, 4).reshape(-1), f"Z{tag}"))
        inputs = [src, f"B{tag}", f"S{tag}", f"Z{tag}"]
        if g_idx and tag == "2":
            inits.append(numpy_helper.from_array((np.arange(kk) // 32).astype(np.int32), "G2"))
            inputs.append("G2")
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"bias{tag}"))
            inputs += [""] * (5 - len(inputs)) + [f"bias{tag}"]
        nodes.append(helper.make_node("MatMulNBits", inputs, [dst], domain="com.microsoft",
                                      K=kk, N=n, bits=4, block_size=32))
        if tag == "1":
            nodes.append(helper.make_node("Relu", ["h"], ["a"]))
    graph = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_flattened_scales_and_zero_points_and_a_bias_are_cut_with_the_rows() -> None:
    model = _hand_built()
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["groups"]["pruned"] == 1 and result.report["verification"]["ok"]
    pruned = result.model
    inits = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    first, second = pruned.graph.node[0], pruned.graph.node[2]
    assert inits[first.input[1]].shape == (32, 2, 16) and inits[second.input[1]].shape == (16, 1, 16)
    assert inits[first.input[2]].shape == (64,) and inits[first.input[3]].shape == (32,)  # 32 rows x 2 blocks
    assert inits[second.input[2]].shape == (16,) and inits[second.input[3]].shape == (16,)
    assert inits[first.input[5]].shape == (32,)
    originals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    kept = _kept_rows(originals["B1"], inits[first.input[1]])
    # the kept rows keep their own scales, zero points and bias
    np.testing.assert_array_equal(inits[first.input[2]].reshape(32, 2), originals["S1"].reshape(64, 2)[kept])
    zero = unpack_bits(originals["Z1"].reshape(64, 1), 4)[:, :2]
    np.testing.assert_array_equal(unpack_bits(inits[first.input[3]].reshape(32, 1), 4)[:, :2], zero[kept])
    np.testing.assert_array_equal(inits[first.input[5]], originals["bias1"][kept])
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    want = _run(_masked(model, "a", kept, 64), x)
    np.testing.assert_allclose(_run(pruned, x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("variant, reason", [
    (dict(g_idx=True), "act-order g_idx"),
    (dict(float_zero=True), "zero points computed in the graph or stored as floats"),
    (dict(hidden=48), "last block of 32 is padded past K"),
])
def test_layouts_that_cannot_lose_blocks_freeze_with_the_reason(variant: dict, reason: str) -> None:
    model = _hand_built(**variant)
    analysis = graphprune.analyze(model)
    hidden = next(g for g in analysis.groups if ("B1", 0) in g.params)
    assert any(reason in r for r in hidden.frozen), hidden.frozen
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] == 0


def test_parameters_count_every_packed_weight() -> None:
    from graphprune.verify.metrics import count_params

    model = _nbits_mlp()
    scales_and_zeros = sum(numpy_helper.to_array(i).size for i in model.graph.initializer if "_Q4" not in i.name)
    assert count_params(model) == 2 * 64 * 128 + scales_and_zeros


def _fused_gate_up(opset: int = 17) -> onnx.ModelProto:
    """Phi-3's MLP: one MatMul computes gate and up side by side, split in half by Slices whose
    bounds are computed from the product's shape (``Shape -> Gather -> Div``), then
    ``gate * Sigmoid(gate) * up -> down``; quantized by ONNX Runtime to ``MatMulNBits``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 256)).astype(np.float32), "Wgu"),
             numpy_helper.from_array(rng.standard_normal((128, 64)).astype(np.float32), "Wd"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"),
             numpy_helper.from_array(np.array(2, np.int64), "two"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([2**62], np.int64), "end")]
    nodes = [helper.make_node("MatMul", ["x", "Wgu"], ["gu"]),
             helper.make_node("Shape", ["gu"], ["s"]),
             helper.make_node("Gather", ["s", "last"], ["width"]),
             helper.make_node("Div", ["width", "two"], ["half"]),
             helper.make_node("Slice", ["gu", "zero", "half", "last"], ["gate"]),
             helper.make_node("Slice", ["gu", "half", "end", "last"], ["up"]),
             helper.make_node("Sigmoid", ["gate"], ["sg"]), helper.make_node("Mul", ["gate", "sg"], ["act"]),
             helper.make_node("Mul", ["act", "up"], ["h"]), helper.make_node("MatMul", ["h", "Wd"], ["y"])]
    graph = helper.make_graph(nodes, "gate_up", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])], inits)
    quantizer = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                                       ir_version=10), block_size=32)
    quantizer.process()
    return quantizer.model.model


def test_shapes_computed_behind_a_matmulnbits_fold_so_its_split_prunes() -> None:
    """ONNX shape inference stops at ``MatMulNBits`` (a com.microsoft op): the Slices' bounds,
    computed from its output's shape, stayed unfolded and froze the MLP ("bounds computed at
    run time"). ONNX Runtime's symbolic inference sizes it (graphprune/io/contrib_shapes.py)."""
    model = _fused_gate_up()
    hidden = [g for g in graphprune.analyze(model).groups if ("Wd_Q4", 1) in g.params]
    assert len(hidden) == 1 and not hidden[0].frozen, hidden[0].frozen if hidden else None
    assert hidden[0].num_units == 4  # 128 neurons in blocks of 32
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["groups"]["pruned"] == 1 and result.report["verification"]["ok"]
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    assert _run(result.model, x).shape == (3, 64)


@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_weights_in_external_data_are_zeroed_on_disk_with_their_zero_point(tmp_path, symmetric: bool) -> None:
    """An int4 LLM keeps its packed weights in external data: the zeroed original gets their
    copies filled with each block's zero point on disk, a block of rows at a time
    (``WeightStore.write_zeroed`` with ``fills``), not in memory. Filled with 0 instead, the
    removed neurons would read ``-zero_point * scale`` and the check would fail."""
    model = _nbits_mlp(symmetric=symmetric)
    path = tmp_path / "m.onnx"
    stored = onnx.ModelProto()
    stored.CopyFrom(model)  # onnx.save turns the tensors it writes out into references
    onnx.save(stored, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    result = graphprune.prune(str(path), ratio=0.5)
    assert result.report["groups"]["pruned"] == 1 and result.report["verification"]["ok"]
    assert result.report["verification"]["max_abs_diff"] < 1e-4 * result.report["verification"]["per_output"][0]["scale"]
    out = tmp_path / "p.onnx"
    result.save(out)
    x = np.random.default_rng(6).standard_normal((4, 64)).astype(np.float32)
    pruned = onnx.load(str(out))
    kept = _kept_rows(numpy_helper.to_array(model.graph.initializer[0]),
                      numpy_helper.to_array(next(i for i in pruned.graph.initializer if i.name == pruned.graph.node[0].input[1])))
    want = _run(_masked(model, "a", kept, 128), x)
    np.testing.assert_allclose(_run(pruned, x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("target", ["target_macs", "target_params"])
def test_a_budget_counts_packed_layers_at_their_pruned_widths(target: str) -> None:
    """The budget's cost model reads a ``MatMulNBits``'s MACs from its input's pruned width
    (its ``K`` attribute still says the full width while the allocator searches) and its
    parameters as ``N x K`` weights (packed bytes of an integer type): half the cost is two of
    the four blocks of 32 neurons. Before, the MACs target over-shot (0.25) and the parameter
    target could not see the packed weights at all."""
    result = graphprune.prune(_nbits_mlp(), **{target: 0.5})
    budget = result.report["budget"]
    assert budget["met"] and abs(budget["achieved"] - 0.5) <= 0.03, budget
    assert budget["widths"][0]["kept"] == 2 and result.report["verification"]["ok"]


def test_the_default_alignment_counts_a_block_as_its_channels() -> None:
    """A 4-bit layer's unit is a block of 32 input channels: the default alignment of 8
    rounded to 8 blocks, 256 channels (``--ratio 0.25`` of 40 blocks kept 32, of 48 removed
    16). Blocks of 32 channels are aligned already; other units keep the default."""
    from graphprune.planning.planner import auto_round_to

    assert auto_round_to(48, 48 * 32) == 1 and auto_round_to(64, 64) == 8 and auto_round_to(200, 400) == 8
    assert auto_round_to(16, 16) == 1  # (few units: no alignment)
    result = graphprune.prune(_hand_built(hidden=40 * 32), ratio=0.25)
    assert result.report["verification"]["ok"]
    node = next(n for n in result.model.graph.node if n.op_type == "MatMulNBits")
    assert next(a.i for a in node.attribute if a.name == "N") == 30 * 32


def test_blocks_read_through_a_concat_keep_their_alignment() -> None:
    """Three layers' outputs joined by a Concat feed one 4-bit layer: the group's unit is a block
    of 32 of the 1,152 joined channels, while its anchor (one Concat operand) holds 384 of them,
    12 blocks. Its width was read as 384 channels over all 36 blocks (no whole width: the default
    alignment of 8 blocks), and ``ratio=0.25`` kept 24 blocks instead of 27."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 384)) / 8).astype(np.float32), f"a{i}") for i in range(3)]
    inits.append(numpy_helper.from_array((rng.standard_normal((1152, 64)) / 40).astype(np.float32), "c"))
    nodes = [n for i in range(3) for n in (helper.make_node("MatMul", ["x", f"a{i}"], [f"m{i}"]),
                                         helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))]
    nodes += [helper.make_node("Concat", ["r0", "r1", "r2"], ["j"], axis=-1), helper.make_node("MatMul", ["j", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, bits=4)
    quantizer.process()
    packed = quantizer.model.model
    assert sum(n.op_type == "MatMulNBits" for n in packed.graph.node) == 4
    result = graphprune.prune(packed, ratio=0.25)
    assert result.report["verification"]["ok"]
    joined = next(n for n in result.model.graph.node if n.op_type == "MatMulNBits" and "j" in n.input)
    assert next(a.i for a in joined.attribute if a.name == "K") == 27 * 32
