"""graphprune.io.blocks: a weight read a block of rows at a time gives what whole-array numpy gives.

Importance scoring and channel removal read large weights through it (peak memory: one block
plus the result, ``docs/large_models.md``); the blocks are made small here so that every axis
crosses several of them, on a memory-mapped weight as the store holds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graphprune.io import blocks


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 200)


def _mapped(tmp_path: Path, array: np.ndarray) -> np.memmap:
    path = tmp_path / "w.bin"
    array.tofile(path)
    return np.memmap(path, dtype=array.dtype, mode="c", shape=array.shape)


@pytest.mark.parametrize("shape", [(7,), (5, 3), (24, 9, 3, 3), (3, 200, 4)])
def test_norms_along_every_axis(tmp_path: Path, shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    weight = _mapped(tmp_path, array)
    for axis in range(array.ndim):
        rows = np.moveaxis(array.astype(np.float64), axis, 0).reshape(shape[axis], -1)
        np.testing.assert_allclose(blocks.axis_norms(weight, axis, 1), np.abs(rows).sum(1), rtol=1e-5)
        np.testing.assert_allclose(blocks.axis_norms(weight, axis, 2), np.sqrt(np.square(rows).sum(1)), rtol=1e-5)


@pytest.mark.parametrize("shape", [(7,), (5, 3), (24, 9, 3, 3), (3, 200, 4)])
def test_kept_equals_deleting_axis_by_axis(tmp_path: Path, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    array = rng.standard_normal(shape).astype(np.float16)
    weight = _mapped(tmp_path, array)
    cuts = [(axis, rng.choice(n, size=max(1, n // 2), replace=False)) for axis, n in enumerate(shape)]
    for count in range(1, len(cuts) + 1):
        expected = array
        for axis, idx in cuts[:count]:
            expected = np.delete(expected, idx, axis=axis)
        got = blocks.kept(weight, cuts[:count])
        assert got.dtype == array.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)
    # every leading row removed but one, and a negative axis
    np.testing.assert_array_equal(blocks.kept(weight, [(0, range(1, shape[0])), (-1, [0])]),
                                  np.delete(array[:1], [0], axis=-1))
