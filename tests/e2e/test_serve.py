"""`flora-train serve`, started for real on 127.0.0.1 and asked by the official `openai` client:
each user's text equals `generate` for that user alone, plain and streamed, completions and chat;
logprobs equal the training loss's own teacher-forced scores; 32 concurrent requests of distinct
users with their own lengths and seeds equal each request served alone while joining a running
batch; stop strings end generation; logit bias steers. What it refuses: test_serve_refusals.py."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from openai import NotFoundError

from flora_train.inference import GenerationSettings, generate, generate_batch
from tests.e2e.helpers import REPO
from tests.e2e.serving import (  # noqa: F401 (fixtures)
    PROMPTS,
    USERS,
    chat_model,
    client,
    server,
    start_server,
    stop_server,
    trained,
)

pytestmark = [pytest.mark.slow, pytest.mark.server]

def test_the_openai_client_gets_each_users_own_text_plain_and_streamed(server, trained):
    url, _ = server
    users = trained.users[:8]
    chat_messages = [{"role": "user", "content": p} for p in PROMPTS]

    def ask(i: int) -> tuple[str, str, str, str, object]:
        c, user, prompt = client(url), users[i], PROMPTS[i % 4]
        plain = c.completions.create(model=f"flora:{user}", prompt=prompt, max_tokens=6, temperature=0)
        chunks = list(c.completions.create(model="flora", user=user, prompt=prompt, max_tokens=6, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
        chat = c.chat.completions.create(model=f"flora:{user}", messages=[chat_messages[i % 4]], max_tokens=5, temperature=0)
        chat_chunks = list(c.chat.completions.create(model=f"flora:{user}", messages=[chat_messages[i % 4]], max_tokens=5,
                                                     temperature=0, stream=True))
        streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        chat_streamed = "".join(ch.choices[0].delta.content or "" for ch in chat_chunks if ch.choices)
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens and not chunks[-1].choices
        assert chat_chunks[0].choices[0].delta.role == "assistant"
        return plain, streamed, chat, chat_streamed, chunks

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for i, (plain, streamed, chat, chat_streamed, chunks) in enumerate(answers):
        user = users[i]
        (alone,), _ = generate_batch(trained, [PROMPTS[i % 4]], [user], GenerationSettings(max_new_tokens=6))
        (chat_alone,), _ = generate_batch(trained, [[chat_messages[i % 4]]], [user], GenerationSettings(max_new_tokens=5, chat=True))
        assert plain.choices[0].text == alone.text == streamed, (i, user)
        assert plain.usage.completion_tokens == alone.tokens and plain.object == "text_completion"
        assert plain.choices[0].finish_reason == ("length" if alone.tokens == 6 else "stop")
        assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1, "streamed in several chunks"
        assert chat.choices[0].message.content == chat_alone.text == chat_streamed, (i, user)
    models = client(url).models.list().data
    assert [m.id for m in models] == ["flora"] and "flora:<user_id>" in models[0].model_extra["usage"]
    # models.retrieve (a 404 for every name before, the served one too): the base's name, a trained
    # user's name with the adapter it gets, and under --strict-users a 404 for a user never trained.
    c = client(url)
    assert c.models.retrieve("flora").id == "flora" and "adapter" not in c.models.retrieve("flora").model_extra
    one = c.models.retrieve(f"flora:{users[0]}")
    assert one.id == f"flora:{users[0]}" and one.model_extra["adapter"] == "user" and one.model_extra["parent"] == "flora"
    for missing, words in (("flora:nobody", "unknown user 'nobody'"), ("other", "unknown model 'other'")):
        with pytest.raises(NotFoundError, match=words):
            c.models.retrieve(missing)


def test_a_batch_of_prompts_with_n_choices_each_equals_every_choice_asked_alone(server, trained):
    """A prompt list (text, or token ids as evaluation harnesses send it) with ``n`` samples each:
    choice ``p * n + j`` is prompt ``p`` asked alone with ``seed + j``, plain and streamed, and chat's
    ``n`` likewise; usage counts each prompt once and every choice's tokens. (Before: a prompt list
    was a 400 'prompt: Input should be a valid string', and n > 1 a 400 'n must be 1'.)"""
    url, _ = server
    c, user, n = client(url), trained.users[6], 2
    ids = [trained.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    kw = dict(model=f"flora:{user}", max_tokens=5, temperature=0.9, top_p=0.95, seed=77, extra_body={"ignore_eos": True})
    batch = c.completions.create(prompt=PROMPTS[:3], n=n, logprobs=1, **kw)
    by_ids = c.completions.create(prompt=ids, n=n, logprobs=1, **kw)
    chunks = list(c.completions.create(prompt=PROMPTS[:3], n=n, stream=True, stream_options={"include_usage": True}, **kw))
    alone = [c.completions.create(prompt=PROMPTS[p], logprobs=1, **{**kw, "seed": 77 + j}).choices[0]
             for p in range(3) for j in range(n)]
    streamed: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [ch.index for ch in batch.choices] == [ch.index for ch in by_ids.choices] == list(range(3 * n))
    for k, want in enumerate(alone):
        assert batch.choices[k].text == by_ids.choices[k].text == streamed[k] == want.text, k
        assert batch.choices[k].logprobs.tokens == want.logprobs.tokens, k
    assert len({a.text for a in alone}) > 3, "seeds seed + j give different samples"
    tokens = sum(len(i) for i in ids)
    assert (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (tokens, 3 * n * 5), batch.usage
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (tokens, 3 * n * 5)
    finished = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason == "length"]
    assert sorted(finished) == list(range(3 * n)), "every choice streams its own finishing chunk"
    # Token-id prompts echo as their text; their scores are the text prompts' scores.
    scored = c.completions.create(model=f"flora:{user}", prompt=ids[:2], max_tokens=0, echo=True, logprobs=0)
    by_text = c.completions.create(model=f"flora:{user}", prompt=PROMPTS[:2], max_tokens=0, echo=True, logprobs=0)
    for k in range(2):
        assert scored.choices[k].text == trained.tokenizer.decode(ids[k])
        assert torch.allclose(torch.tensor(scored.choices[k].logprobs.token_logprobs[1:]),
                              torch.tensor(by_text.choices[k].logprobs.token_logprobs[1:]), atol=1e-5)
    # lm-evaluation-harness's loglikelihood request, as its local-completions model sends it: it sums
    # token_logprobs[ctxlen:-1] and calls a continuation greedy where each equals its top logprob.
    harness = requests.post(f"{url}/v1/completions", timeout=60, json={
        "model": f"flora:{user}", "prompt": ids, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
        "echo": True}).json()
    for k, choice in enumerate(sorted(harness["choices"], key=lambda ch: ch["index"])):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids[k]) + 1 and lp["token_logprobs"][0] is None
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values()), "the greedy token is its own top"
    # Chat: n samples of one conversation, choice j as seed + j alone; greedy choices are the same text.
    messages = [{"role": "user", "content": PROMPTS[2]}]
    chat = c.chat.completions.create(model=f"flora:{user}", messages=messages, n=3, max_tokens=5, temperature=0.9, seed=5,
                                     extra_body={"ignore_eos": True})
    chat_alone = [c.chat.completions.create(model=f"flora:{user}", messages=messages, max_tokens=5, temperature=0.9, seed=5 + j,
                                            extra_body={"ignore_eos": True}).choices[0].message.content for j in range(3)]
    assert [ch.message.content for ch in chat.choices] == chat_alone and chat.usage.completion_tokens == 15
    greedy = list(c.chat.completions.create(model=f"flora:{user}", messages=messages, n=2, max_tokens=5, temperature=0,
                                            stream=True))
    texts = ["".join(ch.choices[0].delta.content or "" for ch in greedy if ch.choices and ch.choices[0].index == j)
             for j in range(2)]
    assert texts[0] == texts[1] and texts[0]
    assert [ch.choices[0].delta.role for ch in greedy[:2]] == ["assistant", "assistant"]


def test_generate_cli_renders_chat_rows_with_every_sampling_flag(server, trained, tmp_path):
    """`flora-train generate --chat` on rows of messages equals ``generate`` called with the same
    settings by name. It failed with 'a prompt must be a string (or messages, with chat)': the CLI
    built the settings by position, and --chat landed in presence_penalty, a field added before chat."""
    _, run_dir = server
    users = trained.users[:4]
    rows = [{"user_id": u, "messages": [{"role": "user", "content": PROMPTS[i]}]} for i, u in enumerate(users)]
    rows.append({"user_id": users[0], "prompt": PROMPTS[1]})  # a plain prompt under --chat: one user turn
    prompts, out = tmp_path / "chat.jsonl", tmp_path / "preds.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "flora_train.cli", "generate", str(run_dir), "--prompts", str(prompts),
                           "--out", str(out), "--device", "cpu", "--chat", "--sample", "--temperature", "0.8", "--top-p",
                           "0.9", "--top-k", "20", "--seed", "3", "--max-new-tokens", "6", "--stop", "zz"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=3,
                                  stop=("zz",), chat=True)
    want, _ = generate(trained, [r.get("messages") or r["prompt"] for r in rows], [r["user_id"] for r in rows], settings)
    got = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert got == [w.text for w in want] and any(got), got


def test_logprobs_equal_the_teacher_forced_scores_of_training(server, trained):
    """``echo`` + ``logprobs`` + ``max_tokens: 0`` (how harnesses score a continuation) gives each
    token's log-probability; they equal log-softmax of the logits the training loss scores."""
    from flora_train.data.tokenize import IGNORE
    from flora_train.train.loss import target_logits

    url, _ = server
    user, prompt = trained.users[3], "quick : favourite city ? my city is the best"
    scored = client(url).completions.create(model=f"flora:{user}", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt and lp.token_logprobs[0] is None and scored.usage.completion_tokens == 0
    ids = torch.tensor([trained.tokenizer(prompt)["input_ids"]])
    rows, index, _ = trained.batch_rows([user])
    with torch.no_grad(), trained.slot.activate(rows, index):
        t = target_logits(trained.model, ids, torch.ones_like(ids), ids.clone())
    want = torch.log_softmax(t.logits.float(), -1).gather(1, t.targets.view(-1, 1)).squeeze(1)
    assert IGNORE not in t.targets.tolist() and len(lp.token_logprobs) == ids.shape[1]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-4), (lp.token_logprobs[1:], want)
    for top, chosen in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]):
        assert len(top) == 3 and max(top.values()) >= chosen - 1e-6  # (a byte token named by its bytes)
    assert_offsets_index_the_text(scored.choices[0].text, lp, trained.tokenizer)
    other = client(url).completions.create(model=f"flora:{trained.users[4]}", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    gap = (torch.tensor(other.choices[0].logprobs.token_logprobs[1:]) - want).abs().max()
    assert gap > 1e-3, "another user's adapter scores differently (else serving each user's own proves nothing)"
    # Generated tokens' logprobs, and chat's logprobs.content, score the tokens returned.
    gen = client(url).completions.create(model=f"flora:{user}", prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
    assert len(gen.choices[0].logprobs.token_logprobs) == gen.usage.completion_tokens
    assert all(v <= 0 for v in gen.choices[0].logprobs.token_logprobs)
    assert_offsets_index_the_text(gen.choices[0].text, gen.choices[0].logprobs, trained.tokenizer)
    both = client(url).completions.create(model=f"flora:{user}", prompt=prompt, max_tokens=4, temperature=0, logprobs=1,
                                          echo=True)
    assert both.choices[0].text == prompt + gen.choices[0].text
    assert_offsets_index_the_text(both.choices[0].text, both.choices[0].logprobs, trained.tokenizer)
    streamed = client(url).completions.create(model=f"flora:{user}", prompt=prompt, max_tokens=4, temperature=0,
                                              logprobs=1, echo=True, stream=True)
    offsets = [o for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
               for o in chunk.choices[0].logprobs.text_offset]
    assert offsets == both.choices[0].logprobs.text_offset
    chat = client(url).chat.completions.create(model=f"flora:{user}", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    # (3 tokens may end inside a character: the text shows it as U+FFFD, as the bytes decode)
    assert bytes(b for c in content for b in c.bytes).decode(errors="replace") == chat.choices[0].message.content


def assert_offsets_index_the_text(text, logprobs, tokenizer):
    """Each token's ``text_offset`` is where its text stands in the choice's text (a special token,
    which the text leaves out, where the next text begins)."""
    specials = set(tokenizer.all_special_tokens)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[-1] <= len(text)
    for token, at in zip(logprobs.tokens, logprobs.text_offset):
        # (a token named by its bytes holds part of a character: its offset is checked against the decode
        # of every prefix in tests/unit/test_text_stream.py)
        assert token in specials or token.startswith("bytes:") or text.startswith(token, at), (token, at, text)


def test_32_concurrent_requests_of_their_own_settings_equal_each_served_alone(server, trained):
    """Distinct users, distinct max_tokens, half sampling with seeds: every answer is what the same
    request gets alone, while requests join a running batch of several users."""
    url, _ = server
    users = trained.users[:USERS]
    before = requests.get(f"{url}/health", timeout=5).json()

    def body(i: int) -> dict:
        b = {"model": f"flora:{users[i]}", "prompt": PROMPTS[i % 4], "max_tokens": 3 + i % 13, "ignore_eos": True}
        b.update({"temperature": 0.9, "top_p": 0.95, "seed": 1000 + i} if i % 2 else {"temperature": 0})
        return b

    def post(i: int) -> dict:
        r = requests.post(f"{url}/v1/completions", json=body(i), timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(USERS) as pool:
        together = list(pool.map(post, range(USERS)))
    after = requests.get(f"{url}/health", timeout=5).json()
    alone = [post(i) for i in range(USERS)]
    for i in range(USERS):
        assert together[i]["choices"][0]["text"] == alone[i]["choices"][0]["text"], (i, body(i))
        assert together[i]["usage"]["completion_tokens"] == body(i)["max_tokens"]
    assert len({a["choices"][0]["text"] for a in together}) > USERS // 2, "users and seeds give different text"
    assert after["joined_running"] > before["joined_running"], after  # requests joined a batch already decoding
    assert after["largest_batch"] > 1 and after["most_users"] > 1, after
    assert after["cache"]["evictions"] > 0 and after["cache"]["resident"] <= 16, after  # 32 users through 16 rows


def test_stop_strings_end_generation_where_they_appear(server, trained):
    url, _ = server
    user = trained.users[5]
    c = client(url)
    full = c.completions.create(model=f"flora:{user}", prompt=PROMPTS[1], max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = next(text[k : k + 2] for k in range(2, len(text) - 2) if text[k : k + 2].strip() and text[k : k + 2] not in text[:k + 1])
    cut = c.completions.create(model=f"flora:{user}", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop, "never"],
                               extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 12, "generation stopped at the stop string, not at max_tokens"
    scored = c.completions.create(model=f"flora:{user}", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=stop,
                                  logprobs=0, extra_body={"ignore_eos": True})
    lp = scored.choices[0].logprobs  # every token scored, the stop string's too, each offset inside the text
    assert len(lp.tokens) == scored.usage.completion_tokens and max(lp.text_offset) <= len(cut.choices[0].text)
    streamed = c.completions.create(model=f"flora:{user}", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=stop,
                                    stream=True, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks) == cut.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logit_bias_steers_the_users_greedy_and_streamed_tokens(server, trained):
    """OpenAI's logit_bias (it was refused as unsupported): +100 on a token makes it the greedy
    choice at every step, -100 on the greedy first token makes the adapter pick another; the
    logprobs stay the model's own."""
    url, _ = server
    c = client(url)
    user = f"flora:{trained.users[2]}"
    plain = c.completions.create(model=user, prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=1,
                                 extra_body={"ignore_eos": True})
    first = plain.choices[0].logprobs.tokens[0]
    forced_id = next(t for t in trained.tokenizer.encode(" blue fox zebra", add_special_tokens=False)
                     if trained.tokenizer.decode([t]) != first and trained.tokenizer.decode([t]).strip())
    forced = c.completions.create(model=user, prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=1,
                                  logit_bias={str(forced_id): 100}, extra_body={"ignore_eos": True})
    piece = trained.tokenizer.decode([forced_id])
    assert forced.choices[0].text == piece * 3
    assert forced.choices[0].logprobs.token_logprobs[0] < -0.01  # the model's own (biased, it would be ~0)
    first_id = trained.tokenizer.encode(first, add_special_tokens=False)
    assert trained.tokenizer.decode(first_id) == first and len(first_id) == 1
    first_id = first_id[0]
    other = c.completions.create(model=user, prompt=PROMPTS[0], max_tokens=1, temperature=0, logprobs=1,
                                 logit_bias={str(first_id): -100})
    assert other.choices[0].logprobs.tokens[0] != first
    streamed = c.completions.create(model=user, prompt=PROMPTS[0], max_tokens=3, temperature=0, stream=True,
                                    logit_bias={str(forced_id): 100}, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in streamed) == piece * 3
