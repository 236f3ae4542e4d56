"""Calibration-aware group sensitivity: the output deviation of pruning one group alone.

One model serves the whole sweep: each group gets a unit mask as an extra graph input, and
every producer/consumer weight of the group is multiplied by its mask (gathered from units
to elements, the zeroed-original construction of :func:`graphprune.verify.validate.zeroed_reference`
with the mask fed at run time). ONNX Runtime then runs the calibration batch once per
(group, ratio) with all masks at one except that group's first removed units; the deviation
is the mean squared relative L2 difference of the float outputs from the unmasked run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.analysis import CONSUMER, PRODUCER, Analysis
from graphprune.planning.budget import GroupState, curve_loss
from graphprune.verify import validate

#: ratios of each group at which the deviation is measured
SWEEP_RATIOS = (0.25, 0.5, 0.75)


Masks = list[tuple[str, np.ndarray]]  # per state: (mask input, removal order) per member group


def masked_model(prepared: onnx.ModelProto, analysis: Analysis,
                 states: list[GroupState]) -> tuple[onnx.ModelProto, list[Masks | None]]:
    """``prepared`` with one mask input per member group of each state (``None`` where no
    weight could be masked)."""
    roles = analysis.context.roles
    model = onnx.ModelProto()
    model.CopyFrom(prepared)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    current: dict[str, str] = {}  # weight -> name of its masked version so far
    nodes: list[onnx.NodeProto] = []
    mask_names: list[Masks | None] = []
    for si, st in enumerate(states):
        masks: Masks = []
        for gi, (group, order) in enumerate(st.members):
            mask_name = f"__gp_sens_mask_{si}_{gi}"
            if _mask_group(graph, inits, roles, group, mask_name, f"{si}_{gi}", current, nodes):
                graph.input.append(onnx.helper.make_tensor_value_info(
                    mask_name, onnx.TensorProto.FLOAT, [group.num_units]))
                masks.append((mask_name, order))
        mask_names.append(masks or None)
    validate._rename_uses(graph, current)
    original = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + original)
    return model, mask_names


def _mask_group(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], roles: dict,
                group: Any, mask_name: str, tag_id: str, current: dict[str, str],
                nodes: list[onnx.NodeProto]) -> bool:
    """Multiply every float producer/consumer weight of ``group`` by its unit mask."""
    used = False
    for dim, labels in group.unit_of.items():
        name, axis = dim
        init = inits.get(name)
        if init is None or roles.get(dim) not in (PRODUCER, CONSUMER):
            continue
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                  onnx.TensorProto.DOUBLE):
            continue
        rank = len(init.dims)
        tag = f"{name}__gp_s{tag_id}_{axis}"
        index_name, shape_name = f"{tag}_idx", f"{tag}_shape"
        graph.initializer.append(numpy_helper.from_array(np.asarray(labels, dtype=np.int64), index_name))
        shape = [1] * rank
        shape[axis] = -1
        graph.initializer.append(numpy_helper.from_array(np.asarray(shape, dtype=np.int64), shape_name))
        source = current.get(name, name)
        gathered = f"{tag}_g"
        nodes.append(onnx.helper.make_node("Gather", [mask_name, index_name], [gathered], name=f"{tag}_gather"))
        if init.data_type != onnx.TensorProto.FLOAT:
            nodes.append(onnx.helper.make_node("Cast", [gathered], [f"{gathered}_c"], to=init.data_type,
                                               name=f"{tag}_cast"))
            gathered = f"{gathered}_c"
        nodes.append(onnx.helper.make_node("Reshape", [gathered, shape_name], [f"{tag}_m"], name=f"{tag}_reshape"))
        nodes.append(onnx.helper.make_node("Mul", [source, f"{tag}_m"], [f"{tag}_w"], name=f"{tag}_mul"))
        current[name] = f"{tag}_w"
        used = True
    return used


def _deviation(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    values = []
    for ref, out in zip(reference, other, strict=True):
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        r = ref.astype(np.float64).ravel()
        o = out.astype(np.float64).ravel()
        denom = float(np.dot(r, r)) + 1e-12
        values.append(float(np.dot(r - o, r - o)) / denom)
    return float(np.mean(values)) if values else 0.0


def measure(
    path: Any,
    states: list[GroupState],
    mask_names: list[Masks | None],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    ratios: Sequence[float] = SWEEP_RATIOS,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[list[float], list[float]] | None]:
    """Per state: (ratios actually used, deviations) or ``None`` when it has no mask."""
    sess = validate.session(path, optimize=True)
    names = [o.name for o in sess.get_outputs()]
    ones = {name: np.ones(st.group.num_units, dtype=np.float32)
            for st, masks in zip(states, mask_names, strict=True) for name, _ in (masks or [])}

    def run(masks: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
        return [[np.asarray(v) for v in sess.run(names, {**f, **masks})] for f in feeds]

    reference = run(ones)
    out: list[tuple[list[float], list[float]] | None] = []
    total = sum(1 for m in mask_names if m is not None)
    done = 0
    for st, masks in zip(states, mask_names, strict=True):
        if masks is None:
            out.append(None)
            continue
        n = st.group.num_units
        used, devs = [], []
        for r in ratios:
            m = max((s for s in st.steps if s <= r * n + 1e-9), default=0)
            if m == 0 or (used and m == round(used[-1] * n)):
                continue
            zeroed = {}
            for name, order in masks:
                mask = np.ones(n, dtype=np.float32)
                mask[order[:m]] = 0.0
                zeroed[name] = mask
            outputs = run({**ones, **zeroed})
            devs.append(float(np.mean([_deviation(a, b) for a, b in zip(reference, outputs, strict=True)])))
            used.append(m / n)
        out.append((used, devs) if used else None)
        done += 1
        if progress is not None:
            progress(done, total)
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


# ---------------------------------------------------------------------------- after refit
def _raw_error(view: Any, stats: Any, remove: np.ndarray) -> float | None:
    """Relative output error of a consumer when input channels ``remove`` are zeroed and
    nothing is refit: ``tr(W_R G_RR W_R^T) / tr(W G W^T)``."""
    from graphprune.planning.data_aware import _rows

    if stats.gram is None or not stats.gram_rows:
        return None
    w = _rows(view)
    gram = stats.gram / max(stats.gram_rows, 1)
    energy = float(np.sum(w * (w @ gram)))
    wr = w[:, remove]
    return float(np.sum(wr * (wr @ gram[np.ix_(remove, remove)]))) / max(energy, 1e-30)


def refit_curves(states: list[GroupState], views: dict[str, Any], stats: Any,
                 measured: list[tuple[list[float], list[float]] | None]) -> dict[str, Any]:
    """Loss = the output deviation expected *after* the least-squares refit.

    For each group, the consumers' relative error left after refit (from the calibration
    Grams, :func:`graphprune.planning.data_aware.removal_error`) at each measured ratio,
    times the group's amplification: the measured output deviation of zeroing the group
    over its consumers' relative error without refit (how strongly this layer's error
    reaches the outputs). Groups without consumer statistics keep the measured curve."""
    from graphprune.planning.data_aware import _consumers, removal_error

    used = 0
    for st, curve in zip(states, measured, strict=True):
        if curve is None or not curve[0]:
            continue
        consumers = _consumers(st.group, views, stats)
        if not consumers:
            continue
        n = st.group.num_units
        refit, amps = [], []
        for ratio, dev in zip(*curve, strict=True):
            m = int(round(ratio * n))
            removed = st.order[:m]
            rec = raw = 0.0
            ok = True
            for view, layer, labels in consumers:
                idx = np.flatnonzero(np.isin(labels, removed))
                r1 = removal_error(view, layer, idx)
                r0 = _raw_error(view, layer, idx)
                if r1 is None or r0 is None:
                    ok = False
                    break
                rec += r1
                raw += r0
            if not ok:
                break
            refit.append(rec)
            if raw > 0:
                amps.append(dev / raw)
        if len(refit) != len(curve[0]) or not amps:
            continue
        amp = float(np.median(amps))
        st.loss = curve_loss(curve[0], [r * amp for r in refit], n, st.order)
        used += 1
    return {"groups_after_refit": used}
