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
        try:
            groups = [GroupPlan(**g) for g in data.get("groups", [])]
        except TypeError as exc:
            raise UsageError(f"malformed plan: {exc}") from exc
        return cls(groups=groups, erase=list(data.get("erase", [])), meta=dict(data.get("meta", {})))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise UsageError(f"no such plan file: {path}") from exc
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read plan '{path}': {exc}") from exc
        return cls.from_dict(data)
