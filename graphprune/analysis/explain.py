"""Why nothing was pruned: one line for a run that removes nothing.

A prune that removes nothing still writes a valid model and exits 0, but it must say why
(``report["nothing_prunable"]``, printed by ``graphprune prune``): no channel group at all
(no layer the analysis understands), every group frozen (the most common reasons, with
counts), or prunable groups that the ratio and rounding leave whole.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphprune.analysis.driver import Analysis


def _kind(reason: str) -> str:
    """A reason with its names taken out (``no rule for Foo 'a'`` -> ``no rule for Foo``)."""
    return re.sub(r"\s*'[^']*'", "", reason).strip()


#: what an op domain without rules means, where it has a known cause and cure
DOMAIN_NOTES = {
    "com.microsoft.nchwc": "ONNX Runtime's NCHWc layout, written for one CPU when a model is saved at "
                           "ORT_ENABLE_ALL: prune the model saved at ORT_ENABLE_EXTENDED (or the original)",
}


def domain_notes(ops: Iterable[str]) -> list[str]:
    """What the known domains among ``ops`` (``domain::Op`` keys) mean, once each, sorted."""
    return sorted({DOMAIN_NOTES[d] for d in (op.partition("::")[0] for op in ops) if d in DOMAIN_NOTES})


def unsupported_ops(analysis: Analysis) -> str:
    """The three most frequent op types without a rule, with counts and what a known
    domain of them means (empty when every op has a rule)."""
    ranked = sorted(analysis.unsupported.items(), key=lambda kv: -len(kv[1]))
    text = ", ".join(f"{op} (x{len(names)})" for op, names in ranked[:3])
    return "; ".join([text, *domain_notes(analysis.unsupported)]) if text else ""


def unranked_layers(analysis: Analysis) -> str:
    """The layers no group holds because the rank of a tensor they read is unknown (a Reshape
    to a target of data-dependent length before them: a tf.ragged front-end), by op type with
    counts (empty when none)."""
    found = getattr(analysis.context, "unranked", {})
    return ", ".join(f"{op} (x{len(set(names))})" for op, names in sorted(found.items()))


def nothing_prunable(analysis: Analysis, units_removed: int, erased: int = 0, prune_hidden: bool = False) -> str | None:
    """The one-line explanation when nothing was removed (``None`` otherwise; ``prune_hidden``: the hidden
    size was asked for)."""
    if units_removed or erased:
        return None
    unranked = unranked_layers(analysis)
    line = _nothing_prunable(analysis, prune_hidden)
    return line + (f"; layers left out, the rank of their input unknown: {unranked}" if unranked else "")


def _nothing_prunable(analysis: Analysis, prune_hidden: bool = False) -> str:
    unsupported = unsupported_ops(analysis)
    if not analysis.groups:
        why = "no channel group found (no layer with float weights that the analysis understands)"
        if unsupported:
            return f"nothing prunable: {why}; ops without a rule: {unsupported}"
        ctx = analysis.context
        kinds = Counter(_kind(r) for reasons in (*ctx.tensor_freeze.values(), *ctx.dim_freeze.values())
                        for r in set(reasons) if not r.startswith(("graph input", "graph output")))
        top = "; ".join(f"{kind} (x{n})" for kind, n in kinds.most_common(2))
        return f"nothing prunable: {why}" + (f"; frozen: {top}" if top else "")
    prunable = analysis.prunable_groups
    if prunable:
        from graphprune.analysis.targets import classify_groups

        kinds = classify_groups(analysis)
        hidden = 0 if prune_hidden else sum(1 for g in prunable if kinds.get(g.id) == "hidden")
        if hidden == len(prunable):
            return (f"nothing prunable: the {hidden} prunable channel group(s) are the hidden size (the residual "
                    "stream), which prunes only with --prune-hidden")
        return (f"nothing prunable: the ratio and rounding leave all {len(prunable)} prunable "
                "channel groups whole (raise --ratio or lower --round-to/--min-channels"
                + (f"; {hidden} of them, the hidden size, prune only with --prune-hidden)" if hidden else ")"))
    counts: Counter[str] = Counter()
    for group in analysis.groups:
        if group.frozen:
            counts[_kind(group.frozen[0])] += 1
        elif group.num_units < 2:
            counts["a single unit"] += 1
        else:
            counts["no weight that creates the channels"] += 1
    top = "; ".join(f"{kind} (x{n})" for kind, n in counts.most_common(3))
    return (f"nothing prunable: every channel group is frozen or unprunable: {top}"
            + (f"; ops without a rule: {unsupported}" if unsupported else ""))
