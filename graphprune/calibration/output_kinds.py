"""Which outputs are what, read from the graph: a length the inputs choose
(:func:`open_length`), a recurrent state fed back (:func:`fed_back`), an embedding
(:func:`feature_outputs`), rows of class scores (:func:`logit_rows`), ids chosen from scores
the graph computes (:func:`decision_scores`); and from the values: rows of class probabilities
(:func:`rows_of_probabilities`), values in [0, 1] (:func:`in_unit_range`), a few values on a
scale (:func:`on_a_scale`). The fidelity report
(:mod:`graphprune.calibration.fidelity`) reads an output's figures accordingly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.io import gs_export
from graphprune.io.weights import read_external_bytes


def open_length(model: onnx.ModelProto) -> set[str]:
    """The outputs whose last axis is declared with a named size (``audio_length``, ``s1``):
    a length the inputs choose, not a number of classes."""
    names = set()
    for out in model.graph.output:
        tensor = out.type.tensor_type
        if tensor.HasField("shape") and tensor.shape.dim and tensor.shape.dim[-1].dim_param:
            names.add(out.name)
    return names


def fed_back(model: onnx.ModelProto) -> set[str]:
    """The outputs of rank 3 or more shaped like an input of the same type (rank, element
    type and every size both declare as a number): a recurrent state the caller feeds back
    (silero's ``hn``, ``[1, 1, 128]`` like its ``h``), not class scores."""
    def signature(value: onnx.ValueInfoProto) -> tuple | None:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            return None
        return tensor.elem_type, [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]

    inputs = [sig for v in model.graph.input if (sig := signature(v)) is not None]
    names = set()
    for out in model.graph.output:
        sig = signature(out)
        if sig is None:
            continue
        for kind, dims in inputs:
            if kind == sig[0] and len(dims) == len(sig[1]) > 2 and all(
                    a is None or b is None or a == b for a, b in zip(dims, sig[1], strict=True)):
                names.add(out.name)
    return names


def feature_outputs(model: onnx.ModelProto) -> set[str]:
    """The outputs computed from a normalisation of each sample's features (a LayerNorm, an
    L2 normalisation: :attr:`~graphprune.rules.registry.OpRule.normalizes_features`) with no
    linear layer after it: an embedding (a sentence encoder's mean-pooled ``[1, 384]``), whose
    arg-max names no class. Followed back through ops that move values or map them channel by
    channel (pooling, masking, dividing by a count), through their first input computed in
    the graph; a linear layer, a softmax or an op without a rule ends the walk (scores)."""
    from graphprune.io.model_io import default_opset  # noqa: PLC0415 (io imports calibration)
    from graphprune.rules.registry import lookup  # noqa: PLC0415

    opset = default_opset(model)
    producer = {out: node for node in model.graph.node for out in node.output if out}
    stored = {t.name for t in model.graph.initializer}
    stored |= {n.output[0] for n in model.graph.node if not n.input and n.output}  # (Constant nodes)

    def normalised(name: str) -> bool:
        for _ in range(_FEATURE_DEPTH):
            node = producer.get(name)
            rule = lookup(node.domain or "", node.op_type, opset) if node is not None else None
            if rule is None:
                return False
            if rule.normalizes_features:
                return True
            computed = [i for i in node.input if i and i not in stored and i in producer]
            if rule.zero_behaviour not in ("move", "map") or not computed:
                return False
            name = computed[0]
        return False

    return {out.name for out in model.graph.output if normalised(out.name)}


#: ops followed back from an output to the one that decides whether it is an embedding
_FEATURE_DEPTH = 32


def logit_rows(model: onnx.ModelProto, data_dir: Path | None = None) -> set[str]:
    """The outputs of rank 3 or more that a dense layer writes along their last axis (a float
    one, or an integer one rescaled to float: :meth:`~graphprune.rules.registry.OpRule.
    rescaled_linear`), through nothing but ops that add or scale by a constant (its bias):
    per-position logits (a token tagger's or a diacritiser's ``[1, T,
    15]``, a CTC head without its softmax), whose rows' arg-max is each position's class. A
    convolution's channels are not its last axis; an embedding ends in a normalisation.
    ``data_dir``: where ``model``'s external tensors are (those the last nodes read are read)."""
    from graphprune.io.model_io import default_opset  # noqa: PLC0415 (io imports calibration)
    from graphprune.rules.registry import lookup  # noqa: PLC0415

    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.output if v.type.tensor_type.HasField("shape")}
    wanted = [name for name, rank in ranks.items() if rank >= 3]
    if not wanted:
        return set()
    near = _last_nodes(model, wanted)
    opset, graph = default_opset(model), gs_export.import_onnx(_constants_read(model, near, data_dir))
    rules = {id(n): lookup(n.domain or "", n.op, opset) for n in graph.nodes}
    dense: set[str] = set()  # the tensors a dense layer writes along the last axis
    for node in graph.nodes:
        rule = rules[id(node)]
        if rule is None or not node.outputs or node.outputs[0].name not in near:
            continue
        try:
            info = rule.linear(node)
            rescaled = rule.rescaled_linear(node) if info is None else None
        except Exception:  # noqa: BLE001 - a constant it reads not at hand: no class
            continue
        if info is not None and info.kernel == "dense" and info.out_channel_axis == -1:
            dense.add(node.outputs[0].name)
        elif rescaled is not None and rescaled.info.kernel == "dense" and rescaled.info.out_channel_axis == -1:
            dense.add(rescaled.output.name)

    def from_dense(tensor: gs.Tensor) -> bool:
        for _ in range(_HEAD_DEPTH):
            if tensor.name in dense:
                return True
            node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
            rule = rules.get(id(node)) if node is not None else None
            alias = rule.aliased_input(node) if rule is not None else None
            if alias is not None and alias < len(node.inputs) and node.inputs[alias].inputs:
                tensor = node.inputs[alias]  # (an exporter's Identity before the output: paddle2onnx's)
                continue
            computed = [t for t in node.inputs if isinstance(t, gs.Variable) and t.inputs] if node is not None else []
            # a bias or a scale (a constant beside the one computed input) keeps each row's
            # arg-max the class; an activation alone (a sigmoid mask of per-band gains, a
            # multi-label head) says the rows are no one-of-N choice
            if (rule is None or rule.zero_behaviour != "map" or rule.normalizes_features or len(computed) != 1
                    or not any(isinstance(t, gs.Constant) for t in node.inputs)):
                return False
            tensor = computed[0]
        return False

    return {t.name for t in graph.outputs if t.name in wanted and from_dense(t)}


def decision_scores(model: onnx.ModelProto) -> dict[str, tuple[list[str], int]]:
    """The float tensors that outputs are chosen from by rank (an ``ArgMax`` of class scores:
    a CTC recogniser's or a g2p model's ids; :meth:`~graphprune.rules.registry.OpRule.
    ranks_inputs`), each with the outputs chosen from it and the axis ranked, followed back
    from the outputs through ops that move or map values one input at a time (a ``Cast``). An
    id changes only where a near-tie flips: the agreement of a few held-out samples' ids ranks
    two models by a token or none (a recogniser that reads nothing still agrees on its blank
    frames), the scores behind them by how far each is from the original's choices."""
    from graphprune.io.model_io import default_opset  # noqa: PLC0415 (io imports calibration)
    from graphprune.rules.registry import lookup  # noqa: PLC0415

    opset = default_opset(model)
    producer = {out: node for node in model.graph.node for out in node.output if out}
    outputs = {o.name for o in model.graph.output}
    found: dict[str, tuple[list[str], int]] = {}
    for out in model.graph.output:
        name = out.name
        for _ in range(_DECISION_DEPTH):
            node = producer.get(name)
            rule = lookup(node.domain or "", node.op_type, opset) if node is not None else None
            if rule is None:
                break
            bare = gs.Node(node.op_type, node.name, attrs={a.name: a.i for a in node.attribute if a.name == "axis"},
                           inputs=[gs.Variable(i) for i in node.input])
            ranked = rule.ranks_inputs(bare)
            if ranked:
                scores = node.input[ranked[0]] if ranked[0] < len(node.input) else ""
                if scores in producer and scores not in outputs and producer[scores].input:
                    found.setdefault(scores, ([], int(rule.ranked_axis(bare) or 0)))[0].append(out.name)
                break
            computed = [i for i in node.input if i in producer and producer[i].input]
            carried = {node.input[i] for i in rule.carries_values(bare) if i < len(node.input)}  # (a Gather's data)
            follow = [i for i in computed if i in carried] or computed  # (a Reshape's computed shape aside)
            if len(follow) != 1 or (follow[0] not in carried and rule.zero_behaviour not in ("move", "map")):
                break
            name = follow[0]
    return found


#: nodes :func:`logit_rows` follows back from an output (a bias, an activation, a rescaling)
_HEAD_DEPTH = 6
#: nodes :func:`decision_scores` follows back from an output to the ``ArgMax`` (GPT-SoVITS's VQ
#: codes: a reshape, an unsqueeze, a concat, a transpose and two gathers after it)
_DECISION_DEPTH = 12


def _last_nodes(model: onnx.ModelProto, outputs: list[str]) -> set[str]:
    """The first output names of the nodes at most :data:`_HEAD_DEPTH` steps before ``outputs``."""
    producer = {out: node for node in model.graph.node for out in node.output if out}
    found: set[str] = set()
    frontier = list(outputs)
    for _ in range(_HEAD_DEPTH):
        nodes = [producer[name] for name in frontier if name in producer]
        frontier = [i for n in nodes if n.output[0] not in found for i in n.input if i]
        found.update(n.output[0] for n in nodes)
    return found


def _constants_read(model: onnx.ModelProto, near: set[str], data_dir: Path | None) -> onnx.ModelProto:
    """``model`` with the external tensors that the nodes writing ``near`` read, read from
    ``data_dir`` (a copy; the others stay references)."""
    if data_dir is None or not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return model
    read = {i for n in model.graph.node if n.output and n.output[0] in near for i in n.input}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.name not in read:
            continue
        try:  # (the store's files may be links: ONNX's loader refuses those)
            raw = read_external_bytes(tensor, Path(data_dir))
        except (OSError, ValueError):  # left a reference: a rule reading it finds no class
            continue
        tensor.raw_data = raw
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return copy


def rows_of_probabilities(value: np.ndarray, *, several: bool = True, atol: float = 1e-3) -> bool:
    """Several rows of class probabilities (a CTC recogniser's ``[1, 40, 18710]`` after its
    softmax) or log-probabilities (a beam decoder's ``[beams, 160]`` after its log-softmax):
    floating point, at least two classes on the last axis, more than one row (``several``;
    else any number), every row non-negative and summing to 1 (within ``atol``: see
    :func:`quantized_sum_error`), or non-positive with its exponentials summing to 1."""
    if value.dtype.kind != "f" or value.ndim < 1 or value.shape[-1] < 2 or (
            several and (value.ndim < 2 or value.size == value.shape[-1])):
        return False
    v = value.astype(np.float64)
    if np.all(v >= -1e-6) and np.allclose(v.sum(axis=-1), 1.0, atol=atol):
        return True
    if not np.all(np.isfinite(v) | (v == -np.inf)) or np.any(v > 1e-6):
        return False
    with np.errstate(under="ignore"):
        return bool(np.allclose(np.exp(v).sum(axis=-1), 1.0, atol=1e-3))


def quantized_sum_error(values: list[np.ndarray]) -> float:
    """How far a row of an output may sum from 1 by rounding alone (``values``: the output on
    several samples), where all its values lie on one grid of 8 to 256 levels (a softmax
    quantized to 8 bits: a tempo classifier's 256 classes in steps of 1/255 summed to
    0.961-0.996, and were read as independent yes / no probabilities): half a step per class, at
    most 0.5; 1e-3 for values on no such grid."""
    if not values or not all(in_unit_range(np.asarray(v)) for v in values):  # (no probabilities: nothing sorted)
        return 1e-3
    floats = [np.asarray(v, np.float64).ravel() for v in values]
    levels = np.unique(np.concatenate(floats))
    if levels.size < 8 or levels.size > 256:
        return 1e-3
    offsets, smallest = levels - levels[0], float(np.diff(levels).min())
    for parts in range(1, 256):  # (the levels present may skip some: the step divides their gaps)
        step = smallest / parts
        if offsets[-1] / step > 255.5:
            break
        if np.allclose(offsets / step, np.round(offsets / step), atol=1e-2):
            return max(1e-3, min(0.5 * step * np.shape(values[0])[-1], 0.5))
    return 1e-3


def in_unit_range(value: np.ndarray) -> bool:
    """Floating point, at least two entries on the last axis, every value in [0, 1]."""
    return value.dtype.kind == "f" and value.ndim >= 1 and value.shape[-1] >= 2 and value.size > 0 \
        and bool(np.all((value >= 0.0) & (value <= 1.0)))


#: a few values per sample, each this many times as far from 0 as it varies over the samples
SCALE_OFFSET = 1.5


def on_a_scale(values: list[np.ndarray], few: int, samples: int) -> bool:
    """A few float values per sample (at most ``few``, over ``samples`` samples or more, each of
    one shape), each of one sign on every sample and far from 0 against how much it varies over
    the samples (``|mean|`` over :data:`SCALE_OFFSET` times the standard deviation, in every
    column): ratings or measurements on a scale (DNSMOS's three opinion scores, each 1-5 over
    speech from -5 to 30 dB SNR: means 1.9-2.4 standard deviations), not class scores, whose
    logits cross 0. Their arg-max decides nothing, and their cosine measures the offset: 0.997
    where the ratings' correlation with the original's had fallen to 0.69
    (:func:`centred_over_samples` does not)."""
    if len(values) < samples or values[0].dtype.kind != "f" or not 0 < values[0].size <= few:
        return False
    if any(v.shape != values[0].shape for v in values):
        return False
    y = np.stack([v.reshape(-1) for v in values]).astype(np.float64)
    if not np.isfinite(y).all() or not np.all((y.min(axis=0) > 0) | (y.max(axis=0) < 0)):
        return False
    return bool(np.all(np.abs(y.mean(axis=0)) > SCALE_OFFSET * y.std(axis=0)))


def centred_over_samples(original: list[np.ndarray], pruned: list[np.ndarray]) -> float:
    """The cosine of both models' values less the original's mean over the samples (column by
    column): how well the pruned values follow the original's from sample to sample, an offset
    of their own counting against them (values of another shape: 0)."""
    if any(np.shape(a) != np.shape(b) for a, b in zip(original, pruned, strict=True)):
        return 0.0
    y = np.stack([np.reshape(v, -1) for v in original]).astype(np.float64)
    p = np.stack([np.reshape(v, -1) for v in pruned]).astype(np.float64)
    mean = y.mean(axis=0)
    a, b = (y - mean).reshape(-1), (p - mean).reshape(-1)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 and np.isfinite(a @ b) else float(na == nb)


def scores_kept(y: np.ndarray, p: np.ndarray) -> tuple[int, int]:
    """Where some channels (axis 1) of ``y`` lie in [0, 1] and others do not (a YOLOv8's
    ``[1, 4 + C, anchors]``: box coordinates in pixels beside class scores): how many of those
    channels' values above 0.5 stay above 0.5 in ``p``, and how many there are."""
    a = np.moveaxis(y, 1, 0).reshape(y.shape[1], -1)
    b = np.moveaxis(p, 1, 0).reshape(p.shape[1], -1)
    unit = (a.min(axis=1) >= 0) & (a.max(axis=1) <= 1)
    if not unit.any() or unit.all():
        return 0, 0
    above = a[unit] > 0.5
    return int(np.count_nonzero(b[unit][above] > 0.5)), int(np.count_nonzero(above))


def token_rows(names: list[str], feeds: list[dict[str, np.ndarray]], outputs: list[list[np.ndarray]]) -> set[str]:
    """The outputs with one row per element of an integer input on every sample (a tagger's
    ``[1, T, 59]`` for its token ids ``[1, T]``): a label per token, every row compared, not a
    CTC recogniser's frames (whose repeats merge; Baidu's LAC read as one: BIO tags merged and
    its commonest tag dropped as the blank)."""
    found = set()
    lengths = [{np.shape(v)[-1] for v in feed.values() if np.asarray(v).dtype.kind in "iu" and np.ndim(v) >= 1}
               for feed in feeds]
    for k, name in enumerate(names):
        rows = [np.shape(out[k])[-2] if np.ndim(out[k]) >= 2 else None for out in outputs]
        if rows and all(r is not None and r > 1 and r in ls for r, ls in zip(rows, lengths, strict=True)):
            found.add(name)
    return found


def peaks_kept(y: np.ndarray, p: np.ndarray) -> list[float]:
    """Per channel of a map ``[N, C, *spatial]`` (at least two positions): 1.0 where the pruned
    output's arg-max lies within one cell of the original's (a heatmap decoded by its peak, as a
    CenterNet's or a keypoint detector's are), else 0.0; nothing for other shapes."""
    if y.ndim < 3 or y.shape != p.shape or int(np.prod(y.shape[2:])) < 2:
        return []
    spatial = y.shape[2:]
    a = np.stack(np.unravel_index(y.reshape(-1, int(np.prod(spatial))).argmax(axis=1), spatial), axis=1)
    b = np.stack(np.unravel_index(p.reshape(-1, int(np.prod(spatial))).argmax(axis=1), spatial), axis=1)
    return (np.abs(a - b).max(axis=1) <= 1).astype(float).tolist()


#: mean cosine over the samples above which an output shaped like an input follows it
FOLLOWS_INPUT = 0.8


def reconstructions(names: list[str], feeds: list[dict[str, np.ndarray]], outputs: list[list[np.ndarray]]) -> set[str]:
    """The outputs shaped like a float input on every sample whose values follow it (mean cosine
    over the samples of at least :data:`FOLLOWS_INPUT`): an autoencoder's reconstruction, a
    denoiser's signal, not class scores whatever their rank (an autoencoder's ``[N, 30]`` for its
    ``x [N, 30]`` was read as 30 class scores: "25 % top-1 agreement" where the anomaly scores
    kept their order). Scores of as many classes as the input has features do not follow it."""
    found = set()
    for k, name in enumerate(names):
        cosines = []
        for feed, out in zip(feeds, outputs, strict=False):
            y = np.asarray(out[k]) if k < len(out) else None
            x = next((np.asarray(v) for v in feed.values() if y is not None and np.shape(v) == y.shape
                      and np.asarray(v).dtype.kind == "f"), None)
            if x is None or y is None or y.dtype.kind != "f":
                break
            a, b = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
            scale = float(np.linalg.norm(a) * np.linalg.norm(b))
            cosines.append(float(a @ b) / scale if scale > 0 else 0.0)
        else:
            if cosines and float(np.mean(cosines)) >= FOLLOWS_INPUT:
                found.add(name)
    return found


def unit_rows(names: list[str], outputs: list[list[np.ndarray]]) -> set[str]:
    """The float outputs whose rows (last axis, two values or more) have length 1 on every
    sample and are no probabilities: embeddings normalised in the graph however the exporter
    wrote it (torch's ``F.normalize`` as ``ReduceL2 -> Clip -> Expand -> Div``, TensorFlow's
    ``l2_normalize`` as a ``Mul`` by ``Rsqrt``), whose arg-max names no class (a metric model's
    32-d embedding read "top-1 agreement 0.88, 12 of 32 classes seen" at a retrieval recall of
    0.961 against 0.964)."""
    found = set()
    for k, name in enumerate(names):
        rows = [np.asarray(out[k], np.float64) for out in outputs if k < len(out)]
        if not rows or any(r.dtype.kind != "f" or r.ndim < 1 or r.shape[-1] < 2 or not np.isfinite(r).all()
                           for r in rows):
            continue
        if all(np.allclose(np.linalg.norm(r, axis=-1), 1.0, atol=UNIT_ATOL) for r in rows) and not all(
                (r >= 0).all() and np.allclose(r.sum(axis=-1), 1.0, atol=UNIT_ATOL) for r in rows):
            found.add(name)
    return found


#: how far from 1 a row's length may be in :func:`unit_rows` (float32 rounding, an epsilon)
UNIT_ATOL = 1e-3


def logit_mask_iou(original: list[np.ndarray], pruned: list[np.ndarray]) -> float | None:
    """Where an output is one map of logits per sample (rank 4 or more, one channel on axis 1, two
    spatial sizes over 1, values of both signs on the samples: a binary segmenter exported
    without its sigmoid), the IoU of the region the pruned model puts above 0 with the
    original's, averaged over the samples whose original region is not empty; ``None``
    otherwise. A U-Net's cosine read 0.986 where its masks overlapped the original's at 0.78."""
    ys, ps = [np.asarray(y) for y in original], [np.asarray(p) for p in pruned]
    if not ys or any(y.dtype.kind != "f" or y.ndim < 4 or y.shape[1] != 1 or sum(d > 1 for d in y.shape[2:]) < 2
                     or y.shape != p.shape for y, p in zip(ys, ps, strict=True)):
        return None
    if not (any(bool((y > 0).any()) for y in ys) and any(bool((y < 0).any()) for y in ys)):
        return None
    ious = [float((a & b).sum() / (a | b).sum()) for a, b in ((y > 0, p > 0) for y, p in zip(ys, ps, strict=True))
            if a.any()]
    return float(np.mean(ious)) if ious else None
