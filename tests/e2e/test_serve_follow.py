"""`flora-train serve --follow`: a resumed run's new checkpoints are served while clients keep asking."""

import shutil
import threading
import time

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from flora_train.config import load_recipe
from flora_train.inference import load_trained
from flora_train.train.run import run_training
from tests.e2e.serving import USERS, chat_model, run_args, start_server, stop_server, train_run  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_follow_serves_each_new_checkpoint_without_a_failed_request(tmp_path, chat_model):
    """A resumed run writes new checkpoints while clients keep asking: answers switch to the new
    adapters (scores equal the new checkpoint's), no request fails, and a corrupt newer checkpoint
    is named in a warning and passed over."""
    from flora_train.run_dir.checkpoints import latest_checkpoint

    run_dir = train_run(tmp_path, chat_model, "train.max_steps=2")
    first = latest_checkpoint(run_dir)
    proc, url = start_server(run_dir, "--follow", "0.2")
    user, prompt = "user-000007", "quick : favourite city ? my city"
    score = lambda: requests.post(f"{url}/v1/completions", json={  # noqa: E731
        "model": f"flora:{user}", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}, timeout=60)
    statuses, stop = [], threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            statuses.append(score().status_code)

    try:
        before = score().json()["choices"][0]["logprobs"]["token_logprobs"]
        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            run_training(load_recipe(None, run_args(tmp_path, chat_model, "train.checkpoint_every_steps=1")), resume=True)
            newest = latest_checkpoint(run_dir)
            assert newest != first
            deadline = time.monotonic() + 30
            while requests.get(f"{url}/health", timeout=5).json()["checkpoint"] != str(newest) and time.monotonic() < deadline:
                time.sleep(0.1)
            health = requests.get(f"{url}/health", timeout=5).json()
            assert health["checkpoint"] == str(newest) and health["adapters_version"] >= 1, health
            broken = newest.parent / "step-99999999"
            shutil.copytree(newest, broken)
            next(p for p in broken.rglob("*.safetensors")).write_bytes(b"torn")
            time.sleep(1.0)
            assert requests.get(f"{url}/health", timeout=5).json()["checkpoint"] == str(newest)
        finally:
            stop.set()
            asker.join()
        after = score().json()["choices"][0]["logprobs"]["token_logprobs"]
        shutil.rmtree(broken)
        fresh = load_trained(run_dir, device="cpu")
        ids = torch.tensor([fresh.tokenizer(prompt)["input_ids"]])
        rows, index, _ = fresh.batch_rows([user])
        with torch.no_grad(), fresh.slot.activate(rows, index):
            logits = fresh.model(input_ids=ids).logits[0, :-1].float()
        want = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
        # The run trained again from scratch on another base (train.overwrite), to checkpoints of
        # the same names: the server does not follow it (before, it served the new run's rows on the
        # old base) and goes on serving its run, read where the overwrite moved it.
        other = tmp_path / "other_base"
        shutil.copytree(chat_model, other)
        weights = next(other.glob("*.safetensors"))
        tensors = load_file(str(weights))
        tensors = {k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, str(weights), metadata={"format": "pt"})
        run_training(load_recipe(None, run_args(tmp_path, other, "train.overwrite=true",
                                                "train.checkpoint_every_steps=1", "store.optimizer.lr=0.2")))
        time.sleep(1.0)
        assert score().json()["choices"][0]["logprobs"]["token_logprobs"] == after
        unread = requests.post(f"{url}/v1/completions", json={"model": "flora:user-000003", "prompt": prompt,
                                                               "max_tokens": 2}, timeout=60)
        health = requests.get(f"{url}/health", timeout=5).json()
        assert unread.status_code == 200 and health["adapters_version"] >= 1
        # It names where it reads the rows: the run moved aside (it named the path the new run took).
        assert health["checkpoint"].startswith(str(run_dir / "replaced")), health
    finally:
        err = stop_server(proc)
    assert "it was trained on another base than the served one (another run: train.overwrite" in err, err[-2000:]
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert torch.allclose(torch.tensor(after[1:]), want, atol=1e-4)
    assert (torch.tensor(before[1:]) - want).abs().max() > 1e-3, "the new checkpoint scores differently"
    assert "step-99999999 does not verify" in err, err[-2000:]


def test_a_forget_reaches_a_running_server(tmp_path, chat_model):
    """`flora-train forget` while servers (no --follow) serve the run and its packed export: from the
    next request on, the forgotten user, whose row each server had cached, gets the base, and a user
    never asked before is served its own row. Before: the forgotten user kept its adapter until a
    restart, and users not yet cached got a 500 (the run's server: 'rows has 31 rows for 32 users',
    the shard rewritten under the index read at start; the export's: its old pack file deleted)."""
    from flora_train.export import export_adapters
    from flora_train.lifecycle import forget_users

    run_dir = train_run(tmp_path, chat_model, "train.max_steps=2")
    export_adapters(run_dir, "packed", None, run_dir / "export" / "packed", pack_size=8)
    servers = [start_server(run_dir)]
    gone, fresh_user, prompt = "user-000003", "user-000001", "quick : favourite city ? my city"

    def ask(url: str, user: str | None) -> requests.Response:
        body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0, **({"model": f"flora:{user}"} if user else {})}
        return requests.post(f"{url}/v1/completions", json=body, timeout=60)

    adapter = lambda url, user: requests.get(f"{url}/v1/models/flora:{user}", timeout=5).json()["adapter"]  # noqa: E731
    logprobs = lambda reply: reply.json()["choices"][0]["logprobs"]["token_logprobs"]  # noqa: E731
    errs, replies = [], []
    try:  # (the second server starts inside: a failed start still stops the first)
        servers.append(start_server(run_dir / "export" / "packed"))
        for _, url in servers:
            own, base = logprobs(ask(url, gone)), logprobs(ask(url, None))  # its row is now in the device cache
            assert own != base and adapter(url, gone) == "user"
        forget_users(run_dir, [gone])
        for _, url in servers:
            replies.append(ask(url, fresh_user))  # same shard / pack as the forgotten user
            assert replies[-1].status_code == 200, replies[-1].text
            assert adapter(url, gone) == "base" and requests.get(f"{url}/health", timeout=5).json()["users"] == USERS - 1
            assert logprobs(ask(url, gone)) == base  # not its cached row
    finally:
        errs = [stop_server(proc) for proc, _ in servers]
    assert f"was written again on disk: 1 user(s) no longer in it get the base from now on ({USERS - 1} users)" in errs[0], errs[0][-2000:]
    fresh = load_trained(run_dir, device="cpu")
    ids = torch.tensor([fresh.tokenizer(prompt)["input_ids"]])
    rows, index, _ = fresh.batch_rows([fresh_user])
    with torch.no_grad(), fresh.slot.activate(rows, index):
        want = torch.log_softmax(fresh.model(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None]).squeeze(1)
    for reply in replies:
        assert torch.allclose(torch.tensor(logprobs(reply)[1:]), want, atol=1e-4)
