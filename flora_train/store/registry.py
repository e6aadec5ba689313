"""User registry: arbitrary string user ids to dense row numbers, in order of arrival."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from flora_train.errors import UserError


def user_key(user_id: str) -> int:
    """A user's 63-bit key: what a rank sends an owner to ask for the user's row (an int64 on the
    wire; the owner resolves it to its own row, so no rank assumes where another keeps a row)."""
    digest = hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class UserKeyCollision(UserError, ValueError):
    """Two users of one shard share a 63-bit key (about one chance in 10^7 for 10^6 users a shard)."""


class UserRegistry:
    def __init__(self, user_ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._key_rows: dict[int, int] | None = None  # built on first use (only owners serving fetches need it)
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
        if self._key_rows is not None:
            self._index_keys(new)
        return new

    def _index_keys(self, user_ids: Iterable[str]) -> None:
        assert self._key_rows is not None
        for uid in user_ids:
            key, row = user_key(uid), self._rows[uid]
            other = self._key_rows.setdefault(key, row)
            if other != row:
                raise UserKeyCollision(f"users {self._ids[other]!r} and {uid!r} have the same 63-bit key, which fetch "
                                       "placement uses to ask for a row: rename one of them (or use store.placement=owner)")

    @property
    def keys_indexed(self) -> bool:
        return self._key_rows is not None

    def index_keys(self) -> None:
        """Indexes every user's key now, and each user added from now on as it is added, so a key
        shared by two users is found when they are registered, not in the middle of a step."""
        if self._key_rows is None:
            self._key_rows = {}
            self._index_keys(self._ids)

    def rows_for_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """The rows of the users with these keys (``user_key``), as an owner resolves a request."""
        self.index_keys()
        index = self._key_rows
        assert index is not None
        try:
            return torch.tensor([index[k] for k in keys.tolist()], dtype=torch.int64)
        except KeyError as exc:
            raise KeyError(f"asked for the row of a user this shard does not hold (key {exc.args[0]})") from None

    def row(self, user_id: str) -> int:
        try:
            return self._rows[user_id]
        except KeyError:
            raise KeyError(f"unknown user {user_id!r}") from None

    def rows(self, user_ids: Iterable[str]) -> list[int]:
        return [self.row(u) for u in user_ids]

    def user(self, row: int) -> str:
        return self._ids[row]
