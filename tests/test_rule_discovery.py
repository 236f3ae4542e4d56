"""The rule registry finds its own modules: every file under ``graphprune/rules/`` is imported
when the package is, so a new rule file needs no other edit to be registered."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import graphprune.rules
from graphprune.rules import RULE_MODULES, OpRule, lookup

RULES_DIR = Path(graphprune.rules.__file__).resolve().parent


def test_every_module_in_the_rules_folder_is_imported():
    files = sorted(p.stem for p in RULES_DIR.glob("*.py") if not p.stem.startswith("_"))
    assert [name.rpartition(".")[2] for name in RULE_MODULES] == files
    assert all(name in sys.modules for name in RULE_MODULES)


def test_every_rule_class_in_the_rules_folder_is_registered():
    """A rule class with op types that is not registered is a forgotten ``@register``."""
    found = 0
    for module_name in RULE_MODULES:
        for cls in vars(sys.modules[module_name]).values():
            if not (isinstance(cls, type) and issubclass(cls, OpRule) and cls.op_types):
                continue
            if cls.__module__ != module_name:
                continue  # imported from another rule module (a base class it extends)
            for op in cls.op_types:
                rule = lookup(cls.domain, op, cls.since_opset)
                assert type(rule) is cls, (
                    f"{cls.__name__} in {module_name} is not the rule for {op} "
                    f"(found {rule!r}): decorate it with @register"
                )
                found += 1
    assert found >= 140


NEW_RULE = '''
from graphprune.rules.registry import OpRule, register


@register
class MysteryRule(OpRule):
    op_types = ("Mystery",)
    domain = "com.example"

    def couple(self, node, ctx):
        ctx.couple_all_axes(node.inputs[0], node.outputs[0])
'''

LOAD_COPY = '''
import importlib.util, sys
folder = sys.argv[1]
spec = importlib.util.spec_from_file_location(
    "graphprune.rules", folder + "/__init__.py", submodule_search_locations=[folder])
rules = importlib.util.module_from_spec(spec)
sys.modules["graphprune.rules"] = rules
spec.loader.exec_module(rules)
assert sys.modules["graphprune.rules.conv"].__file__.startswith(folder)
print(rules.lookup("com.example", "Mystery", 17))
'''


def test_a_new_rule_file_is_registered_without_any_other_edit(tmp_path):
    """Drop a rule file into a copy of the rules folder, import the copy as the package."""
    folder = tmp_path / "rules"
    shutil.copytree(RULES_DIR, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "mystery.py").write_text(textwrap.dedent(NEW_RULE))
    done = subprocess.run(
        [sys.executable, "-c", LOAD_COPY, str(folder)], capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "MysteryRule(Mystery)"
    assert lookup("com.example", "Mystery", 17) is None  # this process is untouched
