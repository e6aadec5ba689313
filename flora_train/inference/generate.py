"""Mixed-user generation: every prompt of one batch has its own user's adapter.

The prompts are left-padded into one batch, the step's rows are the batch's distinct users, and
``model.generate`` runs inside ``slot.activate`` with an index from each sequence to its user. Beam
search keeps a sequence's beams next to each other (``num_beams`` copies per prompt), so the index
is the prompts' index repeated per beam; greedy, sampling and beams use the KV cache as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flora_train.chat_template import ChatTemplateRefused, apply_chat_template
from flora_train.inference.trained import InferenceError, TrainedAdapters, context_of
from flora_train.progress import progress_bar

log = logging.getLogger("flora_train")


@dataclass(frozen=True, kw_only=True)  # by name only: a field added in the middle moved --chat into a penalty
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0  # OpenAI's penalties on tokens already generated (the server's)
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, added to its logit), the server's
    chat: bool = False  # render each prompt with the tokenizer's chat template
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks; vLLM's extension)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        # written to refuse nan too, which passed `<= 0` and then raised in transformers
        if self.do_sample and not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        bad = next(((t, b) for t, b in self.logit_bias if t < 0 or not -100 <= b <= 100), None)
        if bad is not None:
            raise ValueError(f"logit_bias: token {bad[0]} with bias {bad[1]}: token ids are >= 0, biases in [-100, 100]")


@dataclass
class Generation:
    text: str
    tokens: int  # new tokens generated (before a stop string cut the text)
    user_known: bool
    context_bound: bool = False  # max_new_tokens would have run past the model's context: bounded by it


@dataclass
class GenerationStats:
    prompts: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    unknown_users: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def render_prompts(trained: TrainedAdapters, prompts: Sequence[Any], chat: bool,
                   users: Sequence[str] | None = None) -> list[str]:
    """Prompts as text: chat prompts (a string or a list of messages) through the chat template. A
    conversation the template refuses is an error naming the prompt (and its user)."""
    tok = trained.tokenizer
    if not chat:
        for k, p in enumerate(prompts):
            if not isinstance(p, str):
                who = f" (user {users[k]!r})" if users is not None else ""
                raise InferenceError(f"prompt {k + 1} of {len(prompts)}{who}: a list of messages is a conversation: "
                                     "render it with chat on (the model's chat template), or pass a string")
        return list(prompts)
    if not getattr(tok, "chat_template", None):
        raise InferenceError(f"chat prompts need a chat template, and the tokenizer of {trained.source.model_path!r} has none")
    out = []
    for k, p in enumerate(prompts):
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        try:
            out.append(apply_chat_template(tok, messages, add_generation_prompt=True, tokenize=False))
        except ChatTemplateRefused as exc:
            who = f" (user {users[k]!r})" if users is not None else ""
            raise InferenceError(f"prompt {k + 1} of {len(prompts)}{who}: {exc}") from None
    return out


def _cut(text: str, stop: Sequence[str]) -> str:
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


@torch.no_grad()
def generate_tokens(model: torch.nn.Module, slot: Any, rows: torch.Tensor, index: torch.Tensor,
                    prompt_ids: Sequence[Sequence[int]], pad_id: int, settings: GenerationSettings,
                    output_scores: bool = False, synced_gpus: bool = False,
                    autocast_dtype: torch.dtype | None = None) -> tuple[list[list[int]], Any]:
    """The core every caller shares: left-pads token prompts into one batch and generates with
    every sequence on the adapter ``rows[index[i]]``. ``synced_gpus`` keeps ZeRO-3 ranks stepping
    together until every rank is done (each forward gathers the base collectively);
    ``autocast_dtype``: the recipe's autocast (bf16 on CUDA), as training computed."""
    if settings.max_new_tokens == 0:  # nothing to generate (serve's echo asks for it); generate() refuses 0
        return [[] for _ in prompt_ids], None
    device = rows.device
    width = max(len(p) for p in prompt_ids)
    room = context_of(model) - width
    if room <= 0:
        raise ValueError(f"a prompt of {width} tokens leaves no room in the model's context of {context_of(model)}")
    if settings.max_new_tokens > room:
        # The batch stops at the context (past it a learned position table has no row): one generate
        # call whatever the rows need, as ZeRO-3's synced ranks require. generate() groups prompts by
        # their own room first, so what a prompt gets there never depends on its batch-mates.
        settings = dataclasses.replace(settings, max_new_tokens=room)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    if settings.num_beams > 1:
        index = index.repeat_interleave(settings.num_beams)
    kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                                  num_beams=settings.num_beams, pad_token_id=pad_id, return_dict_in_generate=True,
                                  output_scores=output_scores, synced_gpus=synced_gpus)
    if settings.ignore_eos:
        kwargs["min_new_tokens"] = settings.max_new_tokens
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with slot.activate(rows, index), autocast:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    return [seq.tolist() for seq in out.sequences[:, width:]], out


def decode_new(tokenizer: Any, new_ids: list[int], stop: Sequence[str], ignore_eos: bool = False) -> tuple[str, int]:
    """The text of generated ids up to EOS (padding dropped) and a stop string; and the token count."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = new_ids[: new_ids.index(eos)] if eos is not None and eos in new_ids and not ignore_eos else new_ids
    if pad is not None and pad != eos:
        ids = [t for t in ids if t != pad]
    return _cut(tokenizer.decode(ids, skip_special_tokens=True), stop), len(ids)


def generate_batch(trained: TrainedAdapters, prompts: Sequence[Any], users: Sequence[str],
                   settings: GenerationSettings = GenerationSettings(), output_scores: bool = False) -> tuple[list[Generation], Any]:
    """One batch: every prompt on its own user's adapter. Returns the generations and, with
    ``output_scores``, the raw ``generate`` output (scores per step)."""
    if len(prompts) != len(users):
        raise InferenceError(f"{len(prompts)} prompts but {len(users)} users")
    prompt_ids = _prompt_ids(trained, render_prompts(trained, prompts, settings.chat, users), users, settings)
    return _generate_ids(trained, prompt_ids, users, settings, output_scores)


def _prompt_ids(trained: TrainedAdapters, texts: Sequence[str], users: Sequence[str],
                settings: GenerationSettings) -> list[list[int]]:
    """The prompts' token ids; a prompt that leaves no room in the context is an error naming it."""
    ids = trained.tokenizer(list(texts), add_special_tokens=not settings.chat)["input_ids"]
    for k, p in enumerate(ids):
        if settings.max_new_tokens and len(p) >= trained.context:
            raise InferenceError(f"prompt {k + 1} of {len(ids)} (user {users[k]!r}): {len(p)} tokens leave no room to "
                                 f"generate in the model's context of {trained.context} tokens (max_position_embeddings)")
    return ids


def _generate_ids(trained: TrainedAdapters, prompt_ids: Sequence[Sequence[int]], users: Sequence[str],
                  settings: GenerationSettings, output_scores: bool = False) -> tuple[list[Generation], Any]:
    """A prompt whose ``max_new_tokens`` would run past the model's context generates up to it: it
    goes with the prompts of its own bound, so what a prompt gets never depends on its batch-mates
    (a batch runs as long as its longest-running row, and rows past the context would index outside
    a learned position table)."""
    tok = trained.tokenizer  # load_tokenizer gives every tokenizer a pad token
    bound = [min(settings.max_new_tokens, trained.context - len(p)) for p in prompt_ids]
    groups: dict[int, list[int]] = {}
    for k, b in enumerate(bound):
        groups.setdefault(b, []).append(k)
    if output_scores and len(groups) > 1:
        raise InferenceError("output_scores needs every prompt's max_new_tokens inside the model's context")
    results: list[Generation | None] = [None] * len(prompt_ids)
    out = None
    for b, members in groups.items():
        rows, index, _ = trained.batch_rows([users[k] for k in members])
        group_settings = settings if b == settings.max_new_tokens else dataclasses.replace(settings, max_new_tokens=b)
        new, out = generate_tokens(trained.model, trained.slot, rows, index, [prompt_ids[k] for k in members],
                                   tok.pad_token_id, group_settings, output_scores, autocast_dtype=trained.autocast_dtype)
        for k, ids in zip(members, new):
            text, count = decode_new(tok, ids, settings.stop, settings.ignore_eos)
            results[k] = Generation(text, count, users[k] in trained, context_bound=b < settings.max_new_tokens)
    return [r for r in results if r is not None], out


def generate(trained: TrainedAdapters, prompts: Sequence[Any], users: Sequence[str],
             settings: GenerationSettings = GenerationSettings(), batch_size: int = 16,
             progress: bool = False) -> tuple[list[Generation], GenerationStats]:
    """Every prompt with its own user's adapter, ``batch_size`` prompts (of mixed users) a batch.
    Users never trained get the base model, named once in a warning. Every prompt is rendered
    before the first batch, so a prompt the chat template refuses costs no generation."""
    if len(prompts) != len(users):
        raise InferenceError(f"{len(prompts)} prompts but {len(users)} users")
    prompt_ids = _prompt_ids(trained, render_prompts(trained, prompts, settings.chat, users), users, settings)

    stats = GenerationStats(prompts=len(prompts))
    unknown = sorted({u for u in users if u not in trained})
    if unknown:
        stats.unknown_users = unknown
        log.warning("users never trained get the base model: %s%s", ", ".join(map(repr, unknown[:10])),
                    f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
    results: list[Generation] = []
    start = time.perf_counter()
    bar = progress_bar(total=len(prompts), desc="generate", unit="prompt", enabled=progress)
    for s in range(0, len(prompts), batch_size):
        batch, _ = _generate_ids(trained, prompt_ids[s : s + batch_size], users[s : s + batch_size], settings)
        results.extend(batch)
        stats.new_tokens += sum(g.tokens for g in batch)
        stats.seconds = time.perf_counter() - start
        bar.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}", refresh=False)
        bar.update(len(batch))
    bar.close()
    cut = sum(g.context_bound for g in results)
    if cut:
        log.warning("%d prompt%s generated up to the model's context of %d tokens, short of max_new_tokens %d",
                    cut, "" if cut == 1 else "s", trained.context, settings.max_new_tokens)
    return results, stats
