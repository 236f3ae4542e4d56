"""graphprune: structural pruning of neural networks directly on ONNX graphs.

>>> import graphprune
>>> result = graphprune.prune("model.onnx", ratio=0.5)      # doctest: +SKIP
>>> result.model, result.report, result.plan                 # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path as _Path

from graphprune import _layout

_layout.install(_Path(__file__).resolve().parent)

from graphprune.errors import (  # noqa: E402
    AnalysisError,
    GraphPruneError,
    InvalidModelError,
    RewriteError,
    UnsupportedOpsetError,
    UsageError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "GraphPruneError",
    "InvalidModelError",
    "RewriteError",
    "UnsupportedOpsetError",
    "UsageError",
    "VerificationError",
    "analyze",
    "erase_blocks",
    "load_model",
    "prune",
    "register_custom_ops",
    "save_model",
]


def __getattr__(name: str):  # lazy: keep ``import graphprune`` cheap and cycle-free
    if name in ("prune", "analyze"):
        from graphprune import api

        return getattr(api, name)
    if name == "erase_blocks":
        from graphprune.pipeline import depth

        return depth.erase_blocks
    if name == "register_custom_ops":
        from graphprune.io import runtime

        return runtime.register_custom_ops
    if name in ("load_model", "save_model"):
        from graphprune.io import model_io

        return getattr(model_io, name)
    raise AttributeError(f"module 'graphprune' has no attribute {name!r}")
