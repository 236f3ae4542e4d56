"""Op rules. Importing this package registers every built-in rule.

Every module in this folder is imported (:func:`registry.discover`, in name order), so a new
rule file needs no other edit: subclass :class:`OpRule`, set ``op_types`` (and ``domain``),
implement ``couple`` (and ``zero_output``, ``rewrite`` ... where they apply) and decorate it
with :func:`register`. See ``docs/adding-an-op-rule.md``.
"""

from graphprune.rules.registry import (
    OpRule,
    discover,
    lookup,
    register,
    registered_ops,
    unregister,
)

#: the rule modules found in this package, in the order they were imported
RULE_MODULES = discover(__name__, __path__)

__all__ = ["RULE_MODULES", "OpRule", "discover", "lookup", "register", "registered_ops", "unregister"]
