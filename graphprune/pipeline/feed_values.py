"""The values verification feeds a session's original model where random ones say nothing:
ids across the tables they index, the constants a mode switch is tested for, a quantized
input's range, and the fallbacks where the original does not run on generated feeds
(:class:`FeedValues`, a part of :class:`graphprune.pipeline.session.Session`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from graphprune.calibration.synthetic import first_tested_values, named_feeds
from graphprune.io import ir
from graphprune.io.feeds import input_specs, integers_zeroed, make_feeds
from graphprune.verify import validate

#: calibration samples the structural check runs on where random inputs leave outputs empty
DATA_CHECK_SAMPLES = 4


class FeedValues:
    """The feed-value methods of :class:`~graphprune.pipeline.session.Session` (which holds
    the state they read: the original, the prepared model, its graph and store, the
    calibration samples and the caches ``_index_highs``, ``_ranges``, ``_tested``)."""

    def use_data_feeds(self, fault: Exception) -> bool:
        """Where the original does not run on the generated feeds (``fault``) but runs on the
        calibration samples (without any: on :func:`~graphprune.calibration.synthetic.named_feeds`,
        else on the generated feeds with every integer input 0: an index every table has, where
        a GNN's atom ids index as many atoms as an open size gives, and verification's batch of 1
        atom has no atom 1), verify on those from now on and return True: an input whose values
        the model needs (a shape, a length, indices into a table) is not fed random 0s and 1s
        that make it fail. False where they are in use already, or the original fails on them
        as well."""
        if self.feeds_from_data:
            return False
        candidates: list[tuple[list[dict[str, np.ndarray]], str]] = []
        if self.data_feeds:
            candidates.append((self.data_feeds, "calibration samples"))
        else:
            generated = self.feeds(count=DATA_CHECK_SAMPLES)
            graph = self.graph if self.graph is not None else ir.import_graph(self.prepared, self.store)
            named = named_feeds(self.prepared, graph, self.opset, {k: v.shape for k, v in generated[0].items()})
            if named is not None:
                candidates.append(named)
            integers = [k for k, v in generated[0].items() if np.issubdtype(v.dtype, np.integer)]
            if integers:
                zeros = [integers_zeroed(f) for f in generated]
                candidates.append((zeros, f"the generated inputs with every integer input 0 ({', '.join(integers[:4])}"
                                          f"{', ...' if len(integers) > 4 else ''})"))
        for samples, source in candidates:
            try:
                validate.run(self.path_of(self.prepared), samples[0], "the original")
            except Exception:  # VerificationError: the input's fault after all
                continue
            self.data_feeds = samples
            first = str(fault).split(": ", 1)[-1].splitlines()[0][:160]
            self.feeds_from_data = f"{source} (the original does not run on generated inputs: {first})"
            return True
        return False

    def index_highs(self) -> dict[str, int]:
        """Integer inputs that index a table (token ids, positions) and its number of rows
        (:func:`graphprune.calibration.synthetic.index_bounds`): verification feeds them ids
        across the table, not 0s and 1s, on which a network can compute nothing of its own
        (chython-rxnmap: ids 0 and 1 map to a ``-inf`` attention bias and padding, and the
        original's output was the mask's softmax whatever the layers did). Where the original
        does not run on such feeds, none (0s and 1s, as before)."""
        if self._index_highs is None:
            self._index_highs = {}
            if any(np.issubdtype(s.dtype, np.integer) for s in input_specs(self.original)):
                from graphprune.calibration.synthetic import index_bounds

                graph = self.graph if self.graph is not None else ir.import_graph(self.prepared, self.store)
                bounds = {k: int(v) for k, v in index_bounds(graph, self.opset).items() if int(v) > 2}
                if bounds:
                    feed = make_feeds(self.original, batch=self._verify_batch(), input_shapes=self.run_shapes(),
                                      values=self.tested_values(), int_highs=bounds,
                                      float_ranges=self.value_ranges())[0]
                    try:  # (a large model one segment of weights at a time, as verification runs it)
                        validate.run_many(self.path_of(self.prepared), [feed], "the original", segmented=True)
                        self._index_highs = bounds
                    except Exception:  # VerificationError: 0s and 1s, as before
                        pass
        return self._index_highs

    def value_ranges(self) -> dict[str, tuple[float, float]]:
        """Float inputs with a range of values they are meant to lie in (an input quantizer's:
        :func:`graphprune.calibration.synthetic.value_ranges`): verification feeds them values
        uniform across it, not standard normal ones that a quantizer calibrated on 0-255 pixels
        maps to one level (the original's outputs all 0, every check comparing zeros)."""
        if self._ranges is None:
            self._ranges = {}
            if any(np.issubdtype(s.dtype, np.floating) for s in input_specs(self.original)):
                from graphprune.calibration.synthetic import value_ranges

                graph = self.graph if self.graph is not None else ir.import_graph(self.prepared, self.store)
                self._ranges = value_ranges(graph, self.opset)
        return self._ranges

    def tested_values(self) -> dict[str, Any]:
        """Mode switches fed the constant the graph tests them for (silero's ``Equal(sr, 16000)``),
        not a random 0 or 1 (:func:`graphprune.calibration.synthetic.first_tested_values`)."""
        if self._tested is None:
            graph = lambda: self.graph if self.graph is not None else ir.import_graph(self.prepared, self.store)  # noqa: E731
            self._tested = first_tested_values(self.original, graph)
        return self._tested
