"""One user's PEFT LoRA training job, written the way users write one today: the e2e baseline.

``python -m flora_train.bench.peft_job JOB.json`` is a whole job in its own process: start Python,
import torch/transformers/peft/datasets, read and tokenise that user's examples, load the base,
wrap it with ``get_peft_model``, train with AdamW, save the adapter. ``bench e2e`` times such
processes one after another. ``train_adapter`` is the training part alone, which the bench also
runs back to back inside one warm process as a lower bound on what a per-user job can cost.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flora_train.bench.common import quiet_peft

# The modules a LoRA on every linear layer of a Llama targets (the bench's flora_train runs use the same).
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_adapter(model_dir: Path, train: list[dict[str, Any]], rank: int, alpha: float, lr: float,
                  batch_size: int, epochs: int, pad_id: int, out: Path, device: torch.device,
                  seed: int) -> tuple[float, torch.nn.Module]:
    """Base load to saved adapter for one user; returns (seconds, the trained PEFT model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from flora_train.data.tokenize import collate
    from flora_train.train.loss import target_tokens, token_losses

    start = time.perf_counter()
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    with quiet_peft():
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = list(range(len(train)))
    rng = random.Random(seed)
    # bf16 autocast on a GPU, as flora_train's train.precision=bf16 there; float32 on CPU.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    for _ in range(epochs):
        rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            batch = {k: v.to(device) for k, v in collate([train[i] for i in order[s : s + batch_size]], pad_id).items()}
            with autocast:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = token_losses(logits, batch["labels"]).sum() / target_tokens(batch["labels"]).sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.save_pretrained(out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, model.eval()


def tokenised(path: Path, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """A JSONL file's examples as ``user_id``, token ids and completion labels."""
    from flora_train.data import BadRows, Columns, load_examples, tokenize_examples

    rows = tokenize_examples(load_examples(path, "auto", Columns(), BadRows()), tokenizer, max_length, True, BadRows())
    return [{"user_id": u, "input_ids": i, "labels": lab}
            for u, i, lab in zip(rows["user_id"], rows["input_ids"], rows["labels"])]


def main(argv: list[str]) -> int:
    """Runs the job described by the JSON file ``argv[0]`` (written by ``bench e2e``)."""
    from flora_train.base import load_tokenizer

    job = json.loads(Path(argv[0]).read_text())
    model_dir = Path(job["model_dir"])
    tokenizer = load_tokenizer(str(model_dir))
    train = tokenised(Path(job["data"]), tokenizer, job["max_length"])
    train_adapter(model_dir, train, job["rank"], job["alpha"], job["lr"], job["batch_size"], job["epochs"],
                  int(tokenizer.pad_token_id), Path(job["out"]), torch.device(job["device"]), job["seed"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
