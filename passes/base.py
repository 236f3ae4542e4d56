"""Pass infrastructure: one contract for every rewrite.

A pass rewrites a graph in place: ``run(graph, ctx) -> PassResult(graph, modified, stats)``.
It never decides ``modified`` from a flag of its own: the :class:`PassManager` fingerprints
the graph before and after (nodes, their inputs, outputs and attributes, constant values'
identity and shape, graph inputs and outputs) and a result that claims otherwise is
corrected, so ``modified`` always says what happened to the graph.

A pass may state ``requires(graph, ctx)`` (checked before it runs: raise or return a reason
string to refuse) and ``ensures(graph, ctx)`` (checked after). With ``ctx.debug`` the manager
also exports the graph after every pass and verifies it (``onnx.checker`` and an ONNX
Runtime session), naming the pass that broke it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.errors import RewriteError
from graphprune.io.weights import MappedValues, origin

#: constants up to this size are hashed in full by :func:`fingerprint`
FULL_HASH_BYTES = 16 * 2**20


@dataclass
class PassContext:
    """Shared, explicit state for a pipeline run (no globals in passes).

    ``debug_check`` is called with the graph after each pass when ``debug`` is on (the
    pipeline session installs one that exports and verifies the graph).
    """

    opset: int
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    debug: bool = False
    debug_check: Callable[[gs.Graph, str], None] | None = None
    #: free-form shared facts between passes of one run (e.g. calibration statistics)
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    graph: gs.Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class. Subclasses implement :meth:`run`; a second run on its output is a no-op."""

    #: False for a pass that leaves the graph valid only together with the pass after it
    #: (debug mode then checks after that one)
    valid_after: bool = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def requires(self, graph: gs.Graph, ctx: PassContext) -> str | None:
        """A reason the pass cannot run on ``graph`` (``None``: it can)."""
        return None

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> str | None:
        """A reason the pass's postcondition does not hold on ``graph`` (``None``: it holds)."""
        return None

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}()"


def fingerprint(graph: gs.Graph) -> str:
    """A digest of everything a pass may change in ``graph``.

    Constants are hashed by content, not identity (reading a lazily loaded weight gives it
    a new identity without changing it): dtype, shape and all bytes up to
    ``FULL_HASH_BYTES``, a strided sample of larger ones. Weights memory-mapped from a
    :class:`~graphprune.io.weights.WeightStore` are identified by their mapping (passes
    replace arrays, they never write into a mapped one), so the digest costs time
    proportional to the graph rather than to the weights.
    """
    h = hashlib.blake2b(digest_size=16)

    def tensor(t: gs.Tensor, boundary: bool = False) -> None:
        h.update(t.name.encode())
        if isinstance(t, gs.Constant):
            values = t._values if hasattr(t, "_values") else t.values
            mapped = values if isinstance(values, MappedValues) else origin(values)
            if mapped is not None:
                # a weight of the store, as mapped (copy-on-write; passes replace arrays)
                h.update(f"mapped:{id(mapped)}".encode())
                return
            if isinstance(values, gs.ir.tensor.LazyValues):
                values = t.values  # small or store-less: compare by content
            shape = getattr(values, "shape", None)
            h.update(repr((str(getattr(values, "dtype", "")), tuple(shape or ()))).encode())
            if isinstance(values, np.ndarray) and values.size:
                if values.nbytes <= FULL_HASH_BYTES:
                    h.update(np.ascontiguousarray(values).tobytes())
                else:
                    flat = values.reshape(-1)
                    step = max(1, flat.size // 4096)
                    h.update(np.ascontiguousarray(flat[::step][:4096]).tobytes())
        elif boundary:  # intermediate shapes are annotations (re-inferred), not the graph
            h.update(repr((getattr(t, "dtype", None), getattr(t, "shape", None))).encode())

    for t in [*graph.inputs, *graph.outputs]:
        tensor(t, boundary=True)
    for node in graph.nodes:
        h.update(f"{node.domain}:{node.op}:{node.name}".encode())
        h.update(repr(sorted((k, repr(v)) for k, v in node.attrs.items()
                             if not isinstance(v, gs.Graph))).encode())
        for v in node.attrs.values():
            if isinstance(v, gs.Graph):
                h.update(fingerprint(v).encode())
        h.update(b"<")
        for t in node.inputs:
            tensor(t)
        h.update(b">")
        for t in node.outputs:
            tensor(t)
    return h.hexdigest()


class PassManager:
    """Run passes in order (optionally to a fixed point), timing and checking each one."""

    def __init__(self, passes: list[Pass], *, fixed_point: bool = False, max_iterations: int = 10):
        self.passes = passes
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations

    def run_one(self, p: Pass, graph: gs.Graph, ctx: PassContext, *, check: bool = True) -> PassResult:
        reason = p.requires(graph, ctx)
        if reason:
            raise RewriteError(f"{p.name} cannot run: {reason}")
        before = fingerprint(graph)
        start = time.perf_counter()
        result = p.run(graph, ctx)
        ctx.timings[p.name] = ctx.timings.get(p.name, 0.0) + time.perf_counter() - start
        graph = result.graph
        modified = fingerprint(graph) != before
        result = PassResult(graph, modified, result.stats)
        if result.stats:
            _merge(ctx.stats.setdefault(p.name, {}), result.stats)
        reason = p.ensures(graph, ctx)
        if reason:
            raise RewriteError(f"{p.name} broke its postcondition: {reason}")
        if check and ctx.debug and ctx.debug_check is not None and modified and p.valid_after:
            ctx.debug_check(graph, p.name)
        return result

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Run the passes; the result's ``stats`` are this run's, per pass name."""
        modified_any = False
        stats: dict[str, dict[str, Any]] = {}
        # a pass that leaves the graph whole only with the passes after it: debug mode checks
        # once, after the sequence, instead of after each pass
        deferred = any(not p.valid_after for p in self.passes)
        for _ in range(self.max_iterations if self.fixed_point else 1):
            modified = False
            for p in self.passes:
                result = self.run_one(p, graph, ctx, check=not deferred)
                graph = result.graph
                modified |= result.modified
                _merge(stats.setdefault(p.name, {}), result.stats)
            modified_any |= modified
            if not modified:
                break
        if deferred and modified_any and ctx.debug and ctx.debug_check is not None:
            ctx.debug_check(graph, " + ".join(p.name for p in self.passes))
        return PassResult(graph, modified_any, stats)

    def __repr__(self) -> str:
        return f"PassManager({', '.join(map(repr, self.passes))})"


def _merge(slot: dict[str, Any], stats: dict[str, Any]) -> None:
    """Add numeric counters up; other values: the latest wins."""
    for key, value in stats.items():
        if (isinstance(value, int | float) and not isinstance(value, bool)
                and isinstance(slot.get(key), int | float)):
            slot[key] = slot[key] + value
        else:
            slot[key] = value
