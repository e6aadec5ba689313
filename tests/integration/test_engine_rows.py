"""Where the serving engine's adapter rows come from: rows read ahead are the rows read and the cache
stays bounded; packed and folder exports serve the run's rows; the cache goes by the model's name;
users a refresh of the source removes (a forget) are never served a row cached or read ahead before
it, nor while a forget is under way."""

import random
import threading
import time

import pytest
import torch

from flora_train.adapters import user_seed
from flora_train.inference import GenerationSettings, generate_batch, load_trained
from flora_train.inference.adapter_cache import AdapterCache
from flora_train.inference.engine import Done, Engine, Failed
from flora_train.inference.rows import TensorRows
from tests.integration.engine_helpers import PROMPT, Answer, submit, trained, wait_idle  # noqa: F401 (a fixture)


def test_prefetched_rows_are_the_rows_read_and_the_cache_stays_bounded(trained, monkeypatch):
    """Rows read ahead for queued users are the rows the source gives; users never trained and the
    base are not read ahead (their rows are made, not read); the LRU evicts only unpinned rows. The
    reading thread ends its OpenMP team after each read (``cpu_threads.py``): only the engine's stays."""
    import threading

    from flora_train.inference import adapter_cache
    from flora_train.inference.adapter_cache import CacheFull

    released = []
    monkeypatch.setattr(adapter_cache, "release_thread_team", lambda: released.append(threading.current_thread().name))
    cache = AdapterCache(trained.rows, trained.layout, trained.source.init_seed, 3, trained.device)
    cache.prefetch(["user-000001", "user-000002", None, "never-trained"])
    deadline = time.monotonic() + 10
    while cache.stats().staged < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.stats().staged == 2
    assert released and all(name.startswith("flora-prefetch") for name in released), released
    slots = cache.acquire_many(["user-000001", "user-000002", "user-000001"])
    assert slots[0] == slots[2] and cache.stats().prefetched == 2 and cache.stats().misses == 2
    for user, slot in zip(["user-000001", "user-000002"], slots):
        assert torch.equal(cache.table[slot], trained.row(user))
    base = cache.acquire(None)
    with pytest.raises(CacheFull):  # three rows, all pinned
        cache.acquire("user-000003")
    cache.release(slots[1])
    cache.acquire("user-000003")  # user-000002's row was the only unpinned one
    assert cache.stats().evictions == 1 and cache.stats().resident == 3
    from flora_train.adapters import user_seed

    untrained = trained.layout.init_rows(torch.tensor([user_seed(trained.source.init_seed, "")]))[0]
    assert torch.equal(cache.table[base], untrained)  # the base model: an untrained row, the identity


def test_packed_and_flora_exports_serve_the_runs_rows_read_by_user(trained, tmp_path, caplog):
    """Serving reads a user's row from where it was saved: a packed export (slices of its pack
    files) and a flora export (the user's folder) give the run's rows, and the same text. An index
    or manifest torn (a disk fault) is named: at load, an error; beside a server, it goes on with
    the index it read (before: json's traceback in both)."""
    from flora_train.export import export_adapters
    from flora_train.inference.trained import InferenceError

    run_dir = trained.source.checkpoint.parent.parent
    users = trained.users[:3]
    (alone,), _ = generate_batch(trained, [PROMPT], [users[1]], GenerationSettings(max_new_tokens=5))
    for fmt in ("packed", "flora"):
        export_adapters(run_dir, fmt, None, tmp_path / fmt)
        served = load_trained(tmp_path / fmt, device="cpu")
        assert set(served.users) == set(trained.users), fmt
        for user in users:
            assert torch.equal(served.row(user), trained.row(user)), (fmt, user)
        (text,), _ = generate_batch(served, [PROMPT], [users[1]], GenerationSettings(max_new_tokens=5))
        assert text.text == alone.text, fmt
        (tmp_path / fmt / "index.json").write_text('{"user-0')
        with caplog.at_level("WARNING", logger="flora_train"):
            assert not served.rows.refresh() and set(served.users) == set(trained.users)
        assert f"{tmp_path / fmt / 'index.json'}: cannot be read; its users are served as they were" in caplog.text
        assert torch.equal(served.row(users[2]), trained.row(users[2]))
        for name in ("index.json", "manifest.json"):
            (tmp_path / fmt / name).write_text("{")
            with pytest.raises(InferenceError, match=rf"{fmt}/{name}: cannot be read \(torn, or not an export's\)"):
                load_trained(tmp_path / fmt, device="cpu")


def test_the_cache_goes_by_the_name_the_models_forward_takes(trained):
    """transformers 5.25 renamed forward's past_key_values to cache: passing the old name made
    `flora-train serve` warn on its first request on the newest transformers (and it goes in 5.40)."""
    import inspect

    from flora_train.inference.kv_cache import cache_keyword

    class Renamed(torch.nn.Module):  # a forward as transformers >= 5.25 declares it
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return input_ids

    assert cache_keyword(Renamed()) == "cache"
    assert cache_keyword(trained.model) in inspect.signature(trained.model.forward).parameters


def test_users_a_refresh_removes_under_a_storm_are_never_served_their_old_rows(trained):
    """The source is indexed again while threads submit (`flora-train forget` rewrote the checkpoint;
    the HTTP threads and the engine's both refresh it): no request fails on a row that vanished
    between a membership test and its read, no pin leaks, and afterwards every removed user gets
    its untrained row from the cache, never the row cached or read ahead before."""
    users = trained.users[:10]

    class Shrinking(TensorRows):
        def __init__(self) -> None:
            super().__init__(users, trained.rows.read(users))
            self._pending: set[str] = set()
            self._lock = threading.Lock()

        def forget(self, user: str) -> None:
            with self._lock:
                self._pending.add(user)

        def refresh(self) -> bool:
            with self._lock:
                if not self._pending:
                    return False
                self._index = {u: i for u, i in self._index.items() if u not in self._pending}
                self._pending.clear()
                self.generation += 1
                return True

    source = Shrinking()
    cache = AdapterCache(source, trained.layout, trained.source.init_seed, 4, trained.device)
    engine = Engine(trained.model, trained.slot, trained.tokenizer, cache, max_batch=4, prefill_tokens=32)
    answers: list[Answer] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            _, answer = submit(engine, trained, rng.choice(users), GenerationSettings(max_new_tokens=rng.randint(1, 4)))
            with lock:
                answers.append(answer)
            time.sleep(rng.random() * 0.005)

    def remover() -> None:
        rng = random.Random(7)
        for user in users[:5]:
            time.sleep(rng.random() * 0.05)
            source.forget(user)
            if rng.random() < 0.5:
                source.refresh()  # as has_adapter does from an HTTP thread

    threads = [threading.Thread(target=client, args=(s,)) for s in range(3)] + [threading.Thread(target=remover)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_idle(engine, 120)
    engine.close()
    assert len(answers) == 36 and all(a.ended.is_set() for a in answers)
    assert all(sum(isinstance(e, (Done, Failed)) for e in a.events) == 1 and isinstance(a.events[-1], Done) for a in answers)
    assert cache.pinned() == 0 and cache.stats().evictions > 0
    seeds = torch.tensor([user_seed(trained.source.init_seed, u) for u in users[:5]], dtype=torch.int64)
    want = torch.cat([trained.layout.init_rows(seeds), trained.rows.read(users[5:])]).to(cache.table)
    for user, row in zip(users, want):
        slot = cache.acquire(user)
        assert torch.equal(cache.table[slot], row), user
        cache.release(slot)
    # Then, one at a time: a user cached, and one read ahead, are removed; neither row is handed out again.
    cache.release(cache.acquire(users[5]))
    cache.prefetch([users[6]])
    deadline = time.monotonic() + 10
    while cache.stats().staged < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.stats().staged == 1
    source.forget(users[5])
    source.forget(users[6])
    seeds = torch.tensor([user_seed(trained.source.init_seed, u) for u in users[5:7]], dtype=torch.int64)
    for user, row in zip(users[5:7], trained.layout.init_rows(seeds).to(cache.table)):
        slot = cache.acquire(user)
        assert torch.equal(cache.table[slot], row), f"{user}: its row from before the refresh"
        cache.release(slot)


def test_the_users_of_a_forget_under_way_are_served_the_base_from_its_first_write(trained, tmp_path):
    """`forget` writes its journal (forget-pending.json) before anything else, then rewrites the
    checkpoints one by one. A server went on serving the users from a checkpoint not yet rewritten,
    and for good when the forget was killed before it (its journal stays). Now the journal alone
    takes them out of the served rows; cached rows are dropped at the next admission."""
    import json
    import shutil

    from flora_train.inference.rows import CheckpointRows
    from flora_train.run_dir.checkpoints import checkpoint_chain

    run = tmp_path / "run"
    shutil.copytree(trained.source.checkpoint.parent.parent, run)  # the module's run stays as it is
    rows = CheckpointRows(checkpoint_chain(run / "checkpoints" / trained.source.checkpoint.name))
    gone, kept = "user-000002", "user-000005"
    cache = AdapterCache(rows, trained.layout, trained.source.init_seed, 4, trained.device)
    slots = cache.acquire_many([gone, kept])
    assert torch.equal(cache.table[slots[0]], trained.row(gone))
    for slot in slots:
        cache.release(slot)
    (run / "forget-pending.json").write_text(json.dumps({"users": [gone, "someone-else"]}))
    base, again = cache.acquire_many([gone, kept])
    untrained = trained.layout.init_rows(torch.tensor([user_seed(trained.source.init_seed, gone)]))[0]
    assert gone not in rows and torch.equal(cache.table[base], untrained)
    assert kept in rows and torch.equal(cache.table[again], trained.row(kept)) and rows.read_held([gone]) == {}
    # A journal torn by a disk fault does not say whom: no user is served from the run meanwhile.
    (run / "forget-pending.json").write_text('{"users": ["user-0000')
    assert rows.refresh() and gone not in rows and kept not in rows
    (run / "forget-pending.json").unlink()  # (a completed forget also rewrote the checkpoint without it)
    assert rows.refresh() and gone in rows and kept in rows
