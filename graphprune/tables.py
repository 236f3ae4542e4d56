"""Plain-text tables and summaries for people (JSON is for programs).

Everything here returns strings; the command line prints them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, align: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or ("l" + "r" * (len(headers) - 1))

    def fmt(row: list[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=False)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), rule, *(fmt(r) for r in cells[1:])])


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


ANALYZE_LEGEND = """\
columns:
  anchor   the group's name: a tensor and an axis, TENSOR:AXIS (':0' is axis 0, e.g. the
           output channels of a Conv weight [out, in, kh, kw]; ':1' a MatMul weight's columns)
  units    what can be removed together: channels, attention heads or conv groups
  members  tensor dimensions (weights, biases, norm parameters, activations, shape
           constants) that must lose the same units
  ops      operators that touch the group
  status   prunable: can be pruned exactly; prunable*: can be pruned, but crosses a
           normalisation over the pruned axis (inexact: checked separately);
           frozen: cannot be pruned (the reason says which node or name blocks it);
           fixed: nothing blocks it, but there is nothing to remove (one unit only, or no
           weight produces it)"""


def difference_to_original(report: Mapping[str, Any]) -> float | None:
    """The real difference of the output to the original, where a mode measured it (depth
    pruning compares with the original with the erased branches zeroed, and measures this
    besides)."""
    for section in (report, report.get("depth") or {}):
        value = section.get("max_rel_diff_vs_original")
        if value is not None:
            return float(value)
    return None


def result_rows(report: Mapping[str, Any]) -> list[list[object]]:
    """Parameter and MAC rows (before, after, ratio) of a prune report."""
    pb, pa = report["params_before"], report["params_after"]
    mb, ma = report["macs_before"], report["macs_after"]
    return [
        ["params", human(pb), human(pa), f"{pa / pb:.3f}" if pb else "-"],
        [macs_label(report), human(mb), human(ma), f"{ma / mb:.3f}" if mb else "-"],
    ]


def macs_label(report: Mapping[str, Any]) -> str:
    """"MACs", or with the input shapes they were counted at where the inputs leave sizes open
    (scalars, which have no size to say, left out)."""
    sized = {name: shape for name, shape in (report.get("macs_input_shapes") or {}).items() if len(shape)}
    return "MACs" if not sized else "MACs at " + ", ".join(
        f"{name}={'x'.join(str(d) for d in shape)}" for name, shape in sized.items())


def verification_lines(report: Mapping[str, Any]) -> list[str]:
    """What the verification compared with, and how close the pruned model came."""
    v = report.get("verification") or {}
    if v.get("skipped"):
        return ["verification: skipped (--no-verify)"]
    reference = v.get("reference", "the reference")
    if not v.get("ok"):
        return [f"verification: FAILED against {reference}: {v.get('error', '')}".rstrip(": ")]
    lines = [
        f"verification: ok against {reference} (onnx.checker, ORT run, output shapes; "
        f"max abs diff {v.get('max_abs_diff', 0):.3g}, max rel diff {v.get('max_rel_diff', 0):.3g}, "
        f"tolerance {v.get('tolerance', 0):g}, {v.get('samples', 1)} "
        f"{'calibration samples' if v.get('feeds') else 'random inputs'})"
    ]
    if v.get("feeds"):
        lines.append(f"  inputs: {v['feeds']}")
    if v.get("scale"):  # accepted above the tolerance: say on what grounds
        grounds = v["scale"]
        lines.append(f"  accepted: {'relative to ' if grounds.startswith('the ') else ''}{grounds}")
    real = difference_to_original(report)
    if real is not None:
        lines.append(f"  the output differs from the original itself by max rel diff {real:.3g} "
                     "(the erased blocks are gone: that is the price of depth pruning)")
    elif not str(reference).startswith("the original") or "zeroed" in str(reference):
        if report.get("fidelity"):
            lines.append("  (that checks the rewrite is exact; the fidelity below says how much "
                         "the function changed)")
        else:
            lines.append("  (that checks the rewrite is exact; the pruned network still computes "
                         "another function than the original: measuring by how much, and "
                         "refitting it, needs --calibration DATA, or --calibration random "
                         "without data)")
    prepared = preparation_summary(v.get("preparation"))
    if prepared:
        lines.append("  " + prepared)
    for entry in v.get("inexact_groups", [])[:5]:
        why = entry["why"][0] if entry.get("why") else ""
        lines.append(f"  inexact group {entry['anchor']} not compared: {why}")
    agreement = report.get("provider_check")
    if agreement:
        lines.append(f"  on {agreement['provider']}: agrees with the CPU run "
                     f"(max rel diff {agreement['max_rel_diff']:.3g})")
    return lines


def preparation_summary(check: Mapping[str, Any] | None) -> str | None:
    """How the prepared graph (the rewrite's reference) compares with the model as loaded."""
    if not check:
        return None
    if check.get("identical"):
        return "the model as loaded is the graph checked against (its preparation changed no node)"
    if not check.get("checked"):
        return f"the prepared graph was not compared with the model as loaded: {check.get('why', '')}"
    grounds = ", within its float noise" if check.get("max_rel_diff", 0) > check.get("tolerance", 0) else ""
    return (f"the prepared graph computes what the model as loaded computes (max rel diff "
            f"{check.get('max_rel_diff', 0):.3g}{grounds})")


def _fidelity_lines(fidelity: Any, prefix: str = "") -> list[str]:
    if isinstance(fidelity, Mapping):
        lines = []
        for key, value in fidelity.items():
            lines.extend(_fidelity_lines(value, f"{prefix}{key}."))
        return lines
    if isinstance(fidelity, float):
        return [f"  {prefix.rstrip('.')}: {fidelity:.4g}"]
    if isinstance(fidelity, int | str | bool):
        return [f"  {prefix.rstrip('.')}: {fidelity}"]
    return []


def _reason(head: Mapping[str, Any]) -> str:
    """Why a softmax head kept its weights."""
    if head.get("reason"):
        return f" ({head['reason']})"
    return " (the fit did not lower the cross-validated cross-entropy)" if "cv_cross_entropy" in head else ""


def calibration_lines(calibration: Mapping[str, Any] | None) -> list[str]:
    """Samples, the criterion chosen and what each reconstruction pass changed."""
    if not calibration:
        return []
    chosen = calibration.get("criteria_chosen") or {}
    picked = f" ({', '.join(f'{k} x{v}' for k, v in chosen.items())})" if chosen else ""
    lines = [f"calibration: {calibration.get('used', '?')} samples used, {calibration.get('held_out', 0)} held out; "
             f"criterion {calibration.get('criterion')}{picked}; reconstruction {calibration.get('reconstruction')}"]
    if str(calibration.get("source", "")).startswith("random"):
        lines.append(f"  data: {calibration['source']}; no real data: the fidelity below is on random "
                     "inputs and says little about real ones")
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
        lines.append(text)
        rec = stats.get("recurrent") or {}
        if rec.get("layers"):
            compare = (f"; outputs on the calibration samples {rec['output_error_without']:.3g} -> {rec['output_error']:.3g}"
                       if "output_error" in rec else "")
            state = "undone, the outputs moved away" if rec.get("undone") else "kept"
            lines.append(f"    recurrent: {rec['layers']} input projection(s) refit, {state}{compare}")
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


#: rows of the per-group width table printed by ``prune`` (the report has all of them)
WIDTH_ROWS = 30


def budget_lines(budget: Mapping[str, Any] | None) -> list[str]:
    """Target, achieved value and the per-group kept widths of a budget prune."""
    if not budget:
        return []
    achieved = budget.get("achieved")
    shown = f"{achieved:.3f}" if isinstance(achieved, (int, float)) else "-"
    lines = [f"target: {budget['target']} {budget['fraction']:g} of the original -> achieved {shown} "
             f"({'met' if budget.get('met') else 'MISSED'}; {budget.get('measured_by', '')})"]
    if not budget.get("reached_by_width", True):
        lines.append("note: width pruning alone could not reach the target within --max-ratio "
                     f"{budget.get('max_ratio')}")
    if budget.get("latency_floor"):
        lines.append("note: the measured latency stopped following the widths (a narrower round was no "
                     "faster): the run is bound by something else here, such as kernel launches on a GPU "
                     "at batch 1; the least pruned of the fastest rounds is kept (fewer layers run faster "
                     "there: --erase-blocks K)")
    if budget.get("latency_unstable"):
        lines.append(f"note: {budget['latency_unstable']}")
    if budget.get("widths_aligned") is False:
        lines.append("note: widths in multiples of 8 could not land within 0.03 of the target: any "
                     "width allowed (--round-to 8 keeps them aligned)")
    lines.extend(_allocation_detail(budget))
    return lines


def allocation_lines(allocation: Mapping[str, Any] | None) -> list[str]:
    """How a calibrated ratio prune shared the removal across its groups
    (:mod:`graphprune.pipeline.measured_ratio`)."""
    if not allocation:
        return []
    if allocation.get("mode") != "measured":
        if not set(allocation.get("kinds") or ()) & {"head", "mlp"}:
            return []  # (CNN channels: the ratio applies to every group, as always)
        return [f"allocation: uniform ({allocation.get('why', '')})"]
    others = allocation.get("uniform_groups") or {}
    rest = ("; " + ", ".join(f"{n} {k} group{'s' if n != 1 else ''}" for k, n in others.items())
            + " cut by the ratio in every candidate") if others else ""
    lines = [f"allocation across {allocation['groups']} {allocation['kind']} groups by measurement: "
             f"{allocation['units_removed']} units removed (uniform: {allocation['units_removed_uniform']}), "
             f"at most {allocation['max_share']:g} of any group{rest}"]
    return lines + _allocation_detail(allocation)


def _allocation_detail(budget: Mapping[str, Any]) -> list[str]:
    """The measured candidates, the chosen one and the kept widths per group."""
    lines: list[str] = []
    measured = [c for c in budget.get("candidates") or [] if "rel_l2" in c]
    chosen = next((c for c in measured if c["allocation"] == budget.get("chosen")), None)
    if chosen is not None:
        def final(c: Mapping[str, Any]) -> float:  # after the finalists' second reconstruction
            return (c.get("refit") or {}).get("rel_l2", c["rel_l2"])

        uniform = next((c for c in measured if c["allocation"] == "uniform"), None)
        versus = f"; uniform {final(uniform):.4f}" if uniform is not None and uniform is not chosen else ""
        how = ("a screening reconstruction; the two nearest reconstructed again with cross-validated ridges"
               if any("refit" in c for c in measured) else "reconstruction")
        lines.append(f"allocation: {chosen['allocation']}, the nearest of {len(measured)} measured after "
                     f"{how} (held-out rel-L2 {final(chosen):.4f}{versus})")
    failed = [c for c in budget.get("candidates") or [] if c.get("error")]
    if failed:
        lines.append(f"warning: {len(failed)} candidate allocation(s) not chosen because their "
                     f"{failed[0]['error']} (all in --report)")
    for r in budget.get("latency_rounds") or []:
        again = (f", side by side {r['side_by_side_ratio']:.3f}" if "side_by_side_ratio" in r else "")
        lines.append(f"  latency round: modelled {r['modelled_fraction']:.3f} -> measured {r['measured_ratio']:.3f}"
                     f"{again}{' (chosen)' if r.get('chosen') else ''}")
    widths = [w for w in budget.get("widths") or []]
    if widths:
        rows = [[str(w["group"]), str(w["anchor"])[:48], str(w.get("kind", "")), str(w["units"]),
                 str(w["kept"]), f"{w['kept'] / w['units']:.2f}" if w["units"] else "-"]
                for w in widths[:WIDTH_ROWS]]
        lines.append("kept widths per group:")
        lines.append(table(["group", "anchor", "kind", "units", "kept", "kept share"], rows))
        if len(widths) > WIDTH_ROWS:
            lines.append(f"... {len(widths) - WIDTH_ROWS} more groups (all in --report / --json)")
    return lines


def branch_lines(branches: Mapping[str, Any] | None) -> list[str]:
    """What was pruned inside ``If`` branches (pruned on their own: the groups above are the
    main graph's)."""
    if not branches or not (branches.get("pruned") or branches.get("skipped")):
        return []
    lines = []
    for b in branches.get("pruned") or []:
        fidelity = b.get("fidelity") or {}
        own = (f"; its own held-out fidelity on {fidelity['samples']} samples: cosine {fidelity['cosine']:.4g}, "
               f"rel-L2 {fidelity['rel_l2']:.4g}") if {"samples", "cosine", "rel_l2"} <= set(fidelity) else ""
        lines.append(f"If '{b['if']}' {b['branch']}: {b['units_removed']} units removed, params "
                     f"{human(b['params_before'])} -> {human(b['params_after'])} (pruned as a model of its own{own})")
    for reason in branches.get("skipped") or []:
        lines.append(f"not pruned: {reason}")
    if branches.get("hoisted_constants"):
        lines.append(f"constants equal in both branches stored once: {branches['hoisted_constants']}")
    return lines


def normalised_lines(normalised: Mapping[str, Any] | None) -> list[str]:
    """What the normalisation rewrote before the analysis (local functions inlined, ops written
    as standard ops), one line each (``report["normalised"]``)."""
    normalised = normalised or {}
    lines = []
    converted = normalised.get("opset_converted")
    if converted:
        lines.append(f"opset {converted['from']} converted to {converted['to']} by ONNX's version converter "
                     "(the output is written at the new opset)")
    ranks = normalised.get("input_ranks_declared") or {}
    if ranks:
        lines.append("graph inputs that declared no shape, given the rank of --input-shape (sizes open): "
                     + ", ".join(f"{name} (rank {rank})" for name, rank in ranks.items()))
    densified = normalised.get("sparse_densified") or []
    if densified:
        more = f" and {len(densified) - 3} more" if len(densified) > 3 else ""
        lines.append(f"sparse initializers stored dense: {', '.join(densified[:3])}{more}")
    stale = normalised.get("stale_shapes_dropped") or []
    if stale:
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        lines.append(f"declared shapes the graph contradicts, dropped (stale value_info): "
                     f"{', '.join(stale[:3])}{more}")
    if normalised.get("inlined_functions"):
        lines.append(f"local functions inlined: {', '.join(normalised['inlined_functions'])}")
    described = normalised.get("lowered_as") or {}
    kinds: dict[str, list[str]] = {}
    for op, n in sorted((normalised.get("lowered_ops") or {}).items()):
        kinds.setdefault(described.get(op, "ops written as standard ops"), []).append(f"{op} x{n}")
    lines.extend(f"{kind}: {', '.join(ops)}" for kind, ops in kinds.items())
    ran = normalised.get("shapes_run") or {}
    if ran:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(ran.items()))
        lines.append(f"output shapes learnt by running ops ONNX cannot size (at batch 1 and 2 on random "
                     f"inputs; sizes that differ stay open): {ops}")
    return lines


def prune_summary(report: Mapping[str, Any], latency: Mapping[str, Any] | None = None) -> str:
    """The table and lines ``graphprune prune`` prints."""
    rows = result_rows(report)
    if latency:
        before, after = latency["before"]["median_ms"], latency["after"]["median_ms"]
        rows.append([f"latency ms ({latency['after']['provider']})", f"{before:.3f}", f"{after:.3f}",
                     f"{after / before:.3f}" if before else "-"])
    lines = [table(["", "before", "after", "ratio"], rows), ""]
    g = report.get("groups", {})
    ch = report.get("channels", {})
    if "total" in g:
        lines.append(f"groups: {g.get('total', 0)} found, {g.get('pruned', 0)} pruned, "
                     f"{g.get('frozen', 0)} frozen; units removed: {ch.get('removed', 0)} of "
                     f"{ch.get('prunable', 0)} prunable; prunable "
                     f"{report.get('prunable_fraction_of', 'conv channels')}: "
                     f"{report.get('prunable_fraction', 0):.1%}")
        if report.get("unprunable"):
            lines.append(f"  {len(report['unprunable'])} more group(s) neither frozen nor prunable: no weight "
                         "creates their channels (report: unprunable)")
    else:
        lines.append(f"groups pruned: {g.get('pruned', 0)}; units removed: {ch.get('removed', 0)}")
    lines.extend(branch_lines(report.get("branches")))
    uncounted = report.get("macs_uncounted")
    if uncounted:
        what = ", ".join(f"{n} {op}{'s' if n > 1 else ''}" for op, n in sorted(uncounted.items()))
        lines.append(f"MACs leave out the layers inside {what}: the data decides how many times "
                     f"{'a body runs' if sum(uncounted.values()) > 1 else 'its body runs'}")
    if report.get("untied_constants"):
        lines.append(f"shared constants untied: {report['untied_constants']} readers got their own copy "
                     "(equal values the exporter stored once; the layers prune apart)")
    lines.extend(normalised_lines(report.get("normalised")))
    if report.get("nothing_prunable"):
        lines.append(str(report["nothing_prunable"]))
    if report.get("mode"):
        lines.append(f"mode: {report['mode']}")
    erased = report.get("erased_nodes")
    if erased:
        lines.append(f"operators erased: {erased if isinstance(erased, int) else len(erased)}")
    blocks = report.get("blocks_erased") or (report.get("depth") or {}).get("blocks_erased")
    if blocks:
        names = blocks if isinstance(blocks, list) else []
        shown = f" ({', '.join(map(str, names[:8]))}{' ...' if len(names) > 8 else ''})" if names else ""
        lines.append(f"residual blocks erased: {len(names) if names else blocks}{shown}")
    lines.extend(budget_lines(report.get("budget")))
    lines.extend(allocation_lines(report.get("allocation")))
    lines.extend(verification_lines(report))
    lines.extend(calibration_lines(report.get("calibration")))
    # (the final refit's note is the calibration lines' "final refit" line)
    fidelity = _fidelity_lines({k: v for k, v in (report.get("fidelity") or {}).items()
                                if k != "measured_before_final_refit"})
    if fidelity:
        random = str((report.get("calibration") or {}).get("source", "")).startswith("random")
        lines.append(f"fidelity (vs the original on held-out {'random ' if random else ''}inputs):")
        lines.extend(fidelity)
        other = max((e.get("other_shape", 0) for e in (report["fidelity"].get("outputs") or {}).values()), default=0)
        if other:
            lines.append(f"  ({other} of {report['fidelity'].get('samples', '?')} held-out samples got an output of "
                         "another shape from the pruned model, e.g. a decoder stopping at another step: each counts "
                         "as cosine 0)")
    t = report.get("timings", {})
    lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
    return "\n".join(lines)
