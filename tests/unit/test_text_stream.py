"""Incremental detokenization with stop strings: whatever the tokens (random ids of a byte-level
BPE, partial UTF-8 characters included), the text released piece by piece is the full decode,
cut before the first stop string, and nothing is released past a stop string; each token's
offset in the text (logprobs' text_offset) counts the whole characters before it."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flora_train.inference.text_stream import TextStream


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from flora_train.base import load_tokenizer

    return load_tokenizer(str(tiny_llama_dir))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_released_text_is_the_full_decode_cut_at_the_stop_string(tokenizer, data):
    vocab = len(tokenizer)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40))
    full = tokenizer.decode(ids, skip_special_tokens=True)
    stop = []
    if full and data.draw(st.booleans()):
        a = data.draw(st.integers(0, len(full) - 1))
        stop = [full[a : a + data.draw(st.integers(1, 4))]]
    stream = TextStream(tokenizer, stop)
    out, offsets = [], []
    for token in ids:
        released, at = stream.add_at(token)
        out.append(released)
        offsets.append(at)
        if stream.stopped:
            break
    stopped_by_a_token = stream.stopped  # (else a stop string may yet complete at the flush)
    if not stream.stopped:
        out.append(stream.flush())
    want = full[: full.find(stop[0])] if stop and stop[0] in full else full
    assert "".join(out) == want
    assert stream.stopped == bool(stop and stop[0] in full)
    # Each token's offset: the whole characters the tokens before it decode to (a partial one
    # at their end, which this token may complete, not counted); a stopping token's is in the text.
    before = [len(tokenizer.decode(ids[:i], skip_special_tokens=True).rstrip("\ufffd")) for i in range(len(offsets))]
    assert offsets[:-1] == before[:-1]
    assert offsets[-1] == (min(before[-1], len(want)) if stopped_by_a_token else before[-1])



def chat_bytes(tokenizer, ids):
    """The bytes chat's logprobs give these tokens, joined."""
    from flora_train.inference.openai_api import TokenText, chat_logprobs
    from flora_train.inference.sampling import TokenLogprob

    entries = chat_logprobs([TokenLogprob(token, -1.0, []) for token in ids], TokenText(tokenizer))
    return bytes(b for entry in entries for b in entry["bytes"])


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_each_tokens_bytes_join_into_the_text(tokenizer, data):
    """Chat logprobs' ``bytes``: a character split across tokens gave each token the bytes of its
    replacement character (EF BF BD), so a client joining them got no text back."""
    specials = set(tokenizer.all_special_ids)
    token = st.integers(0, len(tokenizer) - 1).filter(lambda i: i not in specials)
    ids = data.draw(st.lists(token, min_size=1, max_size=40))
    assert chat_bytes(tokenizer, ids).decode(errors="replace") == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_character_split_across_tokens_is_its_bytes_and_a_special_token_its_text(tokenizer):
    text = "héllo 🌈 日本"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)  # (characters split across tokens)
    assert chat_bytes(tokenizer, ids) == text.encode()
    assert chat_bytes(tokenizer, [tokenizer.bos_token_id]) == tokenizer.bos_token.encode()


def test_a_partial_character_token_is_named_by_its_bytes_so_alternatives_stay_apart(tokenizer):
    """Completions' ``top_logprobs`` is keyed by token text: tokens each holding part of a character
    were all U+FFFD, so of three such alternatives the client got one."""
    from flora_train.inference.openai_api import TokenText, completion_logprobs
    from flora_train.inference.sampling import TokenLogprob

    name = TokenText(tokenizer)
    ids = tokenizer("héllo 🌈 日本", add_special_tokens=False)["input_ids"]
    partial = [token for token in ids if "\ufffd" in tokenizer.decode([token])]
    assert len(set(partial)) >= 3
    for token in ids:
        raw = bytes(name.bytes(token))
        want = "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if token in partial else tokenizer.decode([token])
        assert name(token) == want
    top = [(token, -1.0 - i) for i, token in enumerate(dict.fromkeys(partial))][:3]
    lp = completion_logprobs([TokenLogprob(top[0][0], -1.0, top)], name, [0])
    assert len(lp["top_logprobs"][0]) == 3 and lp["tokens"][0] == name(top[0][0])
    assert name(tokenizer.bos_token_id) == tokenizer.bos_token
