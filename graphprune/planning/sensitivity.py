"""Calibration-aware group sensitivity: the output deviation of pruning one group alone.

One model serves the whole sweep: each group gets a unit mask as an extra graph input, and
every producer/consumer weight of the group is multiplied by its mask (gathered from units
to elements, the zeroed-original construction of :func:`graphprune.verify.zeroed.zeroed_reference`
with the mask fed at run time). ONNX Runtime then runs the calibration batches once per
(group, ratio) with all masks at one except that group's first removed units; the deviation
is the mean squared relative L2 difference of the float outputs from the unmasked run.

With ``refit`` (the reconstruction is a least-squares refit), every consumer weight of a
group that has a calibration Gram also gets an additive correction input (zero by default):
for a (group, ratio) run it holds the consumer's least-squares refit of the kept input
channels (the optimal-brain-surgeon update ``W - W_R [G^-1]_RR^-1 [G^-1]_R:``), so the
deviation measured is the final-output deviation *after* the cheap reconstruction, not the
raw deviation of zeroed channels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.analysis import CONSUMER, PRODUCER, Analysis
from graphprune.planning.budget import GroupState, curve_loss
from graphprune.verify import validate, zeroed

#: ratios of each group at which the deviation is measured
SWEEP_RATIOS = (0.25, 0.5, 0.75)
#: seconds the sweep may take: where the first group's runs say the whole sweep would take
#: longer, every k-th group is measured and the others take the measured groups' median curve
#: (a YOLOv8-seg at 640x640 spent 278 s here, a calibrated ratio prune of it 32-91 s in all)
SWEEP_SECONDS = 60.0


Masks = list[tuple[str, np.ndarray]]  # per state: (mask input, removal order) per member group


@dataclass
class Correction:
    """The refit correction input of one consumer weight: ``name`` is fed ``W' - W * mask``."""

    name: str
    view: Any  # LinearView of the consumer
    stats: Any  # its ChannelStats (with a Gram)
    labels: np.ndarray  # unit of each input channel
    member: int  # which member group of the state (its removal order)
    shape: tuple[int, ...]


@dataclass
class Sweep:
    """The sweep model's extra inputs: per state its masks and refit corrections."""

    masks: list[Masks | None]
    corrections: list[list[Correction]] = field(default_factory=list)


def masked_model(prepared: onnx.ModelProto, analysis: Analysis, states: list[GroupState],
                 refit: tuple[dict[str, Any], Any] | None = None) -> tuple[onnx.ModelProto, Sweep]:
    """``prepared`` with one mask input per member group of each state (``None`` where no
    weight could be masked) and, with ``refit = (consumer views, statistics)``, a correction
    input per consumer weight that has a Gram (see the module doc)."""
    roles = analysis.context.roles
    model = onnx.ModelProto()
    model.CopyFrom(prepared)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    current: dict[str, str] = {}  # weight -> name of its masked version so far
    nodes: list[onnx.NodeProto] = []
    # masks of weights the graph computes (a dequantized int8 weight), placed after their producer
    computed = _computed_weights(analysis, inits)
    late: dict[str, list[onnx.NodeProto]] = {}
    sweep = Sweep(masks=[])
    corrected: set[str] = set()
    for si, st in enumerate(states):
        masks: Masks = []
        fixes: list[Correction] = []
        for gi, (group, order) in enumerate(st.members):
            mask_name = f"__gp_sens_mask_{si}_{gi}"
            if _mask_group(graph, inits, roles, group, mask_name, f"{si}_{gi}", current, nodes,
                           computed, late, analysis.context.zero_points):
                graph.input.append(onnx.helper.make_tensor_value_info(
                    mask_name, onnx.TensorProto.FLOAT, [group.num_units]))
                masks.append((mask_name, order))
                if refit is not None:
                    fixes.extend(_corrections(group, gi, refit, inits, corrected, f"{si}_{gi}"))
        sweep.masks.append(masks or None)
        sweep.corrections.append(fixes if masks else [])
    # the corrections add to the fully masked weights (after every mask of every group)
    for fixes in sweep.corrections:
        for fix in fixes:
            weight = fix.view.weight.name
            out = f"{fix.name}_w"
            nodes.append(onnx.helper.make_node("Add", [current.get(weight, weight), fix.name], [out],
                                               name=f"{fix.name}_add"))
            current[weight] = out
            graph.input.append(onnx.helper.make_tensor_value_info(fix.name, onnx.TensorProto.FLOAT,
                                                                  list(fix.shape)))
    zeroed.rename_uses(graph, current)
    original = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    for node in original:
        graph.node.append(node)
        for out in node.output:
            graph.node.extend(late.get(out, []))
    _expose_scores(prepared, graph)
    return model, sweep


def _expose_scores(prepared: onnx.ModelProto, graph: onnx.GraphProto) -> None:
    """The scores that outputs are chosen from by rank, as outputs of the sweep model too: a model
    whose only output is ids (a g2p model's ``ArgMax``) deviated by nothing, the ids being no float."""
    from graphprune.calibration.output_kinds import decision_scores

    types = {v.name: v for v in graph.value_info}
    shown = {o.name for o in graph.output}
    for name in decision_scores(prepared):
        if name not in shown:
            value = onnx.ValueInfoProto(name=name)
            if name in types and types[name].type.HasField("tensor_type"):
                value.type.tensor_type.elem_type = types[name].type.tensor_type.elem_type
            graph.output.append(value)


def _computed_weights(analysis: Analysis, inits: dict[str, onnx.TensorProto]) -> dict[str, tuple[int, int]]:
    """Float weights the graph computes from constants (an int8 weight's DequantizeLinear, a
    cast and scaled integer weight) that a producer or consumer reads: name -> (ONNX element
    type, rank). Their integer constants cannot be masked by a float Mul; these can."""
    out: dict[str, tuple[int, int]] = {}
    for name in zeroed.computed_weights(analysis, linked=True) - set(inits):
        tensor = analysis.context.tensors[name]
        if tensor.dtype is not None and tensor.shape is not None and np.dtype(tensor.dtype).kind == "f":
            out[name] = (onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype)), len(tensor.shape))
    return out


def _corrections(group: Any, member: int, refit: tuple[dict[str, Any], Any],
                 inits: dict[str, onnx.TensorProto], corrected: set[str], tag: str) -> list[Correction]:
    """Correction inputs for the consumers of ``group`` that have a Gram (float32 weights,
    each weight corrected for one group only)."""
    from graphprune.planning.data_aware import _consumers, _inverse_gram

    views, stats = refit
    out = []
    for view, layer, labels in _consumers(group, views, stats):
        name = view.weight.name
        init = inits.get(name)
        if (init is None or init.data_type != onnx.TensorProto.FLOAT or name in corrected
                or view.group != 1 or _inverse_gram(layer) is None
                or len(labels) != view.in_channels()):
            continue
        corrected.add(name)
        out.append(Correction(name=f"__gp_sens_fix_{tag}_{len(corrected)}", view=view, stats=layer,
                              labels=np.asarray(labels), member=member, shape=tuple(init.dims)))
    return out


def correction(fix: Correction, removed_units: np.ndarray) -> np.ndarray:
    """``W' - W * mask`` in the weight's stored layout: ``W'`` the least-squares refit of the
    kept input channels when the units ``removed_units`` go (zero on the removed channels)."""
    from graphprune.planning.data_aware import _columns, _inverse_gram

    view = fix.view
    cols = _columns(view)  # [out, in, kernel]
    out_ch, in_ch, kernel = cols.shape
    rows = cols.transpose(0, 2, 1).reshape(-1, in_ch)  # [out * kernel, in]
    remove = np.flatnonzero(np.isin(fix.labels, removed_units))
    zeroed = rows.copy()
    zeroed[:, remove] = 0.0
    refit = zeroed
    if len(remove) and len(remove) < in_ch:
        h = _inverse_gram(fix.stats)
        try:
            block = np.linalg.inv(h[np.ix_(remove, remove)])
        except np.linalg.LinAlgError:
            block = np.linalg.pinv(h[np.ix_(remove, remove)])
        refit = rows - (rows[:, remove] @ block) @ h[remove, :]
        refit[:, remove] = 0.0

    def stored(r: np.ndarray) -> np.ndarray:
        mats = r.reshape(out_ch, kernel, in_ch).transpose(0, 2, 1).reshape(1, out_ch, -1)
        return view.set_matrices(mats).astype(np.float64)

    return (stored(refit) - stored(zeroed)).astype(np.float32)


def _mask_group(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], roles: dict,
                group: Any, mask_name: str, tag_id: str, current: dict[str, str],
                nodes: list[onnx.NodeProto], computed: dict[str, tuple[int, int]],
                late: dict[str, list[onnx.NodeProto]], zero_points: dict[str, np.ndarray] | None = None) -> bool:
    """Multiply every float producer/consumer weight of ``group`` by its unit mask (pinned
    elements, label -1, read a 1 appended to the mask); a weight the graph computes
    (``computed``) is masked by nodes that ``late`` places after its producer. An 8-bit integer
    weight (``quantize_dynamic``'s ``MatMulInteger`` / ``ConvInteger``) is masked around its
    zero point in int32, ``(w - zp) * mask + zp``, and cast back: a masked unit reads as zero."""
    used = False
    source_mask = mask_name
    pinned = bool(getattr(group, "pinned_units", 0))
    if pinned:
        source_mask = f"{mask_name}_ext"
    for dim, labels in group.unit_of.items():
        name, axis = dim
        init = inits.get(name)
        if init is not None:
            if roles.get(dim) not in (PRODUCER, CONSUMER):
                continue
            data_type, rank = init.data_type, len(init.dims)
        elif name in computed:
            data_type, rank = computed[name]
        else:
            continue
        integer = init is not None and data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        if data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE) \
                and not integer:
            continue
        tag = f"{name}__gp_s{tag_id}_{axis}"
        index_name, shape_name = f"{tag}_idx", f"{tag}_shape"
        index = np.where(np.asarray(labels) >= 0, labels, group.num_units).astype(np.int64)
        graph.initializer.append(numpy_helper.from_array(index, index_name))
        shape = [1] * rank
        shape[axis] = -1
        graph.initializer.append(numpy_helper.from_array(np.asarray(shape, dtype=np.int64), shape_name))
        if pinned and not used:  # the mask with a 1 appended, made once a weight reads it
            graph.initializer.append(numpy_helper.from_array(np.ones(1, dtype=np.float32), f"{mask_name}_one"))
            nodes.append(onnx.helper.make_node("Concat", [mask_name, f"{mask_name}_one"], [source_mask], axis=0,
                                               name=f"{mask_name}_concat"))
        source = current.get(name, name)
        gathered = f"{tag}_g"
        nodes.append(onnx.helper.make_node("Gather", [source_mask, index_name], [gathered], name=f"{tag}_gather"))
        if data_type != onnx.TensorProto.FLOAT:
            nodes.append(onnx.helper.make_node("Cast", [gathered], [f"{gathered}_c"],
                                               to=onnx.TensorProto.INT32 if integer else data_type,
                                               name=f"{tag}_cast"))
            gathered = f"{gathered}_c"
        nodes.append(onnx.helper.make_node("Reshape", [gathered, shape_name], [f"{tag}_m"], name=f"{tag}_reshape"))
        if integer:
            zp = np.asarray(0 if zero_points is None or name not in zero_points else zero_points[name])
            graph.initializer.append(numpy_helper.from_array(zp.astype(np.int32), f"{tag}_zp"))
            nodes.extend([
                onnx.helper.make_node("Cast", [source], [f"{tag}_i"], to=onnx.TensorProto.INT32, name=f"{tag}_to32"),
                onnx.helper.make_node("Sub", [f"{tag}_i", f"{tag}_zp"], [f"{tag}_c"], name=f"{tag}_centre"),
                onnx.helper.make_node("Mul", [f"{tag}_c", f"{tag}_m"], [f"{tag}_cm"], name=f"{tag}_mul"),
                onnx.helper.make_node("Add", [f"{tag}_cm", f"{tag}_zp"], [f"{tag}_a"], name=f"{tag}_back"),
                onnx.helper.make_node("Cast", [f"{tag}_a"], [f"{tag}_w"], to=data_type, name=f"{tag}_to8")])
            current[name] = f"{tag}_w"
            used = True
            continue
        mul = onnx.helper.make_node("Mul", [source, f"{tag}_m"], [f"{tag}_w"], name=f"{tag}_mul")
        if init is None:
            late.setdefault(name, []).append(mul)
        else:
            nodes.append(mul)
        current[name] = f"{tag}_w"
        used = True
    return used


def _prepared(reference: list[np.ndarray]) -> list[tuple[np.ndarray, float] | None]:
    """One sample's outputs as :func:`_deviation` reads them, once for every comparison: float
    ones flattened in float64 with their squared norm (``None``: not compared)."""
    out: list[tuple[np.ndarray, float] | None] = []
    for ref in reference:
        if not np.issubdtype(ref.dtype, np.floating):
            out.append(None)
            continue
        r = ref.astype(np.float64).ravel()
        out.append((r, float(np.dot(r, r)) + 1e-12))
    return out


def _deviation(reference: list[np.ndarray], other: list[np.ndarray],
               prepared: list[tuple[np.ndarray, float] | None] | None = None) -> float:
    """Mean squared deviation of ``other`` from ``reference`` relative to its norm, over the float
    outputs (``prepared``: :func:`_prepared` of ``reference``, made once for many comparisons)."""
    values = []
    for ref, original, out in zip(prepared or _prepared(reference), reference, other, strict=True):
        if ref is None:
            continue
        if original.shape != out.shape:  # a decoder that stops at another step: all of it deviates
            values.append(1.0)
            continue
        d = ref[0] - out.ravel()  # (in float64, as the reference)
        values.append(float(np.dot(d, d)) / ref[1])
    return float(np.mean(values)) if values else 0.0


def measure(
    path: Any,
    states: list[GroupState],
    sweep: Sweep,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    ratios: Sequence[float] = SWEEP_RATIOS,
    progress: Callable[[int, int], None] | None = None,
    uncorrected: list[tuple[list[float], list[float]] | None] | None = None,
) -> list[tuple[list[float], list[float]] | None]:
    """Per state: (ratios actually used, deviations) or ``None`` when it has no mask or was
    not measured (:data:`SWEEP_SECONDS`). ``uncorrected``: filled with the same curves measured
    without the refit corrections (the deviation a reconstruction other than the refit starts
    from), where the sweep has corrections and measures every group within its time; else left
    empty (where they would take the sweep past that time, the corrected curves are measured alone)."""
    sess = validate.session(path, optimize=True)
    names = [o.name for o in sess.get_outputs()]
    base = {name: np.ones(st.group.num_units, dtype=np.float32)
            for st, masks in zip(states, sweep.masks, strict=True) for name, _ in (masks or [])}
    for fixes in sweep.corrections:
        base.update({fix.name: np.zeros(fix.shape, dtype=np.float32) for fix in fixes})

    def run(extra: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
        return [[np.asarray(v) for v in sess.run(names, {**f, **base, **extra})] for f in feeds]

    reference = run({})
    out: list[tuple[list[float], list[float]] | None] = []
    raw: list[tuple[list[float], list[float]] | None] | None = (
        [] if uncorrected is not None and any(sweep.corrections) else None)
    total = sum(1 for m in sweep.masks if m is not None)
    done, stride, started, aside = 0, 1, time.perf_counter(), 0.0

    prepared = [_prepared(a) for a in reference]

    def deviation(outputs: list[list[np.ndarray]]) -> float:
        return float(np.mean([_deviation(a, b, p) for a, b, p in zip(reference, outputs, prepared, strict=True)]))

    for st, masks, fixes in zip(states, sweep.masks, sweep.corrections, strict=True):
        if masks is None or (done and done % stride):
            out.append(None)
            if raw is not None:
                raw.append(None)
            done += masks is not None
            continue
        n = st.group.num_units
        members = st.members
        used, devs, plain = [], [], []
        for r in ratios:
            m = max((s for s in st.steps if s <= r * n + 1e-9), default=0)
            if m == 0 or (used and m == round(used[-1] * n)):
                continue
            extra = {}
            for name, order in masks:
                mask = np.ones(n, dtype=np.float32)
                mask[order[:m]] = 0.0
                extra[name] = mask
            if raw is not None:
                if fixes:
                    began = time.perf_counter()
                    plain.append(deviation(run(extra)))
                    aside += time.perf_counter() - began
            for fix in fixes:
                extra[fix.name] = correction(fix, members[fix.member][1][:m])
            devs.append(deviation(run(extra)))
            used.append(m / n)
        out.append((used, devs) if used else None)
        if raw is not None:
            raw.append(((used, plain) if fixes else out[-1]) if used else None)
        done += 1
        if done == 1 and total > 1:  # what the whole sweep would take at the first group's pace
            elapsed = time.perf_counter() - started
            if elapsed * total > SWEEP_SECONDS:  # the uncorrected curves go first (every group's, or none:
                raw = None  # they took OSKut's calibrated budget to 176 s of sensitivity on a 1 M-parameter model)
            stride = max(1, int(np.ceil((elapsed - aside) * total / SWEEP_SECONDS)))
            raw = raw if stride == 1 else None
        if progress is not None:
            progress(done, total)
    if raw is not None and uncorrected is not None:
        uncorrected.extend(raw)
    return out


def apply_curves(states: list[GroupState], curves: list[tuple[list[float], list[float]] | None]) -> dict[str, Any]:
    """Replace each state's loss by its measured curve; unmeasured states get the median curve."""
    measured = [c for c in curves if c is not None and c[0]]
    if not measured:
        return {"groups_measured": 0}
    grid = np.asarray(SWEEP_RATIOS)
    median = np.median([np.interp(grid, [0.0, *c[0]], [0.0, *c[1]]) for c in measured], axis=0)
    for st, curve in zip(states, curves, strict=True):
        ratios, devs = curve if curve is not None and curve[0] else (list(grid), list(median))
        st.loss = curve_loss(ratios, devs, st.group.num_units, st.order)
    return {"groups_measured": len(measured), "groups": len(states),
            "ratios": list(SWEEP_RATIOS)}
