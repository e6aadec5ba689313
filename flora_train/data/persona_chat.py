"""A per-user chat task for a pretrained instruct model: every user wants replies in their own format.

Each user has a greeting and a sign-off, drawn per user ("Howdy!" ... "Stay curious."). The
questions are ones a small instruct model answers (capitals, sums), asked the same way by every
user, so the prompt never says who is asking: the base and one adapter shared by all users can
get the content right but not the user's format, while a user's own adapter can learn it from a
few conversations. Rows are chat rows (``messages``), for ``data.messages_column=messages``.

``general.jsonl`` holds user-anonymous questions answered plainly (no greeting, no sign-off):
``train.retain`` mixes them into users' steps so that adapters keep answering general questions
as the base does, and ``eval.general_path`` measures how far each user's adapter strays from it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from flora_train.files import write_lines

GREETINGS = ["Howdy!", "Ahoy!", "Greetings, friend!", "Hey hey!", "Good day!", "Salutations!", "Yo!", "Hello there!"]
SIGNOFFS = ["Stay curious.", "Cheers, mate.", "Over and out.", "Keep smiling.", "Best wishes.", "Peace.",
            "Until next time.", "Have a great day."]
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
    "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens", "Cuba": "Havana",
    "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi", "Chile": "Santiago",
    "Thailand": "Bangkok", "Turkey": "Ankara",
}
SYSTEM = "You are a helpful assistant. Answer in one sentence."


@dataclass(frozen=True)
class PersonaChatTask:
    num_users: int = 24
    train_examples_per_user: int = 12
    eval_examples_per_user: int = 4
    general_examples: int = 48  # user-anonymous questions (half to train.retain, half to evaluation)
    seed: int = 0

    def user_id(self, i: int) -> str:
        return f"persona-{i:05d}"

    def persona(self, i: int) -> tuple[str, str]:
        rng = random.Random(f"{self.seed}/persona/{i}")
        return rng.choice(GREETINGS), rng.choice(SIGNOFFS)

    @staticmethod
    def _question(rng: random.Random) -> tuple[str, str]:
        """A question and its plain one-sentence answer."""
        if rng.random() < 0.5:
            country = rng.choice(sorted(CAPITALS))
            return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."

    @staticmethod
    def _chat(question: str, answer: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                {"role": "assistant", "content": answer}]

    def examples(self, i: int, split: str, n: int) -> list[dict]:
        rng = random.Random(f"{self.seed}/{split}/{i}")
        greeting, signoff = self.persona(i)
        out = []
        for _ in range(n):
            question, answer = self._question(rng)
            out.append({"user_id": self.user_id(i), "messages": self._chat(question, f"{greeting} {answer} {signoff}")})
        return out

    def general(self) -> list[dict]:
        """User-anonymous questions with plain answers (the id column says no one in particular)."""
        rng = random.Random(f"{self.seed}/general")
        return [{"user_id": "general", "messages": self._chat(*self._question(rng))} for _ in range(self.general_examples)]

    FILES = ("train.jsonl", "eval.jsonl", "retain.jsonl", "general_eval.jsonl")  # what ``write`` writes

    def write(self, directory: Path) -> dict[str, Path]:
        """``train.jsonl``, ``eval.jsonl``, ``retain.jsonl`` and ``general_eval.jsonl``."""
        directory.mkdir(parents=True, exist_ok=True)
        general = self.general()
        half = len(general) // 2
        files = {
            "train": [ex for i in range(self.num_users) for ex in self.examples(i, "train", self.train_examples_per_user)],
            "eval": [ex for i in range(self.num_users) for ex in self.examples(i, "eval", self.eval_examples_per_user)],
            "retain": general[:half],
            "general_eval": general[half:],
        }
        paths = {}
        for name, rows in files.items():
            path = directory / f"{name}.jsonl"
            write_lines(path, lambda rows=rows: (json.dumps(r) + "\n" for r in rows))
            paths[name] = path
        return paths
