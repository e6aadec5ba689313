"""What a caller hands the serving engine (``Request``) and what it hears back (``Delta``s, then
one ``Done`` or ``Failed``), apart from how the engine schedules them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flora_train.inference.generate import GenerationSettings
from flora_train.inference.sampling import TokenLogprob


class Overloaded(RuntimeError):
    """The queue is full: the caller should try again later."""


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt: bool = False  # the echoed prompt's tokens (logprobs only where asked)
    # Where each logprob's token begins, in characters: in the generated text, or for the prompt's,
    # in the prompt decoded without special tokens.
    offsets: list[int] = field(default_factory=list)


@dataclass
class Done:
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    version: int  # the adapters' version the request ran on


class AdapterUnreadable(RuntimeError):
    """A request's user's adapter could not be read on the server (a cut file, a lost disk): the
    server's fault, not the request's; its reason is for the server's log."""

    def __init__(self, user: str, cause: Exception) -> None:
        super().__init__(f"the adapter of user {user!r} cannot be read: {cause}")
        self.user = user


@dataclass
class Failed:
    error: Exception


@dataclass(eq=False)
class Request:
    """What a caller submits; ``sink`` receives ``Delta``s then one ``Done`` or ``Failed``, called
    from the engine's thread (it must not block)."""

    prompt_ids: list[int]
    user: str | None  # None: the base model (with the shared adapter, when the run has one)
    settings: GenerationSettings
    sink: Callable[[Delta | Done | Failed], None]
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely
    echo: bool = False  # the prompt's text (and its logprobs, when asked) before the completion
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


__all__ = ["AdapterUnreadable", "Delta", "Done", "Failed", "Overloaded", "Request"]
