"""`flora-train serve`: an OpenAI-compatible endpoint where every request has its own user's adapter.

``/v1/completions`` and ``/v1/chat/completions`` take the user from the request's ``user`` field or
a model name ``<name>:<user_id>`` (both given and different is a 400; neither: the base model).
Requests are served by the ``Engine`` (continuous batching: many users' sequences in one forward,
joining and leaving at every step), answered as one JSON body or streamed as server-sent events.
Bad requests get a 4xx that names what is wrong and never stop the server; a field this server does
not implement is a 400 naming it. A full queue answers 429 with ``Retry-After``; ``/health`` is 503
when the engine's thread is not running; ``/metrics`` is Prometheus text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from flora_train.arg_types import model_name_error
from flora_train.chat_template import ChatTemplateRefused, apply_chat_template
from flora_train.cpu_threads import release_thread_team
from flora_train.inference import openai_api as api
from flora_train.inference.admission import ApiError, RequestReader
from flora_train.inference.engine import AdapterUnreadable, Delta, Done, Engine, Failed, Overloaded, Request
from flora_train.inference.generate import GenerationSettings
from flora_train.inference.kernels import tune_for_serving
from flora_train.inference.metrics import ServeMetrics
from flora_train.inference.adapter_cache import AdapterCache
from flora_train.inference.trained import InferenceError, TrainedAdapters

log = logging.getLogger("flora_train")


API_KEY_ENV = "FLORA_TRAIN_API_KEY"  # serve's key where --api-key is not given (and not in the process list)


def _error(status: int, message: str) -> JSONResponse:
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


class _Answers:
    """The events of one HTTP request's sequences (its prompts times ``n``), each tagged with its
    choice index, moved from the engine's thread onto the handler's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, Delta | Done | Failed]] = asyncio.Queue()

    def sink(self, index: int) -> Callable[[Delta | Done | Failed], None]:
        def put(event: Delta | Done | Failed) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))  # raises once the loop is gone

        return put


def _choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice ``j`` of ``n`` samples with ``seed + j``: the choices differ, and each is what a
    request of that seed alone gets."""
    return None if seed is None else seed + choice


def check_cache_users(cache_users: int | None, max_batch: int) -> None:
    """Every sequence of a full batch holds an adapter row (from the flags alone: checked before loading)."""
    if cache_users is not None and cache_users < max_batch:
        raise InferenceError(f"--cache-users {cache_users} is below --max-batch {max_batch}: a full batch needs a row each")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """At shutdown the follower stops, then the engine (its thread finishes the step it is on)."""
    yield
    if app.state.follower is not None:
        app.state.follower.close()
    app.state.engine.close()


def create_app(trained: TrainedAdapters, model_name: str = "flora", strict_users: bool = False, max_batch: int = 32,
               prefill_tokens: int = 512, max_prompt_tokens: int | None = None, default_max_tokens: int = 16,
               max_queue: int = 256, cache_users: int | None = None, follow_s: float | None = None,
               api_key: str | None = None) -> FastAPI:
    """``api_key``: every /v1/ request must carry ``Authorization: Bearer <api_key>`` (401 otherwise,
    as vLLM's --api-key); /health and /metrics stay open to the probes and scrapers."""
    naming = model_name_error(model_name)
    if naming is not None:
        raise InferenceError(f"model_name {naming}")
    app = FastAPI(title="flora_train", description="per-user adapters, batched across users", lifespan=_lifespan)
    if api_key is not None:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def _authorised(request: HttpRequest, call_next: Callable[..., Any]) -> Any:
            if request.url.path.startswith("/v1/") and not hmac.compare_digest(
                    request.headers.get("authorization", "").encode(), expected):
                app.state.metrics.requests.labels("401").inc()
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                                   "(the server's --api-key)")
            return await call_next(request)
    reader = RequestReader.for_model(trained, max_prompt_tokens, default_max_tokens)
    check_cache_users(cache_users, max_batch)
    capacity = cache_users or len(trained.users) + max_batch
    cache = AdapterCache(trained.rows, trained.layout, trained.source.init_seed, capacity, trained.device)
    tuned = tune_for_serving(trained.model, trained.slot, max_batch, prefill_tokens, trained.autocast_dtype)
    if tuned["measured"]:
        log.info("kernels tuned for serving before the first request: %d shapes in %.1fs", tuned["measured"], tuned["seconds"])
    engine = Engine(trained.model, trained.slot, trained.tokenizer, cache, max_batch=max_batch,
                    prefill_tokens=prefill_tokens, max_queue=max_queue, autocast_dtype=trained.autocast_dtype)
    metrics = ServeMetrics(lambda: engine.waiting, lambda: engine.running, lambda: engine.adapters.stats())
    engine.observer = metrics
    app.state.engine, app.state.metrics = engine, metrics
    follower = None
    if follow_s is not None:
        from flora_train.inference.follow import Follower

        follower = Follower(trained, engine, follow_s)
    app.state.follower = follower
    tok = trained.tokenizer
    piece = api.TokenText(tok)

    def sse(payload: dict[str, Any] | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "extra_forbidden":
            metrics.requests.labels("400").inc()
            return _error(400, f"unsupported field {where!r}: this server does not implement it")
        metrics.requests.labels("400").inc()
        msg = str(first.get("msg", "invalid body")).removeprefix("Value error, ")  # our validators' own words
        return _error(400, f"malformed request: {where + ': ' if where else ''}{msg}")

    @app.exception_handler(ApiError)
    async def _api(request: HttpRequest, exc: ApiError) -> JSONResponse:
        metrics.requests.labels(str(exc.status)).inc()
        response = _error(exc.status, exc.message)
        if exc.status == 429:
            response.headers["Retry-After"] = "1"
        return response

    def has_adapter(user: str) -> bool:
        """Whether ``user`` has an adapter in the served rows as they are on disk now (a forget may
        have rewritten them since they were read)."""
        source = engine.adapters.source
        source.refresh()
        return user in source

    def user_in(model: str | None) -> str | None:
        """The user a model name selects ('<model_name>:<user_id>'), None for the base's own name."""
        base, _, named = (model or model_name).partition(":")
        if base != model_name:
            raise ApiError(404, f"unknown model {base!r}: this server serves {model_name!r} ('{model_name}:<user_id>')")
        return named or None

    def served_user(user: str | None) -> str | None:
        if user and strict_users and not has_adapter(user):
            raise ApiError(404, f"unknown user {user!r}: no adapter was trained for it")
        return user or None

    def user_of(req: api._Common) -> str | None:
        named = user_in(req.model)
        if named and req.user and named != req.user:
            raise ApiError(400, f"two users named: model {req.model!r} and user {req.user!r}; name one")
        return served_user(named or req.user)

    def start(prompts: list[list[int]], settings: list[GenerationSettings], n: int, user: str | None,
              logprobs: int | None, echo: bool) -> tuple[list[Request], _Answers]:
        """Submits ``n`` sequences per prompt (choice ``p * n + j``); all of them or none."""
        if len(prompts) * n > max_queue:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} sequences, more than the "
                                f"server queues at once (--max-queue {max_queue})")
        answers = _Answers()
        seqs = [Request(ids, user, dataclasses.replace(s, seed=_choice_seed(s.seed, j)), answers.sink(p * n + j),
                        logprobs, echo)
                for p, (ids, s) in enumerate(zip(prompts, settings)) for j in range(n)]
        for k, request in enumerate(seqs):
            try:
                engine.submit(request)
            except Overloaded as exc:
                for submitted in seqs[:k]:
                    submitted.cancelled.set()
                raise ApiError(429, f"server busy: {exc}; retry shortly") from None
        return seqs, answers

    async def events(seqs: list[Request], answers: _Answers,
                     http: HttpRequest) -> AsyncIterator[tuple[int, Delta | Done]]:
        """``(choice, event)`` until every sequence is done; a client gone away cancels them all (the
        engine drops them at its next step), and so does one failing."""
        remaining = len(seqs)
        try:
            while remaining:
                try:
                    index, event = await asyncio.wait_for(answers.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if isinstance(event, Failed):
                    if isinstance(event.error, AdapterUnreadable):  # the server's files, not the request
                        raise ApiError(500, f"the adapter of user {event.error.user!r} cannot be read on this "
                                            "server (its log says why)")
                    if isinstance(event.error, (InferenceError, ValueError)):
                        raise ApiError(400, str(event.error))
                    raise ApiError(500, f"generation failed: {event.error}")
                yield index, event
                if isinstance(event, Done):
                    remaining -= 1
        finally:
            for request in seqs:
                request.cancelled.set()  # a no-op once done; otherwise the client left (or the stream was closed)

    def stream(req: api._Common, seqs: list[Request], answers: _Answers, http: HttpRequest, head: list[dict[str, Any]],
               chunk: Callable[[int, Delta], dict[str, Any]], last: Callable[[int, Done], dict[str, Any]],
               use: Callable[[dict[int, Done]], dict[str, int]], rid: str, model: str, obj: str) -> StreamingResponse:
        """Server-sent events: ``head``, a chunk per delta (tagged with its choice), each choice's
        finishing chunk, the usage chunk when ``stream_options.include_usage``, then ``[DONE]``."""
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def body() -> AsyncIterator[str]:
            for payload in head:
                yield sse(payload)
            done: dict[int, Done] = {}
            try:
                async for index, ev in events(seqs, answers, http):
                    if isinstance(ev, Delta):
                        yield sse(chunk(index, ev))
                        continue
                    done[index] = ev
                    yield sse(last(index, ev))
                if include_usage and len(done) == len(seqs):
                    yield sse(api.usage_chunk(rid, model, obj, use(done)))
            except ApiError as exc:
                yield sse({"error": {"message": exc.message, "type": "server_error"}})
            yield sse("[DONE]")

        metrics.requests.labels("200").inc()
        return StreamingResponse(body(), media_type="text/event-stream")

    def usage_of(prompts: list[list[int]], done: dict[int, Done]) -> dict[str, int]:
        """Each prompt's tokens once (however many choices it has), every choice's new tokens."""
        return api.usage(sum(len(ids) for ids in prompts), sum(d.completion_tokens for d in done.values()))

    @app.get("/health")
    def health() -> JSONResponse:
        s = engine.stats()
        c = engine.adapters.stats()
        alive = engine.alive
        return JSONResponse(status_code=200 if alive else 503, content={
            "status": "ok" if alive else "engine stopped", "model": model_name, "base": trained.source.model_path,
            "users": len(engine.adapters.source), "method": trained.layout.spec.method,
            "checkpoint": str(engine.adapters.source.label),  # where its rows are read: the followed one, or moved
            "adapters_version": engine.adapters.version,
            "waiting": engine.waiting, "running": engine.running, "steps": s.steps, "requests": s.requests,
            "new_tokens": s.new_tokens, "largest_batch": s.largest_batch, "most_users": s.most_users,
            "joined_running": s.joined_running, "dropped": s.dropped, "failed": s.failed,
            "cache": {"capacity": c.capacity, "resident": c.resident, "hits": c.hits, "misses": c.misses,
                      "evictions": c.evictions, "prefetched": c.prefetched}})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "owned_by": "flora_train", "root": trained.source.model_path,
            "users": len(engine.adapters.source), "method": trained.layout.spec.method,
            "usage": f"model '{model_name}:<user_id>' or field 'user' selects a user's adapter; neither: the base model"}]}

    @app.get("/v1/models/{model:path}")
    def model(model: str) -> dict[str, Any]:
        """OpenAI's models.retrieve: the base's name, or '<name>:<user_id>' with the adapter it is served
        with (a user never trained gets the base, or 404 under --strict-users)."""
        user = served_user(user_in(model))
        return {"id": model, "object": "model", "owned_by": "flora_train", "root": trained.source.model_path,
                **({"parent": model_name, "adapter": "user" if has_adapter(user) else "base"} if user else {})}

    @app.post("/v1/completions")
    async def completions(req: api.CompletionRequest, http: HttpRequest) -> Any:
        user = user_of(req)
        prompts, echoed = await run_in_threadpool(reader.prompts, req)
        settings = [reader.settings(req, req.max_tokens, len(ids), False, req.echo,
                                "prompt" if len(prompts) == 1 else f"prompt[{k}]") for k, ids in enumerate(prompts)]
        seqs, answers = start(prompts, settings, req.n, user, req.logprobs, req.echo)
        rid, model = api.new_id("cmpl"), req.model or model_name

        def piece_of(index: int, ev: Delta) -> tuple[str, dict[str, Any] | None]:
            """The delta's text (the prompt echoed as sent) and its logprobs, whose offsets index the
            choice's text: the echoed prompt, then what was generated."""
            shown = echoed[index // req.n] if req.echo else ""
            if req.logprobs is None:
                return (shown if ev.prompt else ev.text), None
            at = [min(o, len(shown)) for o in ev.offsets] if ev.prompt else [len(shown) + o for o in ev.offsets]
            return (shown if ev.prompt else ev.text), api.completion_logprobs(ev.logprobs, piece, at)

        if req.stream:
            def chunk(index: int, ev: Delta) -> dict[str, Any]:
                return api.completion_body(rid, model, [api.completion_choice(index, *piece_of(index, ev), None)], None,
                                           chunk=True)

            return stream(req, seqs, answers, http, [], chunk, lambda index, ev: api.completion_body(
                rid, model, [api.completion_choice(index, "", None, ev.finish_reason)], None, chunk=True),
                lambda done: usage_of(prompts, done), rid, model, "text_completion")
        texts: list[list[str]] = [[] for _ in seqs]
        parts: list[list[dict[str, Any]]] = [[] for _ in seqs]
        done: dict[int, Done] = {}
        async for index, ev in events(seqs, answers, http):
            if isinstance(ev, Delta):
                text, lp = piece_of(index, ev)
                texts[index].append(text)
                if lp is not None:
                    parts[index].append(lp)
            else:
                done[index] = ev
        if len(done) < len(seqs):
            raise ApiError(499, "client closed the request")
        metrics.requests.labels("200").inc()
        texts_of = ["".join(t) for t in texts]
        choices = [api.completion_choice(i, texts_of[i], api.merge_completion_logprobs(parts[i], texts_of[i])
                                         if req.logprobs is not None else None, done[i].finish_reason)
                   for i in range(len(seqs))]
        return api.completion_body(rid, model, choices, usage_of(prompts, done))

    @app.post("/v1/chat/completions")
    async def chat(req: api.ChatRequest, http: HttpRequest) -> Any:
        user = user_of(req)
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, f"the base {trained.source.model_path!r} has no chat template; use /v1/completions")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]

        def render() -> list[int]:
            text = apply_chat_template(tok, messages, add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]

        try:
            prompt_ids = await run_in_threadpool(render)
        except ChatTemplateRefused as exc:
            raise ApiError(400, str(exc)) from None
        settings = reader.settings(req, req.max_completion_tokens or req.max_tokens, len(prompt_ids), True, False)
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true")
        seqs, answers = start([prompt_ids], [settings], req.n, user, top, False)
        rid, model = api.new_id("chatcmpl"), req.model or model_name
        if req.stream:
            head = [api.chat_chunk(rid, model, i, {"role": "assistant", "content": ""}) for i in range(len(seqs))]
            return stream(req, seqs, answers, http, head,
                          lambda index, ev: api.chat_chunk(rid, model, index, {"content": ev.text}, api.chat_logprobs(
                              ev.logprobs, piece) if top is not None else None),
                          lambda index, ev: api.chat_chunk(rid, model, index, {}, None, ev.finish_reason),
                          lambda done: usage_of([prompt_ids], done), rid, model, "chat.completion.chunk")
        texts: list[list[str]] = [[] for _ in seqs]
        logprobs: list[list[dict[str, Any]]] = [[] for _ in seqs]
        done: dict[int, Done] = {}
        async for index, ev in events(seqs, answers, http):
            if isinstance(ev, Delta):
                texts[index].append(ev.text)
                if top is not None:
                    logprobs[index].extend(api.chat_logprobs(ev.logprobs, piece))
            else:
                done[index] = ev
        if len(done) < len(seqs):
            raise ApiError(499, "client closed the request")
        metrics.requests.labels("200").inc()
        choices = [api.chat_choice(i, "".join(texts[i]), logprobs[i] if top is not None else None, done[i].finish_reason)
                   for i in range(len(seqs))]
        return api.chat_body(rid, model, choices, usage_of([prompt_ids], done))

    # From here the engine's thread computes; the one that loaded the model keeps no OpenMP team (cpu_threads.py).
    release_thread_team()
    return app
