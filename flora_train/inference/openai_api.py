"""OpenAI's completions and chat completions as clients send and read them: the request schemas
(a field we do not implement is refused, never dropped), and the bodies, stream chunks and logprobs
we answer with. No model or engine here: the server wires these to the engine."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flora_train.chat_template import text_of_parts
from flora_train.errors import lone_surrogate
from flora_train.inference.sampling import TokenLogprob

MAX_CHOICES = 128  # OpenAI's bound on n


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    # A string, or OpenAI's list of content parts (what LangChain and the Agents SDK send): text
    # parts become one string here; an image or audio part is refused by name.
    content: str | list[dict[str, Any]]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, content: str | list[dict[str, Any]]) -> str:
        return text_of_parts(content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    # A field we do not implement must not be dropped silently (a client asking for it would get
    # nothing and believe it): pydantic refuses it, and the handler names it.
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # vLLM's extension; 0: off
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # choices per prompt, each its own sequence
    stop: str | list[str] | None = None
    user: str | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says
    # token id (as a string, JSON's keys) -> added to its logit before sampling or the greedy choice
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, body: Any) -> Any:
        """Every string of the body is text: half a UTF-16 pair escaped in JSON (``"\\ud800"``) ended
        in the tokenizer's TypeError (a 500) or a user id no store can look up."""
        def walk(value: Any, where: str) -> None:
            if isinstance(value, str) and (why := lone_surrogate(value)) is not None:
                raise ValueError(f"{where or 'the body'} {why}")
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            for key, inner in items:
                if isinstance(key, str) and (why := lone_surrogate(key)) is not None:  # a key is echoed in errors
                    raise ValueError(f"a key of {where or 'the body'} {why}")
                walk(inner, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))

        walk(body, "")
        return body


class CompletionRequest(_Common):
    # One prompt or a batch of them, as text or token ids (evaluation harnesses send token-id
    # batches); each prompt gets n choices, indexed prompt by prompt.
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


def logit_bias_of(bias: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` as ``(token id, bias)`` pairs; a key that is not a token id of the
    vocabulary is refused by name."""
    pairs = []
    for key, value in (bias or {}).items():
        token = int(key) if key.strip().lstrip("-").isdigit() else None
        if token is None or not 0 <= token < vocab:
            raise ValueError(f"logit_bias: key {key!r} is not a token id of this model (0..{vocab - 1})")
        pairs.append((token, float(value)))
    return tuple(sorted(pairs))


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _decodes_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return decoder.get("type") == "ByteLevel" or any(d.get("type") == "ByteLevel" for d in decoder.get("decoders", []))


class TokenText:
    """Token ids as the text pieces logprobs name them by, and as their bytes (chat's ``bytes``:
    a character split across tokens is one piece of it per token, which its text cannot show)."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        # Byte-level BPE spells each byte as one printable character (GPT-2's alphabet): read back.
        self._bytes_of_char = ({c: b for b, c in bytes_to_unicode().items()} if _decodes_byte_level(tokenizer)
                               else {})
        self._special = set(getattr(tokenizer, "all_special_ids", []))

    def __call__(self, token: int) -> str:
        """The token's text; a token that holds part of a character is named by its bytes, as
        OpenAI names them (``bytes:\\xe6\\x97``): as text each would be U+FFFD, and the completions
        ``top_logprobs`` object, keyed by text, kept one of several such alternatives."""
        text = self._text(token)
        if "\ufffd" in text and token not in self._special:
            raw = bytes(self.bytes(token))
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text

    def bytes(self, token: int) -> list[int]:
        """The token's own bytes: its byte-level spelling read back, or SentencePiece's byte fallback
        (``<0xE2>``); else (a special token, a whole-character vocabulary) its text's UTF-8."""
        spelled = self.tokenizer.convert_ids_to_tokens(token)
        if token not in self._special and isinstance(spelled, str):
            if self._bytes_of_char and all(c in self._bytes_of_char for c in spelled):
                return [self._bytes_of_char[c] for c in spelled]
            fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", spelled)
            if fallback:
                return [int(fallback.group(1), 16)]
        return list(self._text(token).encode())

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(items: list[TokenLogprob], piece: TokenText, offsets: list[int]) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object of ``items``; ``offsets``: where each token
    begins in the choice's text."""
    return {"tokens": [piece(t.token) for t in items], "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [({piece(i): lp for i, lp in t.top} if t.logprob is not None else None) for t in items],
            "text_offset": offsets}


def merge_completion_logprobs(parts: list[dict[str, Any]], text: str) -> dict[str, Any] | None:
    """One choice's logprobs from its deltas'; ``text``: the choice's, which the offsets of tokens of
    a stop string (streamed before the string was whole) may point past."""
    if not parts:
        return None
    merged = {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    merged["text_offset"] = [min(o, len(text)) for o in merged["text_offset"]]
    return merged


def chat_logprobs(items: list[TokenLogprob], piece: TokenText) -> list[dict[str, Any]]:
    def entry(token: int, lp: float) -> dict[str, Any]:
        return {"token": piece(token), "logprob": lp, "bytes": piece.bytes(token)}

    return [{**entry(t.token, t.logprob if t.logprob is not None else 0.0), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
            for t in items]


def completion_choice(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None,
                    chunk: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                            "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_choice(index: int, text: str, logprobs: list[dict[str, Any]] | None, finish: str) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": {"content": logprobs} if logprobs is not None else None, "finish_reason": finish}


def chat_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": use}


def chat_chunk(rid: str, model: str, index: int, delta: dict[str, Any], logprobs: list[dict[str, Any]] | None = None,
               finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                         "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


__all__ = ["MAX_CHOICES", "ChatRequest", "CompletionRequest", "Message", "TokenText", "chat_body", "chat_choice",
           "chat_chunk", "chat_logprobs", "completion_body", "completion_choice", "completion_logprobs",
           "merge_completion_logprobs", "new_id", "usage", "usage_chunk"]
