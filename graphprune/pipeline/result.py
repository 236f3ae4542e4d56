"""What every prune mode returns: the model, the report (one shape) and the plan.

A session keeps the weights in a :class:`~graphprune.io.weights.WeightStore` (a private
folder under the temporary directory), and the result hands them on: ``model`` builds the
proto with its weights on first access, :meth:`PruneResult.save` streams them to the output
file without that copy. The folder goes when the result is garbage-collected or at exit; a
pipeline that prunes many models in one process, or a worker that a pool or Ray ends
without running exit handlers, releases it at once with :meth:`PruneResult.close` or a
``with`` block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import onnx

from graphprune.errors import UsageError
from graphprune.io import model_io

if TYPE_CHECKING:
    from graphprune.analysis import Analysis
    from graphprune.io.weights import WeightStore
    from graphprune.planning.plan import Plan


class PruneResult:
    """What every mode returns: the model, the report (one shape) and the plan.

    When the weights are held by a :class:`~graphprune.io.weights.WeightStore` (every
    session's model), ``model`` is built with its weights in the proto on first access;
    :meth:`save` streams them to the output file instead, without that copy.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        report: dict[str, Any],
        plan: Plan,
        analysis: Analysis | None = None,
        *,
        store: WeightStore | None = None,
    ) -> None:
        self._model = model
        self.report = report
        self.plan = plan
        self.analysis = analysis
        self.store = store  # None once the model holds its own weights
        self._owned = store  # the folder this result releases on close()
        self._closed = False

    @property
    def model(self) -> onnx.ModelProto:
        if self.store is not None:
            self._refuse_if_closed("read its model")
            self._model = self.store.materialize(self._model)
            self.store = None
        return self._model

    @model.setter
    def model(self, value: onnx.ModelProto) -> None:
        self._model, self.store = value, None

    @property
    def skeleton(self) -> onnx.ModelProto:
        """The model with its weights as references to the store (cheap to inspect)."""
        return self._model

    def save(self, path: Any, *, input_path: Any = None) -> Any:
        """Write the model atomically (weights streamed from the store, never copied)."""
        if self.store is not None:
            self._refuse_if_closed("save its model")
        external = True if self.store is not None and self.store.external_source else None
        return model_io.save_model(self._model, path, input_path=input_path, store=self.store,
                                   external_data=external)

    def close(self) -> None:
        """Delete the temporary folder that holds the weights now. ``model`` read before
        stays usable; a model neither read nor saved before is gone (reading or saving it
        then raises :class:`~graphprune.errors.UsageError`). Closing twice is harmless."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None
        self._closed = True

    def _refuse_if_closed(self, what: str) -> None:
        if self._closed:
            raise UsageError(f"cannot {what}: the result was closed before its model was read or saved")

    def __enter__(self) -> PruneResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PruneResult(mode={self.report.get('mode')!r}, groups={len(self.plan.groups)})"
