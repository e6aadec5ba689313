"""The store's shard files in a folder (one ``store-RRRRR-of-WWWWW.safetensors`` and user list
``users-RRRRR-of-WWWWW.json`` per rank that saved it), and users' rows out of a chain of such
folders (oldest first, each user's newest copy winning) by safetensors slices. Writing is
``ShardedAdapterStore``'s; which folders make a chain is the run directory's (``run_dir``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from flora_train.store.selection import BEST_LOSS, BEST_STEP, KEPT, SEEN, STOPPED_AT, served_rows
from flora_train.store.sharding import ShardError


def shard_file(rank: int, world: int, kind: str) -> str:
    ext = "safetensors" if kind == "store" else "json"
    return f"{kind}-{rank:05d}-of-{world:05d}.{ext}"


def users_file(store_shard: Path) -> Path:
    """The user list beside a store shard."""
    rank, world = (int(x) for x in store_shard.stem.split("-", 1)[1].split("-of-"))
    return store_shard.with_name(shard_file(rank, world, "users"))


def iter_shards(directory: Path):
    """``(shard path, its user ids)`` for every store shard in ``directory``; a missing shard, a
    shard without its user list or a user held by two shards is an error naming them."""
    shards = sorted(directory.glob("store-*-of-*.safetensors"))
    if not shards:
        raise ShardError(f"{directory}: no store shards (store-NNNNN-of-NNNNN.safetensors)")
    world = int(shards[0].stem.split("-of-")[1])
    expected = {shard_file(r, world, "store") for r in range(world)}
    names = {p.name for p in shards}
    if names != expected:
        gone = sorted(expected - names) or sorted(names - expected)
        raise ShardError(f"{directory}: the store shards do not form one set of {world} (check {gone[0]})")
    seen: dict[str, str] = {}
    for path in shards:
        users_path = users_file(path)
        try:
            users = json.loads(users_path.read_text())["user_ids"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShardError(f"{users_path}: missing or corrupt user list of shard {path.name} ({exc})") from None
        for u in users:
            if u in seen:
                raise ShardError(f"{directory}: user {u!r} is in two shards ({seen[u]} and {path.name})")
            seen[u] = path.name
        yield path, users


def newest_copies(chain: list[Path], wanted: set[str] | None) -> dict[Path, tuple[list[str], list[int]]]:
    """Per shard of a chain: its user list, and the indices of the ``wanted`` users (all when None)
    whose newest copy it holds. Only user lists are read."""
    latest: dict[str, tuple[Path, int]] = {}
    users_of: dict[Path, list[str]] = {}
    for member in chain:
        for path, users in iter_shards(member):
            users_of[path] = users
            for i, u in enumerate(users):
                if wanted is None or u in wanted:
                    latest[u] = (path, i)
    return {path: (users, [i for i, u in enumerate(users) if u in latest and latest[u][0] == path])
            for path, users in users_of.items()}


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as half-open runs ``[a, b)``."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def saved_user_ids(chain: list[Path]) -> list[str]:
    """Every user saved in a chain (from the user lists alone: no tensor is read)."""
    seen: dict[str, None] = {}
    for member in chain:
        for _, users in iter_shards(member):
            seen.update(dict.fromkeys(users))
    return list(seen)


def shard_rank(path: Path) -> int:
    """The rank that saved a ``store-RRRRR-of-WWWWW.safetensors`` shard."""
    return int(path.stem.split("-")[1])


def shard_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def saved_steps(chain: list[Path]) -> dict[str, int]:
    """Every saved user's optimizer step counter (its newest copy), reading only that column."""
    steps: dict[str, int] = {}
    for _, users, tensors in iter_copies(newest_copies(chain, None), 1 << 20, ("optim.step",)):
        steps.update(zip(users, tensors["optim.step"].tolist()))
    return steps


def without_users(path: Path, users: list[str], forget: set[str]) -> int:
    """Rewrites store shard ``path`` (whose user list is ``users``) and its user list without the
    ``forget`` users, as new files (no old page survives in them); returns how many it removed."""
    return len(users) - keep_users(path, users, {u: u for u in users if u not in forget})


def keep_users(path: Path, users: list[str], keep: dict[str, str]) -> int:
    """Rewrites store shard ``path`` (user list ``users``) with only the users in ``keep``, each under
    its new name ``keep[user]``, as new files; returns how many it kept (nothing is written when
    every user stays under its own name)."""
    from flora_train.store.shard_writer import save_rows

    take = [i for i, u in enumerate(users) if u in keep]
    if len(take) == len(users) and all(keep[u] == u for u in users):
        return len(take)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k)[take].contiguous() for k in f.keys()}
    meta["users"] = str(len(take))
    path.unlink()
    save_rows(tensors, path, dict(sorted(meta.items())))  # the same bytes from the same rows (the header in order)
    listing = users_file(path)
    listing.unlink()
    listing.write_text(json.dumps({"user_ids": [keep[users[i]] for i in take]}, ensure_ascii=False))
    return len(take)


def iter_copies(copies: dict[Path, tuple[list[str], list[int]]], chunk: int, keys: tuple[str, ...] | None = None):
    """``(path, user ids, {key: tensor})`` of ``newest_copies`` (every key, or ``keys``), at most
    ``chunk`` users at a time, reading only their rows (contiguous runs as slices)."""
    for path, (users, take) in copies.items():
        with safe_open(str(path), framework="pt") as f:
            for key in keys or f.keys():
                rows = f.get_slice(key).get_shape()[0]
                if rows != len(users):
                    raise ShardError(f"{path}: {key} has {rows} rows for {len(users)} users")
            for k in range(0, len(take), chunk):
                some = take[k : k + chunk]
                runs = _runs(some)
                yield path, [users[i] for i in some], {key: torch.cat([f.get_slice(key)[a:b] for a, b in runs])
                                                       for key in keys or f.keys()}


def iter_saved_rows_of(path: Path, users: list[str], take: list[int], chunk: int = 1024):
    """``(user ids, rows)`` of the users at sorted indices ``take`` of one shard (whose user list is
    ``users``): the rows they are served with, read by slices."""
    keys = ("rows", KEPT, SEEN) if KEPT in shard_shapes(path) else ("rows",)
    for _, ids, tensors in iter_copies({path: (users, take)}, chunk, keys):
        yield ids, tensors["rows"] if len(keys) == 1 else served_rows(tensors["rows"], tensors[KEPT], tensors[SEEN])


def iter_saved_rows(chain: list[Path], wanted: set[str] | None = None, chunk: int = 1024, part: tuple[int, int] = (0, 1)):
    """``(user ids, rows [n, row_size])`` of the ``wanted`` users (all when None), at most ``chunk``
    users at a time, shard by shard, reading only their rows: memory stays bounded by ``chunk``
    rows however many users the checkpoint holds. ``part=(k, n)``: only the users whose newest copy
    is in a shard saved by a rank ``r`` with ``r % n == k`` (``n`` processes split the work)."""
    mine, parts = part
    copies = {path: held for path, held in newest_copies(chain, wanted).items()
              if shard_rank(path) % parts == mine}
    for path, (users, take) in copies.items():
        # The row each user is served with: its kept row where a validation chose one.
        yield from iter_saved_rows_of(path, users, take, chunk)


def saved_selection(chain: list[Path]) -> dict[str, dict[str, float]]:
    """Per user of a chain saved with ``train.select``/``train.patience``: the step it stopped after
    (or None) and, under ``train.select: best``, the step its kept row is from and that row's
    validation loss; empty for other runs."""
    out: dict[str, dict[str, float]] = {}
    copies = newest_copies(chain, None)
    for path, held in copies.items():
        shapes = shard_shapes(path)
        if SEEN not in shapes:
            continue
        keeps = KEPT in shapes
        for _, users, t in iter_copies({path: held}, 1 << 20, (BEST_STEP, BEST_LOSS, SEEN, STOPPED_AT)):
            for i, u in enumerate(users):
                if int(t[SEEN][i]):
                    kept = ({"kept_step": int(t[BEST_STEP][i]), "validation_loss": float(t[BEST_LOSS][i])}
                            if keeps else {})
                    out[u] = {**kept, "stopped_after": int(t[STOPPED_AT][i]) - 1 if int(t[STOPPED_AT][i]) else None}
    return out


def read_saved_rows(chain: list[Path]) -> tuple[list[str], torch.Tensor]:
    """Every saved user's id and adapter row ``[users, row_size]``, across all shards of a chain."""
    ids: list[str] = []
    rows: list[torch.Tensor] = []
    for users, part in iter_saved_rows(chain, chunk=1 << 30):
        ids.extend(users)
        rows.append(part)
    return ids, torch.cat(rows)
