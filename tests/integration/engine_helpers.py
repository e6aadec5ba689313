"""The serving engine's tests' shared pieces: a small trained run (module-scoped where it is
used), an engine over its rows, and a caller that records what the engine sends it."""

import threading
import time

import pytest

from flora_train.config import load_recipe
from flora_train.inference import GenerationSettings, load_trained
from flora_train.inference.adapter_cache import AdapterCache
from flora_train.inference.engine import Delta, Done, Engine, Failed, Request
from flora_train.train.run import run_training
from tests.distributed.helpers import small_recipe

PROMPT = "quick : favourite colour ?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("engine")
    run_training(load_recipe(None, [*small_recipe(tmp, tiny_llama_dir), f"run_dir={tmp / 'run'}", "eval.at_end=false"]))
    return load_trained(tmp / "run", device="cpu")


class Answer:
    def __init__(self, fail_after: int | None = None) -> None:
        self.events: list = []
        self.ended = threading.Event()
        self.fail_after = fail_after

    def sink(self, event) -> None:
        if self.fail_after is not None and len(self.events) >= self.fail_after:
            raise RuntimeError("Event loop is closed")  # what call_soon_threadsafe raises once the client left
        self.events.append(event)
        if isinstance(event, (Done, Failed)):
            self.ended.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))


def engine_for(trained, capacity: int = 8, **kw) -> tuple[Engine, AdapterCache]:
    cache = AdapterCache(trained.rows, trained.layout, trained.source.init_seed, capacity, trained.device)
    return Engine(trained.model, trained.slot, trained.tokenizer, cache, **kw), cache


def submit(engine: Engine, trained, user: str | None, settings: GenerationSettings, prompt: str = PROMPT,
           answer: Answer | None = None) -> tuple[Request, Answer]:
    answer = answer or Answer()
    request = Request(trained.tokenizer(prompt)["input_ids"], user, settings, answer.sink)
    engine.submit(request)
    return request, answer


def wait_idle(engine: Engine, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.running and not engine.waiting

