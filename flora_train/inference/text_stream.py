"""Generated tokens as text, as they arrive: stop strings are found the moment they are complete
(so generation ends there), and text is released only once it can no longer change: not while it
ends in a partial UTF-8 character, nor while its end could still become a stop string.

Decoding is incremental (the way vLLM and TGI detokenize): each token decodes a short window of the
last few ids, not the whole sequence again, and the text grows by what that window adds once it
no longer ends in a partial character.

``add_at`` also says where the token's text begins (what logprobs' ``text_offset`` reports): after
every whole character before it, so each byte of a character split across tokens points at that
character; a token that completes a stop string points at most at the text's end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.released = 0  # characters of the text already handed out
        self.text = ""  # the text so far (up to a stop string, once one is found)
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] is the window already turned into text
        self._read = 0
        self._waiting = 0  # whole characters that ids[_read:] decode to, before a partial one

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def offsets(self, tokens: Sequence[int]) -> list[int]:
        """Adds ``tokens`` (a prompt's, say) and returns where each one's text begins."""
        return [self.add_at(token)[1] for token in tokens]

    def add_at(self, token: int) -> tuple[str, int]:
        """``add``, and where the token's text begins in ``text``."""
        at = len(self.text) + self._waiting
        released = self.add(token)
        return released, min(at, len(self.text)) if self.stopped else at

    def add(self, token: int) -> str:
        """Appends a token; returns the text that became final. After a stop string was completed
        (``stopped``), the text ends before it and nothing more is released."""
        self.ids.append(token)
        seen = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        pending = window.endswith("\ufffd")  # a character split across tokens: wait for the rest
        if len(window) > len(seen) and not pending:
            self.text += window[len(seen) :]
            self._prefix, self._read = self._read, len(self.ids)
        self._waiting = len(window[len(seen) :].rstrip("\ufffd")) if self._read < len(self.ids) else 0
        return self._settle(final=False)

    def flush(self) -> str:
        """The rest of the text, when generation ended for another reason (a partial character
        still pending is decoded as it stands)."""
        if self._read < len(self.ids) and not self.stopped:
            seen = self._decode(self.ids[self._prefix : self._read])
            self.text += self._decode(self.ids[self._prefix :])[len(seen) :]
            self._read = len(self.ids)
        return self._settle(final=True)

    def _settle(self, final: bool) -> str:
        """Cuts the text at a completed stop string, and releases what can no longer change."""
        if self.stopped:
            return ""
        ends = [self.text.find(s) for s in self.stop if s in self.text]
        if ends:
            self.text = self.text[: min(ends)]
            self.stopped = True
            return self._release(len(self.text))
        safe = len(self.text)
        hold = 0
        for s in [] if final else self.stop:  # hold back a tail that may yet become a stop string
            for k in range(min(len(s) - 1, safe), hold, -1):
                if self.text[safe - k : safe] == s[:k]:
                    hold = k
                    break
        return self._release(safe - hold)

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        out = self.text[self.released : upto]
        self.released = upto
        return out


__all__ = ["TextStream"]
