"""A synthetic personalisation task that only per-user adapters can solve.

Each user has a hidden rule: for each of ``num_keys`` questions ("favourite colour?") it always
answers one of ``num_values`` words, drawn per user at random. Prompts carry random filler words,
so held-out prompts are new text. Across users every answer is equally likely, so one adapter
shared by everyone stays near chance (1 / num_values), while a user's own adapter can learn its
rule from a handful of examples.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from flora_train.files import write_lines

KEYS = ["colour", "animal", "city", "fruit", "sport", "metal", "planet", "drink", "flower", "tool", "music", "river"]
VALUES = ["red", "blue", "green", "amber", "violet", "silver", "ochre", "teal", "coral", "ivory", "olive", "plum"]
FILLER = ["today", "please", "quick", "question", "hello", "again", "friend", "note", "so", "well", "hey", "now"]


@dataclass(frozen=True)
class SyntheticTask:
    num_users: int = 1000
    train_examples_per_user: int = 16
    eval_examples_per_user: int = 4
    num_keys: int = 4
    num_values: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_keys <= len(KEYS):
            raise ValueError(f"num_keys must be in 1..{len(KEYS)}")
        if not 2 <= self.num_values <= len(VALUES):
            raise ValueError(f"num_values must be in 2..{len(VALUES)}")

    def user_id(self, i: int) -> str:
        return f"user-{i:06d}"

    def rule(self, i: int) -> dict[str, str]:
        """User ``i``'s hidden answer for each key."""
        rng = random.Random(f"{self.seed}/rule/{i}")
        return {k: rng.choice(VALUES[: self.num_values]) for k in KEYS[: self.num_keys]}

    def examples(self, i: int, split: str, n: int) -> list[dict[str, str]]:
        rng = random.Random(f"{self.seed}/{split}/{i}")
        rule = self.rule(i)
        out = []
        for j in range(n):
            # Cycle through keys so that every key is seen; shuffle filler for fresh prompts.
            key = KEYS[(j + rng.randrange(self.num_keys)) % self.num_keys] if split == "eval" else KEYS[j % self.num_keys]
            filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 3)))
            out.append({"user_id": self.user_id(i), "prompt": f"{filler} : favourite {key} ?", "completion": f" {rule[key]}"})
        return out

    FILES = ("train.jsonl", "eval.jsonl")  # what ``write`` writes

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Writes ``train.jsonl`` and ``eval.jsonl``; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = directory / self.FILES[0], directory / self.FILES[1]
        for path, split, n in zip(paths, ("train", "eval"), (self.train_examples_per_user, self.eval_examples_per_user)):
            write_lines(path, lambda split=split, n=n: (json.dumps(ex) + "\n" for i in range(self.num_users)
                                                        for ex in self.examples(i, split, n)))
        return paths

    def texts(self, split: str = "train") -> list[str]:
        """Every example of ``split`` as one string (prompt + completion), e.g. to train a tokenizer."""
        n = self.train_examples_per_user if split == "train" else self.eval_examples_per_user
        return [ex["prompt"] + ex["completion"] for i in range(self.num_users) for ex in self.examples(i, split, n)]

    def chance_accuracy(self) -> float:
        return 1.0 / self.num_values
