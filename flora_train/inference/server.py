"""`flora-train serve`: an OpenAI-compatible endpoint where every request has its own user's adapter.

``/v1/completions`` and ``/v1/chat/completions`` take the user from the request's standard ``user``
field or from a model name ``<base>:<user_id>``; ``/health`` says what is served. Concurrent
requests of different users are batched into one forward by the ``Batcher`` (FLoRA's point: one
base pass for many users). Bad requests get a 4xx with a message and never stop the server; a
field this server does not implement (``logprobs``, ``echo``, ``stream: true``, ...) is a 400 that
names it, never silently ignored. A full queue answers 429 with ``Retry-After``; ``/health`` is 503
when the batching thread is not running.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from flora_train.inference.batcher import Batcher, Overloaded
from flora_train.inference.generate import GenerationSettings
from flora_train.inference.trained import InferenceError, TrainedAdapters


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    # A field we do not implement must not be dropped silently (a client asking for logprobs would
    # get null and believe it): pydantic refuses it, and the handler names it.
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    user: str | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


class CompletionRequest(_Common):
    prompt: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error"}})


def create_app(trained: TrainedAdapters, model_name: str = "flora", strict_users: bool = False, max_batch: int = 32,
               batch_window_ms: float = 10.0, max_prompt_tokens: int | None = None,
               default_max_tokens: int = 16, max_queue: int = 256) -> FastAPI:
    app = FastAPI(title="flora_train", description="per-user adapters, batched across users")
    batcher = Batcher(trained, max_batch=max_batch, window_s=batch_window_ms / 1000, max_queue=max_queue)
    app.state.batcher = batcher
    config = getattr(trained.model, "config", None)
    limit = max_prompt_tokens or getattr(config, "max_position_embeddings", None) or 4096

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "extra_forbidden":
            return _error(400, f"unsupported field {where!r}: this server does not implement it")
        return _error(400, f"malformed request: {where + ': ' if where else ''}{first.get('msg', 'invalid body')}")

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        response = _error(exc.status, exc.message)
        if exc.status == 429:
            response.headers["Retry-After"] = "1"
        return response

    @app.on_event("shutdown")
    def _close() -> None:
        batcher.close()

    def user_of(req: _Common) -> str:
        user = req.user
        if user is None and req.model and ":" in req.model:
            user = req.model.split(":", 1)[1]
        if not user:
            raise ApiError(400, "name the adapter's user: the request's 'user' field, or model '<base>:<user_id>'")
        if strict_users and user not in trained:
            raise ApiError(404, f"unknown user {user!r}: no adapter was trained for it")
        return user

    def settings_of(req: _Common, max_tokens: int | None, chat: bool, prompt_tokens: int) -> GenerationSettings:
        if req.stream:
            raise ApiError(400, "unsupported field 'stream': true: this server answers with one JSON body (stream=false)")
        if req.n != 1:
            raise ApiError(400, "n must be 1")
        new = max_tokens or default_max_tokens
        if prompt_tokens + new > limit:
            raise ApiError(400, f"prompt of {prompt_tokens} tokens + max_tokens {new} exceeds the limit of {limit} tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return GenerationSettings(max_new_tokens=new, do_sample=req.temperature > 0, temperature=req.temperature or 1.0,
                                  top_p=req.top_p, seed=req.seed, stop=stop, chat=chat, ignore_eos=req.ignore_eos)

    async def run(prompt: Any, user: str, settings: GenerationSettings):
        try:
            future = batcher.submit(prompt, user, settings)
        except Overloaded as exc:
            raise ApiError(429, f"server busy: {exc}; retry shortly") from None
        try:
            return await asyncio.wrap_future(future)
        except InferenceError as exc:
            raise ApiError(400, str(exc)) from None

    def usage(prompt_tokens: int, new: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": new, "total_tokens": prompt_tokens + new}

    @app.get("/health")
    def health() -> JSONResponse:
        s = batcher.stats()
        alive = batcher.alive
        return JSONResponse(status_code=200 if alive else 503, content={
                "status": "ok" if alive else "batching thread stopped", "model": model_name, "base": trained.source.model_path, "users": len(trained.users),
                "method": trained.layout.spec.method, "batches": s.batches, "prompts": s.prompts,
                "largest_batch": s.largest_batch, "new_tokens": s.new_tokens, "waiting": batcher.waiting,
                "dropped": s.dropped, "failed": s.failed})

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "flora_train"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> dict[str, Any]:
        user = user_of(req)
        prompt_tokens = len(trained.tokenizer(req.prompt)["input_ids"])
        settings = settings_of(req, req.max_tokens, False, prompt_tokens)
        result = await run(req.prompt, user, settings)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or model_name,
                "choices": [{"index": 0, "text": result.text, "logprobs": None,
                             "finish_reason": "length" if result.tokens >= settings.max_new_tokens else "stop"}],
                "usage": usage(prompt_tokens, result.tokens)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> dict[str, Any]:
        user = user_of(req)
        if not getattr(trained.tokenizer, "chat_template", None):
            raise ApiError(400, f"the base {trained.source.model_path!r} has no chat template; use /v1/completions")
        messages = [m.model_dump() for m in req.messages]
        rendered = trained.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_tokens = len(trained.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        settings = settings_of(req, req.max_completion_tokens or req.max_tokens, True, prompt_tokens)
        result = await run(messages, user, settings)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model or model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": "length" if result.tokens >= settings.max_new_tokens else "stop"}],
                "usage": usage(prompt_tokens, result.tokens)}

    return app


def serve(trained: TrainedAdapters, host: str, port: int, **options: Any) -> None:
    import uvicorn

    uvicorn.run(create_app(trained, **options), host=host, port=port, log_level="warning")
