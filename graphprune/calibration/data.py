"""Calibration data: read, validate and split the samples a calibrated prune runs on.

A calibration source is one of

- a ``.npz`` file with one array per graph input, keyed by the input's name, with a leading
  sample axis on top of the input's own shape (rank = input rank + 1: ``array[i]`` is one
  feed);
- a folder of ``.npz`` files, one feed each (arrays of the input's own rank), read in name
  order;
- for a model with one input, the array may also come unnamed: saved as ``np.savez(path, a)``
  (numpy names it ``arr_0``) or as a ``.npy`` file of stacked samples (``np.save``);
- (API) a mapping of stacked arrays like the ``.npz`` file, or an iterable of feed dicts.

Every feed is checked against the model's declared inputs: names (no missing, no extra
array), dtypes (a cast within a kind, such as float64 -> float32 or int32 -> int64, is applied;
anything else is an error) and shapes (fixed sizes must match; a symbolic size must be the same wherever the
symbol appears within one feed). Errors are one-line :class:`~graphprune.errors.UsageError`
messages that name the input.

Part of the samples is held out for the fidelity report: ``holdout`` (default 20 %) of them,
at least one when there are two samples or more, evenly spaced over the sequence so that a
sorted data set does not hold out one class. The split is deterministic.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphprune.errors import UsageError
from graphprune.io.feeds import UNNAMED_DIMS, InputSpec, input_specs

Feed = dict[str, np.ndarray]

#: default share of the samples held out for the fidelity report
DEFAULT_HOLDOUT = 0.2
#: held-out samples a choice made on them needs (a measured allocation, the criteria's plans)
MIN_HOLDOUT = 8
#: numpy's name for an array saved without one (``np.savez(path, a)``)
UNNAMED = "arr_0"


@dataclass
class CalibrationSet:
    """Validated calibration feeds, split into the samples used and those held out."""

    samples: list[Feed]
    holdout: list[Feed]
    source: str = "feeds"
    #: index (in the source order) of every held-out sample
    holdout_indices: list[int] = field(default_factory=list)
    #: what the report should know of the samples (every one the same: :func:`_alike`)
    note: str | None = None

    @property
    def total(self) -> int:
        return len(self.samples) + len(self.holdout)

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "samples": self.total,
            "used": len(self.samples),
            "held_out": len(self.holdout),
            **({"note": self.note} if self.note else {}),
        }


def _describe(source: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return type(source).__name__


#: what numpy raises on a damaged ``.npz`` or ``.npy`` (a ``.npz`` is a zip archive: a file
#: that is no zip, a truncated member, a compression it cannot read)
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)


def _unreadable(path: Path, exc: BaseException) -> UsageError:
    """numpy's reason, in one line; a file that is neither a zip archive nor an array file
    (numpy then takes it for a pickle and says so: "allow_pickle=False") is said to be that."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "pickle" in first:
        first = "not a .npz (zip archive of arrays) nor a .npy array file"
    return UsageError(f"cannot read calibration file '{path}': {first}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except FileNotFoundError as exc:
        raise UsageError(f"no such calibration file: {path}") from exc
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from exc


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from exc


def _unstack(arrays: Mapping[str, Any], what: str) -> list[Feed]:
    """Stacked arrays (leading sample axis) -> one feed per sample."""
    if not arrays:
        raise UsageError(f"calibration data {what} holds no arrays")
    stacked = {str(k): np.asarray(v) for k, v in arrays.items()}
    counts = {name: (a.shape[0] if a.ndim else None) for name, a in stacked.items()}
    for name, count in counts.items():
        if count is None:
            raise UsageError(
                f"calibration array '{name}' in {what} is a scalar; it needs a leading sample axis"
            )
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"'{n}': {c}" for n, c in counts.items())
        raise UsageError(f"calibration arrays in {what} have different sample counts ({detail})")
    count = next(iter(counts.values()))
    if count == 0:
        raise UsageError(f"calibration data {what} has no samples")
    return [{name: a[i] for name, a in stacked.items()} for i in range(count)]


def read_feeds(source: Any) -> tuple[list[Feed], bool, str]:
    """``(feeds, stacked, description)``; ``stacked``: arrays came with a sample axis."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
            if not files:
                raise UsageError(f"calibration folder '{path}' holds no .npz files")
            return [_read_npz(p) for p in files], False, str(path)
        if not path.exists():
            raise UsageError(f"no such calibration file or folder: {path}")
        if path.suffix == ".npy":  # one unnamed stacked array (a model with one input)
            return _unstack({UNNAMED: _read_npy(path)}, f"'{path}'"), True, str(path)
        if path.suffix != ".npz":
            raise UsageError(f"calibration data must be a .npz file or a folder of them, got '{path}'")
        return _unstack(_read_npz(path), f"'{path}'"), True, str(path)
    if isinstance(source, Mapping):
        return _unstack(source, "(mapping)"), True, "arrays"
    if isinstance(source, Iterable) and not isinstance(source, bytes | np.ndarray):
        feeds = []
        for index, feed in enumerate(source):
            if not isinstance(feed, Mapping):
                raise UsageError(
                    f"calibration sample {index} is a {type(feed).__name__}, not a dict of arrays"
                )
            feeds.append({str(k): np.asarray(v) for k, v in feed.items()})
        if not feeds:
            raise UsageError("calibration data has no samples")
        return feeds, False, "feeds"
    raise UsageError(
        f"calibration data must be a .npz path, a folder, a dict of arrays or feed dicts, "
        f"got {_describe(source)}"
    )


def _shape_text(shape: list[Any] | None) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape or []) + "]"


def validate_feed(
    feed: Feed, specs: list[InputSpec], *, index: int, stacked: bool
) -> Feed:
    """Check ``feed`` against the model inputs; return it with same-kind casts applied."""
    wanted = {s.name for s in specs}
    if len(specs) == 1 and set(feed) == {UNNAMED}:  # np.savez(path, a) / np.save: the one input
        feed = {specs[0].name: feed[UNNAMED]}
    extra = sorted(set(feed) - wanted)
    if extra:
        raise UsageError(
            f"calibration array '{extra[0]}' is not a graph input "
            f"(inputs: {', '.join(s.name for s in specs)})"
        )
    out: Feed = {}
    symbols: dict[str, tuple[int, str]] = {}
    where = f"sample {index}"
    for spec in specs:
        if spec.name not in feed:
            raise UsageError(f"calibration data has no array for graph input '{spec.name}'")
        value = feed[spec.name]
        if value.dtype != spec.dtype:
            kinds = {value.dtype.kind, np.dtype(spec.dtype).kind}
            # a string input (object in ONNX Runtime) takes numpy's str and bytes arrays
            if not (len(kinds) == 1 or kinds <= {"i", "u"} or kinds in ({"O", "U"}, {"O", "S"})):
                raise UsageError(
                    f"calibration input '{spec.name}' has dtype {value.dtype}; "
                    f"the model expects {spec.dtype}"
                )
            value = value.astype(spec.dtype)
        shape = spec.shape
        if shape is not None:
            if value.ndim != len(shape):
                lead = " plus a leading sample axis" if stacked else ""
                got = value.ndim + (1 if stacked else 0)
                hint = ""
                if stacked and value.ndim + 1 == len(shape) and (not isinstance(shape[0], int) or shape[0] == 1):
                    # [N, C, H, W] for an input [batch, C, H, W]: the rows are samples
                    hint = "; to feed each row as one sample of batch 1, add that axis: array[:, None]"
                raise UsageError(
                    f"calibration input '{spec.name}' has rank {got}; expected "
                    f"{len(shape) + (1 if stacked else 0)} (the input's shape "
                    f"{_shape_text(shape)}{lead}){hint}"
                )
            for axis, dim in enumerate(shape):
                size = int(value.shape[axis])
                if isinstance(dim, int) and size != dim:
                    raise UsageError(
                        f"calibration input '{spec.name}' ({where}) has size {size} on axis "
                        f"{axis}; the model's shape is {_shape_text(shape)}"
                    )
                if isinstance(dim, str) and dim not in UNNAMED_DIMS:
                    seen = symbols.setdefault(dim, (size, spec.name))
                    if seen[0] != size:
                        raise UsageError(
                            f"calibration input '{spec.name}' ({where}) has {dim}={size} but "
                            f"'{seen[1]}' has {dim}={seen[0]}"
                        )
        out[spec.name] = np.ascontiguousarray(value) if value.ndim else np.asarray(value)  # (the former makes 0-d 1-d)
    return out


def _some_finite(feeds: list[Feed]) -> None:
    """A float input with no finite value in any sample (all NaN or infinite: a file written
    from failed preprocessing) measures nothing, and its outputs (NaN both before and after)
    would read as agreeing perfectly: a usage error. Some non-finite values (missing values
    a tabular model imputes) are data."""
    for name in feeds[0] if feeds else {}:
        values = [np.asarray(f[name]) for f in feeds]
        if values[0].dtype.kind == "f" and all(v.size for v in values) and \
                not any(np.isfinite(v).any() for v in values):
            raise UsageError(f"calibration input '{name}' has no finite value in any of its "
                             f"{len(values)} samples (all NaN or infinite)")


def _alike(feeds: list[Feed]) -> str | None:
    """A note where every sample is the same (8 all-zero images ran to exit 0 without a word)."""
    first = feeds[0] if len(feeds) > 1 else None
    if first is None or any(not np.array_equal(np.asarray(f[k]), np.asarray(first[k])) for f in feeds[1:] for k in first):
        return None
    return (f"all {len(feeds)} calibration samples are the same: the criteria and the reconstruction learn from one "
            "input (give samples of the data the model will see)")


def holdout_indices(count: int, holdout: float) -> list[int]:
    """Evenly spaced indices of the held-out samples (none when ``count`` < 2)."""
    if count < 2 or holdout <= 0:
        return []
    n = min(count - 1, max(1, int(math.floor(holdout * count + 0.5))))
    step = count / n
    return sorted({min(count - 1, int(step * i + step / 2)) for i in range(n)})


def _unfinished(values: Any) -> bool:
    return any(np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all() for v in values)


def _drop_unfinished(feeds: list[Feed], run: Callable[[list[Feed]], list[list[np.ndarray]]] | None
                     ) -> tuple[list[Feed], str | None]:
    """The samples whose float inputs hold NaN or infinite values and on which the original's
    outputs do too, dropped (``run``: the original's outputs on feeds): they measure nothing, and
    one NaN pixel made every statistic NaN, so that a prune wrote 51 NaN biases and a model that
    outputs NaN for every input (exit 0). Where the original's outputs stay finite the values
    are data (missing values a tabular model imputes)."""
    suspects = [i for i, f in enumerate(feeds) if _unfinished(f.values())]
    if not suspects or run is None:
        return feeds, None
    bad = {i for i, outs in zip(suspects, run([feeds[i] for i in suspects]), strict=True) if _unfinished(outs)}
    if not bad:
        return feeds, None
    if len(bad) == len(feeds):
        raise UsageError(f"every one of the {len(feeds)} calibration samples holds NaN or infinite input values on "
                         "which the original's outputs are NaN or infinite too: nothing to measure")
    return ([f for i, f in enumerate(feeds) if i not in bad],
            f"{len(bad)} of {len(feeds)} samples dropped: their inputs hold NaN or infinite values and so do the "
            "original's outputs on them")


def load_calibration(
    source: Any, model: onnx.ModelProto, *, holdout: float = DEFAULT_HOLDOUT,
    run: Callable[[list[Feed]], list[list[np.ndarray]]] | None = None,
) -> CalibrationSet:
    """Read, validate and split ``source`` for ``model`` (see the module docstring); ``run``: the
    original's outputs on feeds, to drop the samples it answers with NaN (:func:`_drop_unfinished`)."""
    if isinstance(source, CalibrationSet):
        return source
    if not 0.0 <= float(holdout) < 1.0:
        raise UsageError(f"holdout must be in [0, 1), got {holdout}")
    feeds, stacked, what = read_feeds(source)
    specs = input_specs(model)
    checked = [validate_feed(f, specs, index=i, stacked=stacked) for i, f in enumerate(feeds)]
    _some_finite(checked)
    checked, dropped = _drop_unfinished(checked, run)
    held = holdout_indices(len(checked), float(holdout))
    held_set = set(held)
    return CalibrationSet(
        samples=[f for i, f in enumerate(checked) if i not in held_set],
        holdout=[checked[i] for i in held],
        source=what,
        holdout_indices=held,
        note="; ".join(n for n in (dropped, _alike(checked)) if n) or None,
    )
