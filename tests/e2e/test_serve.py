"""`flora-train serve`, started for real on 127.0.0.1 and asked by the official `openai` client:
each user's text equals `generate` for that user alone, plain and streamed, completions and chat;
logprobs equal the training loss's own teacher-forced scores; 32 concurrent requests of distinct
users with their own lengths and seeds equal each request served alone while joining a running
batch; stop strings end generation; bad requests get a 4xx naming the problem and never stop
serving; /metrics is Prometheus text."""

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from openai import NotFoundError, OpenAI

from flora_train.inference import GenerationSettings, generate, generate_batch, load_trained
from tests.e2e.helpers import REPO
from tests.e2e.serving import USERS, chat_model, start_server, stop_server, train_run  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.server]

PROMPTS = [f"quick : favourite {k} ?" for k in ("colour", "animal", "city", "fruit")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_model):
    run_dir = train_run(tmp_path_factory.mktemp("serve"), chat_model)
    proc, url = start_server(run_dir, "--strict-users", "--max-batch", "12", "--prefill-tokens", "24",
                             "--cache-users", "16")
    yield url, run_dir
    stop_server(proc)


@pytest.fixture(scope="module")
def trained(server):
    return load_trained(server[1], device="cpu")


def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


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
        assert 1 <= len(top) <= 3 and max(top.values()) >= chosen - 1e-6  # (byte tokens may share a text)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    other = client(url).completions.create(model=f"flora:{trained.users[4]}", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    gap = (torch.tensor(other.choices[0].logprobs.token_logprobs[1:]) - want).abs().max()
    assert gap > 1e-3, "another user's adapter scores differently (else serving each user's own proves nothing)"
    # Generated tokens' logprobs, and chat's logprobs.content, score the tokens returned.
    gen = client(url).completions.create(model=f"flora:{user}", prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
    assert len(gen.choices[0].logprobs.token_logprobs) == gen.usage.completion_tokens
    assert all(v <= 0 for v in gen.choices[0].logprobs.token_logprobs)
    chat = client(url).chat.completions.create(model=f"flora:{user}", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


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


def test_bad_requests_get_4xx_naming_the_problem_and_serving_goes_on(server):
    url, run_dir = server
    post = lambda body, path="/v1/completions": requests.post(f"{url}{path}", json=body, timeout=60)  # noqa: E731
    bad = requests.post(f"{url}/v1/completions", data="{not json", headers={"content-type": "application/json"}, timeout=60)
    assert bad.status_code == 400 and "malformed request" in bad.json()["error"]["message"]
    cases = [
        ({"prompt": 3, "user": "user-000001"}, 400, "prompt"),
        ({"prompt": "hi", "user": "nobody"}, 404, "unknown user 'nobody'"),
        ({"prompt": "hi", "model": "flora:user-000001", "user": "user-000002"}, 400, "two users named"),
        ({"prompt": "hi", "model": "gpt-4"}, 404, "unknown model 'gpt-4'"),
        ({"prompt": "favourite colour " * 400, "user": "user-000001", "max_tokens": 4}, 400,
         "exceeds the limit of 64 tokens (the model's context)"),
        ({"prompt": ["hi", "favourite colour " * 400], "user": "user-000001"}, 400, "prompt[1] of "),
        ({"prompt": "hi", "user": "user-000001", "logit_bias": {"one": 5}}, 400, "logit_bias: key 'one' is not a token id"),
        ({"prompt": "hi", "user": "user-000001", "logit_bias": {"1": 101}}, 400, "logit_bias.1: Input should be less"),
        ({"prompt": "hi", "user": "user-000001", "suffix": "x"}, 400, "unsupported field 'suffix'"),
        ({"prompt": "hi", "user": "user-000001", "n": 0}, 400, "n: Input should be greater than or equal to 1"),
        ({"prompt": [], "user": "user-000001"}, 400, "the prompt is empty"),
        ({"prompt": [[5, 6], [7, 99999]], "user": "user-000001"}, 400, "prompt[1]: token id 99999 is outside the vocabulary"),
        ({"prompt": ["hi"] * 3, "user": "user-000001", "n": 100}, 400, "300 sequences, more than the server queues at once"),
        ({"prompt": "hi", "user": "user-000001", "max_tokens": 0}, 400, "max_tokens 0"),
        ({"prompt": "hi", "user": "user-000001", "temperature": 3}, 400, "temperature"),
    ]
    for body, status, words in cases:
        r = post(body)
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.status_code, r.text)
    chat = post({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "/v1/chat/completions")
    assert chat.status_code == 400 and "top_logprobs needs logprobs" in chat.json()["error"]["message"]
    # A conversation the template refuses (its raise_exception) was a 500 with a jinja2 traceback in
    # the log; content parts (what LangChain sends) were 'messages.0.content: Input should be a valid string'.
    for messages, words in [([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                             "the chat template refuses this conversation: System role not supported"),
                            ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
                             "messages.0.content: content[0] is of type 'image_url': this model reads text only")]:
        r = post({"messages": messages, "user": "user-000001"}, "/v1/chat/completions")
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    parts, whole = (post({"messages": [{"role": "user", "content": content}], "user": "user-000001", "max_tokens": 4,
                          "temperature": 0}, "/v1/chat/completions").json()["choices"][0]["message"]["content"]
                    for content in ([{"type": "text", "text": "favourite"}, {"type": "text", "text": "colour ?"}],
                                    "favourite\ncolour ?"))
    assert parts == whole and parts, (parts, whole)
    base = post({"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0})  # no user: the base model
    assert base.status_code == 200 and base.json()["usage"]["completion_tokens"] >= 1
    assert requests.get(f"{url}/health", timeout=5).json()["status"] == "ok"
    # The default context is the recipe's data.max_length (256), capped by the model's (64 here).
    room = post({"messages": [{"role": "user", "content": "hi"}], "user": "user-000001", "temperature": 0,
                 "ignore_eos": True}, "/v1/chat/completions").json()
    assert room["usage"]["total_tokens"] == 64, room["usage"]  # chat without max_tokens: up to the context


def test_serving_limits_out_of_range_are_refused_before_serving(server, trained, capsys):
    """--max-queue 0 made an unbounded queue (queue.Queue(0): never a 429) and --max-prompt-tokens 0
    fell back to the default unseen; a limit past the model's context let prompts run past its
    positions. Now: argparse's usage line, or one error line before any thread starts."""
    from flora_train.cli import parse_args
    from flora_train.inference.server import create_app
    from flora_train.inference.trained import InferenceError

    for flag, value, words in [("--max-queue", "0", "must be a whole number >= 1, got '0'"),
                               ("--max-prompt-tokens", "0", "must be a whole number >= 1, got '0'"),
                               ("--port", "99999", "must be a port number 0..65535, got '99999'"),  # (OverflowError)
                               ("--follow", "-1", "must be a number of seconds > 0, got '-1'")]:
        with pytest.raises(SystemExit):
            parse_args(["serve", "runs/x", flag, value])
        assert f"argument {flag}: {words}" in capsys.readouterr().err
    # A port in use is one line before anything loads (the run named here does not even exist); it
    # was uvicorn's 'address already in use' after the whole base had loaded, exit code 3.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "flora_train.cli", "serve", "no/such/run", "--port", str(port)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"flora-train: error: --host 127.0.0.1 --port {port}: cannot listen there: Address already in use"), proc.stderr
    with pytest.raises(InferenceError, match=r"--max-prompt-tokens 65: must be in 1\.\.64, the model's context"):
        create_app(trained, max_prompt_tokens=65)
    # Through the CLI: a cache smaller than a batch is refused from the flags alone, before the run is
    # read; a limit the loaded model refuses ends it before the line that says it serves (both came
    # after 'serving N users' ... on http://...': the first even after the whole run had loaded).
    for source, flags, words in [("no/such/run", ["--cache-users", "2", "--max-batch", "4"],
                                  "--cache-users 2 is below --max-batch 4: a full batch needs a row each"),
                                 (str(server[1]), ["--max-prompt-tokens", "65"],
                                  "--max-prompt-tokens 65: must be in 1..64, the model's context (max_position_embeddings)")]:
        proc = subprocess.run([sys.executable, "-m", "flora_train.cli", "serve", source, "--port", "0", *flags],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and proc.stderr.strip().endswith(f"flora-train: error: {words}"), proc.stderr[-2000:]
        assert "serving" not in proc.stdout and "Traceback" not in proc.stderr, proc.stdout
    from flora_train.inference.engine import Engine

    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        Engine(trained.model, trained.slot, trained.tokenizer, None, max_queue=0)  # type: ignore[arg-type]


def test_metrics_are_prometheus_text_with_requests_tokens_latency_and_cache(server):
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = server
    requests.post(f"{url}/v1/completions", json={"prompt": "hi", "user": "user-000002", "max_tokens": 2}, timeout=60)
    requests.post(f"{url}/v1/completions", json={"prompt": "hi", "user": "user-000002", "bogus": 1}, timeout=60)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=5).text) for s in fam.samples}
    get = lambda name, **labels: samples.get((name, tuple(sorted(labels.items()))), 0)  # noqa: E731
    assert get("flora_requests_total", status="200") >= 1 and get("flora_requests_total", status="400") >= 1
    assert get("flora_completion_tokens_total") >= 2 and get("flora_prompt_tokens_total") >= 1
    assert get("flora_time_to_first_token_seconds_count") >= 1 and get("flora_inter_token_latency_seconds_count") >= 1
    assert get("flora_batch_occupancy_count") >= 1 and get("flora_adapter_cache_capacity") == 16
    assert get("flora_adapter_cache_hits_total") + get("flora_adapter_cache_misses_total") >= 2
    assert ("flora_queue_depth", ()) in samples and ("flora_running_requests", ()) in samples


def test_an_api_key_is_asked_of_every_client_but_health_and_metrics(server, monkeypatch):
    """`serve --api-key` (or $FLORA_TRAIN_API_KEY, out of the process list), as vLLM's: a client
    without the key, or with another, gets 401 (the openai client's AuthenticationError); probes and
    scrapers are not asked. Before, there was no key: anyone who reached the port used every user's
    adapter, and serving on 0.0.0.0 said nothing of it."""
    from openai import AuthenticationError

    monkeypatch.setenv("FLORA_TRAIN_API_KEY", "s3cret-key")
    proc, url = start_server(server[1])
    try:
        with pytest.raises(AuthenticationError, match="missing or wrong API key"):
            OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0).completions.create(
                model="flora:user-000001", prompt=PROMPTS[0], max_tokens=2)
        ok = OpenAI(base_url=f"{url}/v1", api_key="s3cret-key", max_retries=0).completions.create(
            model="flora:user-000001", prompt=PROMPTS[0], max_tokens=2, temperature=0)
        assert ok.usage.completion_tokens >= 1
        assert requests.get(f"{url}/v1/models", timeout=5).status_code == 401
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
        assert requests.get(f"{url}/metrics", timeout=5).status_code == 200
    finally:
        stop_server(proc)
    monkeypatch.delenv("FLORA_TRAIN_API_KEY")
    proc = subprocess.run([sys.executable, "-m", "flora_train.cli", "serve", "no/such/run", "--host", "0.0.0.0", "--port", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "warning: serving on 0.0.0.0 without --api-key (or $FLORA_TRAIN_API_KEY): whoever reaches it" in proc.stderr
    from flora_train.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["serve", "runs/x", "--api-key", "two words"])
