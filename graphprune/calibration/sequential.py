"""Sequential reconstruction: refit linear layers of a pruned model, wave by wave.

Maths. A linear layer computes ``y = W x + b`` per output position (:mod:`.linear`). After
pruning, its input ``x_p`` (pruned model, upstream layers already reconstructed) differs
from the original's; the target is the ORIGINAL layer's output ``y_o``. With the constant-1
column appended (``x~ = [x_p, 1]``) the ridge least-squares fit

    W~ = argmin sum ||y_o - W~ x~||^2 + lam ||W||^2 = (G + lam D)^-1 C,
    G = sum x~ x~^T,  C = sum x~ y_o^T,  lam = ridge * mean(diag(G_xx)),

(``D``: identity without the bias entry) needs only the Gram ``G`` and the cross statistic
``C``, accumulated over the calibration samples; memory is bounded by them, not by the
number of samples. Conv layers use im2col patches at a deterministic subsample of output
positions; grouped convolutions get one fit per group. The bias falls out of the fit (bias
compensation is the special case of a fit with only the bias free).

Order. A layer's input depends on the layers upstream of it; a *wave* is the set of
targets whose inputs depend only on targets of earlier waves. Each wave is one run of the
current pruned model (only the prefix of the graph it needs) with the wave's inputs
exposed; the original outputs (targets) come from one run of the original model, cached at
the selected rows only — or, after a data-aware plan, from the statistics run, which
recorded them (:mod:`.targets`).

``mode="affine"`` is the statistics correction (the ONNX equivalent of re-estimating
BatchNorm statistics, which also works where BN was folded into the conv by the exporter):
each output channel ``k`` gets ``y' = s_k y + t_k`` so that its mean and variance on the
calibration data match the original's (``s_k = sigma_o / sigma_p``, ``t_k = mu_o - s_k mu_p``),
folded into the layer's weight rows and bias.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.calibration import runner
from graphprune.calibration.bias import share_bias, write_bias
from graphprune.calibration.linear import LinearView, map_rows, select
from graphprune.calibration.refit_targets import (
    Target,
    refit_inputs,
)
from graphprune.calibration.ridge import (
    DEFAULT_RIDGE,
    Accumulator,
    GramBases,
    RidgeChoices,
    bias_for,
    choose_ridge,
    fit,
    fit_error,
    fit_fixed_bias,
    rounding_pays,
)
from graphprune.calibration.stats import add_moments, finish_moments
from graphprune.calibration.targets import RecordedTargets
from graphprune.io import ir
from graphprune.io.order import toposort_model

#: rows per fitted weight column (subsampled output positions), and their bounds
ROWS_PER_INPUT = 4
MIN_ROWS = 4096
MAX_ROWS = 8192
@dataclass
class WaveReport:
    targets: int = 0
    rel_error_before: list[float] = field(default_factory=list)
    rel_error_after: list[float] = field(default_factory=list)
    ridges: list[float] = field(default_factory=list)
    residual: int = 0
    #: refit layers whose weight is stored encoded (quantized), and their clipped shares
    quantized: int = 0
    clipped: list[float] = field(default_factory=list)
    #: layers that keep their weights: no fit (rounded on its grid, if stored) was better
    kept: int = 0
    #: layers not fit: the pruned model computed fewer positions there than the original did
    #: (sizes chosen by value, a duration or a selection, that the prune changed)
    misplaced: list[str] = field(default_factory=list)


def censored_targets(y: np.ndarray, xt: np.ndarray, current: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The targets of a layer whose output is rectified (:attr:`LinearView.rectified`: a ReLU
    folded into a QOperator layer's output quantization), for a least-squares fit of its
    pre-activation ``z``. Where the original's output is positive it is the original's ``z``;
    where it is zero, ``z`` was anywhere at or below zero: the target is the pruned layer's
    current ``z`` where that is at or below zero too (nothing to correct), else zero (one step
    of a censored regression). Fitting the zeros themselves pulls every inactive unit up to
    zero; leaving such layers alone leaves a model whose every layer rectifies unreconstructed.
    ``y``: ``[R, g, og]``; ``xt``: ``[R, g, K + 1]`` (the rows, with the constant 1);
    ``current``: the layer's weights ``[g, og, K]`` and bias ``[g, og]`` as they are (:func:`current_weights`)."""
    matrices, bias = current
    z = np.einsum("rgk,gok->rgo", xt[:, :, :-1], matrices) + bias[None]
    return np.where(y > 0, y, np.minimum(z, 0.0)).astype(np.float32)


def current_weights(view: LinearView) -> tuple[np.ndarray, np.ndarray]:
    """``view``'s weights ``[g, og, K]`` and bias ``[g, og]`` (zeros where it has none), float32."""
    matrices = np.asarray(view.matrices(), np.float32)
    g, og, _ = matrices.shape
    bias = view.bias_values()
    return matrices, (np.zeros((g, og), np.float32) if bias is None else np.asarray(bias, np.float32).reshape(g, og))


def rows_budget(view: LinearView) -> int:
    k = refit_inputs(view)
    return int(min(MAX_ROWS, max(MIN_ROWS, ROWS_PER_INPUT * k)))


def _seed(target: Target, batch: int) -> int:
    """The rows a target's fit samples in ``batch``: chosen by its input, so that layers reading
    one input at as many positions (a transformer's query, key and value) fit the same rows
    and share their Gram's eigen-decomposition (:class:`~.ridge.GramBases`)."""
    return zlib.crc32(target.view.data.name.encode()) + 7919 * batch


class Reconstructor:
    """Refit (``mode="refit"``) or correct (``mode="affine"``) ``targets`` of ``graph``.

    Each wave runs only the part of the graph it needs: the tensors on the frontier of the
    later waves (computed in this run, not changed by the refit of this or later waves) are
    kept in a :class:`~graphprune.calibration.runner.TensorCache` and fed to the next run
    instead of re-running the prefix (``use_cache=False``: re-run the prefix every wave)."""

    #: keep the frontier tensors between waves
    use_cache = True
    #: bytes of frontier tensors held in memory per model (beyond: temporary files)
    cache_bytes = runner.CACHE_BYTES
    _bases: GramBases | None = None
    ridges: RidgeChoices | None = None

    def __init__(
        self,
        reference: onnx.ModelProto,
        batches: runner.Batches,
        *,
        mode: str = "refit",
        ridge: float | None = None,
        store: Any = None,
        recorded: RecordedTargets | None = None,
        ridges: RidgeChoices | None = None,
    ) -> None:
        self.reference = reference
        #: the cross-validated ridges, recorded or recalled (:class:`~.ridge.RidgeChoices`)
        self.ridges = ridges
        #: original outputs recorded by the statistics run (:mod:`.targets`), used instead of
        #: running ``reference`` again where they cover a layer
        self.recorded = recorded if recorded is not None and recorded.model is reference else None
        self.store = store
        self.data_dir = getattr(store, "root", None)
        self.batches = batches
        self.mode = mode
        self.ridge = ridge
        self.samples = max(1, sum(batches.sizes))
        #: (target, batch) -> the original's output positions there, which the pruned
        #: model's must equal for its rows to be the same positions (sizes chosen by value
        #: -- a duration, a selection -- may differ once pruned)
        self._positions: dict[tuple[int, int], int] = {}
        #: eigen-decompositions of the Grams of layers that read one input at the same rows
        self._bases = GramBases()

    # ------------------------------------------------------------------ original
    def _original(self, members: list[Target], later: list[str], cache: runner.TensorCache | None
                  ) -> tuple[dict[str, Any], runner.TensorCache | None]:
        """Original outputs of a wave's targets: selected rows (refit) or channel moments;
        and the cache of original tensors that the later waves (outputs ``later``) need."""
        rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        totals: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        moments: dict[int, list[np.ndarray]] = {}

        def count(t: Target, batch: int) -> int:
            return math.ceil(rows_budget(t.view) * self.batches.sizes[batch] / self.samples)

        def selection(t: Target, batch: int, shape: tuple[int, ...]) -> np.ndarray:
            return select(t.view.output_positions(shape), count(t, batch), _seed(t, batch))

        if self.recorded is not None and self.mode == "refit":
            members = [t for t in members if t.row_cuts or not self._recorded(t, count, rows, totals)]
        by_out = {t.view.output.name: t for t in members}
        by_total = {t.residual.total: t for t in members if t.residual is not None and self.mode == "refit"}
        if not by_out and not by_total:
            return {"rows": rows, "totals": totals, "moments": moments}, None

        def take(batch: int, name: str, y: np.ndarray) -> None:
            t = by_total.get(name)
            if t is not None and t.residual is not None:
                selected = selection(t, batch, y.shape)
                out = t.view.output_rows(y, selected)
                if out.shape[1] == t.view.out_channels():
                    totals[(t.index, batch)] = (selected, np.ascontiguousarray(out - t.residual.offset))
            t = by_out.get(name)
            if t is None:
                return
            y = t.view.read_output(y)
            if self.mode == "affine":
                add_moments(moments, t.index, y, t.view.is_conv)
                return
            selected = selection(t, batch, y.shape)
            self._positions[(t.index, batch)] = t.view.output_positions(y.shape)
            out = t.view.output_rows(y, selected)
            if t.kept is not None:
                out = out[:, t.kept]
            if t.row_cuts:  # positions in the pruned output, of the rows it still has
                cuts = {a % y.ndim: c for a, c in t.row_cuts.items() if a % y.ndim != y.ndim - 1}
                selected, valid = map_rows(selected, y.shape, cuts)
                out = out[valid]
            rows[(t.index, batch)] = (selected, np.ascontiguousarray(out))

        graph = self.reference.graph
        keep: list[str] = []
        if later and self.use_cache:
            now = runner.computed(graph, [*by_out, *by_total], cache.types() if cache else {})
            keep = runner.frontier(graph, later, runner.produced(graph) - now)
        kept = runner.stream(self.reference, [*by_out, *by_total], self.batches.feeds, take,
                             what="the original model", data_dir=self.data_dir, cache=cache, keep=keep,
                             cache_bytes=self.cache_bytes)
        return {"rows": rows, "totals": totals, "moments": moments}, kept

    def _recorded(self, t: Target, count: Any, rows: dict, totals: dict) -> bool:
        """Fill ``t``'s original rows (and residual sums) from the recording; False when it
        does not cover ``t`` (then the original is run for it)."""
        assert self.recorded is not None
        total = t.residual.total if t.residual is not None else None
        got = [self.recorded.rows(t.view.output.name, total, b, count(t, b), _seed(t, b))
               for b in range(len(self.batches.feeds))]
        if any(g is None for g in got):
            return False
        for b, entry in enumerate(got):
            assert entry is not None
            positions, out, summed = entry
            known = self.recorded.positions.get((t.view.output.name, b))
            if known is not None:
                self._positions[(t.index, b)] = known
            if t.kept is not None:
                out = out[:, t.kept]
            rows[(t.index, b)] = (positions, np.ascontiguousarray(out))
            if t.residual is not None and summed is not None and summed.shape[1] == t.view.out_channels():
                totals[(t.index, b)] = (positions, np.ascontiguousarray(summed - t.residual.offset))
        return True

    # ------------------------------------------------------------------ waves
    def run(self, graph: gs.Graph, template: onnx.ModelProto, targets: list[Target]) -> dict[str, Any]:
        if not targets:
            return {"layers": 0, "waves": 0}
        names = set(graph.tensors())
        waves = sorted({t.wave for t in targets})
        report = WaveReport()
        ref_cache: runner.TensorCache | None = None
        cache: runner.TensorCache | None = None
        try:
            for wave in waves:
                members = [t for t in targets if t.wave == wave]
                rest = [t for t in targets if t.wave > wave]
                residuals = [t.residual for t in rest if t.residual is not None and self.mode == "refit"]
                ref_later = [t.view.output.name for t in rest] + [r.total for r in residuals]
                original, ref_next = self._original(members, ref_later, ref_cache)
                if ref_cache is not None:
                    ref_cache.close()
                ref_cache = ref_next
                toposort_model(graph)  # a bias Add written by the last wave comes last
                model = ir.export_graph(graph, template, self.store)
                # what this and later waves rewrite: their outputs, and everything computed from
                # the constants they store (a dequantized weight is a tensor the graph computes)
                unstable = runner.downstream(model.graph, [
                    name for t in targets if t.wave >= wave
                    for name in (t.view.output.name, *t.view.written_constants())])
                later = [t.view.output.name for t in rest] + [r.stream for r in residuals]
                keep = runner.frontier(model.graph, later, unstable) if rest and self.use_cache else []
                if self.mode == "affine":
                    cache = self._affine_wave(graph, model, members, original["moments"], names, cache, keep)
                else:
                    residual = self._residual_rows(members, original["totals"], unstable)
                    cache = self._refit_wave(graph, model, members, original["rows"], residual,
                                             original["totals"], names, report, cache, keep)
                report.targets += len(members)
        finally:
            for c in (ref_cache, cache):
                if c is not None:
                    c.close()
        toposort_model(graph)
        out: dict[str, Any] = {"layers": report.targets, "waves": len(waves)}
        if report.rel_error_before:
            out["rel_error_before"] = round(float(np.mean(report.rel_error_before)), 5)
            out["rel_error_after"] = round(float(np.mean(report.rel_error_after)), 5)
            out["ridge_median"] = float(np.median(report.ridges))
            out["residual_targets"] = report.residual
        if report.quantized:
            # refit in float, stored back on each weight's own quantization grid
            out["quantized_layers"] = report.quantized
            out["clipped_max"] = round(float(max(report.clipped)), 6)
        if report.kept:
            out["kept_weights"] = report.kept
        if report.misplaced:
            out["not_refit_positions_differ"] = report.misplaced
        return out

    def _residual_rows(
        self, members: list[Target], totals: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]], unstable: set[str]
    ) -> dict[int, Target]:
        """Members refit towards the residual stream: the sum was read from the original in
        every batch and the stream does not change in this or a later wave."""
        batches = range(len(self.batches.feeds))
        return {
            t.index: t for t in members
            if t.residual is not None and t.residual.stream not in unstable
            and all((t.index, b) in totals for b in batches)
        }

    def _refit_wave(
        self,
        graph: gs.Graph,
        model: onnx.ModelProto,
        members: list[Target],
        targets_rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
        residual: dict[int, Target],
        totals: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
        names: set[str],
        report: WaveReport,
        cache: runner.TensorCache | None,
        keep: list[str],
    ) -> runner.TensorCache | None:
        by_input: dict[str, list[Target]] = defaultdict(list)
        by_original: dict[str, list[Target]] = defaultdict(list)  # an unrolled recurrence's steps
        by_stream: dict[str, list[Target]] = defaultdict(list)
        for t in members:
            (by_original if t.recurrent else by_input)[t.view.data.name].append(t)
            if t.index in residual and t.residual is not None:
                by_stream[t.residual.stream].append(t)
        acc: dict[int, Accumulator] = {}
        pending: dict[tuple[int, int], dict[str, Any]] = {}
        rectified: dict[int | str, tuple[np.ndarray, np.ndarray]] = {}  # (censored_targets)

        def add(t: Target, batch: int) -> None:
            entry = pending[(t.index, batch)]
            if "x" not in entry or (t.index in residual and "r" not in entry):
                return
            del pending[(t.index, batch)]
            xr = entry["x"]
            y = entry.get("r")
            if y is None:
                y = targets_rows[(t.index, batch)][1]
            r, g, k = xr.shape
            og = y.shape[1] // g
            xt = np.concatenate([xr, np.ones((r, g, 1), np.float32)], axis=2)
            y = y.reshape(r, g, og)
            if t.view.rectified:
                if t.key not in rectified:
                    rectified[t.key] = current_weights(t.view)
                y = censored_targets(y, xt, rectified[t.key])
            weights = entry.get("w")
            if weights is not None:  # rows weighted as the normalisation after the sum sees them
                root = np.sqrt(weights).astype(np.float32)[:, None, None]
                xt, y = xt * root, y * root
            a = acc.get(t.key)
            if a is None:
                a = acc[t.key] = Accumulator.empty(g, k, og)
            a.add(batch % 2, xt, y)

        misplaced: set[int | str] = set()

        def take_input(t: Target, batch: int, x: np.ndarray) -> None:
            rows, _ = targets_rows[(t.index, batch)]
            here = t.view.positions(t.view.read_data(x).shape)
            there = None if t.row_cuts else self._positions.get((t.index, batch))
            if (len(rows) and rows.max() >= here) or (there is not None and here != there):
                misplaced.add(t.key)  # the original's rows are not the pruned model's positions
                return
            pending.setdefault((t.index, batch), {})["x"] = t.view.input_rows(t.view.read_data(x), rows)  # [R, g, K]
            add(t, batch)

        def take_original(batch: int, name: str, x: np.ndarray) -> None:
            for t in by_original.get(name, ()):  # (each reader cuts the original's input for itself)
                kept, channel = x, t.view.info.data_axis % max(x.ndim, 1)
                cuts = {a % max(x.ndim, 1): c for a, c in (t.input_cut or {}).items()}
                cuts.setdefault(channel, t.channel_cut if t.channel_cut is not None else np.zeros(0, np.int64))
                for axis, cut in cuts.items():
                    if x.ndim and len(cut) and cut.max() < kept.shape[axis]:
                        kept = np.delete(kept, cut, axis=axis)
                if not x.ndim or kept.shape[channel] != t.view.in_channels():
                    misplaced.add(t.key)  # the original's input, less the cut, is not the layer's
                    continue
                take_input(t, batch, kept)

        def take(batch: int, name: str, x: np.ndarray) -> None:
            for t in by_input.get(name, ()):
                take_input(t, batch, x)
            for t in by_stream.get(name, ()):
                rows, total = totals[(t.index, batch)]
                stream = None
                entry = pending.setdefault((t.index, batch), {})
                positions = t.view.output_positions(x.shape)
                if positions * t.view.out_channels() == x.size and (not len(rows) or positions > rows.max()):
                    stream = total - t.view.output_rows(x, rows)
                    entry["w"] = t.residual.row_weights(total + t.residual.offset) if t.residual else None
                entry["r"] = stream
                add(t, batch)

        if by_original:
            runner.stream(self.reference, list(by_original), self.batches.feeds, take_original,
                          what="the original model", data_dir=self.data_dir)
        kept = runner.stream(model, [*by_input, *by_stream], self.batches.feeds, take, what="the pruned model",
                             data_dir=self.data_dir, cache=cache, keep=keep, cache_bytes=self.cache_bytes)
        if cache is not None:
            cache.close()
        fits: dict[int | str, list[Target]] = defaultdict(list)  # a shared weight: one fit
        for t in members:
            fits[t.key].append(t)
        for key, group in fits.items():
            a = acc.get(key)
            if key in misplaced:
                report.misplaced += [t.name for t in group]
                continue
            if a is None or a.rows == 0:
                continue
            a.flush()
            self._solve(graph, group, a, names, report)
            if group[0].index in residual:
                report.residual += 1
        return kept

    def _solve(self, graph: gs.Graph, group: list[Target], a: Accumulator, names: set[str],
               report: WaveReport) -> None:
        """Fit the weight (and bias) of ``group``'s layers (one, or the readers of a shared
        weight) to the statistics ``a`` of all their rows; written where it pays."""
        view = group[0].view
        _, g, k1, _ = a.gram.shape
        k = k1 - 1
        current = view.matrices()  # [g, og, K]
        bias = view.bias_values()
        if bias is None:
            bias = np.zeros(current.shape[0] * current.shape[1])
        cur = np.concatenate([np.swapaxes(current, 1, 2), bias.reshape(g, 1, -1)], axis=1)  # [g, K+1, og]
        gram, cross, y2 = a.gram.sum(0), a.cross.sum(0), float(a.y2.sum())
        scale = [max(float(np.mean(np.diag(gram[j])[:k])), 1e-30) if k else 0.0 for j in range(g)]
        if view.bias_fixed:  # no bias can be written: fit the weights with the bias held
            ridge, pays = DEFAULT_RIDGE, True
            solved = np.stack([fit_fixed_bias(gram[j], cross[j], cur[j], ridge * scale[j]) for j in range(g)])
        else:
            ridge, pays = self._choose_ridge(a, cur, scale, view.node.name)
            solved = np.stack([fit(gram[j], cross[j], cur[j], ridge * scale[j]) for j in range(g)])

        def error(w: np.ndarray) -> float:  # [g, K+1, og]
            return sum(fit_error(gram[j], cross[j], 0.0, w[j]) for j in range(g)) + y2

        norm, before, after = max(y2, 1e-30), error(cur), error(solved)
        if not pays or not np.isfinite(solved).all() or after > before:  # (pays: on held-out rows)
            report.kept += 1
            return
        mats = np.swapaxes(solved[:, :k, :], 1, 2)  # [g, og, K]
        def rounded(w: np.ndarray, f: int) -> np.ndarray:  # w's weights as stored on the grid (not written)
            stored = view.as_stored(np.swapaxes(w[:, :k, :], 1, 2), a.gram[f, 0, :k, :k] if g == 1 else None)
            return np.concatenate([np.swapaxes(stored, 1, 2), w[:, k:, :]], axis=1)
        if view.stored is not None and not self._validated(
                f"{view.node.name}#rounded", lambda: rounding_pays(a, cur, ridge, scale, rounded, not view.bias_fixed)):
            report.kept += 1
            return
        def accept(stored: np.ndarray) -> bool:  # as rounded on the weight's grid, with its bias refit
            nonlocal after
            solved[:, :k, :] = np.swapaxes(stored, 1, 2)
            if not view.bias_fixed:
                solved[:, k, :] = np.stack([bias_for(gram[j], cross[j], solved[j]) for j in range(g)])
            after = error(solved)
            return after <= before
        clipped = view.store(mats, gram[0, :k, :k] if g == 1 else None, accept if view.stored is not None else None)
        if clipped is None:  # stored on its grid, the fit is worse than the current weights
            report.kept += 1
            return
        if view.stored is not None:
            report.quantized += 1
            report.clipped.append(clipped)
        report.rel_error_before.append(math.sqrt(max(before, 0.0) / norm))
        report.rel_error_after.append(math.sqrt(max(after, 0.0) / norm))
        report.ridges.append(ridge)
        write_bias(graph, view, solved[:, k, :].reshape(-1), names)
        for t in group[1:]:  # the other readers of a shared weight: the same bias
            if not share_bias(view, t.view):
                write_bias(graph, t.view, solved[:, k, :].reshape(-1), names)

    def _choose_ridge(self, a: Accumulator, cur: np.ndarray, scale: list[float], layer: str | None = None
                      ) -> tuple[float, bool]:
        """The ridge and whether the fit pays on held-out rows (:func:`.ridge.choose_ridge`;
        recorded, or recalled, in :attr:`ridges` where it is validated)."""
        return self._validated(layer, lambda: choose_ridge(a, cur, scale, self.ridge, ROWS_PER_INPUT, self._bases))

    def _validated(self, key: str | None, validate: Any) -> Any:
        """``validate()``, recorded or recalled in :attr:`ridges` (under ``key``: the layer) where
        the ridge is validated."""
        if self.ridges is None or self.ridge is not None or key is None:
            return validate()
        return self.ridges.choose(key, validate)

    def _affine_wave(
        self,
        graph: gs.Graph,
        model: onnx.ModelProto,
        members: list[Target],
        original: dict[int, list[np.ndarray]],
        names: set[str],
        cache: runner.TensorCache | None,
        keep: list[str],
    ) -> runner.TensorCache | None:
        by_out = {t.view.output.name: t for t in members}
        pruned: dict[int, list[np.ndarray]] = {}
        kept = runner.stream(
            model, list(by_out), self.batches.feeds,
            lambda _b, name, y: add_moments(pruned, by_out[name].index, by_out[name].view.read_output(y), by_out[name].view.is_conv),
            what="the pruned model", data_dir=self.data_dir, cache=cache, keep=keep, cache_bytes=self.cache_bytes,
        )
        if cache is not None:
            cache.close()
        for t in members:
            if t.index not in pruned or t.index not in original:
                continue
            mu_p, var_p = finish_moments(pruned[t.index])
            mu_o, var_o = finish_moments(original[t.index])
            if t.kept is not None:
                mu_o, var_o = mu_o[t.kept], var_o[t.kept]
            if mu_o.shape != mu_p.shape:
                continue
            scale = np.where(var_p > 1e-12, np.sqrt(var_o / np.maximum(var_p, 1e-12)), 1.0)
            scale = np.clip(scale, 0.1, 10.0)
            shift = mu_o - scale * mu_p
            view = t.view
            if view.bias_fixed:  # the shift has nowhere to go: the layer is left as it is
                continue
            mats = view.matrices()
            g, og, _ = mats.shape
            view.store(mats * scale.reshape(g, og, 1))
            bias = view.bias_values()
            bias = np.zeros_like(scale) if bias is None else bias
            write_bias(graph, view, scale * bias + shift, names)
        return kept
