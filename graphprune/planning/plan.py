"""Plans: what to remove, as data (JSON in and out, replayable on the same model)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphprune.errors import UsageError

PLAN_VERSION = 1


@dataclass
class GroupPlan:
    """Remove units ``remove`` (of ``size``) from the group named by ``anchor``."""

    group: int
    anchor: str
    size: int
    remove: list[int]
    #: parameter tensor -> axis -> removed indices (for mapping back to framework params)
    channels: dict[str, dict[str, list[int]]] = field(default_factory=dict)


@dataclass
class Plan:
    groups: list[GroupPlan] = field(default_factory=list)
    erase: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def units_removed(self) -> int:
        return sum(len(g.remove) for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, **asdict(self)}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        from graphprune.io._atomic import atomic_write_text

        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            raise UsageError(f"not a graphprune plan (version {PLAN_VERSION} expected)")
        if not isinstance(data.get("groups"), list):
            raise UsageError("malformed plan: 'groups' must be a list of groups (a plan that removes nothing has [])")
        try:
            groups = [GroupPlan(**g) for g in data["groups"]]
        except TypeError as exc:
            raise UsageError(f"malformed plan: {exc}") from exc
        for k, g in enumerate(groups):
            _check_group(k, g)
        erase, meta = data.get("erase", []), data.get("meta", {})
        if not isinstance(erase, list) or not all(isinstance(n, str) for n in erase) or not isinstance(meta, dict):
            raise UsageError("malformed plan: 'erase' must be a list of node names and 'meta' an object")
        return cls(groups=groups, erase=list(erase), meta=dict(meta))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise UsageError(f"no such plan file: {path}") from exc
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read plan '{path}': {exc}") from exc
        return cls.from_dict(data)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_group(k: int, group: GroupPlan) -> None:
    """A group read from JSON holds what a saved plan holds: whole numbers where units are counted
    (a unit 1.5 was taken as unit 1, a string made the replay fail with an internal error)."""
    where = f"malformed plan: groups[{k}]"
    if not _whole(group.group) or not _whole(group.size) or not isinstance(group.anchor, str):
        raise UsageError(f"{where}: 'group' and 'size' must be whole numbers and 'anchor' a name")
    if not isinstance(group.remove, list) or not all(_whole(u) for u in group.remove):
        raise UsageError(f"{where}: 'remove' must be a list of unit indices (whole numbers), got {group.remove!r}"[:300])
    if not isinstance(group.channels, dict):
        raise UsageError(f"{where}: 'channels' must be an object")
