"""Mixed-user generation: a batch in which every prompt has its own user's adapter generates, token
for token and logit for logit, what each user's prompt generates alone (left padding, greedy and
beam search), for FLoRA, LoRA and IA3; a user never trained gets the base model."""

import logging
import threading
import warnings

import pytest
import torch

from flora_train.config import load_recipe
from flora_train.inference import GenerationSettings, generate, generate_batch, load_trained
from flora_train.inference.trained import InferenceError
from flora_train.train.run import run_training
from tests.distributed.helpers import small_recipe

PROMPTS = ["favourite colour of", "my city", "animal", "the fruit I like best is"]


@pytest.fixture(scope="module", params=["flora", "lora", "ia3"])
def trained(request, tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp(f"gen-{request.param}")
    lr = {"flora": 0.05, "lora": 0.01, "ia3": 0.05}[request.param]
    run_training(load_recipe(None, [*small_recipe(tmp, tiny_llama_dir), f"adapter.method={request.param}",
                                    f"store.optimizer.lr={lr}", f"run_dir={tmp / 'run'}", "eval.at_end=false"]))
    return load_trained(tmp / "run", device="cpu")


def _alone(trained, prompt, user, settings):
    (gen,), out = generate_batch(trained, [prompt], [user], settings, output_scores=True)
    return gen, torch.stack(out.scores, dim=1)[0]


@pytest.mark.parametrize("beams", [1, 3])
def test_mixed_batch_equals_each_user_alone(trained, beams):
    users = ["user-000001", "user-000007", "user-000001", "user-000011"]
    settings = GenerationSettings(max_new_tokens=8, num_beams=beams)
    mixed, out = generate_batch(trained, PROMPTS, users, settings, output_scores=True)
    scores = torch.stack(out.scores, dim=1)  # [batch * beams, steps, vocab]
    assert len({g.text for g in mixed}) > 1
    for k, (prompt, user) in enumerate(zip(PROMPTS, users)):
        alone, alone_scores = _alone(trained, prompt, user, settings)
        assert mixed[k].text == alone.text, (k, user)
        if beams == 1:
            steps = alone_scores.shape[0]
            torch.testing.assert_close(scores[k, :steps], alone_scores, rtol=1e-4, atol=1e-4)


def test_users_differ_and_unknown_users_get_the_base(trained, caplog):
    settings = GenerationSettings(max_new_tokens=6)
    prompt = PROMPTS[3]
    per_user = {u: generate_batch(trained, [prompt], [u], settings, output_scores=True)[1] for u in trained.users[:6]}
    logits = [torch.stack(o.scores, 1)[0, 0] for o in per_user.values()]
    assert any(not torch.allclose(logits[0], other) for other in logits[1:]), "users' adapters must differ"
    with caplog.at_level("WARNING", logger="flora_train"):
        results, stats = generate(trained, [prompt, prompt], ["never-trained", trained.users[0]], settings)
    assert stats.unknown_users == ["never-trained"] and "never-trained" in caplog.text
    assert not results[0].user_known and results[1].user_known
    with trained.slot.base_only(), torch.no_grad():
        enc = trained.tokenizer([prompt], return_tensors="pt")
        base = trained.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=trained.tokenizer.pad_token_id)
    ids = base[0, enc["input_ids"].shape[1]:].tolist()
    eos = trained.tokenizer.eos_token_id
    ids = ids[: ids.index(eos)] if eos in ids else ids
    assert results[0].text == trained.tokenizer.decode(ids, skip_special_tokens=True)
    # No new tokens is an empty completion each (transformers' generate raised ValueError for 0).
    empty, stats = generate(trained, [prompt, prompt], [trained.users[0], trained.users[1]], GenerationSettings(max_new_tokens=0))
    assert [(g.text, g.tokens) for g in empty] == [("", 0), ("", 0)] and stats.new_tokens == 0


def test_lora_generation_equals_peft_for_that_user(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flora_train.export import export_adapters

    run_dir = tmp_path / "run"
    run_training(load_recipe(None, [*small_recipe(tmp_path, tiny_llama_dir), "adapter.method=lora", "adapter.rank=4",
                                    "store.optimizer.lr=0.01", f"run_dir={run_dir}", "eval.at_end=false"]))
    trained = load_trained(run_dir, device="cpu")
    export_adapters(run_dir, "peft", ["user-000005"], tmp_path / "peft")
    folder = next(p for p in (tmp_path / "peft").iterdir() if p.is_dir())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained.source.model_path), str(folder)).eval()
    tok = trained.tokenizer
    settings = GenerationSettings(max_new_tokens=8)
    for prompt in PROMPTS:
        (ours,), _ = generate_batch(trained, [prompt], ["user-000005"], settings)
        enc = tok([prompt], return_tensors="pt")
        with torch.no_grad():
            theirs = peft_model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        ids = theirs[0, enc["input_ids"].shape[1]:].tolist()
        ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
        assert ours.text == tok.decode(ids, skip_special_tokens=True), prompt


def test_peft_and_flora_exports_serve_what_the_run_serves_shared_adapter_included(tmp_path, tiny_llama_dir, monkeypatch,
                                                                                    caplog):
    """``generate`` and ``serve`` read a ``--format peft`` export (they refused it): LoRA users on a
    LoRA shared adapter give the run's rows, shared row and text. An export folder edited or cut
    short is refused naming its file (a cut flora file ended in safetensors' traceback)."""
    import json

    from flora_train.export import ExportError, export_adapters

    run_dir = tmp_path / "run"
    run_training(load_recipe(None, [*small_recipe(tmp_path, tiny_llama_dir), "adapter.method=lora", "adapter.rank=4",
                                    "store.optimizer.lr=0.01", f"run_dir={run_dir}", "eval.at_end=false",
                                    "train.epochs=1",
                                    "adapter.shared.method=lora", "adapter.shared.rank=2", "adapter.shared.lr=0.01",
                                    "train.shared_steps=3"]))
    users = ["user-000002", "user-000007"]
    for fmt in ("peft", "flora"):
        export_adapters(run_dir, fmt, users, tmp_path / fmt)
    run, peft, flora = (load_trained(p, device="cpu") for p in (run_dir, tmp_path / "peft", tmp_path / "flora"))
    assert peft.slot.shared is not None and torch.equal(peft.slot.shared.row, run.slot.shared.row)
    assert run.slot.shared.row.abs().max() > 0 and all(torch.equal(peft.row(u), run.row(u)) for u in users)
    settings = GenerationSettings(max_new_tokens=3)
    scores = [torch.stack(generate_batch(t, PROMPTS[:2], users, settings, output_scores=True)[1].scores)
              for t in (run, peft)]
    with run.slot.without_shared():
        plain = torch.stack(generate_batch(run, PROMPTS[:2], users, settings, output_scores=True)[1].scores)
    assert torch.equal(scores[0], scores[1]) and not torch.allclose(plain, scores[0], atol=1e-4)

    def folder(export, user):
        return export / json.loads((export / "index.json").read_text())[user]

    config = folder(tmp_path / "peft", users[0]) / "adapter_config.json"
    edited = {**json.loads(config.read_text()), "lora_alpha": 8}
    config.write_text(json.dumps(edited))
    refusal = r"adapter_config\.json: lora_alpha is 8 where the export wrote 16.0; user 'user-000002'"
    with pytest.raises(ExportError, match=refusal):
        load_trained(tmp_path / "peft", device="cpu").row(users[0])
    for export, weights in ((tmp_path / "peft", "adapter_model"), (tmp_path / "flora", "flora_adapter")):
        (folder(export, users[1]) / f"{weights}.safetensors").write_bytes(b"cut")
        with pytest.raises(ExportError, match=rf"{weights}\.safetensors: not a readable safetensors file"):
            load_trained(export, device="cpu").row(users[1])
    # Served, that user's requests fail with the server's 500 (it was a 400, as if the request were
    # wrong), naming the user and not the server's files; the reason goes to the server's log.
    from fastapi.testclient import TestClient

    from flora_train.inference import server

    monkeypatch.setattr(server, "release_thread_team", lambda: None)  # (this process keeps its threads)
    with caplog.at_level(logging.WARNING, logger="flora_train"), TestClient(
            server.create_app(load_trained(tmp_path / "flora", device="cpu"))) as client:
        answers = [client.post("/v1/completions", json={"model": f"flora:{u}", "prompt": "hi", "max_tokens": 2})
                   for u in users]
    assert answers[0].status_code == 200, answers[0].text
    assert answers[1].status_code == 500 and answers[1].json()["error"]["message"] == (
        "the adapter of user 'user-000007' cannot be read on this server (its log says why)")
    assert "flora_adapter.safetensors: not a readable safetensors file" in caplog.text
    manifest = tmp_path / "peft" / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "layout"}))
    with pytest.raises(InferenceError, match="export the run again to serve it"):
        load_trained(tmp_path / "peft", device="cpu")


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_chat_prompts_and_the_chat_endpoint(tmp_path, tiny_llama_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from flora_train.inference.server import create_app

    run_training(load_recipe(None, [*small_recipe(tmp_path, tiny_llama_dir), f"run_dir={tmp_path / 'run'}", "eval.at_end=false"]))
    trained = load_trained(tmp_path / "run", device="cpu")
    settings = GenerationSettings(max_new_tokens=5, chat=True)
    with pytest.raises(Exception, match="chat template"):
        generate_batch(trained, ["hi"], ["user-000001"], settings)
    trained.tokenizer.chat_template = TEMPLATE
    chats = [[{"role": "user", "content": "favourite colour ?"}], "favourite city ?"]
    mixed, _ = generate_batch(trained, chats, ["user-000001", "user-000004"], settings)
    for k, user in enumerate(["user-000001", "user-000004"]):
        (alone,), _ = generate_batch(trained, [chats[k]], [user], settings)
        assert mixed[k].text == alone.text
    from flora_train.inference import server

    released = []  # the thread that loaded the model keeps no OpenMP team once the engine computes (cpu_threads.py)
    monkeypatch.setattr(server, "release_thread_team", lambda: released.append(threading.current_thread().name))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # (FastAPI's on_event, which it will remove)
        app = create_app(trained)
    assert released == [threading.current_thread().name]
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "flora:user-000001", "temperature": 0, "max_tokens": 5,
                                                      "messages": chats[0]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == mixed[0].text
        assert client.post("/v1/chat/completions", json={"messages": [], "user": "u"}).status_code == 400
        assert app.state.engine.alive
    assert not app.state.engine.alive, "the server's shutdown stops the engine's thread"
    # A conversation the template refuses is an error naming the prompt and its user, found before
    # the first batch generates (it was jinja2's traceback, after the batches before it had run).
    import importlib

    gen = importlib.import_module("flora_train.inference.generate")  # the package's `generate` is the function

    trained.tokenizer.chat_template = "{% if messages|length > 1 %}{{ raise_exception('one turn only') }}{% endif %}" + TEMPLATE
    batches = []
    monkeypatch.setattr(gen, "generate_tokens", lambda *a, **k: batches.append(a) or ([[]], None))
    two_turns = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    with pytest.raises(InferenceError, match=r"^prompt 2 of 2 \(user 'user-000004'\): the chat template refuses this "
                                             r"conversation: one turn only$"):
        generate(trained, [chats[0], two_turns], ["user-000001", "user-000004"], settings, batch_size=1)
    assert batches == []


def test_a_flora_export_folder_serves_like_its_run(trained, tmp_path):
    from flora_train.export import export_adapters

    run_dir = trained.source.label.split("/checkpoints/")[0]
    export_adapters(run_dir, "flora", None, tmp_path / "export")
    exported = load_trained(tmp_path / "export", device="cpu")
    assert exported.users == trained.users and exported.layout.to_dict() == trained.layout.to_dict()
    users = ["user-000003", "user-000010", "never-trained"]
    settings = GenerationSettings(max_new_tokens=6)
    want, _ = generate_batch(trained, PROMPTS[:3], users, settings)
    got, _ = generate_batch(exported, PROMPTS[:3], users, settings)
    assert [g.text for g in got] == [w.text for w in want]


def test_seeded_sampling_repeats(trained):
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    users = ["user-000001", "user-000002"]
    first, _ = generate_batch(trained, PROMPTS[:2], users, settings)
    again, _ = generate_batch(trained, PROMPTS[:2], users, settings)
    assert [g.text for g in first] == [g.text for g in again]
    others = [generate_batch(trained, PROMPTS[:2], users, GenerationSettings(max_new_tokens=8, do_sample=True,
                                                                              temperature=1.5, seed=s))[0] for s in range(8, 12)]
    assert any([g.text for g in o] != [g.text for g in first] for o in others), "other seeds sample other text"


def test_generation_stays_inside_the_context_and_never_depends_on_its_batch(tmp_path, tiny_gpt2_dir, caplog):
    """A GPT-2 base has a table of 64 learned positions. A prompt that max_new_tokens carried past
    them crashed generate with IndexError ('index out of range in self'); a prompt longer than the
    context did too. Now a prompt generates up to the context (and its batch-mates, with their own
    room, as they would alone) and a prompt with no room is an error naming it."""
    run_training(load_recipe(None, [*small_recipe(tmp_path, tiny_gpt2_dir), "adapter.target_modules=[c_attn]",
                                    f"run_dir={tmp_path / 'run'}", "eval.at_end=false", "train.max_steps=1"]))
    trained = load_trained(tmp_path / "run", device="cpu")
    tok, user = trained.tokenizer, trained.users[0]
    def prompt_of(n: int) -> str:  # a prompt of n tokens
        texts = [unit * k for unit in (" :", " ?", ":", "?", " a", "a") for k in range(1, 100)]
        return next(t for t in texts if len(tok(t)["input_ids"]) == n)

    long_prompt = prompt_of(60)  # room for 4
    settings = GenerationSettings(max_new_tokens=10, ignore_eos=True)
    with caplog.at_level("WARNING", logger="flora_train"):
        (short, cut), _ = generate(trained, [PROMPTS[0], long_prompt], [user, user], settings)
    assert (short.tokens, short.context_bound, cut.tokens, cut.context_bound) == (10, False, 4, True)
    assert "1 prompt generated up to the model's context of 64 tokens, short of max_new_tokens 10" in caplog.text
    (alone,), _ = generate(trained, [PROMPTS[0]], [user], settings)
    assert alone.text == short.text and trained.context == 64
    with pytest.raises(InferenceError, match=rf"^prompt 2 of 2 \(user '{user}'\): 64 tokens leave no room to generate "
                                             r"in the model's context of 64 tokens"):
        generate(trained, [PROMPTS[0], prompt_of(64)], [user, user], settings)
