"""Make ``graphprune.passes`` and ``graphprune.frontends`` importable from a source checkout.

The repository keeps ``passes/`` and ``frontends/`` next to ``graphprune/`` (the layout the
project asked for). A wheel or an editable install maps them to ``graphprune.passes`` and
``graphprune.frontends`` through setuptools' ``package-dir``. From the repository root,
however, ``import graphprune`` finds the source folder ``graphprune/`` first, which has no
``passes/`` inside. This finder closes that gap: when a sibling folder exists it serves the
subpackage from there; otherwise it stays out of the way (installed wheels).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_SIBLINGS = ("passes", "frontends")


class _SiblingFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != "graphprune" or parts[1] not in _SIBLINGS:
            return None
        location = self.root.joinpath(*parts[1:])
        if location.is_dir():
            init = location / "__init__.py"
            return importlib.util.spec_from_file_location(
                fullname, init, submodule_search_locations=[str(location)]
            )
        source = location.with_suffix(".py")
        if source.is_file():
            return importlib.util.spec_from_file_location(fullname, source)
        return None


def install(package_dir: Path) -> None:
    """Register the finder if ``package_dir`` sits in a source checkout without the subpackages."""
    if (package_dir / "passes").is_dir():
        return  # installed layout: nothing to do
    root = package_dir.parent
    if not all((root / name / "__init__.py").is_file() for name in _SIBLINGS):
        return
    if any(isinstance(f, _SiblingFinder) for f in sys.meta_path):
        return
    sys.meta_path.append(_SiblingFinder(root))
