"""User registry: arbitrary string user ids to dense row numbers, in order of arrival."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


class UserRegistry:
    def __init__(self, user_ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        self.add(user_ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._rows

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def add(self, user_ids: Iterable[str]) -> list[str]:
        """Registers unknown ids (in the order given) and returns the ones that were new."""
        new = []
        for uid in user_ids:
            if not isinstance(uid, str) or uid == "":
                raise ValueError(f"user ids must be non-empty strings, got {uid!r}")
            if uid not in self._rows:
                self._rows[uid] = len(self._ids)
                self._ids.append(uid)
                new.append(uid)
        return new

    def row(self, user_id: str) -> int:
        try:
            return self._rows[user_id]
        except KeyError:
            raise KeyError(f"unknown user {user_id!r}") from None

    def rows(self, user_ids: Iterable[str]) -> list[int]:
        return [self.row(u) for u in user_ids]

    def user(self, row: int) -> str:
        return self._ids[row]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"user_ids": self._ids}, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> "UserRegistry":
        data = json.loads(path.read_text())
        ids = data.get("user_ids") if isinstance(data, dict) else None
        if not isinstance(ids, list):
            raise ValueError(f"{path}: not a user registry (no 'user_ids' list)")
        registry = cls(ids)
        if len(registry) != len(ids):
            raise ValueError(f"{path}: duplicate user ids in the registry")
        return registry
