"""Temporary folders a killed process left are swept by the next one (graphprune.io.scratch):
only folders whose owner file names an ended process of this boot and PID namespace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from graphprune.io import scratch

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux processes")


def _folder(parent: Path, name: str, owner: str | None) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "weights.data").write_bytes(b"\0" * 64)
    if owner is not None:
        (folder / scratch.OWNER).write_text(owner)
    return folder


def test_only_folders_of_ended_processes_are_swept(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead_pid = int(ended.stdout)
    here = scratch._namespace()
    parent_pid = os.getppid()
    started = scratch._start_time(parent_pid)
    assert started
    folders = {
        "dead": _folder(tmp_path, "graphprune-dead", f"{here} {dead_pid} 1"),
        "reused": _folder(tmp_path, "gp-cache-reused", f"{here} {parent_pid} {int(started) + 1}"),
        "alive": _folder(tmp_path, "graphprune-alive", f"{here} {parent_pid} {started}"),
        "other boot": _folder(tmp_path, "graphprune-boot", f"another-boot:1 {dead_pid} 1"),
        "no owner": _folder(tmp_path, "graphprune-mine", None),
        "garbled": _folder(tmp_path, "graphprune-garbled", "not an owner line"),
        "other prefix": _folder(tmp_path, "model-dead", f"{here} {dead_pid} 1"),
    }
    removed = scratch.sweep(tmp_path)
    assert sorted(removed) == sorted(str(folders[k]) for k in ("dead", "reused"))
    assert {k for k, f in folders.items() if f.exists()} == {"alive", "other boot", "no owner", "garbled",
                                                            "other prefix"}


def test_a_folder_names_its_maker_and_goes_with_it(tmp_path):
    folder = scratch.Folder("graphprune-test-", tmp_path)
    path = Path(folder.name)
    assert (path / scratch.OWNER).read_text().split()[1:] == [str(os.getpid()), scratch._start_time(os.getpid())]
    assert scratch.sweep(tmp_path) == [] and path.exists()
    with folder:
        pass
    assert not path.exists()
