"""The serving engine in-process: a request whose caller left (cancelled, or its loop gone
mid-stream) is dropped at the next step and frees its KV row and adapter pin; a request whose
adapter cannot be read fails alone; a closed engine's full queue is Overloaded; a long prompt is
prefilled in chunks while short requests keep decoding; under a storm of threads submitting and
cancelling, every request ends exactly once and no pin leaks; the KV cache keeps each row exact
(where the engine's rows come from: test_engine_rows.py)."""

import random
import threading
import time

import pytest
import torch

from flora_train.inference import GenerationSettings, generate_batch
from flora_train.inference.adapter_cache import AdapterCache
from flora_train.inference.engine import Done, Engine, Failed, Overloaded, Request
from tests.integration.engine_helpers import PROMPT, Answer, engine_for, submit, trained, wait_idle  # noqa: F401 (a fixture)


def test_callers_that_leave_are_dropped_and_failures_stay_with_their_request(trained):
    class Unreadable:  # user-000003's row cannot be read; everyone else's can
        generation = 0

        def __init__(self, rows):
            self.rows, self.label = rows, "flaky"

        def refresh(self):
            return False

        def read_held(self, users):
            held = [u for u in users if u in self]
            return dict(zip(held, self.read(held))) if held else {}

        def __contains__(self, user):
            return user in self.rows

        @property
        def users(self):
            return self.rows.users

        def read(self, users):
            if "user-000003" in users:
                raise OSError("disk gone")
            return self.rows.read(users)

    cache = AdapterCache(Unreadable(trained.rows), trained.layout, trained.source.init_seed, 8, trained.device)
    engine = Engine(trained.model, trained.slot, trained.tokenizer, cache, max_batch=8)
    long = GenerationSettings(max_new_tokens=40, ignore_eos=True)
    _, gone_mid_stream = submit(engine, trained, "user-000001", long, answer=Answer(fail_after=3))
    cancelled, cancelled_answer = submit(engine, trained, "user-000002", long)
    _, broken = submit(engine, trained, "user-000003", long)
    _, good = submit(engine, trained, "user-000004", GenerationSettings(max_new_tokens=6))
    cancelled.cancelled.set()
    assert broken.ended.wait(30) and good.ended.wait(60)
    assert isinstance(broken.events[-1], Failed) and "disk gone" in str(broken.events[-1].error)
    wait_idle(engine)
    stats = engine.stats()
    engine.close()
    (alone,), _ = generate_batch(trained, [PROMPT], ["user-000004"], GenerationSettings(max_new_tokens=6))
    assert good.text == alone.text and isinstance(good.events[-1], Done)
    assert len(gone_mid_stream.events) == 3 and not gone_mid_stream.ended.is_set(), "no events after it left"
    assert not cancelled_answer.ended.is_set()
    assert stats.dropped == 2 and stats.failed == 1 and stats.new_tokens < 40 + 6, stats  # the two left early
    assert cache.pinned() == 0, "every pin released"
    assert not engine.alive
    with pytest.raises(Overloaded):  # nothing drains a closed engine's queue of 1
        small, _ = engine_for(trained, max_queue=1)
        small.close()
        submit(small, trained, "user-000001", long)
        submit(small, trained, "user-000001", long)


def test_a_long_prompt_is_prefilled_in_chunks_while_short_ones_decode(trained):
    engine, _ = engine_for(trained, max_batch=4, prefill_tokens=8)
    short = GenerationSettings(max_new_tokens=20, ignore_eos=True)
    _, first = submit(engine, trained, "user-000001", short)
    while not first.events:
        time.sleep(0.001)
    long_prompt = "favourite colour ? my city " * 5  # inside the context of 64 with its 3 new tokens
    chunks = [-(-len(trained.tokenizer(p)["input_ids"]) // 8) for p in (PROMPT, long_prompt)]
    _, long = submit(engine, trained, "user-000002", GenerationSettings(max_new_tokens=3), prompt=long_prompt)
    assert first.ended.wait(60) and long.ended.wait(60)
    stats = engine.stats()
    engine.close()
    assert chunks[1] >= 4 and stats.prefill_chunks == sum(chunks) and stats.joined_running == 1, stats
    (a,), _ = generate_batch(trained, [PROMPT], ["user-000001"], short)
    (b,), _ = generate_batch(trained, [long_prompt], ["user-000002"], GenerationSettings(max_new_tokens=3))
    assert first.text == a.text and long.text == b.text


def test_a_storm_of_submits_and_cancels_ends_every_request_once_and_leaks_nothing(trained):
    """Threads submit and cancel at random while the engine runs: every request not cancelled ends
    with exactly one Done, the engine's counters add up, and no adapter pin is left."""
    engine, cache = engine_for(trained, capacity=6, max_batch=6, prefill_tokens=32)
    answers: list[tuple[Request, Answer]] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for k in range(12):
            settings = GenerationSettings(max_new_tokens=rng.randint(1, 12), do_sample=bool(k % 2), seed=k,
                                          temperature=0.8, ignore_eos=True)
            request, answer = submit(engine, trained, rng.choice([None, *trained.users[:10], "never-trained"]), settings)
            with lock:
                answers.append((request, answer))
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.01)
                request.cancelled.set()

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_idle(engine, 120)
    stats = engine.stats()
    engine.close()
    done = [a for r, a in answers if a.ended.is_set()]
    ends = [sum(isinstance(e, (Done, Failed)) for e in a.events) for _, a in answers]
    assert max(ends) == 1 and all(n == 1 for (r, _), n in zip(answers, ends) if not r.cancelled.is_set())
    assert all(isinstance(a.events[-1], Done) for a in done), "nothing failed"
    assert all(a.ended.is_set() for r, a in answers if not r.cancelled.is_set()), "every request kept ends"
    assert stats.requests + stats.dropped == len(answers) == 48 and stats.failed == 0, stats
    assert cache.pinned() == 0 and cache.stats().evictions > 0


def test_the_kv_cache_keeps_each_row_exact_through_joins_and_leaves(trained):
    """Rows of different lengths joined, some dropped, the rest trimmed: each remaining row's next
    logits equal that sequence run alone (float32, the same kernels: 1e-5)."""
    from flora_train.inference.kv_cache import SlotKV, cache_keyword

    tok, model = trained.tokenizer, trained.model
    keyword = cache_keyword(model)
    prompts = [tok(p)["input_ids"] for p in ("a", "quick : favourite colour ? it is", "my city", "favourite fruit ?")]
    rows, index, _ = trained.batch_rows(["user-000001"])

    def run(kv: SlotKV, ids: list[list[int]]) -> torch.Tensor:
        width = max(len(p) for p in ids)
        x = torch.zeros(len(ids), width, dtype=torch.long)
        m = torch.zeros_like(x)
        for i, p in enumerate(ids):
            x[i, width - len(p):] = torch.tensor(p)
            m[i, width - len(p):] = 1
        attn, pos = kv.step_inputs(m)
        with torch.no_grad(), trained.slot.activate(rows, index.new_zeros(len(ids))):
            return model(input_ids=x, attention_mask=attn, position_ids=pos, use_cache=True, **{keyword: kv.cache}).logits[:, -1]

    batch = SlotKV.empty(2, trained.device)
    run(batch, prompts[:2])
    late = SlotKV.empty(2, trained.device)
    run(late, prompts[2:])
    batch.join(late)
    batch.keep([1, 3])  # the long one and the last newcomer stay; the short ones leave
    nxt = [[7], [9]]
    got = run(batch, nxt)
    for k, (p, n) in enumerate(zip([prompts[1], prompts[3]], nxt)):
        alone = SlotKV.empty(1, trained.device)
        want = run(alone, [p + n])
        assert torch.allclose(got[k], want[0], atol=1e-5), k
    assert batch.length == len(prompts[1]) + 1, "columns padding every remaining row were trimmed"
