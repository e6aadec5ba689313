"""Generated tokens as text, as they arrive: stop strings are found the moment they are complete
(so generation ends there), and text is released only once it can no longer change: not while it
ends in a partial UTF-8 character, nor while its end could still become a stop string."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.released = 0  # characters of the text already handed out
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Appends a token; returns the text that became final. After a stop string was completed
        (``stopped``), the text ends before it and nothing more is released."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        ends = [self.text.find(s) for s in self.stop if s in self.text]
        if ends:
            self.text = self.text[: min(ends)]
            self.stopped = True
            return self._release(len(self.text))
        safe = len(self.text)
        if self.text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            safe = len(self.text.rstrip("\ufffd"))
        hold = 0
        for s in self.stop:  # hold back a tail that may yet become a stop string
            for k in range(min(len(s) - 1, safe), hold, -1):
                if self.text[safe - k : safe] == s[:k]:
                    hold = k
                    break
        return self._release(safe - hold)

    def flush(self) -> str:
        """The rest of the text, when generation ended for another reason."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        out = self.text[self.released : upto]
        self.released = upto
        return out


__all__ = ["TextStream"]
