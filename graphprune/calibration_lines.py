"""The calibration's lines of the ``prune`` summary: samples, the criterion and the
reconstruction chosen, and what each reconstruction pass changed (:mod:`graphprune.tables`
prints them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _reason(head: Mapping[str, Any]) -> str:
    """Why a softmax head kept its weights."""
    if head.get("reason"):
        return f" ({head['reason']})"
    return " (the fit did not lower the cross-validated cross-entropy)" if "cv_cross_entropy" in head else ""


def _reconstruction(calibration: Mapping[str, Any]) -> str:
    """The reconstruction kept; under ``auto``, with what each tried left on the held-out samples."""
    kept, choice = calibration.get("reconstruction"), calibration.get("reconstruction_choice") or {}
    if calibration.get("reconstruction_requested") != "auto":
        return str(kept)
    shown = "none" if calibration.get("reconstruction_reverted") else kept
    errors, why = choice.get("rel_l2") or {}, choice.get("stats")
    why = f"statistics correction {why}" if isinstance(why, str) else ""
    if not errors:
        return f"auto: {shown}" + (f" ({why})" if why else "")
    tried = ", ".join(f"{k} {v:.4g}" for k, v in errors.items() if v is not None)
    return f"auto: {shown} (held-out relative L2: {tried}" + (f"; {why})" if why else ")")


def _recurrent_lines(stats: Mapping[str, Any]) -> list[str]:
    """The refit of recurrent layers, and of a recurrence unrolled over its steps."""
    lines = []
    for key in ("recurrent", "unrolled"):
        rec = stats.get(key) or {}
        if not rec.get("layers"):
            continue
        parts = ", ".join(f"{rec[k]} {what}" for k, what in (("input_projections", "input projection(s)"), (
            "recurrences", "recurrence(s) on the original's states")) if rec.get(k))
        what = (f"recurrent: {rec['layers']} layer(s) refit ({parts})" if key == "recurrent" else
                f"unrolled recurrence: {rec['layers']} step(s) fit together on the original's inputs")
        state = "undone, the outputs moved away" if rec.get("undone") else "kept"
        compare = (f"; outputs on the calibration samples {rec['output_error_without']:.3g} -> {rec['output_error']:.3g}"
                   if "output_error" in rec else "")
        lines.append(f"    {what}, {state}{compare}")
    return lines


def calibration_lines(calibration: Mapping[str, Any] | None) -> list[str]:
    """Samples, the criterion chosen and what each reconstruction pass changed."""
    if not calibration:
        return []
    chosen, weighed = calibration.get("criteria_chosen") or {}, calibration.get("criterion_choice") or {}
    picked = f" ({', '.join(f'{k} x{v}' for k, v in chosen.items())})" if chosen else ""
    if weighed.get("compared"):  # the whole plans of several criteria, on the held-out samples
        tried = ", ".join(f"{k} {v['error']:.4g}" for k, v in weighed["held_out"].items() if isinstance(v["error"], float))
        share = f"; nearer in {weighed['confidence']:.0%} of resamples" if weighed.get("confidence") is not None else ""
        if weighed.get("nearest", weighed["kept"]) == weighed["kept"]:
            picked += f", the nearest plan (held-out relative L2: {tried}{share})"
        else:
            picked += f" (held-out relative L2: {tried}{share} for {weighed['nearest']}, too few to leave auto)"
    lines = [f"calibration: {calibration.get('used', '?')} samples used, {calibration.get('held_out', 0)} held out; "
             f"criterion {calibration.get('criterion')}{picked}; reconstruction {_reconstruction(calibration)}"]
    if str(calibration.get("source", "")).startswith("random"):
        lines.append(f"  data: {calibration['source']}; no real data: the fidelity below is on random "
                     "inputs and says little about real ones")
    if calibration.get("note"):
        lines.append(f"  note: {calibration['note']}")
    for name, stats in (calibration.get("passes") or {}).items():
        text = f"  {name}: {stats.get('layers', 0)} layers"
        if "rel_error_before" in stats:
            text += f", error of the refit layers {stats['rel_error_before']:.3g} -> {stats['rel_error_after']:.3g}"
        if stats.get("quantized_layers"):
            text += f"; {stats['quantized_layers']} stored back quantized"
            if stats.get("clipped_max"):
                text += f" (up to {100 * stats['clipped_max']:.2g} % of a weight clipped)"
        if stats.get("kept_weights"):
            text += f"; {stats['kept_weights']} kept their weights (the fit did not pay on held-out rows)"
        if stats.get("not_refit_positions_differ"):
            text += (f"; {len(stats['not_refit_positions_differ'])} not refit: the pruned model computes other "
                     "positions there (sizes chosen by value, a duration or a selection, changed)")
        lines.append(text)
        lines += _recurrent_lines(stats)
        for head in stats.get("heads") or []:
            text = (f"    head '{head['layer']}' -> {head['kind']} '{head['output']}' ({head['classes']} classes, "
                    f"{head.get('active_classes', head['classes'])} fitted, {head.get('rows', 0)} rows)")
            if "cv_cross_entropy" in head:
                (ce0, ce1), (top0, top1) = head["cv_cross_entropy"], head["cv_top1_agreement"]
                text += f": cross-validated cross-entropy {ce0:.4g} -> {ce1:.4g}, top-1 {top0:.3g} -> {top1:.3g}"
            lines.append(text + ("" if head.get("written") else f"; kept as it was{_reason(head)}"))
        skipped = stats.get("skipped") or []
        if skipped:
            more = stats.get("not_refit", len(skipped)) - 1
            lines.append(f"    not refit: {skipped[0]}" + (f" (and {more} more, see --report)" if more > 0 else ""))
    if calibration.get("reconstruction_reverted"):
        lines.append("  undone: the held-out samples fit worse with the reconstruction than without (see fidelity)")
    final = calibration.get("final_refit") or {}
    if final.get("kept"):
        lines.append(f"  final refit on all {final['samples']} samples, the held-out ones too: the model written; "
                     "the fidelity below is the same prune's reconstructed without them")
    elif final.get("ran"):
        lines.append(f"  final refit on all samples not kept: {final.get('why')}")
    return lines
