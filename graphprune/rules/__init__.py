"""Op rules. Importing this package registers every built-in rule.

To support a custom op, subclass :class:`OpRule`, set ``op_types`` (and ``domain``), implement
``couple`` (and ``rewrite`` if the node has attributes or inputs that count channels) and
decorate it with :func:`register`. See ``docs/adding-an-op-rule.md``.
"""

# ruff: noqa: I001  (import order matters: transformer extends norm)

from graphprune.rules import conv, elementwise, linear, norm, pool, shape_ops  # noqa: F401
from graphprune.rules import transformer  # noqa: F401  (after norm: it extends LayerNorm)
from graphprune.rules.registry import OpRule, lookup, register, registered_ops, unregister

__all__ = ["OpRule", "lookup", "register", "registered_ops", "unregister"]
