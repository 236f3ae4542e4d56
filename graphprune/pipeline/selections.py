"""Outputs computed after a selection, in the structural check.

A selection (the rules' :meth:`~graphprune.rules.registry.OpRule.ranks_inputs`: ``TopK``,
``ArgMax``, ``NonZero``, ``NonMaxSuppression``, ...) picks entries by comparing values. What is
computed from its choice jumps when rounding flips a near-tie between two entries or moves a
score across a threshold: a pruned convolution sums in another order, the box of another peak
comes out (a relative difference of 0.99 on a TF.js CenterNet whose other outputs agreed to
1e-6), or one box more (the outputs' shapes differ). So:

- such an output is never excused as the model's own float noise (:func:`selected_outputs`):
  moving the inputs by two units in the last place flips the same choices, and that "noise"
  is as large as the outputs (2.7e14 on a random-weight RetinaNet), which would excuse anything
  -- unless both models chose the same entries on every input compared (:func:`choices_agree`):
  then what follows is the same computation on the same choices, and its noise is the model's
  own (Kokoro's vocoder after its duration expansion amplifies one unit in the last place to 5 %
  of its output through the phase of an STFT);
- where every failing output is downstream of a selection, the two models are compared on
  further random inputs, on which those outputs have elements; agreement on most passes
  (:func:`within_selection_flips`);
- where they flip on most inputs too (scores saturated at 1.0 tie everywhere), every value
  computed before the choices and read after them (:func:`_frontier`) is compared instead,
  provided no layer after a choice was pruned: then what comes after is the same computation
  on the same values, and only the choice differs.

A rewrite error shows on every input, and in the values the selections read.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from graphprune.io import gs_export
from graphprune.io.graph_reads import node_reads
from graphprune.rules.registry import lookup
from graphprune.verify import noise, validate


class SessionLike(Protocol):
    """What these checks read of a :class:`graphprune.pipeline.session.Session` (a protocol,
    so that the session, which calls them, is not imported here)."""

    prepared: onnx.ModelProto
    model: Any
    opset: int
    store: Any

    def path_of(self, model: Any, *, keep: bool = True) -> Any: ...

    def feeds(self, count: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]: ...

#: further random inputs on which outputs after a selection are compared, and how many must agree
SELECTION_FEEDS, SELECTION_AGREE = 3, 2


def _selections(session: SessionLike) -> tuple[list[gs.Node], set[str]]:
    """The main graph's selections and every tensor computed from their choice."""
    from graphprune.calibration.runner import downstream

    found = [n for n in gs_export.import_onnx(session.prepared).nodes
             if (rule := lookup(n.domain or "", n.op, session.opset)) is not None and rule.ranks_inputs(n)]
    return found, downstream(session.prepared.graph, [t.name for n in found for t in n.outputs if t.name])


def selected_outputs(session: SessionLike) -> set[int]:
    """The indices of the graph outputs computed from what a selection picks."""
    found, after = _selections(session)
    return {j for j, o in enumerate(session.prepared.graph.output) if o.name in after} if found else set()


def choices_agree(session: SessionLike, candidate: Any, reference: Any, feeds: list[dict[str, np.ndarray]]) -> bool:
    """Did both models choose the same entries on ``feeds``: every integer output of every
    selection (``NonZero``'s positions, ``TopK``'s and ``ArgMax``'s indices, the boxes
    ``NonMaxSuppression`` keeps) equal? ``False`` where a selection has no such output
    (``Compress`` gives the chosen values only) or a run fails."""
    found, _ = _selections(session)
    chosen_by = [[t.name for t in n.outputs if t.name and t.dtype is not None and np.dtype(t.dtype).kind in "iub"]
                 for n in found]
    if not found or not all(chosen_by):
        return False
    names = [name for names in chosen_by for name in names]
    try:
        chosen = [_run_exposed(session, model, names, feeds, optimize)
                  for model, optimize in ((candidate, True), (reference, False))]
    except Exception:  # VerificationError: nothing compared
        return False
    return all(x.shape == y.shape and np.array_equal(x, y)
               for a, b in zip(*chosen, strict=True) for x, y in zip(a, b, strict=True))


def within_own_noise(session: SessionLike, candidate: Any, verification: dict[str, Any],
                     reference: Any = None) -> dict[str, Any]:
    """Accept a difference that is float noise of the model: ``candidate`` on the session's
    feeds (:func:`graphprune.verify.noise.excuse_float_noise`). Outputs after a selection are
    held to their noise too where ``reference`` (what ``candidate`` was compared with) and
    ``candidate`` chose the same entries on those feeds (:func:`choices_agree`), else never."""
    path = session.path_of(candidate, keep=candidate is session.model)
    feeds = session.feeds(count=verification.get("samples", 1))
    selected = selected_outputs(session)
    same = bool(selected) and reference is not None and choices_agree(session, candidate, reference, feeds)
    floors = _floors(session, [o.name for o in session.prepared.graph.output])
    result = noise.excuse_float_noise(path, feeds, verification, set() if same else selected, floors)
    if same and result.get("ok") and not verification.get("ok"):
        result["scale"] += "; every selection chose the same entries in both models"
    return result


def within_selection_flips(session: SessionLike, candidate: Any, reference: Any, verification: dict[str, Any],
                           tolerance: float) -> dict[str, Any]:
    """``verification`` accepted where every failing output follows a selection and the models
    agree on most further inputs, or agree on the values the selections read (see the module
    docstring); else as it was, with ``selection_agreement`` added."""
    graph = session.prepared.graph
    found, after = _selections(session)
    per_output = verification.get("per_output") or []
    shapes = verification.get("shapes_differ")
    if not found or (shapes is None and len(per_output) != len(graph.output)):
        return verification
    if shapes is not None:
        failing = [graph.output[j].name if j < len(graph.output) else "" for j in shapes]
    else:
        failing = [graph.output[j].name for j, entry in enumerate(per_output)
                   if entry["max_abs_diff"] > tolerance * max(entry["scale"], 1e-12)]
    if not failing or any(name not in after for name in failing):
        return verification
    feeds = session.feeds(count=SELECTION_FEEDS + 1)[1:]
    try:
        pruned = validate.run_many(session.path_of(candidate, keep=candidate is session.model), feeds,
                                   "the pruned model", optimize=True)
        zeroed = validate.run_many(session.path_of(reference, keep=False), feeds, "the zeroed original",
                                   optimize=False)
    except Exception:  # VerificationError: the verdict stands
        return verification
    positions = [j for j, o in enumerate(graph.output) if o.name in failing]
    agreeing = [validate.differences(b, a) for a, b in zip(pruned, zeroed, strict=True)
                if validate.output_shapes_match(b, a)
                and all(j < len(b) and b[j].size for j in positions)]  # (an empty output compares nothing)
    agreeing = [d for d in agreeing if d[1] <= tolerance]
    found_row = {**verification, "selection_agreement": f"{len(agreeing)}/{len(feeds)}"}
    names = ", ".join(f"{n.op} '{n.name}'" for n in found[:2])
    accepted = {k: v for k, v in found_row.items() if k not in ("error", "_error")}
    if len(agreeing) < SELECTION_AGREE:
        read = _read_values_agree(session, candidate, reference, after, session.feeds(count=SELECTION_FEEDS + 1),
                                  tolerance)
        if read is None:
            return found_row
        worst, noisy = read
        within = f"within the tolerance or {noise.NOISE_MULTIPLE:g}x its own float noise; " if noisy else ""
        return {**accepted, "ok": True, "checker": True, "ort": True, "max_rel_diff_read": worst,
                "scale": f"outputs after a selection ({names}) flip on most inputs; every value computed "
                         f"before the choices and read after them agrees ({within}max rel diff {worst:.3g} "
                         f"on {SELECTION_FEEDS + 1} inputs), and no layer after them was pruned"}
    if shapes is None:
        return {**found_row, "ok": True,
                "scale": f"outputs after a selection ({names}) flip near-ties on one input; equal on "
                         f"{len(agreeing)} of {len(feeds)} further inputs"}
    return {**accepted, "ok": True, "checker": True, "ort": True, "output_shapes_match": False,
            "samples": len(agreeing), "tolerance": tolerance,
            "max_abs_diff": max(d[0] for d in agreeing), "max_rel_diff": max(d[1] for d in agreeing),
            "scale": f"outputs after a selection ({names}) have other shapes on one input (a near-tie or "
                     f"threshold flipped by rounding: one entry more or fewer); equal on {len(agreeing)} "
                     f"of {len(feeds)} further inputs"}


def _frontier(graph: onnx.GraphProto, after: set[str]) -> list[str]:
    """The tensors computed before any choice that the nodes after a choice read (a selection's
    scores, the box offsets gathered at the chosen positions; the outer values an ``If`` branch
    reads). Where one is a comparison's result (``score > t`` into ``NonZero``), the values
    compared stand for it: a threshold flipped by rounding changes the comparison, not them."""
    made = {o: node for node in graph.node for o in node.output if o}
    given = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    floats = {v.name for v in (*graph.value_info, *graph.output)
              if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                  onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)}
    names: list[str] = []
    for node in graph.node:
        if not any(o in after for o in node.output):
            continue
        for name in sorted(node_reads(node)):
            if not name or name in after or name in given or name not in made:
                continue
            producer = made[name]
            compared = [i for i in producer.input if i in floats and i not in given] \
                if name not in floats and producer.op_type in COMPARISONS else []
            names += [n for n in compared or [name] if n not in names]
    return names


#: ops whose boolean result a selection reads; their float operands are compared instead
COMPARISONS = ("Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal")


def _read_values_agree(session: SessionLike, candidate: Any, reference: Any, after: set[str],
                       feeds: list[dict[str, np.ndarray]], tolerance: float) -> tuple[float, bool] | None:
    """The largest relative difference between the two models' :func:`_frontier` tensors on
    ``feeds``, and whether some of them needed their own float noise: each such tensor agrees
    within ``tolerance`` of its size or within ``NOISE_MULTIPLE`` x its noise in ``candidate``
    (:func:`_own_noise`: ONNX Runtime's sigmoid is exact to ~1e-7 absolute, so a detector's
    scores saturated at 6e-7 on random input differ by 20 % of their size between two runs
    whose logits agree to 2e-7). ``None`` where one does not, a layer after a choice was
    pruned (its weights have other shapes in ``candidate``), or nothing could be compared."""
    graph = session.prepared.graph
    original = {t.name: list(t.dims) for t in graph.initializer}
    pruned = onnx.load(str(session.path_of(candidate, keep=candidate is session.model)), load_external_data=False)
    changed = {t.name for t in pruned.graph.initializer if original.get(t.name, list(t.dims)) != list(t.dims)}
    if any(name in changed for node in graph.node if any(o in after for o in node.output)
           for name in node_reads(node)):
        return None
    names = _frontier(graph, after)
    if not names:
        return None
    try:
        values = [_run_exposed(session, model, names, feeds, optimize)
                  for model, optimize in ((candidate, True), (reference, False))]
    except Exception:  # VerificationError: nothing compared
        return None
    worst, over = 0.0, {}
    for a, b in zip(*values, strict=True):
        if not validate.output_shapes_match(b, a):
            return None
        for j, (x, y) in enumerate(zip(a, b, strict=True)):
            diff, rel = validate.differences([y], [x])
            worst = max(worst, rel)
            if rel > tolerance:
                over[j] = max(over.get(j, 0.0), diff)
    if not over:
        return worst, False
    own = _own_noise(session, candidate, names, feeds, values[0])
    if own is None or any(diff > noise.NOISE_MULTIPLE * own[j] for j, diff in over.items()):
        return None
    return worst, True


def _own_noise(session: SessionLike, candidate: Any, names: list[str], feeds: list[dict[str, np.ndarray]],
               fast: list[list[np.ndarray]]) -> list[float] | None:
    """How far each tensor ``names`` of ``candidate`` moves between its runs on ``feeds`` with
    ORT's graph optimizations (``fast``), without them, and with the float inputs moved by two
    units in the last place (as :func:`graphprune.verify.noise.excuse_float_noise` measures
    outputs), and at least the error its kernels leave whatever the size
    (:func:`_floors`); ``None`` where a run fails."""
    try:
        plain = _run_exposed(session, candidate, names, feeds, False)
        moved = _run_exposed(session, candidate, names, [noise.nudged(feed) for feed in feeds], True)
    except Exception:  # VerificationError: nothing measured
        return None
    return noise.spread(fast, plain, moved, floors=_floors(session, names))


def _floors(session: SessionLike, names: list[str]) -> list[float]:
    """The absolute error the kernels that compute ``names`` leave, whatever their size
    (:func:`graphprune.verify.noise.error_floors`: a saturated sigmoid's)."""
    return noise.error_floors(gs_export.import_onnx(session.prepared), names, session.opset)


def _run_exposed(session: SessionLike, model: Any, names: list[str], feeds: list[dict[str, np.ndarray]],
                 optimize: bool) -> list[list[np.ndarray]]:
    """The tensors ``names`` of ``model`` on ``feeds`` (exposed as outputs of a copy of its
    weightless skeleton, written beside its weights in the store)."""
    skeleton = onnx.load(str(session.path_of(model, keep=False)), load_external_data=False)
    del skeleton.graph.output[:]
    skeleton.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return validate.run_many(session.store.write_model(skeleton), feeds, "the values the selections read",
                             optimize=optimize)
