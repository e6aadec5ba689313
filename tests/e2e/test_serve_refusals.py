"""What `flora-train serve` refuses and reports, asked for real on 127.0.0.1: bad requests get a
4xx naming the problem and never stop serving; limits out of range are refused before serving; an
API key is asked of every client but the probes; /metrics is Prometheus text."""

import socket
import subprocess
import sys

import pytest
import requests
from openai import OpenAI

from tests.e2e.helpers import REPO
from tests.e2e.serving import (  # noqa: F401 (fixtures)
    PROMPTS,
    USERS,
    chat_model,
    server,
    start_server,
    stop_server,
    trained,
)

pytestmark = [pytest.mark.slow, pytest.mark.server]


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
        # Half a UTF-16 pair (JSON's "\ud800"): a 500 from the tokenizer, or a user no store could read.
        ({"prompt": "fav\ud800", "user": "user-000001"}, 400,
         "prompt holds a lone UTF-16 surrogate '\\ud800' at character 3 (half a \\uD800-\\uDFFF pair): not text"),
        ({"prompt": "hi", "user": "user-000001\udc00"}, 400, "user holds a lone UTF-16 surrogate"),
        ({"prompt": "hi", "user": "user-000001", "logit_bias": {"\udc00": 1}}, 400,
         "a key of logit_bias holds a lone UTF-16 surrogate"),
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
                             "messages.0.content: content[0] is of type 'image_url': this model reads text only"),
                            ([{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}],
                             "messages[0].content[0].text holds a lone UTF-16 surrogate")]:
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
