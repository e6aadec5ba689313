"""The serving engine: iteration-level (continuous) batching of many users' requests.

One background thread owns the model. Every iteration it
1. takes newly submitted requests (a bounded queue: a full one is ``Overloaded``, the server's 429),
2. drops requests whose caller went away (at the next step, wherever they are),
3. prefills the next chunk of newcomers' prompts: at most ``prefill_tokens`` prompt tokens an
   iteration, so a long prompt is cut into chunks and never stalls the running sequences,
4. runs one decode step for every running sequence, each with its own user's adapter row, its own
   sampling settings and seeded generator, stop strings checked as its text arrives.

Newcomers join the running batch as soon as their prefill ends, and finished sequences leave at
once (``SlotKV`` keeps the per-sequence KV cache). Each sequence keeps the adapter cache it was
admitted with, so a live reload (``swap_adapters``) changes what new requests get while the
running ones finish on the version they started with.

Why our own scheduler rather than transformers' continuous-batching manager: its paged cache packs
every request's tokens into one row and attends with its own kernels, and nothing in its API says
which request a token belongs to at a given step, which per-user adapters need at every layer.
Here each sequence is one row of an ordinary batched forward, so ``slot.activate(rows, index)``
routes rows exactly as training does, with the model's own attention.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from flora_train.inference.kv_cache import SlotKV, cache_keyword
from flora_train.inference.request import AdapterUnreadable, Delta, Done, Failed, Overloaded, Request
from flora_train.inference.adapter_cache import AdapterCache, CacheFull
from flora_train.inference.sampling import TokenLogprob, logprobs_of, new_generator, penalised, sample_rows
from flora_train.inference.sequences import EngineStats, PrefillGroup, Sequence, step_rows
from flora_train.inference.text_stream import TextStream

log = logging.getLogger("flora_train")


class Engine:
    def __init__(self, model: torch.nn.Module, slot: Any, tokenizer: Any, adapters: AdapterCache, *,
                 max_batch: int = 32, prefill_tokens: int = 512, max_queue: int = 256,
                 autocast_dtype: torch.dtype | None = None, observer: Any = None) -> None:
        if min(max_batch, prefill_tokens, max_queue) < 1:  # (a queue of size 0 would be unbounded: never a 429)
            raise ValueError("max_batch, prefill_tokens and max_queue must be >= 1")
        self.model, self.slot, self.tokenizer = model, slot, tokenizer
        self._cache_keyword = cache_keyword(model)
        self.device = adapters.table.device
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        self.autocast_dtype = autocast_dtype
        self.observer = observer  # metrics: on_first_token, on_token, on_finish, on_step
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {t for t in [*eos, tokenizer.eos_token_id] if t is not None}
        self._adapters = adapters
        self._next_adapters: AdapterCache | None = None
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_queue)
        self._waiting: deque[Request] = deque()
        self._running: list[Sequence] = []
        self._kv = SlotKV.empty(0, self.device)
        self._prefill: PrefillGroup | None = None
        self._step_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._stats = EngineStats()
        self._thread = threading.Thread(target=self._loop, name="flora-engine", daemon=True)
        self._thread.start()

    # ---- called from any thread -------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queues a request; raises ``Overloaded`` when the queue is full."""
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} requests are waiting") from None

    def swap_adapters(self, adapters: AdapterCache) -> None:
        """New requests get ``adapters`` from the next iteration on; running ones keep theirs."""
        with self._lock:
            self._next_adapters = adapters

    @property
    def adapters(self) -> AdapterCache:
        with self._lock:
            return self._next_adapters or self._adapters

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._queue.qsize() + len(self._waiting)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running) + (len(self._prefill.seqs) if self._prefill else 0)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(**vars(self._stats))

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=30)

    # ---- the engine's thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closing:
            self._take_new(block=not (self._running or self._prefill or self._waiting))
            if self._closing:
                break
            with self._lock:
                if self._next_adapters is not None:
                    self._adapters, self._next_adapters = self._next_adapters, None
            start = time.perf_counter()
            self._drop_cancelled()
            if self._prefill is None:
                self._prefill = self._admit()
            if self._waiting:  # read the next newcomers' rows while this step computes
                self._adapters.prefetch([r.user for r in list(self._waiting)[: self.max_batch]])
            if self._prefill is not None:
                self._guarded(self._prefill_chunk, list(self._prefill.seqs))
            if self._running:
                self._guarded(self._decode_step, list(self._running))
            with self._lock:
                self._stats.busy_s += time.perf_counter() - start
        for req in [*self._waiting, *[s.req for s in self._running]] + ([s.req for s in self._prefill.seqs] if self._prefill else []):
            self._emit(req, Failed(RuntimeError("the server is shutting down")))

    def _take_new(self, block: bool) -> None:
        try:
            item = self._queue.get(timeout=0.25) if block else self._queue.get_nowait()
            while True:
                if item is None:
                    self._closing = True
                    return
                with self._lock:
                    self._waiting.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            return

    def _guarded(self, work: Callable[[], None], members: list[Sequence]) -> None:
        """Runs one forward's work; if it raises, the sequences in that forward fail, nothing else
        (those it had already finished keep their ``Done``)."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - a failing request must not stop the engine
            log.warning("a batch of %d requests failed: %s", len(members), exc)
            if self._prefill is not None and set(members) & set(self._prefill.seqs):
                self._prefill = None
            self._remove([s for s in members if not s.ended], Failed(exc))

    def _emit(self, req: Request, event: Delta | Done | Failed) -> None:
        try:
            req.sink(event)
        except Exception:  # noqa: BLE001 - the caller's loop is gone: treat it as a disconnect
            req.cancelled.set()

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled.is_set()]
            for r in gone:
                self._waiting.remove(r)
            self._stats.dropped += len(gone)
        self._remove([s for s in self._running if s.req.cancelled.is_set()], dropped=True)

    def _remove(self, seqs: list[Sequence], failure: Failed | None = None, dropped: bool = False) -> None:
        """Running or prefilling sequences leave: their KV rows and adapter pins are freed; the
        failed get ``failure`` (finished ones already had their ``Done``)."""
        if not seqs:
            return
        leaving = set(seqs)
        keep = [i for i, s in enumerate(self._running) if s not in leaving]
        if len(keep) != len(self._running):
            self._kv.keep(keep)
        with self._lock:
            self._running = [self._running[i] for i in keep]
            self._stats.dropped += len(seqs) if dropped else 0
            self._stats.failed += len(seqs) if failure is not None else 0
        self._step_rows = None
        for s in seqs:
            s.release()
            if failure is not None:
                s.ended = True
                self._emit(s.req, failure)

    def _admit(self) -> PrefillGroup | None:
        """The next group of waiting requests to prefill together: as many as fit the batch and,
        beyond the first, the prefill budget."""
        group: list[Sequence] = []
        tokens = 0
        adapters = self._adapters
        while self._waiting and len(self._running) + len(group) < self.max_batch:
            req = self._waiting[0]
            if group and tokens + len(req.prompt_ids) > self.prefill_tokens:
                break
            try:
                slot = adapters.acquire(req.user)
            except CacheFull:
                break  # wait for running requests to free rows
            except Exception as exc:  # noqa: BLE001 - this request's adapter cannot be read: it fails alone
                with self._lock:
                    self._waiting.popleft()
                    self._stats.failed += 1
                failure = AdapterUnreadable(req.user, exc)
                log.warning("%s", failure)
                self._emit(req, Failed(failure))
                continue
            with self._lock:
                self._waiting.popleft()
            tokens += len(req.prompt_ids)
            group.append(Sequence(req, adapters, slot, new_generator(req.settings.seed, self.device),
                                   TextStream(self.tokenizer, req.settings.stop)))
        if not group:
            return None
        if self._running:
            with self._lock:
                self._stats.joined_running += len(group)
        width = max(len(s.req.prompt_ids) for s in group)
        ids = torch.full((len(group), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(group):
            n = len(s.req.prompt_ids)
            ids[i, width - n:] = torch.tensor(s.req.prompt_ids, dtype=torch.long)
            mask[i, width - n:] = 1
        return PrefillGroup(group, ids.to(self.device), mask.to(self.device), SlotKV.empty(len(group), self.device))

    def _forward(self, seqs: list[Sequence], kv: SlotKV, ids: torch.Tensor, new_mask: torch.Tensor,
                 rows: tuple[torch.Tensor, torch.Tensor], all_logits: bool) -> torch.Tensor:
        attention_mask, positions = kv.step_inputs(new_mask)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with torch.no_grad(), self.slot.activate(*rows), autocast:
            out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=True, logits_to_keep=0 if all_logits else 1, **{self._cache_keyword: kv.cache})
        return out.logits.float()

    def _prefill_chunk(self) -> None:
        p = self._prefill
        assert p is not None
        width = p.ids.shape[1]
        cols = max(1, self.prefill_tokens // len(p.seqs))
        a, b = p.offset, min(width, p.offset + cols)
        echo = any(s.req.echo for s in p.seqs)
        logits = self._forward(p.seqs, p.kv, p.ids[:, a:b], p.mask[:, a:b], step_rows(p.seqs, self.device), all_logits=echo)
        p.offset = b
        with self._lock:
            self._stats.prefill_chunks += 1
        if echo:
            p.collect_echo(logits, a, b)
        if b < width:
            return
        self._prefill = None
        last = logits[:, -1]
        first = self._choose(p.seqs, last)
        with self._lock:
            self._stats.new_tokens += sum(1 for s in p.seqs if s.req.settings.max_new_tokens and not s.req.cancelled.is_set())
        staying: list[int] = []
        for i, s in enumerate(p.seqs):
            if s.req.cancelled.is_set():
                s.release()
                s.ended = True  # its caller left: nothing more is sent
                with self._lock:
                    self._stats.dropped += 1
                continue
            if s.req.echo:
                self._echo(s, p.echo.get(i, []))
            if s.req.settings.max_new_tokens == 0:
                self._finish(s, "length")
                s.release()
                continue
            if not self._accept(s, last[i], first[i]):
                staying.append(i)
            else:
                s.release()
        p.kv.keep(staying)
        self._kv.join(p.kv)
        with self._lock:
            self._running.extend(p.seqs[i] for i in staying)
        self._step_rows = None

    def _echo(self, s: Sequence, prompt_logprobs: list[TokenLogprob]) -> None:
        text = self.tokenizer.decode(s.req.prompt_ids, skip_special_tokens=False)
        if s.req.logprobs is None:
            self._emit(s.req, Delta(text, prompt=True))
            return
        at = TextStream(self.tokenizer, ()).offsets(s.req.prompt_ids)
        self._emit(s.req, Delta(text, prompt_logprobs, prompt=True, offsets=at))

    def _decode_step(self) -> None:
        seqs = self._running
        if self._step_rows is None:
            self._step_rows = step_rows(seqs, self.device)
        ids = torch.tensor([[s.generated[-1]] for s in seqs], device=self.device)
        ones = torch.ones(len(seqs), 1, dtype=torch.long, device=self.device)
        logits = self._forward(seqs, self._kv, ids, ones, self._step_rows, all_logits=False)[:, -1]
        with self._lock:
            st = self._stats
            st.steps += 1
            st.largest_batch = max(st.largest_batch, len(seqs))
            st.most_users = max(st.most_users, int(self._step_rows[0].shape[0]))
        if self.observer is not None:
            self.observer.on_step(len(seqs))
        tokens = self._choose(seqs, logits)
        self._remove([s for i, s in enumerate(seqs) if self._accept(s, logits[i], tokens[i])])
        with self._lock:
            self._stats.new_tokens += len(seqs)

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Every sequence's next token: greedy rows from one batched argmax, the others (sampling,
        penalties or logit bias) through ``sample_rows`` with their own settings and generators."""
        tokens = logits.argmax(dim=-1).tolist()  # one device sync for every greedy row
        rest = [i for i, s in enumerate(seqs) if s.req.settings.do_sample or s.req.settings.presence_penalty
                or s.req.settings.frequency_penalty or s.req.settings.logit_bias]
        if rest:
            sts = [seqs[i].req.settings for i in rest]
            scores = torch.stack([penalised(logits[i], seqs[i].generated, st.presence_penalty, st.frequency_penalty,
                                            st.logit_bias) for i, st in zip(rest, sts)])
            picked = sample_rows(scores, [st.temperature if st.do_sample else 0.0 for st in sts], [st.top_k for st in sts],
                                 [st.top_p for st in sts], [seqs[i].generator for i in rest])
            for i, token in zip(rest, picked):
                tokens[i] = token
        return tokens

    def _accept(self, s: Sequence, logits: torch.Tensor, token: int) -> bool:
        """Appends ``s``'s next token and emits it (``logits``: its row, for logprobs); True when
        ``s`` is finished."""
        st = s.req.settings
        s.generated.append(token)
        now = time.monotonic()
        if self.observer is not None:
            self.observer.on_token(now - (s.last_token_at or s.req.submitted), first=not s.last_token_at)
        s.last_token_at = now
        lp = logprobs_of(logits.view(1, -1), torch.tensor([token], device=logits.device), s.req.logprobs or 0) \
            if s.req.logprobs is not None else []
        if token in self.eos and not st.ignore_eos:
            rest = s.text.flush()
            self._emit(s.req, Delta(rest, lp, offsets=[len(s.text.text)] if lp else []))
            self._finish(s, "stop")
            return True
        delta, at = s.text.add_at(token)
        if delta or lp:
            self._emit(s.req, Delta(delta, lp, offsets=[at] if lp else []))
        if s.text.stopped:
            self._finish(s, "stop")
            return True
        if len(s.generated) >= st.max_new_tokens:
            rest = s.text.flush()
            if rest:
                self._emit(s.req, Delta(rest))
            self._finish(s, "stop" if s.text.stopped else "length")
            return True
        return False

    def _finish(self, s: Sequence, reason: str) -> None:
        with self._lock:
            self._stats.requests += 1
        if self.observer is not None:
            self.observer.on_finish(len(s.req.prompt_ids), len(s.generated))
        s.ended = True
        self._emit(s.req, Done(reason, len(s.req.prompt_ids), len(s.generated), s.adapters.version))


__all__ = ["AdapterUnreadable", "Delta", "Done", "Engine", "EngineStats", "Failed", "Overloaded", "Request"]
