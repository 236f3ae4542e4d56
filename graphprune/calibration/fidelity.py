"""Functional fidelity: how close a pruned model stays to the ORIGINAL on held-out samples.

For every graph output and every held-out sample ``i`` (``y`` original, ``p`` pruned, both
flattened):

- ``cosine``: ``<y, p> / (|y| |p|)``, averaged over samples (``min_cosine``: the worst);
  ``None`` for an output of one element per sample (a score, a probability: its cosine is
  its sign's agreement, 1 whatever the value);
- ``rel_l2``: ``|p - y| / |y|``, averaged over samples; ``pooled_rel_l2``: the same over all
  samples at once (``sqrt(sum |p - y|^2 / sum |y|^2)``), which a sample whose original output is
  near zero (a text detector's map of a crop without text) cannot dominate;
- ``other_shape``: how many samples the pruned model answers with an output of another shape
  (a decoder loop that stops at another step); each counts as cosine 0 and ``rel_l2`` 1;
- ``top1_agreement``: where the output looks like class scores (floating point, last axis of
  at least 2 classes and the same length on every sample, a single row per sample, not the
  same for every sample, and not declared with a named, open length: audio, a sequence, nor
  shaped like an input: a recurrent state fed back, nor an embedding: computed from a
  normalisation with no linear layer after it, nor, beside an output of class
  probabilities, an output that holds none: a face detector's box offsets and landmarks beside
  its face / non-face softmax), the share of samples whose arg-max class is the same;
- ``top1_per``: ``"row"`` where ``top1_agreement`` is over the rows of an output of several
  rows of class probabilities or log-probabilities (a CTC recogniser's softmax
  ``[1, 40, 18710]``: each position's class; a beam decoder's log-softmax ``[beams, 160]``:
  each beam's next token), or of logits a dense layer writes along the last axis (a
  diacritiser's ``[1, T, 15]``, :func:`logit_rows`), averaged over the samples;
- ``top1_lower_bound``: for one row per sample, the 95 % (Wilson) lower bound of that share
  (13 of 13 agreeing: 0.77; a direction classifier whose 13 held-out lines all agreed flipped
  8 % of other lines), and ``top1_classes_seen``: how many of the classes the original gives
  the held-out samples, where that is not all of them (a file-type classifier's held-out
  files covered 30 of 214: what the others became is not measured);
- ``sequence_agreement``: for rows of class scores, the share of samples whose whole sequence
  of classes is the same, repeats merged and the blank dropped where one class is most rows'
  (``sequence_collapsed``: a CTC recogniser's line; 91 % of its positions agreed where 27 % of
  its lines read the same);
- ``top1_one_class``: the class the original gives every held-out sample, where it gives
  them all one (a classifier fed random inputs it saturates on, or samples of one kind): the
  ``top1_agreement`` then says whether that class stays on top, not whether the model still
  tells classes apart;
- ``balanced_cosine``: where an output's channels (axis 1) differ in size by
  :data:`SPREAD` or more (a detector's ``[1, 4 + C, anchors]``: box coordinates in pixels beside
  class scores in [0, 1], whose cosine measures the boxes only: 0.999 where a layout
  detector had lost most detections), the cosine with each channel scaled to the original's
  RMS 1, averaged over the samples, and ``balanced_rel_l2``: the root mean square over the
  channels of each channel's relative L2 pooled over the samples (a YOLOv8's one score channel
  counts as much as its four box channels in pixels: the box coordinates alone decided the
  pooled figure, which chose an allocation that lost three quarters of the detections);
- ``centred_cosine``: where an output's values sit on an offset larger than their spread (a
  sigmoid heat map around 0.5: its cosine read 0.997 where the map's correlation with the
  original's had fallen to 0.43), the cosine of each sample's values less their mean (the
  Pearson correlation), averaged over the samples; and where a few numbers per sample each sit
  far from 0 against how much they vary over the samples (ratings on a scale:
  :func:`~graphprune.calibration.output_kinds.on_a_scale`, read as no class scores), the cosine of
  both models' numbers less the original's mean over the samples;
- ``rank_correlation``: where an output holds a few numbers per sample (at most
  :data:`FEW_SCORES`: a probability, a binary classifier's two classes, a handful of scores)
  or one row of class scores (then the classes the original gives the held-out samples), and
  at least :data:`RANK_SAMPLES` samples are held out, the Spearman correlation over the
  samples of each number with the original's, averaged over those that vary: whether the
  samples keep their order. A classifier whose one class dominates every sample keeps its
  cosine and its arg-max while that class's score, the one a threshold reads, stops ranking
  the samples as it did;
- ``threshold_agreement``: where an output's values all lie in [0, 1] on every held-out sample,
  both sides of 0.5 occur and no ``top1_agreement`` applies (a sigmoid's: a word segmenter's
  per-character boundary probability, a binary classifier's score, a mask), the share of its
  elements on the same side of 0.5 as the original's, averaged over the samples: the decision
  the model's users take from it (a Thai segmenter's cosine read 0.970 where 4 % of its
  boundary decisions had flipped); where the original's positive decisions are the fewer,
  ``positives_kept``, the share of them the pruned model still takes (a face detector's
  anchors: 99.6 % negatives, its threshold agreement 0.9955 whether it found the faces or
  none), and under :data:`POSITIVES_KEPT` the top-level ``positives_lost`` names the output (a map's
  ``peaks_kept``: its arg-max within a cell of the original's, what a CenterNet reads);
- ``mask_iou``: for a binary segmenter's map of logits ``[N, 1, H, W]``, the IoU of its region above 0 with the original's;
- ``scores_of``: an entry that is no graph output but the scores outputs are chosen from by rank
  (:func:`~graphprune.calibration.output_kinds.decision_scores`: a recogniser's per-frame softmax
  behind its ``ArgMax`` ids), compared as rows of class scores along the ranked axis and counted
  with the outputs: ids that agree on a few samples rank two models by a token or none (a
  recogniser that read nothing agreed on its blank frames), their scores by how far they moved;
- ``constant``: the original's output is the same on every held-out sample (a quantized model
  fed values its input quantizer maps to one level answers 0 to everything): the figures
  compare what a constant became; where every output is so, ``note`` says that the figures
  say nothing about what the model computes.

The top-level ``cosine`` / ``rel_l2`` / ``top1_agreement`` are the worst over the outputs
(``None`` when no output qualifies); the top-level ``balanced_rel_l2`` (where an output has
one) is the worst of each output's balanced or else pooled relative L2. ``deciding_rel_l2``
(several outputs) is their geometric mean (each at least :data:`DECIDING_FLOOR`; an output
equal to the original's to the last digit, which the prune does not reach, left out), the figure
that decides (:func:`deciding_rel_l2`): the worst output decided before, and a pitch tracker's
pitch, arbitrary on unvoiced frames (relative L2 ~1 however good the model), outvoted its
confidence falling to 0 (a dead model kept over a refit whose confidence was at 0.13).
``collapsed`` (an output) and ``collapsed_outputs``: the pruned output's size is under
:data:`COLLAPSED` of the original's (a confidence that never passes its threshold again).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphprune.calibration import output_kinds, runner
from graphprune.calibration.output_kinds import (
    decision_scores,
    feature_outputs,
    fed_back,
    in_unit_range,
    logit_rows,
    open_length,
    quantized_sum_error,
    rows_of_probabilities,
    token_rows,
)
from graphprune.calibration.pair_figures import (
    SPREAD,
    balanced_cosine,
    channel_spread,
    channel_squares,
    pair_figures,
    rank_correlation,
)
from graphprune.verify.validate import finite_pair

Feed = dict[str, np.ndarray]
#: an output's relative L2 under this counts as this in ``deciding_rel_l2`` (an unreached output's float noise)
DECIDING_FLOOR = 1e-3
#: an output in [0, 1] whose positive decisions (above 0.5) are the few keeps under this share of
#: the original's: named in ``positives_lost`` (a face detector whose anchors all fell below its
#: threshold read threshold agreement 0.9955: 892 of 896 anchors are negatives)
POSITIVES_KEPT = 0.8
#: ``reconstruction="auto"`` weighs the statistics correction only where the refit left more
#: than this share of the held-out error without reconstruction (:func:`stats_needless`)
STATS_AFTER_REFIT = 0.01
#: an output whose size (RMS over the held-out samples) fell under this share of the original's
COLLAPSED = 1e-3


def looks_like_scores(value: np.ndarray) -> bool:
    """Floating point, at least two entries on the last axis, one row per sample, no NaN (the
    arg-max of NaN is the first entry: a regressor's NaN outputs agreed at 1.0; a masked logit's
    minus infinity is a score)."""
    return (
        value.dtype.kind == "f" and value.ndim >= 1 and value.shape[-1] >= 2
        and int(np.prod(value.shape[:-1])) == 1 and not bool(np.isnan(value).any())
    )


def row_agreement(y: np.ndarray, p: np.ndarray) -> float:
    """The share of rows whose arg-max class is the same (no rows in either: 1; in one: 0)."""
    if not y.size or not p.size:
        return float(y.size == p.size)
    return float(np.mean(np.argmax(y, axis=-1) == np.argmax(p, axis=-1)))


def sequence_agreement(y: np.ndarray, p: np.ndarray, ctc: bool = True) -> tuple[bool, bool]:
    """Whether a sample's rows give the same sequence of classes, and whether that sequence
    was read as a CTC recogniser's: where one class is the arg-max of most rows (the blank),
    repeats are merged and that class dropped before comparing (a line reads the same when
    its characters move by a frame); else (or not ``ctc``: a label per token) every row must agree."""
    ya, pa = np.argmax(y, axis=-1).reshape(-1), np.argmax(p, axis=-1).reshape(-1)
    if not ya.size:  # no rows (a decoder run for 0 steps): the same where the pruned has none either
        return not pa.size, False
    values, counts = np.unique(ya, return_counts=True)
    blank = int(values[np.argmax(counts)])
    if not ctc or counts.max() * 2 <= ya.size:
        return bool(np.array_equal(ya, pa)), False

    def collapsed(a: np.ndarray) -> np.ndarray:
        merged = a[np.concatenate([[True], a[1:] != a[:-1]])]
        return merged[merged != blank]

    return bool(np.array_equal(collapsed(ya), collapsed(pa))), True


def lower_bound(agreeing: float, n: int, z: float = 1.96) -> float:
    """The Wilson lower bound (95 %) of a share measured as ``agreeing`` of ``n`` samples
    (13 of 13 agreeing: at least 0.77)."""
    if n <= 0:
        return 0.0
    centre = agreeing + z * z / (2 * n)
    spread = z * np.sqrt(agreeing * (1 - agreeing) / n + z * z / (4 * n * n))
    return float(max(0.0, (centre - spread) / (1 + z * z / n)))


def on_offset(y: np.ndarray) -> bool:
    """Floating point, many values (at least :data:`OFFSET_VALUES`), that sit on an offset
    larger than their spread (``|mean| > std``): a heat map in [0, 1] around 0.5, whose cosine
    measures the offset."""
    if y.dtype.kind != "f" or y.size < OFFSET_VALUES:
        return False
    v = y.astype(np.float64)
    return bool(np.isfinite(v).all() and abs(v.mean()) > v.std() > 0)


#: values an output needs per sample for a ``centred_cosine`` (a dense map, not a few scores)
OFFSET_VALUES = 64


#: outputs of at most this many numbers per sample get a ``rank_correlation`` ...
FEW_SCORES = 16
#: ... over at least this many held-out samples
RANK_SAMPLES = 5


def _few_scores_correlation(k: int, original: list[list[np.ndarray]], pruned: list[list[np.ndarray]]
                            ) -> float | None:
    """:func:`rank_correlation` of output ``k`` where it qualifies (see the module docstring)."""
    if len(original) < RANK_SAMPLES:
        return None
    ys = [np.asarray(r[k]) for r in original]
    ps = [np.asarray(r[k]) for r in pruned]
    shape = ys[0].shape
    if ys[0].dtype.kind != "f" or not ys[0].size or any(v.shape != shape for v in (*ys, *ps)):
        return None
    y, p = np.stack([v.reshape(-1) for v in ys]), np.stack([v.reshape(-1) for v in ps])
    if ys[0].size > FEW_SCORES:
        if not looks_like_scores(ys[0]):
            return None
        # many classes: those the held-out samples are given (a malware classifier's "benign")
        top = np.unique(np.argmax(y, axis=1))
        y, p = y[:, top], p[:, top]
    return rank_correlation(y, p)


def compared_names(original: onnx.ModelProto) -> tuple[list[str], dict[str, tuple[list[str], int]]]:
    """What the fidelity compares: the graph outputs of ``original``, then the scores that
    outputs are chosen from by rank (:func:`decision_scores`, with the outputs each decides
    and the axis ranked), which :func:`graphprune.calibration.runner.outputs` fetches as
    ``also`` and :func:`compare_outputs` takes as ``decided``."""
    decided = decision_scores(original)
    return [o.name for o in original.graph.output] + list(decided), decided


def _decided_rows(names: Sequence[str], samples: list[list[Any]], decided: dict[str, tuple[list[str], int]]
                  ) -> list[list[Any]]:
    """``samples`` with each scores tensor of ``decided`` turned so that its ranked axis is the last."""
    turn = {k: decided[name][1] for k, name in enumerate(names) if name in decided}
    if not turn:
        return samples
    return [[np.moveaxis(np.asarray(v), turn[k], -1) if k in turn and v is not None and np.ndim(v) > 1 else v
             for k, v in enumerate(row)] for row in samples]


def _shown(k: int, names: Sequence[str], original: list[list[Any]], decided: dict) -> bool:
    """The scores ``names[k]`` hold the values of an output compared anyway (a classifier's
    probabilities beside its label, as ZipMap's maps): nothing to add."""
    if not original or original[0][k] is None:
        return False
    scores = np.asarray(original[0][k])
    return any(name not in decided and (value := np.asarray(original[0][j])).dtype.kind == "f"
               and value.size == scores.size and np.array_equal(value.reshape(-1), scores.reshape(-1))
               for j, name in enumerate(names) if j != k)


def compare_outputs(
    names: Sequence[str], original: list[list[np.ndarray]], pruned: list[list[np.ndarray]],
    *, not_scores: set[str] = frozenset(), logits: set[str] = frozenset(),
    decided: dict[str, tuple[list[str], int]] | None = None, tags: set[str] = frozenset(),
) -> dict[str, Any]:
    """Fidelity figures from per-sample outputs (``original[i][k]``: sample i, output k;
    ``not_scores``: outputs never taken for class scores, see :func:`open_length`;
    ``logits``: outputs whose rows are class scores, see :func:`logit_rows`; ``decided``: the
    names that are the scores other outputs are chosen from, :func:`compared_names`: compared
    as rows of class scores along the ranked axis, their figures under the scores' name with
    ``scores_of``, and counted with the outputs; one that either model does not compute is
    left out; ``tags``: outputs with a row per token, see :func:`token_rows`)."""
    if decided:
        absent = {k for k, name in enumerate(names) if name in decided and any(
            row[k] is None for row in (*original, *pruned)) or _shown(k, names, original, decided)}
        original, pruned = _decided_rows(names, original, decided), _decided_rows(names, pruned, decided)
        if absent:
            keep = [k for k in range(len(names)) if k not in absent]
            names = [names[k] for k in keep]
            original = [[row[k] for k in keep] for row in original]
            pruned = [[row[k] for k in keep] for row in pruned]
        logits = {*logits, *(name for name in names if name in decided)}
    outputs: dict[str, Any] = {}
    # beside an output of class probabilities, one that is none is no class scores (an MTCNN
    # O-Net's box offsets and landmarks beside its face / non-face softmax read as classes)
    atol = [quantized_sum_error([r[k] for r in original]) for k in range(len(names))]  # (a quantized softmax's)
    distributions = {name for k, name in enumerate(names) if original and all(
        rows_of_probabilities(np.asarray(r[k]), several=False, atol=atol[k]) for r in original)}
    if distributions:
        not_scores = {*not_scores, *(n for n in names if n not in distributions and n not in logits)}
    # values in [0, 1] whose rows do not sum to 1: independent yes / no probabilities (a
    # multi-label head's sigmoids: toxic, insult, ...), decided each at 0.5, no one-of-N choice
    # (six labels read top-1 agreement 1.0 while a flag's F1 fell to 0.79)
    not_scores = {*not_scores, *(name for k, name in enumerate(names) if name not in logits and original and all(
        in_unit_range(np.asarray(r[k])) for r in original) and not all(
        rows_of_probabilities(np.asarray(r[k]), several=False, atol=atol[k]) for r in original))}
    for k, name in enumerate(names):
        cosines, rels, agree, balanced, sequences = [], [], [], [], []
        collapsed = False  # a sequence compared as a CTC recogniser's (see sequence_agreement)
        channel_error2: np.ndarray | None = None  # per channel (axis 1), pooled over the samples
        channel_total2: np.ndarray | None = None
        classes: set[int] = set()  # the original's class on each sample (one row per sample)
        error2 = total2 = size2 = 0.0  # (pooled over the samples; size2: the pruned output's)
        unfinished = hollow = broken = 0  # samples on which the original's output holds a NaN or an infinity / nothing
        # else; broken: the pruned output's is non-finite where the original's is not
        scale = name not in logits and name not in distributions and output_kinds.on_a_scale(
            [np.asarray(r[k]) for r in original], FEW_SCORES, RANK_SAMPLES)  # (ratings: no classes)
        scores, other_shape = name not in not_scores and not scale, 0
        per_row = False  # top-1 agreement per row (position) of several rows of probabilities
        spread = max((channel_spread(np.asarray(r[k])) for r in original[:4]
                      if np.asarray(r[k]).dtype.kind == "f"), default=1.0)
        offset = all(on_offset(np.asarray(r[k])) for r in original[:4])
        centred: list[float] = []
        widths = {np.shape(ref_list[k])[-1:] for ref_list in original}
        # an output of values in [0, 1] (a sigmoid's): the decision at 0.5 per element
        in_unit, decisions, sides, kept, peaks = True, [], set(), [0, 0], []  # kept: the original's positives still positive
        scores = scores and len(widths) == 1  # a class count does not change with the input
        differ = elements = 0  # an output of class ids, words, flags: the elements that changed
        for ref_list, out_list in zip(original, pruned, strict=True):
            y = np.asarray(ref_list[k])
            p = np.asarray(out_list[k])
            if y.shape == p.shape and y.dtype.kind not in "fc" and p.dtype.kind not in "fc":
                scores = False
                changed = int(np.count_nonzero(y != p))
                differ, elements = differ + changed, elements + y.size
                rels.append(changed / y.size if y.size else 0.0)
                continue
            if y.shape != p.shape or y.dtype.kind not in "fc":
                scores = False
                other_shape += y.shape != p.shape
                cosines.append(float(np.array_equal(y, p)))
                rels.append(0.0 if np.array_equal(y, p) else 1.0)
                if y.dtype.kind in "fc" and not np.array_equal(y, p):
                    norm2 = float(np.sum(np.abs(y.astype(np.float64)) ** 2))
                    error2, total2 = error2 + norm2, total2 + norm2
                continue
            if y.dtype.kind == "f" and not bool(np.isfinite(y).all()):
                unfinished, hollow = unfinished + 1, hollow + (not np.isfinite(y).any())
            cosine, rel = pair_figures(y, p)
            cosines.append(cosine if y.size > 1 else None)
            if in_unit and y.dtype.kind == "f" and y.size and bool(np.all((y >= 0) & (y <= 1))):
                above = y > 0.5
                decisions.append(float(np.mean(above == (p > 0.5))))
                sides.update(np.unique(above).tolist())
                kept[0], kept[1] = kept[0] + int(np.count_nonzero(p[above] > 0.5)), kept[1] + int(np.count_nonzero(above))
                peaks.extend(output_kinds.peaks_kept(y, p))  # (a heatmap read by its arg-max: where its peaks went)
            else:
                in_unit = False
            if offset:
                centred.append(pair_figures(y - y.mean(dtype=np.float64), p - p.mean(dtype=np.float64))[0])
            rels.append(rel)
            a, b = finite_pair(y, p)
            if a is None:  # (non-finite on one side only: all of it counts as error)
                a, b = np.nan_to_num(y.reshape(-1).astype(np.float64)), np.zeros(y.size)
                broken += bool(np.any(np.isfinite(y) & ~np.isfinite(p)))
            error2, total2 = error2 + float(np.sum(np.abs(a - b) ** 2)), total2 + float(np.sum(np.abs(a) ** 2))
            size2 += float(np.sum(np.abs(b) ** 2))
            if spread >= SPREAD and (value := balanced_cosine(y, p)) is not None:
                balanced.append(value)
                if not in_unit:  # (the channels in [0, 1] beside the others: a detector's class scores)
                    kept = [a + b for a, b in zip(kept, output_kinds.scores_kept(y, p), strict=True)]
                e2, y2 = channel_squares(y, p)
                if channel_error2 is None or channel_error2.shape == e2.shape:
                    channel_error2 = e2 if channel_error2 is None else channel_error2 + e2
                    channel_total2 = y2 if channel_total2 is None else channel_total2 + y2
            if scores and not per_row and looks_like_scores(y):
                agree.append(float(np.argmax(y) == np.argmax(p)))
                classes.add(int(np.argmax(y)))
            elif scores and (per_row or not agree) and (rows_of_probabilities(y, atol=atol[k]) or (
                    name in logits and y.ndim >= 2 and y.size > y.shape[-1] and y.shape[-1] >= 2)):
                per_row = True
                agree.append(row_agreement(y, p))
                same, ctc = sequence_agreement(y, p, ctc=name not in tags)
                sequences.append(float(same))
                collapsed = collapsed or ctc
            else:
                scores = False
        if len(rels) == len(original) and not cosines and original:  # no float value: what agrees
            # (a classifier's label beside its probabilities: a cosine or a relative L2 of class ids says nothing)
            outputs[name] = {"cosine": None, "min_cosine": None, "rel_l2": None, "pooled_rel_l2": None,
                             "agreement": round(1.0 - differ / elements, 6) if elements else 1.0, "discrete": True}
            continue
        cosines = [c for c in cosines if c is not None]  # (one element: no cosine)
        entry: dict[str, Any] = {
            "cosine": round(float(np.mean(cosines)), 6) if cosines else None,
            "min_cosine": round(float(np.min(cosines)), 6) if cosines else None,
            "rel_l2": round(float(np.mean(rels)), 6) if rels else None,
            "pooled_rel_l2": (round(float(np.sqrt(error2 / total2)), 6) if total2 > 0
                              else float(error2 > 0)) if rels else None,
        }
        if len(original) > 1 and all(_equal(original[0][k], r[k]) for r in original[1:]):
            entry["constant"] = True
        if total2 > 0 and size2 < COLLAPSED**2 * total2:
            entry["collapsed"] = True
        if unfinished:
            entry["original_not_finite"] = unfinished
            if hollow == len(original):  # (nothing but NaN on every sample: nothing compared)
                entry.update(cosine=None, min_cosine=None, rel_l2=None, pooled_rel_l2=None, no_finite_value=True)
        if broken:  # (counted as zeros in the figures; no reconstruction may win with it: deciding_rel_l2)
            entry["pruned_not_finite"] = broken
        if other_shape:  # a decoder that stops at another step: counted as cosine 0, rel_l2 1
            entry["other_shape"] = other_shape
        # an output the inputs do not change (a constant, a folded weight) scores no class
        if scores and agree and (len(original) < 2 or any(
                not np.array_equal(np.asarray(original[0][k]), np.asarray(r[k])) for r in original[1:])):
            entry["top1_agreement"] = round(float(np.mean(agree)), 6)
            if per_row:  # (a sequence of class probabilities: every position counts)
                entry["top1_per"] = "row"
                # and per sample: the whole sequence (a recogniser's line) read the same
                entry["sequence_agreement"] = round(float(np.mean(sequences)), 6)
                if collapsed:
                    entry["sequence_collapsed"] = True
            else:  # how far the share of a few samples can be trusted, and what classes they cover
                entry["top1_lower_bound"] = round(lower_bound(float(np.mean(agree)), len(agree)), 4)
                classes_of = int(np.shape(original[0][k])[-1])
                if len(classes) < classes_of:
                    entry["top1_classes_seen"] = f"{len(classes)} of {classes_of}"
            if not per_row and len(classes) == 1 and len(agree) > 1:
                # every held-out sample is one class: the agreement says whether that class
                # stays on top, not whether the model still tells classes apart
                entry["top1_one_class"] = classes.pop()
        if not in_unit and balanced and kept[1]:  # (every class score of a detector fallen under 0.5: 0 boxes)
            entry["positives_kept"] = round(kept[0] / kept[1], 6)
        if in_unit and len(decisions) == len(original) and len(sides) == 2 and "top1_agreement" not in entry \
                and not per_row:
            # both decisions occur (else the share says nothing): a segmenter's per-character
            # boundary probability, a binary classifier's score, a mask
            entry["threshold_agreement"] = round(float(np.mean(decisions)), 6)
            if kept[1] < 0.5 * sum(np.size(r[k]) for r in original):  # positives are the few: how many stay
                entry["positives_kept"] = round(kept[0] / kept[1], 6)
                if peaks:
                    entry["peaks_kept"] = round(float(np.mean(peaks)), 6)
        if not in_unit and (iou := output_kinds.logit_mask_iou([r[k] for r in original], [r[k] for r in pruned])):
            entry["mask_iou"] = round(iou, 6)  # (a binary segmenter's logits: the region above 0, as it is read)
        if offset and centred and len(centred) == len(original):
            entry["centred_cosine"] = round(float(np.mean(centred)), 6)
        elif scale:
            entry["centred_cosine"] = round(output_kinds.centred_over_samples(
                [r[k] for r in original], [r[k] for r in pruned]), 6)
        if balanced and len(balanced) == len(original):
            entry["balanced_cosine"] = round(float(np.mean(balanced)), 6)
            live = channel_total2 > 0
            if live.any():
                entry["balanced_rel_l2"] = round(float(np.sqrt(np.mean(channel_error2[live] / channel_total2[live]))), 6)
        if (value := _few_scores_correlation(k, original, pruned)) is not None:
            entry["rank_correlation"] = round(value, 6)
        if decided and name in decided:
            entry["scores_of"] = list(decided[name][0])
        outputs[name] = entry
    worst: dict[str, Any] = {"samples": len(original), "outputs": outputs}
    cos = [e["cosine"] for e in outputs.values() if e["cosine"] is not None]
    rel = [e["rel_l2"] for e in outputs.values() if e["rel_l2"] is not None]
    pooled = [e["pooled_rel_l2"] for e in outputs.values() if e["pooled_rel_l2"] is not None]
    top = [e["top1_agreement"] for e in outputs.values() if "top1_agreement" in e]
    worst["cosine"], worst["rel_l2"] = (min(cos) if cos else None), (max(rel) if rel else None)
    worst["pooled_rel_l2"], worst["top1_agreement"] = (max(pooled) if pooled else None), (min(top) if top else None)
    for figure in ("balanced_cosine", "centred_cosine", "rank_correlation", "top1_lower_bound", "sequence_agreement",
                   "threshold_agreement", "mask_iou"):
        found = [e[figure] for e in outputs.values() if figure in e]
        if found:
            worst[figure] = min(found)
    own = [v for e in outputs.values() if (v := e.get("balanced_rel_l2", e["pooled_rel_l2"])) is not None]
    if any("balanced_rel_l2" in e for e in outputs.values()):
        worst["balanced_rel_l2"] = max(own)
    if len(own) > 1:  # (an output the prune does not reach, equal to the last digit, decides nothing: at the
        # floor it divided XFeat's two changed outputs' 0.21 by 6)
        reached = [v for v in own if v > 0] or own
        worst["deciding_rel_l2"] = round(float(np.exp(np.mean(np.log(np.maximum(reached, DECIDING_FLOOR))))), 6)
    if agreements := [e["agreement"] for e in outputs.values() if "agreement" in e]:
        worst["agreement"] = min(agreements)
        if not own:  # nothing but discrete outputs: the largest share of their elements that changed decides
            worst["deciding_rel_l2"] = round(1.0 - min(agreements), 6)
    if broken := max((e.get("pruned_not_finite", 0) for e in outputs.values()), default=0):
        worst["pruned_not_finite"] = broken
    if collapsed_outputs := [n for n, e in outputs.items() if e.get("collapsed")]:
        worst["collapsed_outputs"] = collapsed_outputs
    if lost := {n: e["positives_kept"] for n, e in outputs.items() if e.get("positives_kept", 1.0) < POSITIVES_KEPT}:
        worst["positives_lost"] = lost
    unfinished = max((e.get("original_not_finite", 0) for e in outputs.values()), default=0)
    if unfinished:
        worst["note"] = (f"the original's outputs hold NaN or infinite values on {unfinished} of the {len(original)} "
                         "held-out samples (inputs outside what the model was made for, e.g. the log of a negative "
                         "value): the figures compare the finite values only"
                         + (", and there are none" if any(e.get("no_finite_value") for e in outputs.values()) else "")
                         + "; give samples of the data it was made for")
    elif outputs and all(e.get("constant") for e in outputs.values()):
        worst["note"] = (f"the original's outputs are the same on all {len(original)} held-out samples: the "
                         "figures say nothing about what the model computes (give samples of the data it was "
                         "made for)")
    elif 0 < len(original) < RANK_SAMPLES:  # (a batched feed is one sample: 12 feeds of 8 names held out 2)
        worst["note"] = (f"the figures rest on {len(original)} held-out sample(s): give more samples, or a "
                         "larger --holdout, to measure the prune")
    return worst


def deciding_rel_l2(figures: dict[str, Any]) -> float | None:
    """The figure that keeps or undoes a reconstruction and ranks a budget's candidates: the
    ``deciding_rel_l2`` of several outputs, else the ``balanced_rel_l2`` where the output has
    one (channels of sizes far apart), else the ``pooled_rel_l2``; infinite where an output is
    NaN or infinite where the original's is finite (one NaN bias makes every output NaN: as zeros
    it scored relative L2 1, better than an honest reconstruction further off)."""
    if figures.get("pruned_not_finite"):
        return math.inf
    for key in ("deciding_rel_l2", "balanced_rel_l2", "pooled_rel_l2"):
        if figures.get(key) is not None:
            return figures[key]
    return None


def reported_error(error: float | None) -> float | None:
    """An error as the report holds it: rounded; ``None`` where it is infinite (JSON has no infinity)."""
    return round(error, 6) if error is not None and math.isfinite(error) else None


def made_worse(figures: dict[str, Any], worse: float, better: float) -> str:
    """The warning of a reconstruction undone: the held-out ``figures`` with it, the deciding
    relative L2 without (``worse``) and with it (``better``)."""
    which = ("the outputs' (geometric mean)" if "deciding_rel_l2" in figures
             else "balanced" if "balanced_rel_l2" in figures else "pooled")
    broken = ", its outputs NaN or infinite where the original's are finite" if math.isinf(better) else ""
    return (f"the reconstruction made the held-out fidelity worse ({which} relative L2 {worse:.4g} -> {better:.4g}"
            f"{broken}): the model is written without it")


def stats_needless(refit_error: float, none_error: float) -> str | None:
    """Why ``reconstruction="auto"`` need not weigh the statistics correction against a refit whose
    held-out error (:func:`deciding_rel_l2`) is ``refit_error``, ``none_error`` without
    reconstruction (``None``: it must): the refit left so little that nothing the correction
    could win would show (a ResNet-50's refit leaves 0.2 %; the correction took 54 of 274 s)."""
    if none_error > 0 and refit_error <= STATS_AFTER_REFIT * none_error:
        return (f"not tried: the refit left {refit_error / none_error:.2%} of the held-out error without "
                f"reconstruction (at most {STATS_AFTER_REFIT:.0%})")
    return None


def _equal(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def reference_outputs(original: onnx.ModelProto, feeds: Sequence[Feed], *,
                      data_dir: Path | None = None) -> list[list[np.ndarray]]:
    """The original's outputs on ``feeds`` (and the scores its ids are chosen from:
    :func:`compared_names`), to compare several pruned models with."""
    return runner.outputs(original, feeds, "the original model", data_dir=data_dir,
                          also=list(decision_scores(original)))


def fidelity(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    feeds: Sequence[Feed],
    *,
    data_dir: Path | None = None,
    reference: list[list[np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Run both models on ``feeds`` (one sample each) and compare every output
    (``reference``: the original's outputs from :func:`reference_outputs`, not run again)."""
    if not feeds:
        return {"samples": 0, "outputs": {}, "cosine": None, "rel_l2": None, "top1_agreement": None,
                "note": "no held-out sample: nothing measured, and the reconstruction was kept unweighed "
                        "(give 2 samples or more)"}
    names, decided = compared_names(original)
    ref = reference if reference is not None else runner.outputs(original, feeds, "the original model",
                                                                  data_dir=data_dir, also=list(decided))
    out = runner.outputs(pruned, feeds, "the pruned model", data_dir=data_dir, also=list(decided))
    return compare_outputs(names, ref, out, not_scores=open_length(original) | fed_back(original)
                           | feature_outputs(original) | output_kinds.reconstructions(names, list(feeds), ref)
                           | output_kinds.unit_rows(names, ref),
                           logits=logit_rows(original, data_dir), decided=decided,
                           tags=token_rows(names, list(feeds), ref))
