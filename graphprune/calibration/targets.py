"""Refit targets recorded by the statistics run: one run of the original for both.

The refit (:mod:`.sequential`) needs the ORIGINAL output of every layer it fits at a
subsample of output positions, and for a residual target the stream after the addition
(:mod:`.residual`). When a data-aware plan collects input statistics, that same run of the
original exposes the outputs of every linear layer (and the sums of their residual
additions) and keeps only the selected rows, here, so that the refit does not run the
original model again.

Rows are chosen per layer and batch as the refit chooses them (:func:`.linear.select`, a
seed of the layer's output name), with the budget of the ORIGINAL layer — at least the
pruned layer's, which has fewer inputs; the refit takes a fixed subsample of them. They are
held in a :class:`~graphprune.calibration.runner.TensorCache` (in memory up to its limit,
then in temporary files): memory is bounded by layers x rows, not by the samples.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx

from graphprune.calibration import runner
from graphprune.calibration.linear import LinearView, select
from graphprune.calibration.residual import residual_of


def seed(name: str, batch: int) -> int:
    return zlib.crc32(name.encode()) + 7919 * batch


class RecordedTargets:
    """Selected output rows of the linear layers ``views`` of ``model`` on every batch."""

    def __init__(
        self,
        model: onnx.ModelProto,
        views: Iterable[LinearView],
        sizes: list[int],
        budget: Callable[[LinearView], int],
        opset: int,
        data_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.sizes = sizes
        self.samples = max(1, sum(sizes))
        self.budget = budget
        self.views: dict[str, LinearView] = {}
        self.totals: dict[str, str] = {}  # residual sum -> output of its layer
        for view in views:
            self.views[view.output.name] = view
            residual = residual_of(view, opset)
            if residual is not None and residual.total not in self.views:
                self.totals.setdefault(residual.total, view.output.name)
        self.selected: dict[tuple[str, int], np.ndarray] = {}
        #: (layer, batch) -> the number of output positions the rows were selected from
        self.positions: dict[tuple[str, int], int] = {}
        self.cache = runner.TensorCache(runner.CACHE_BYTES, data_dir)

    def names(self) -> list[str]:
        """Tensors the statistics run exposes for the recording."""
        return [*self.views, *(t for t in self.totals if t not in self.views)]

    def _selection(self, layer: str, batch: int, shape: tuple[int, ...]) -> np.ndarray:
        key = (layer, batch)
        if key not in self.selected:
            view = self.views[layer]
            count = math.ceil(self.budget(view) * self.sizes[batch] / self.samples)
            self.positions[key] = view.output_positions(shape)
            self.selected[key] = select(self.positions[key], count, seed(layer, batch))
        return self.selected[key]

    def take(self, batch: int, name: str, value: np.ndarray) -> None:
        """The ``stream`` callback: keep the selected rows of a recorded tensor."""
        for layer, key in ((name, f"out:{name}"), (self.totals.get(name), f"sum:{name}")):
            if layer is None or layer not in self.views:
                continue
            view = self.views[layer]
            if view.output_positions(value.shape) * view.out_channels() != value.size:
                continue
            rows = self._selection(layer, batch, value.shape)
            read = view.read_output(value) if key.startswith("out:") else value
            self.cache.put(key, batch, view.output_rows(read, rows))

    def rows(self, layer: str, total: str | None, batch: int, count: int, salt: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """``(positions, layer output rows, residual sum rows or None)`` for up to ``count``
        rows of ``layer`` in ``batch`` (``None``: not recorded)."""
        known = self.cache.types()
        if f"out:{layer}" not in known or (layer, batch) not in self.selected:
            return None
        positions = self.selected[(layer, batch)]
        out = self.cache.get(f"out:{layer}", batch)
        summed = self.cache.get(f"sum:{total}", batch) if total and f"sum:{total}" in known else None
        if count < len(positions):
            keep = select(len(positions), count, salt)
            positions, out = positions[keep], out[keep]
            summed = summed[keep] if summed is not None else None
        return positions, out, summed

    def close(self) -> None:
        self.cache.close()
        self.selected.clear()
        self.positions.clear()
