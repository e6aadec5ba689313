"""`flora-train serve`, started for real on 127.0.0.1: concurrent requests of 16 distinct users each
get their own user's completion (what `generate` gives that user alone) and are batched together;
bad requests get a 4xx and the server keeps serving."""

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from flora_train.config import load_recipe
from flora_train.inference import GenerationSettings, generate_batch, load_trained
from flora_train.train.run import run_training
from tests.distributed.helpers import small_recipe
from tests.e2e.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.server]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("serve")
    run_dir = tmp / "run"
    run_training(load_recipe(None, [*small_recipe(tmp, tiny_llama_dir), f"run_dir={run_dir}",
                                    "eval.at_end=false"]))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flora_train.cli", "serve", str(run_dir), "--port", str(port),
                             "--strict-users", "--batch-window-ms", "50", "--device", "cpu"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError("server never answered /health")
    yield url, run_dir
    proc.terminate()
    proc.wait(timeout=30)


def test_sixteen_concurrent_users_get_their_own_completions(server):
    url, run_dir = server
    trained = load_trained(run_dir, device="cpu")
    users = trained.users[:12] + trained.users[:4]  # 16 requests; 12 distinct users, 4 of them twice
    prompts = [f"quick : favourite {k} ?" for k in ("colour", "animal", "city", "fruit")] * 4

    def ask(i: int) -> requests.Response:
        body = {"prompt": prompts[i], "max_tokens": 6, "temperature": 0}
        if i % 2:
            body["user"] = users[i]
        else:
            body["model"] = f"flora:{users[i]}"
        return requests.post(f"{url}/v1/completions", json=body, timeout=120)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for i, r in enumerate(answers):
        assert r.status_code == 200, r.text
        body = r.json()
        (alone,), _ = generate_batch(trained, [prompts[i]], [users[i]], GenerationSettings(max_new_tokens=6))
        assert body["choices"][0]["text"] == alone.text, (i, users[i])
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == alone.tokens
    health = requests.get(f"{url}/health", timeout=5).json()
    assert health["prompts"] >= 16 and health["largest_batch"] > 1, health  # concurrent users shared forwards


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    url, run_dir = server
    post = lambda path, **kw: requests.post(f"{url}{path}", timeout=60, **kw)  # noqa: E731
    bad = post("/v1/completions", data="{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "malformed request" in bad.json()["error"]["message"]
    assert post("/v1/completions", json={"prompt": 3, "user": "user-000001"}).status_code == 400
    unknown = post("/v1/completions", json={"prompt": "hi", "user": "nobody"})
    assert unknown.status_code == 404 and "unknown user 'nobody'" in unknown.json()["error"]["message"]
    assert post("/v1/completions", json={"prompt": "hi"}).status_code == 400  # no user named
    huge = post("/v1/completions", json={"prompt": "favourite colour " * 400, "user": "user-000001", "max_tokens": 4})
    assert huge.status_code == 400 and "exceeds the limit" in huge.json()["error"]["message"]
    chat = post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "user": "user-000001"})
    assert chat.status_code == 400 and "no chat template" in chat.json()["error"]["message"]
    ok = post("/v1/completions", json={"prompt": "quick : favourite colour ?", "user": "user-000001", "max_tokens": 3,
                                       "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
    assert requests.get(f"{url}/health", timeout=5).json()["status"] == "ok"


def test_fields_the_server_does_not_implement_are_named_not_ignored(server):
    url, _ = server
    post = lambda body: requests.post(f"{url}/v1/completions", json={"prompt": "hi", "user": "user-000001", **body}, timeout=60)  # noqa: E731
    for field, value in (("logprobs", 2), ("echo", True), ("presence_penalty", 0.5)):
        r = post({field: value})
        assert r.status_code == 400 and f"unsupported field '{field}'" in r.json()["error"]["message"], (field, r.text)
    r = post({"stream": True})
    assert r.status_code == 400 and "'stream'" in r.json()["error"]["message"]
    assert post({"stream": False, "max_tokens": 2}).status_code == 200


def test_a_cancelled_request_or_a_failing_one_never_stops_the_batcher(server):
    """The old thread resolved a future its caller had cancelled: InvalidStateError killed it and
    every later request hung. Now a cancelled request is dropped, a failing one fails alone."""
    from flora_train.inference.batcher import Batcher, Overloaded

    _, run_dir = server
    trained = load_trained(run_dir, device="cpu")
    settings = GenerationSettings(max_new_tokens=3)
    batcher = Batcher(trained, window_s=0.5)
    gone = batcher.submit("favourite colour", "user-000001", settings)
    assert gone.cancel(), "still queued: cancellable"
    bad = batcher.submit(["not", "a", "string"], "user-000002", settings)  # a list is a prompt only with chat
    good = batcher.submit("my city", "user-000003", GenerationSettings(max_new_tokens=4))
    (alone,), _ = generate_batch(trained, ["my city"], ["user-000003"], GenerationSettings(max_new_tokens=4))
    assert good.result(timeout=120).text == alone.text
    with pytest.raises(Exception, match="must be a string"):
        bad.result(timeout=60)
    stats = batcher.stats()
    assert batcher.alive and stats.dropped == 1 and stats.failed == 1
    batcher.close()
    assert not batcher.alive
    small = Batcher(trained, max_queue=1)
    small.close()  # no thread drains it now: one request waits, the next is refused
    small.submit("a", "user-000001", settings)
    with pytest.raises(Overloaded):
        small.submit("b", "user-000001", settings)
