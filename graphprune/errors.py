"""One exception hierarchy for the whole library.

The library never prints and never returns ``None`` to signal failure: it raises one of
these. The command line maps them to a one-line message and a non-zero exit code.
"""

from __future__ import annotations


class GraphPruneError(Exception):
    """Root of every error graphprune raises on purpose."""

    exit_code = 1


class InvalidModelError(GraphPruneError):
    """The input is not a loadable ONNX model (not ONNX, truncated, missing external data)."""

    exit_code = 2


class UnsupportedOpsetError(InvalidModelError):
    """The model's default-domain opset is below the supported minimum."""


class UsageError(GraphPruneError):
    """Arguments that cannot work: ratio out of range, unknown criterion, output == input."""

    exit_code = 2


class AnalysisError(GraphPruneError):
    """The dependency analysis met a graph it cannot describe safely."""


class RewriteError(GraphPruneError):
    """A pass could not rewrite the graph consistently."""


class VerificationError(GraphPruneError):
    """The pruned model failed a check (checker, ORT run, shapes or equivalence)."""

    exit_code = 3


class OutputShapesDiffer(VerificationError):
    """The pruned model ran, and some of its outputs have other shapes than the reference's:
    ``outputs``, their indices (after a selection by value: one box more or fewer)."""

    def __init__(self, message: str, outputs: list[int]) -> None:
        super().__init__(message)
        self.outputs = outputs
