"""Helpers of the serving tests: a tiny base with a chat template, a short training run on it, and
`flora-train serve` started for real on 127.0.0.1 (and stopped)."""

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from flora_train.config import load_recipe
from flora_train.data import SyntheticTask
from flora_train.train.run import run_training
from tests.e2e.helpers import REPO

USERS = 32
# Refuses a system turn the way Gemma's template does, so the server's answer to a refusal is tested.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flora_train.cli", "serve", str(run_dir), "--port", str(port),
                             "--device", "cpu", *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server never answered /health")


def stop_server(proc: subprocess.Popen) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    return err


def run_args(tmp: Path, model_dir: Path, *extra: str) -> list[str]:
    train, _ = SyntheticTask(num_users=USERS, train_examples_per_user=4, eval_examples_per_user=0).write(tmp / "data")
    return [f"base.name_or_path={model_dir}", f"data.train_path={train}", "adapter.target_modules=[q_proj,v_proj,down_proj]",
            "train.users_per_step=16", "train.examples_per_user=2", "train.micro_batch_size=16", "train.epochs=2",
            "store.optimizer.lr=0.05", "tracking.enabled=false", "train.progress=false", "eval.at_end=false",
            f"run_dir={tmp / 'run'}", *extra]


def train_run(tmp: Path, model_dir: Path, *extra: str) -> Path:
    run_training(load_recipe(None, run_args(tmp, model_dir, *extra)))
    return tmp / "run"


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama with a chat template, so chat completions have something to render."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat_base") / "tiny"
    shutil.copytree(tiny_llama_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


PROMPTS = [f"quick : favourite {k} ?" for k in ("colour", "animal", "city", "fruit")]


@pytest.fixture(scope="session")
def server(tmp_path_factory, chat_model):
    """One server for test_serve.py and test_serve_refusals.py (started once where they share a worker)."""
    run_dir = train_run(tmp_path_factory.mktemp("serve"), chat_model)
    proc, url = start_server(run_dir, "--strict-users", "--max-batch", "12", "--prefill-tokens", "24",
                             "--cache-users", "16")
    yield url, run_dir
    stop_server(proc)


@pytest.fixture(scope="session")
def trained(server):
    from flora_train.inference import load_trained

    return load_trained(server[1], device="cpu")


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
