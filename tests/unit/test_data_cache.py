"""Tokenise once: the run's data cache is built by one pass, reused by the next run, rebuilt when
an input changes, memory-mapped when read, and never left half-written."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st
from omegaconf import OmegaConf

from flora_train.config import load_recipe
from flora_train.data import DataError, SyntheticTask
from flora_train.data import cache
from flora_train.data.examples import IGNORE, TokenizedExamples
from flora_train.train import data_setup


def _cfg(tmp_path, model_dir, *extra):
    train, evalp = SyntheticTask(num_users=6, train_examples_per_user=4, eval_examples_per_user=2).write(tmp_path / "data")
    return load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"base.name_or_path={model_dir}", f"data.train_path={train}",
                              f"data.eval_path={evalp}", "tracking.enabled=false", *extra])


def test_second_run_reuses_the_cache_and_a_changed_file_rebuilds_it(tmp_path, tiny_llama_dir, monkeypatch):
    cfg = _cfg(tmp_path, tiny_llama_dir)
    first = data_setup.prepare_data(cfg)
    assert len(first.train) == 24 and len(first.eval) == 12
    calls = []
    real = data_setup.tokenize_examples
    monkeypatch.setattr(data_setup, "tokenize_examples", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = data_setup.prepare_data(cfg)
    assert calls == [] and again.cache_dir == first.cache_dir, "same inputs: nothing tokenised again"
    assert again.train.fingerprint() == first.train.fingerprint()

    train_path = tmp_path / "data" / "train.jsonl"
    lines = train_path.read_text().splitlines()
    train_path.write_text("\n".join(lines[:-1]) + "\n")  # one example fewer
    changed = data_setup.prepare_data(cfg)
    assert calls, "a changed file is tokenised again"
    assert changed.cache_dir != first.cache_dir and len(changed.train) == 23
    assert not first.cache_dir.exists(), "the superseded cache is removed"
    # A recipe key the tokens depend on changes the key too.
    shorter = data_setup.prepare_data(OmegaConf.merge(cfg, {"data": {"max_length": 24, "on_bad_row": "skip"}}))
    assert shorter.cache_dir != changed.cache_dir


def test_the_cache_is_memory_mapped_not_read_into_memory(tmp_path, tiny_llama_dir):
    task = SyntheticTask(num_users=2000, train_examples_per_user=20, eval_examples_per_user=0)
    train, _ = task.write(tmp_path / "data")
    cfg = load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"base.name_or_path={tiny_llama_dir}", f"data.train_path={train}",
                             "tracking.enabled=false", "data.eval_examples_per_user=0"])
    folder = data_setup.prepare_data(cfg).cache_dir
    before = pa.total_allocated_bytes()
    examples = cache.load(folder)[0]["train"]
    token_bytes = int(examples.lengths().sum()) * 4 * 2  # input_ids and labels, int32
    assert token_bytes > 2_000_000
    grown = pa.total_allocated_bytes() - before
    # Arrow's allocator holds what is read into memory; mapped pages are not allocations.
    assert grown < token_bytes / 20, f"{grown} bytes allocated for {token_bytes} bytes of tokens"
    assert examples.input_ids(12345).base is not None, "an example is a view of the mapped buffer, not a copy"


def test_a_half_written_cache_is_not_used(tmp_path, tiny_llama_dir):
    cfg = _cfg(tmp_path, tiny_llama_dir)
    folder = data_setup.prepare_data(cfg).cache_dir
    (folder / "meta.json").unlink()  # as if killed before the last write
    assert not cache.is_complete(folder)
    again = data_setup.prepare_data(cfg)
    assert again.cache_dir == folder and cache.is_complete(folder) and len(again.train) == 24


@pytest.mark.parametrize("torn", ["meta.json", "train/data-00000-of-00001.arrow", "eval/state.json"])
def test_a_torn_cache_is_tokenised_again_and_users_still_lists(tmp_path, tiny_llama_dir, torn, capsys):
    """A complete cache whose files a disk fault or a cut copy tore: the data is tokenised again,
    said once, and `flora-train users` lists the run without token counts. Before, every command
    that reads the run ended in json's or pyarrow's traceback."""
    from flora_train.lifecycle import _tokens
    from flora_train.run_dir import RunDir

    cfg = _cfg(tmp_path, tiny_llama_dir)
    first = data_setup.prepare_data(cfg)
    good = first.train.fingerprint()
    (first.cache_dir / torn).write_bytes(b"torn")
    assert _tokens(RunDir(tmp_path / "run")) == {}
    assert f"{first.cache_dir}: the tokenised data cannot be read" in capsys.readouterr().err
    again = data_setup.prepare_data(cfg)
    assert "tokenising the data again" in capsys.readouterr().err
    assert again.cache_dir == first.cache_dir and again.train.fingerprint() == good and len(again.eval) == 12
    assert sum(_tokens(RunDir(tmp_path / "run")).values()) == int(again.train.target_counts().sum())


def test_a_data_error_on_rank_0_names_the_file_and_writes_no_cache(tmp_path, tiny_llama_dir):
    cfg = _cfg(tmp_path, tiny_llama_dir)
    with (tmp_path / "data" / "train.jsonl").open("a") as f:
        f.write('{"user_id": 7, "prompt": "p", "completion": " c"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:25: user id column 'user_id' must be a string"):
        data_setup.prepare_data(cfg)
    caches = tmp_path / "run" / "data_cache"
    assert not caches.exists() or not any(cache.is_complete(p) for p in caches.iterdir())


def test_bad_row_counts_travel_with_the_cache(tmp_path, tiny_llama_dir):
    cfg = _cfg(tmp_path, tiny_llama_dir, "data.on_bad_row=skip")
    with (tmp_path / "data" / "train.jsonl").open("a") as f:
        f.write("not json\n")
    first = data_setup.prepare_data(cfg)
    again = data_setup.prepare_data(cfg)
    assert first.bad_rows.counts == again.bad_rows.counts == {"malformed": 1}
    assert "train.jsonl:25" in again.bad_rows.examples[0]


rows = st.lists(st.tuples(st.sampled_from(["a", "b", "c", "zz"]),
                          st.lists(st.integers(0, 500), min_size=1, max_size=9),
                          st.lists(st.booleans(), min_size=9, max_size=9)), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None)
@given(rows, st.integers(1, 7))
def test_examples_read_the_same_from_any_chunking_and_view(data, chunk):
    plain = [{"user_id": u, "input_ids": ids, "labels": [t if keep else IGNORE for t, keep in zip(ids, mask)]}
             for u, ids, mask in data]
    whole = TokenizedExamples.from_rows(plain)
    chunked = TokenizedExamples(pa.Table.from_batches(whole.table.to_batches(max_chunksize=chunk)))
    for ex in (whole, chunked):
        for i, r in enumerate(plain):
            assert ex.user(i) == r["user_id"]
            assert ex.input_ids(i).tolist() == r["input_ids"] and ex.labels(i).tolist() == r["labels"]
        assert ex.target_counts().tolist() == [sum(t != IGNORE for t in r["labels"][1:]) for r in plain]
        assert {u: v.tolist() for u, v in ex.by_user().items()} == \
            {u: [i for i, r in enumerate(plain) if r["user_id"] == u] for u in {r["user_id"] for r in plain}}
    assert chunked.fingerprint() == whole.fingerprint() == whole.select(range(len(plain))).fingerprint()
    picked = [i for i in range(len(plain)) if i % 2 == 0]
    view = chunked.select(picked)
    assert [view.user(k) for k in range(len(view))] == [plain[i]["user_id"] for i in picked]
    assert view.fingerprint() == TokenizedExamples.from_rows([plain[i] for i in picked]).fingerprint()
    if len(plain) > 1:
        changed = [dict(r) for r in plain]
        changed[-1] = {**changed[-1], "input_ids": changed[-1]["input_ids"] + [1], "labels": changed[-1]["labels"] + [1]}
        assert TokenizedExamples.from_rows(changed).fingerprint() != whole.fingerprint()


def test_concat_joins_a_cached_table_and_rows_made_in_memory(tmp_path, tiny_llama_dir):
    cfg = _cfg(tmp_path, tiny_llama_dir)
    train = data_setup.prepare_data(cfg).train
    extra = TokenizedExamples.from_rows([{"user_id": "__general__", "input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}])
    both = train.concat(extra)
    assert len(both) == len(train) + 1 and both.input_ids(len(train)).tolist() == [5, 6, 7]
    assert both.input_ids(3).tolist() == train.input_ids(3).tolist() and both.user(len(train)) == "__general__"
