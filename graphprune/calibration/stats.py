"""Activation statistics of the inputs of linear layers, from ONNX Runtime.

For each chosen linear layer (a *consumer*: its weight reads the channels of a channel
group) the input tensor is exposed and every calibration batch is folded into

- per-channel moments: count, sum and sum of squares (mean, second moment, variance);
- the channel Gram ``X^T X`` (rows: positions of the input, subsampled to about
  ``gram_rows(C)`` over all batches), for layers of at most ``GRAM_MAX_CHANNELS`` channels.

Memory is bounded by these statistics; nothing is kept per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphprune.calibration import runner
from graphprune.calibration.linear import LinearView

GRAM_MAX_CHANNELS = 4096
#: Gram rows over all batches: ROWS_PER_CHANNEL per channel, within [MIN_ROWS, MAX_ROWS]
ROWS_PER_CHANNEL = 2
MIN_ROWS = 4096
MAX_ROWS = 8192
#: Gram rows buffered before one product folds them in
FLUSH_ROWS = 1024


def gram_rows(channels: int) -> int:
    return int(min(MAX_ROWS, max(MIN_ROWS, ROWS_PER_CHANNEL * channels)))


@dataclass
class ChannelStats:
    """Statistics of one layer input along its channel axis."""

    count: float = 0.0
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    gram: np.ndarray | None = None
    gram_rows: int = 0
    #: Gram rows not yet folded in (see :meth:`flush`)
    pending: list[np.ndarray] = field(default_factory=list)

    @property
    def mean(self) -> np.ndarray:
        assert self.total is not None
        return self.total / max(self.count, 1.0)

    @property
    def second_moment(self) -> np.ndarray:
        assert self.squares is not None
        return self.squares / max(self.count, 1.0)

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.second_moment - self.mean**2, 0.0)

    def add(self, rows: np.ndarray, gram_rows: np.ndarray | None, axis: int = -1) -> None:
        """``rows``: values with the channels along ``axis`` (any other layout: every other
        axis is a position); sums are taken in float64 without copying ``rows``."""
        axis = axis % rows.ndim
        channels = rows.shape[axis]
        if self.total is None:
            self.total = np.zeros(channels)
            self.squares = np.zeros(channels)
        total, squares = channel_sums(rows, axis)
        self.total += total
        self.squares += squares  # type: ignore[operator]
        self.count += rows.size // max(channels, 1)
        if gram_rows is not None:
            self.pending.append(gram_rows)
            if sum(len(r) for r in self.pending) >= FLUSH_ROWS:
                self.flush()

    def flush(self) -> None:
        """Fold the buffered Gram rows in: one product per :data:`FLUSH_ROWS` rows rather
        than one per batch (a transformer's batch of one sentence has a few rows, and each
        product rewrites the whole ``C x C`` Gram)."""
        if not self.pending:
            return
        rows = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        self.pending = []
        with np.errstate(over="ignore", invalid="ignore"):
            g = rows.T @ rows
        if not np.isfinite(g).all() and np.isfinite(rows).all():  # float32 sums overflow past ~1e19 per value
            wide = rows.astype(np.float64)
            g = wide.T @ wide
        self.gram = g.astype(np.float64) if self.gram is None else self.gram + g
        self.gram_rows += rows.shape[0]


def channel_sums(rows: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel sum and sum of squares (float64) of ``rows`` along ``axis``. A channel
    axis before contiguous positions (NCHW) is summed per sample and channel first, in the
    array's own precision (pairwise over the positions; float32 at least: float16 squares and
    sums overflow at 65,504), then in float64 over samples."""
    others = tuple(a for a in range(rows.ndim) if a != axis)
    inner = np.float32 if rows.dtype.itemsize < 4 else None
    if 0 < axis < rows.ndim - 1 and rows.flags["C_CONTIGUOUS"]:
        lead = int(np.prod(rows.shape[:axis]))
        view = rows.reshape(lead, rows.shape[axis], -1)
        with np.errstate(over="ignore"):
            squares = np.square(view, dtype=inner).sum(axis=2).sum(axis=0, dtype=np.float64)
        if not np.isfinite(squares).all():  # (past ~1e19 per value): in float64
            squares = np.square(view, dtype=np.float64).sum(axis=2).sum(axis=0)
        return view.sum(axis=2, dtype=inner).sum(axis=0, dtype=np.float64), squares
    with np.errstate(over="ignore"):
        squares = np.square(rows, dtype=np.float64 if inner else None).sum(axis=others, dtype=np.float64)
    if not np.isfinite(squares).all():
        squares = np.square(rows, dtype=np.float64).sum(axis=others)
    return rows.sum(axis=others, dtype=np.float64), squares


@dataclass
class LayerStats:
    """Input statistics of linear layers, by node name."""

    layers: dict[str, ChannelStats] = field(default_factory=dict)
    samples: int = 0

    def get(self, node: str) -> ChannelStats | None:
        stats = self.layers.get(node)
        return stats if stats is not None and stats.count else None


def collect(
    model: onnx.ModelProto,
    views: list[LinearView],
    batches: runner.Batches,
    *,
    gram: bool = True,
    data_dir: Path | None = None,
    what: str = "the original model",
    record: Any = None,
) -> LayerStats:
    """Stream ``batches`` through ``model`` and gather the input statistics of ``views``
    (``record``: a :class:`~graphprune.calibration.targets.RecordedTargets` that the same run
    fills with the refit targets)."""
    by_input: dict[str, list[LinearView]] = {}
    for view in views:
        by_input.setdefault(view.data.name, []).append(view)
    out = LayerStats(samples=sum(batches.sizes))
    total = max(out.samples, 1)

    recorded = set(record.names()) if record is not None else set()

    def take(batch: int, name: str, x: np.ndarray) -> None:
        if name in recorded:
            record.take(batch, name, x)
        raw = x
        for view in by_input.get(name, ()):
            x = view.read_data(raw)
            axis = 1 if view.is_conv else x.ndim - 1
            channels = x.shape[axis] if x.ndim else 0
            stats = out.layers.setdefault(view.node.name, ChannelStats())
            sample = None
            if gram and channels <= GRAM_MAX_CHANNELS:
                limit = -(-gram_rows(channels) * batches.sizes[batch] // total)
                sample = view.channel_rows(x, limit, seed=batch)
            stats.add(x if x.ndim else x.reshape(1, 1), sample, axis if x.ndim else -1)

    names = [*by_input, *(n for n in recorded if n not in by_input)]
    runner.stream(model, names, batches.feeds, take, what=what, data_dir=data_dir)
    for stats in out.layers.values():
        stats.flush()
    return out


def summary(stats: LayerStats) -> dict[str, Any]:
    return {"layers": len(stats.layers), "samples": stats.samples}


def add_moments(store: dict[int, list[np.ndarray]], key: int, y: np.ndarray, conv: bool) -> None:
    """Add ``y``'s per-channel sums and sums of squares (channel axis 1 of a conv output, else
    the last) to ``store[key]``."""
    axis = 1 if conv else y.ndim - 1
    channels = y.shape[axis]
    total, squares = channel_sums(y, axis)
    entry = store.setdefault(key, [np.zeros(channels), np.zeros(channels), np.zeros(1)])
    entry[0] += total
    entry[1] += squares
    entry[2] += y.size // max(channels, 1)


def finish_moments(entry: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance from :func:`add_moments`' sums."""
    n = max(float(entry[2][0]), 1.0)
    mean = entry[0] / n
    return mean, np.maximum(entry[1] / n - mean**2, 0.0)
