"""Layout: ``passes/`` and ``frontends/`` sit next to ``graphprune/`` in the repository and are
imported as ``graphprune.passes`` / ``graphprune.frontends`` — from the repository root (where
the source folder ``graphprune/`` shadows the installed package) and from anywhere else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, sys
import graphprune.passes, graphprune.frontends
import graphprune.passes.base, graphprune.passes.prune_channels
from graphprune.pipeline import session
print(json.dumps({
    "graphprune": graphprune.__file__,
    "passes": graphprune.passes.__file__,
    "frontends": graphprune.frontends.__file__,
    "same_module": session.PassManager is graphprune.passes.base.PassManager,
    "top_level_passes": importlib.util.find_spec("passes") is not None,
    "top_level_frontends": importlib.util.find_spec("frontends") is not None,
}))
"""


def _probe(cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("where", ["repository_root", "elsewhere"])
def test_subpackages_import(where, tmp_path):
    found = _probe(REPO if where == "repository_root" else tmp_path)
    package = Path(found["graphprune"]).resolve().parent
    passes = Path(found["passes"]).resolve().parent
    frontends = Path(found["frontends"]).resolve().parent
    if where == "repository_root" or package == REPO / "graphprune":
        # the source folder (repository root, or an editable install): siblings are served
        assert package == REPO / "graphprune"
        assert passes == REPO / "passes"
        assert frontends == REPO / "frontends"
    else:
        # a regular install elsewhere: the subpackages live inside the installed package
        assert passes == package / "passes"
        assert frontends == package / "frontends"
    assert found["same_module"] is True
    if where == "elsewhere":
        # never installed as generic top-level packages
        assert found["top_level_passes"] is False
        assert found["top_level_frontends"] is False


def test_python_m_graphprune_version_from_both_places(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for cwd in (REPO, tmp_path):
        done = subprocess.run([sys.executable, "-m", "graphprune", "--version"], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("graphprune ")
