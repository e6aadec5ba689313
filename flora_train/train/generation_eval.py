"""Generation-based evaluation (``eval.generate: true``): each held-out example's prompt is
completed by generation, once with its user's adapter and once with the base model, and scored
against the reference completion by exact match and ROUGE-L (``rouge-score``). Per user: both
scores and the adapter's gain over the base; the users whose adapter does worse than the base are
named. Mixed users share every batch, as in training."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flora_train import dist as fdist
from flora_train.data.examples import TokenizedExamples
from flora_train.data.tokenize import IGNORE
from flora_train.files import replace_text
from flora_train.inference.generate import GenerationSettings, decode_new, generate_tokens


@dataclass
class UserGeneration:
    examples: int = 0
    exact: float = 0.0  # summed over examples
    rouge_l: float = 0.0
    base_exact: float = 0.0
    base_rouge_l: float = 0.0

    def mean(self, total: float) -> float:
        return total / self.examples if self.examples else float("nan")

    def as_row(self, user: str) -> dict[str, Any]:
        return {"user_id": user, "examples": self.examples, "exact_match": self.mean(self.exact),
                "rouge_l": self.mean(self.rouge_l), "base_exact_match": self.mean(self.base_exact),
                "base_rouge_l": self.mean(self.base_rouge_l),
                "rouge_l_gain": self.mean(self.rouge_l) - self.mean(self.base_rouge_l)}


def _split(input_ids: list[int], labels: list[int], eos: int | None) -> tuple[list[int], list[int]]:
    """(prompt tokens, reference completion tokens) of a tokenised prompt/completion example."""
    first = next(i for i, t in enumerate(labels) if t != IGNORE)
    target = [t for t in labels[first:] if t != IGNORE and t != eos]
    return input_ids[:first], target


def generation_eval(model: torch.nn.Module, slot: Any, tokenizer: Any, examples: TokenizedExamples,
                    adapter_rows: Callable[[list[str]], torch.Tensor], base_rows: Callable[[list[str]], torch.Tensor],
                    settings: GenerationSettings, batch_size: int, device: torch.device, total_batches: int = 0,
                    synced: bool = False) -> dict[str, UserGeneration]:
    """Scores this rank's ``examples``; ``total_batches`` (the most any rank has) keeps ZeRO-3 ranks
    generating in lockstep (``synced``): a rank out of examples generates on a one-token prompt."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: dict[str, UserGeneration] = {}
    order = np.argsort(examples.user_codes, kind="stable").tolist()
    was_training = model.training
    model.eval()
    try:
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        batches += [[]] * max(0, total_batches - len(batches))
        for ids in batches:
            if not ids:  # keeps this rank's module sequence in step with ranks that still generate
                rows = base_rows(["__pad__"]).to(device)
                generate_tokens(model, slot, rows, torch.zeros(1, dtype=torch.long, device=device), [[pad]], pad,
                                settings, synced_gpus=synced)
                continue
            users = [examples.user(i) for i in ids]
            split = [_split(examples.input_ids(i).tolist(), examples.labels(i).tolist(), eos) for i in ids]
            if any(not prompt for prompt, _ in split):
                raise ValueError("eval.generate needs prompt/completion examples (a `text` example has no prompt "
                                 "to complete); set eval.generate=false for text data")
            unique = list(dict.fromkeys(users))
            index = torch.tensor([unique.index(u) for u in users], device=device)
            outputs = {}
            for kind, rows_for in (("adapter", adapter_rows), ("base", base_rows)):
                new, _ = generate_tokens(model, slot, rows_for(unique).to(device), index, [p for p, _ in split], pad,
                                         settings, synced_gpus=synced)
                outputs[kind] = [decode_new(tokenizer, n, settings.stop)[0].strip() for n in new]
            for k, user in enumerate(users):
                reference = tokenizer.decode(split[k][1], skip_special_tokens=True).strip()
                r = results.setdefault(user, UserGeneration())
                r.examples += 1
                r.exact += float(outputs["adapter"][k] == reference)
                r.base_exact += float(outputs["base"][k] == reference)
                r.rouge_l += scorer.score(reference, outputs["adapter"][k])["rougeL"].fmeasure
                r.base_rouge_l += scorer.score(reference, outputs["base"][k])["rougeL"].fmeasure
    finally:
        model.train(was_training)
    return results


def summarise_generation(per_user: dict[str, UserGeneration], prefix: str = "eval_gen") -> dict[str, float]:
    rows = [r.as_row(u) for u, r in per_user.items() if r.examples]
    out: dict[str, float] = {f"{prefix}/users": float(len(rows))}
    if not rows:
        return out
    for key in ("exact_match", "rouge_l", "base_exact_match", "base_rouge_l", "rouge_l_gain"):
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        out[f"{prefix}/{key}_mean"] = float(values.mean())
        if key == "rouge_l_gain":
            for q in (0.1, 0.5, 0.9):
                out[f"{prefix}/{key}_p{int(q * 100)}"] = float(torch.quantile(values, q))
    out[f"{prefix}/users_worse_than_base"] = float(sum(r["rouge_l_gain"] < 0 for r in rows))
    return out


def worse_than_base(per_user: dict[str, UserGeneration]) -> list[str]:
    rows = [r.as_row(u) for u, r in per_user.items() if r.examples]
    return [r["user_id"] for r in sorted(rows, key=lambda r: r["rouge_l_gain"]) if r["rouge_l_gain"] < 0]


def write_generation_report(directory: Path, step: int, per_user: dict[str, UserGeneration]) -> tuple[Path, Path]:
    """The per-user JSONL and a histogram PNG of the per-user ROUGE-L gains over the base."""
    import matplotlib.pyplot as plt

    from flora_train.bench.common import new_figure

    directory.mkdir(parents=True, exist_ok=True)
    jsonl = directory / f"generate_per_user-step{step}.jsonl"
    rows = [r.as_row(u) for u, r in sorted(per_user.items())]
    replace_text(jsonl, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    gains = [r["rouge_l_gain"] for r in rows if not math.isnan(r["rouge_l_gain"])]
    fig, (ax,) = new_figure(1)
    ax.hist(gains, bins=min(40, max(5, len(gains) // 5)), color="tab:blue")
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.set_xlabel("ROUGE-L of the user's adapter minus the base model's")
    ax.set_ylabel("users")
    ax.set_title(f"per-user gain over the base, step {step} ({len(gains)} users)")
    png = directory / f"generate_gain-step{step}.png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return jsonl, png


def gather_generation(local: dict[str, UserGeneration]) -> dict[str, UserGeneration]:
    merged: dict[str, UserGeneration] = {}
    for part in fdist.all_gather_objects({u: asdict(r) for u, r in local.items()}):
        merged.update({u: UserGeneration(**r) for u, r in part.items()})
    return merged

