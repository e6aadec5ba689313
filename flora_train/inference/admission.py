"""What a request may ask of the server, read before anything is queued: its prompts as token ids
(text, or ids inside the vocabulary), its OpenAI sampling fields as ``GenerationSettings``, and the
prompt + ``max_tokens`` limit and where that limit comes from. Every refusal is an ``ApiError``
whose message names the problem; the server answers it with that status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flora_train.inference import openai_api as api
from flora_train.inference.generate import GenerationSettings
from flora_train.inference.trained import InferenceError, TrainedAdapters


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestReader:
    tokenizer: Any
    vocab: int
    limit: int  # prompt + max_tokens, in tokens
    origin: str  # what set the limit (named in the refusal)
    default_max_tokens: int  # completions without max_tokens (chat: up to the limit)
    context: int  # the model's positions: no flag raises a limit past them

    @classmethod
    def for_model(cls, trained: TrainedAdapters, max_prompt_tokens: int | None, default_max_tokens: int) -> RequestReader:
        """The limit is ``--max-prompt-tokens``, else the run's ``data.max_length`` (what the
        adapters were trained on), else the model's context; ``--max-prompt-tokens`` past the
        context is refused."""
        context = trained.context
        vocab = getattr(getattr(trained.model, "config", None), "vocab_size", None) or len(trained.tokenizer)
        if max_prompt_tokens is not None and not 1 <= max_prompt_tokens <= context:
            raise InferenceError(f"--max-prompt-tokens {max_prompt_tokens}: must be in 1..{context}, the model's "
                                 "context (max_position_embeddings)")
        if max_prompt_tokens is not None:
            limit, origin = max_prompt_tokens, "--max-prompt-tokens"
        elif trained.source.max_length and trained.source.max_length < context:
            limit = trained.source.max_length
            origin = f"the run's data.max_length; --max-prompt-tokens raises it, up to the model's context of {context}"
        else:
            limit, origin = context, "the model's context"
        return cls(trained.tokenizer, vocab, limit, origin, default_max_tokens, context)

    def settings(self, req: api._Common, max_tokens: int | None, prompt_tokens: int, chat: bool, echo: bool,
                 which: str = "prompt") -> GenerationSettings:
        room = self.limit - prompt_tokens
        if room < 0:
            raise ApiError(400, f"{which} of {prompt_tokens} tokens exceeds the limit of {self.limit} tokens ({self.origin})")
        new = max_tokens if max_tokens is not None else (room if chat else min(self.default_max_tokens, room))
        if prompt_tokens + new > self.limit:
            # Past the model's own context no flag helps: say that, not what raises the limit.
            limit, origin = (self.context, "the model's context") if prompt_tokens + new > self.context \
                else (self.limit, self.origin)
            raise ApiError(400, f"{which} of {prompt_tokens} tokens + max_tokens {new} exceeds the limit of {limit} "
                                f"tokens ({origin})")
        if new == 0 and not echo:
            raise ApiError(400, "max_tokens 0 generates nothing; it is for scoring a prompt with echo and logprobs")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        try:
            return GenerationSettings(max_new_tokens=new, do_sample=req.temperature > 0, temperature=req.temperature or 1.0,
                                      top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=stop,
                                      presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                      logit_bias=api.logit_bias_of(req.logit_bias, self.vocab), ignore_eos=req.ignore_eos)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def prompts(self, req: api.CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """The request's prompts as token ids, and as the text ``echo`` returns (text prompts as sent,
        token prompts decoded)."""
        batch = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
            else [req.prompt]  # ([] is one empty prompt: refused below)
        ids, texts = [], []
        for k, prompt in enumerate(batch):
            which = "the prompt" if len(batch) == 1 else f"prompt[{k}]"
            if isinstance(prompt, str):
                ids.append(self.tokenizer(prompt)["input_ids"])
                texts.append(prompt)
            else:
                bad = next((t for t in prompt if not 0 <= t < self.vocab), None)
                if bad is not None:
                    raise ApiError(400, f"{which}: token id {bad} is outside the vocabulary (0..{self.vocab - 1})")
                ids.append(list(prompt))
                texts.append(self.tokenizer.decode(prompt, skip_special_tokens=False))
            if not ids[-1]:
                raise ApiError(400, f"{which} is empty")
        return ids, texts
