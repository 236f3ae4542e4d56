"""A prune that removed nothing writes the model as it came.

The preparation may lower ops to others it analyses (a Keras LSTM's ``Loop`` as ONNX's
``LSTM``, which computes the same to within rounding and holds 5 % more; a fused kernel as the
pattern it fuses). Where the plan then removes nothing, writing the lowered graph would hand back
a larger file that computes slightly differently: the model as loaded is written instead, in
every mode (lossless, ratio, budget)."""

from __future__ import annotations

from typing import Any

from graphprune.errors import GraphPruneError

#: the report's line where the model is written as it came
NOTE = "nothing was removed: the model is written as it came"


def as_it_came(session: Any, *, lowered_only: bool = True) -> bool:
    """Whether a prune of ``session`` that removed nothing writes the model as it came: where
    the preparation lowered ops to others (``lowered_only=False``: whatever it changed; a ratio
    or budget prune that removes nothing wrote a Keras GRU's folded, untied graph, 67 -> 49
    nodes). Not where ONNX's version converter ran (an opset ONNX Runtime no longer runs, a
    QLinearSoftmax read at the new opset), nor, for ``--lossless``, for foldings alone (weights a
    quantizer left to be quantized at run time: bit for bit, which is what it is for), nor for
    a file that fails the checker as it came (outputs that declare a type without a shape)."""
    if (lowered_only and not session.normalised.get("lowered_ops")) or "opset_converted" in session.normalised:
        return False
    try:
        session.check(session.loaded)
    except GraphPruneError:
        return False
    return True


def keep_loaded(session: Any, report: dict[str, Any]) -> None:
    """``session`` writes the model as loaded; ``report``'s after-figures are its before-figures
    (counted on the prepared graph, as before). The caller says so in the report."""
    session.model = session.loaded
    if "nodes_before" in report:  # (the file's nodes: the prepared graph's count said 49 for 67 written)
        report["nodes_before"] = len(session.loaded.graph.node)
    for figure in ("params", "macs", "nodes"):
        if f"{figure}_before" in report:
            report[f"{figure}_after"] = report[f"{figure}_before"]


def write_unchanged(session: Any, report: dict[str, Any], plan: Any) -> bool:
    """Where ``plan`` removes nothing and :func:`as_it_came` holds, :func:`keep_loaded`; whether it did."""
    if plan.units_removed or plan.erase or not as_it_came(session, lowered_only=False):
        return False
    keep_loaded(session, report)
    report["unchanged"] = NOTE
    return True
