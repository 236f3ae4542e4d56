"""Who is at fault when the original does not run during a prune.

A comparison whose reference does not run is not a failed rewrite: the model as loaded may
not run (an exporter's broken graph, inputs whose values verification cannot guess: exit 2),
or only the prepared graph fails (a defect of graphprune's preparation: exit 3). Where some
input sizes or integer values were guessed, the error says which and how to give real ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from onnx import version_converter

from graphprune.errors import GraphPruneError, InvalidModelError, UsageError, VerificationError
from graphprune.io.feeds import integers_zeroed
from graphprune.verify import preparation, validate

__all__ = ["blaming", "conversion_fault", "data_fault", "did_not_run", "input_fault"]


def did_not_run(error: BaseException | None, what: str) -> bool:
    """Is ``error`` the failure of ``what`` to run at all (not a difference in its outputs)?"""
    return error is not None and str(error).startswith(f"{what} does not run")


def input_fault(session: Any, feeds: list[dict[str, np.ndarray]] | None = None) -> GraphPruneError | None:
    """Where the model as loaded fails ``onnx.checker`` or ONNX Runtime before any change, on
    any of ``feeds`` (default: the session's first): bad input (exit 2), not a failed rewrite;
    else ``None``. Where only the prepared graph fails, the preparation is at fault: a
    :class:`VerificationError` that says so (exit 3)."""
    tried = feeds or session.feeds()[:1]  # every feed a comparison ran with (a second random axis may be out of range)
    feed = tried[0]
    try:
        for feed in tried:  # noqa: B007 - the feed that failed is run on the loaded graph below
            validate.run(session.path_of(session.prepared), feed, "the input model")
    except VerificationError as fault:
        if feeds is None and _runs_on_integer_zeros(session, feed):  # ids into an open count of rows (a
            return None  # GNN's atoms) on generated feeds: verification feeds 0s there; the model runs
        converted = session.normalised.get("opset_converted")
        hint = (f" (as ONNX's version converter wrote it, from opset {converted['from']} to "
                f"{converted['to']})") if converted else ""
        if not preparation.same_computation(session.loaded, session.prepared):
            try:
                validate.run(session.path_of(session.loaded), feed, preparation.AS_LOADED)
            except Exception:  # VerificationError: the input's own fault, as below
                pass
            else:
                return conversion_fault(session, 1e-5, [feed]) or VerificationError(preparation.failure_message(
                    {"error": f"it does not run in ONNX Runtime{hint}, the model as loaded does: "
                              + str(fault).removeprefix("the input model does not run in ONNX Runtime: ")}))
        unknown = validate.unregistered_op(session.prepared)  # says more than ORT's loader
        if unknown:
            return InvalidModelError(f"the input model fails onnx.checker: {unknown}")
        return InvalidModelError(str(fault) + hint + _shape_hint(session) + _given_hint(session) + _values_hint(session))
    return None


def _runs_on_integer_zeros(session: Any, feed: dict[str, np.ndarray]) -> bool:
    """Whether the prepared model runs on ``feed`` with its integer inputs 0 (where it has any)."""
    if not any(np.issubdtype(np.asarray(v).dtype, np.integer) for v in feed.values()):
        return False
    try:
        validate.run(session.path_of(session.prepared), integers_zeroed(feed), "the input model")
    except VerificationError:
        return False
    return True


@contextmanager
def blaming(session: Any, what: str, data: list[dict[str, np.ndarray]] | None = None) -> Iterator[None]:
    """Runs of ``what`` (the original, as loaded) that fail where the model as loaded fails as
    well raise :class:`InvalidModelError` (:func:`input_fault`); on ``data`` (calibration
    samples) alone, :func:`data_fault`."""
    try:
        yield
    except VerificationError as exc:
        ran = not did_not_run(exc, what)
        fault = None if ran else input_fault(session) or (data_fault(session, data) if data else None)
        if fault is None:
            raise
        raise fault from exc


#: calibration samples run through the model as loaded to find one it does not run on
DATA_BLAME_SAMPLES = 32


def data_fault(session: Any, data: list[dict[str, np.ndarray]]) -> GraphPruneError | None:
    """Where the model as loaded runs on the session's own feeds but not on one of the first
    :data:`DATA_BLAME_SAMPLES` of ``data`` (calibration samples: token ids past a vocabulary),
    the data is at fault: :class:`UsageError` (it was exit 3, "the original model does not
    run"); a failure of the prepared graph alone stays graphprune's (:func:`input_fault`)."""
    fault = input_fault(session, data[:DATA_BLAME_SAMPLES])
    if not isinstance(fault, InvalidModelError):
        return fault
    detail = str(fault).removeprefix("the input model does not run in ONNX Runtime: ")
    return UsageError(f"the calibration data does not fit the model: the model as loaded does not run on it "
                      f"in ONNX Runtime: {detail}")


def conversion_fault(session: Any, tolerance: float,
                     feeds: list[dict[str, np.ndarray]] | None = None) -> InvalidModelError | None:
    """Where the prepared graph fails the preparation check and ONNX's version converter ran:
    if the graph as the converter wrote it already fails the same check against the model as
    loaded (does not run, or computes something else: ``Scan`` below opset 9 converted with
    float16 casts around it), the model is one graphprune cannot take at its opset (exit 2),
    not a defect of graphprune's own preparation (exit 3), provided ONNX's converter alone,
    without graphprune's fixes to it, fails the check too; else ``None``."""
    if session.as_converted is None:  # no conversion ran
        return None
    converted = session.normalised["opset_converted"]
    feeds = feeds or session.feeds()
    check = preparation.check_preparation(session.loaded, session.as_converted, session.path_of,
                                          feeds, tolerance, label="the converted graph")
    if check.get("ok") is not False:
        return None
    try:  # ONNX's converter alone, without graphprune's fixes to it: is it ONNX's doing?
        raw = version_converter.convert_version(session.loaded, converted["to"])
    except Exception:  # noqa: BLE001 - graphprune's fixes are what made it convert: theirs
        return None
    if preparation.check_preparation(session.loaded, raw, session.path_of, feeds, tolerance).get("ok") is not False:
        return None
    what = preparation.failure_detail(check)
    return InvalidModelError(
        f"ONNX's version converter does not convert this model from opset {converted['from']} to "
        f"{converted['to']} (graphprune works at opset {converted['to']} and up) without changing what it "
        f"computes ({what}); export the model at opset {converted['to']} or later")


def _values_hint(session: Any) -> str:
    """Where integer inputs were fed random 0s and 1s: which, and how to feed real values (an
    input read as a shape, a count or indices may need particular ones)."""
    from graphprune.io.feeds import input_specs

    if session.data_feeds:
        return ""
    tested = session.tested_values()
    guessed = [s.name for s in input_specs(session.original)
               if np.issubdtype(s.dtype, np.integer) and s.name not in tested]
    if not guessed:
        return ""
    names = ", ".join(guessed[:4]) + (", ..." if len(guessed) > 4 else "")
    return (f" (integer inputs were fed random 0s and 1s: {names}; if the model needs particular values "
            "there, give real inputs with --calibration FILE)")


def _given_hint(session: Any) -> str:
    """Where the sizes given with ``--input-shape`` are what it ran at: the model may fix some (a
    segmenter that runs at batch 1 only, given ``x=2,64``: the hint blamed the values alone)."""
    given = dict(session.input_shapes or {})
    if not given:
        return ""
    at = ", ".join(f"{n}={'x'.join(map(str, d))}" for n, d in list(given.items())[:4])
    return f" (run at the sizes given: {at}; the model may fix some of them, as an export at batch 1 does)"


def _shape_hint(session: Any) -> str:
    """Where some input sizes were chosen, not given: which, and how to give them (a model
    that runs only at sizes the search did not try, e.g. a KV cache whose last axis must
    be the head size)."""
    from graphprune.analysis.probe_sizes import open_dimensions
    from graphprune.io.feeds import input_specs

    chosen = sorted({name for dims in open_dimensions(input_specs(session.original), session.input_shapes).values()
                     for name, _ in dims})
    if not chosen:
        return ""
    feeds = session.feeds()[0]
    at = ", ".join(f"{n}={'x'.join(map(str, feeds[n].shape))}" for n in chosen[:4] if n in feeds)
    more = ", ..." if len(chosen) > 4 else ""
    return (f" (run at sizes chosen for the open dimensions: {at}{more}; if the model needs others, "
            "give them with --input-shape NAME=d0,d1,...)")
