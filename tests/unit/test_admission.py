"""What a request may ask: prompt + max_tokens against the server's limit, and the refusal naming
what set that limit (and what would raise it, where anything can)."""

import pytest

from flora_train.inference import openai_api as api
from flora_train.inference.admission import ApiError, RequestReader

ORIGIN = "the run's data.max_length; --max-prompt-tokens raises it, up to the model's context of 256"


def refusal(max_tokens: int) -> str:
    reader = RequestReader(tokenizer=None, vocab=50, limit=32, origin=ORIGIN, default_max_tokens=16, context=256)
    with pytest.raises(ApiError) as refused:
        reader.settings(api.CompletionRequest(prompt="x"), max_tokens, prompt_tokens=4, chat=False, echo=False)
    return refused.value.message


def test_a_request_past_the_limit_is_told_what_raises_it_and_one_past_the_context_that_nothing_does():
    assert refusal(100) == f"prompt of 4 tokens + max_tokens 100 exceeds the limit of 32 tokens ({ORIGIN})"
    # (It was told the same: to raise --max-prompt-tokens, which cannot go past the 256 positions.)
    assert refusal(10**9) == ("prompt of 4 tokens + max_tokens 1000000000 exceeds the limit of 256 tokens "
                              "(the model's context)")
