"""What the data readers and checks raise and count: ``DataError`` for input a run cannot use, and
``BadRows``, the policy (``data.on_bad_row``) that stops at a bad row or skips and counts it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from flora_train.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and line (or row) and the user where known."""


@dataclass
class BadRows:
    """What was skipped, by reason, with the first few places for the log."""

    policy: str = "error"
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # each example's
    # What an error offers when no setting fixes the row (None: nothing to offer; generate's prompts)
    skip_hint: str | None = "set data.on_bad_row=skip to skip such rows"

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self, where: str, reason: str, detail: str, fix: str | None = None) -> None:
        """``fix``: what to set when the row is fine but read under the wrong settings (then skipping
        rows is not the way out, and every row would say the same: the first stops the read). Other
        bad rows under the error policy are gathered, and ``refuse`` names them together once the
        pass is over: fixing the first alone would meet the next on the following try."""
        message = f"{where}: {detail}"
        if self.policy == "error" and fix:
            raise DataError(f"{message} ({fix})")
        self.counts[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(message)
            self.reasons.append(reason)

    def summary(self, shown: int = 3) -> str:
        """The first ``shown`` bad rows by file and line, and how many more there are of each reason."""
        if self.total == 1:
            return self.examples[0]
        listed = self.examples[:shown]
        message = f"{self.total} bad rows: {'; '.join(listed)}"
        hidden = Counter(self.counts)
        hidden.subtract(self.reasons[:shown])
        rest = self.total - len(listed)
        if rest and len(self.reasons) >= len(listed):  # (a data cache from before reasons were kept has none)
            by_reason = ", ".join(f"{reason.replace('_', ' ')} {n}" for reason, n in sorted(hidden.items()) if n > 0)
            message += f"; and {rest} more ({by_reason})"
        elif rest:
            message += f"; and {rest} more"
        return message

    def refuse(self) -> None:
        """Under the error policy, raises one ``DataError`` for the bad rows gathered so far: the first
        few by file and line, and how many more there are."""
        if self.policy != "error" or not self.total:
            return
        message = self.summary()
        raise DataError(f"{message} ({self.skip_hint})" if self.skip_hint else message)
