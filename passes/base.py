"""Pass infrastructure: a pass rewrites a graph in place and says truthfully what it did."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import onnx_graphsurgeon as gs


@dataclass
class PassContext:
    """Shared, explicit state for a pipeline run (no globals in passes)."""

    opset: int
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class PassResult:
    graph: gs.Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class. Subclasses implement :meth:`run`; a second run on its output is a no-op."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}()"


class PassManager:
    """Run passes in order (optionally to a fixed point), timing each one."""

    def __init__(self, passes: list[Pass], *, fixed_point: bool = False, max_iterations: int = 10):
        self.passes = passes
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        modified_any = False
        for _ in range(self.max_iterations if self.fixed_point else 1):
            modified = False
            for p in self.passes:
                start = time.perf_counter()
                result = p.run(graph, ctx)
                ctx.timings[p.name] = ctx.timings.get(p.name, 0.0) + time.perf_counter() - start
                if result.stats:
                    ctx.stats.setdefault(p.name, {}).update(result.stats)
                graph = result.graph
                modified |= result.modified
            modified_any |= modified
            if not modified:
                break
        return PassResult(graph, modified_any)

    def __repr__(self) -> str:
        return f"PassManager({', '.join(map(repr, self.passes))})"
