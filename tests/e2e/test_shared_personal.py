"""Shared + personal adapters through the CLI: the shared phase, then personal rows on the frozen
shared adapter; checkpointed and resumed bit for bit; scored beside the base and the shared adapter;
exported (the shared adapter once, beside the users') and served from the run or the export alike;
and the joint mode."""

import json
import subprocess
import sys

import torch

from flora_train.inference.trained import load_trained
from flora_train.run_dir.checkpoints import latest_checkpoint, list_checkpoints, read_shared_adapter

from tests.distributed.helpers import saved_state
from tests.e2e.helpers import REPO, SMALL, flora_train

SHARED = [*SMALL, "adapter.shared.method=lora", "adapter.shared.rank=4", "adapter.shared.lr=0.01",
          "adapter.shared.target_modules=all-linear", "train.shared_steps=6"]
# Each user keeps its best row on a validation split; patience 1 stops users early.
SELECT = ["data.validation_fraction=0.25", "train.select=best", "train.validate_every_steps=2", "train.patience=1"]


def test_shared_then_personal_trains_resumes_exports_and_serves(tmp_path):
    full = tmp_path / "full"
    out = flora_train("run", "recipes/quickstart.yaml", *SHARED, *SELECT, f"run_dir={full}", "export.format=flora").stdout
    assert "shared + personal (best of)" in out and "shared adapter" in out and "users better than the shared adapter" in out
    assert "best global (step" in out  # the one moment for everyone that the validation split prefers
    global_row = next(line for line in out.splitlines() if line.startswith("best global (step")).split()
    assert "nan" not in global_row and "-" not in global_row[-6:], global_row  # its accuracy measured too
    users = [json.loads(line) for line in flora_train("users", str(full), "--json").stdout.splitlines()]
    assert len(users) == 24 and all(u["kept_step"] in (0, 2, 4, 6, 8, 10, 12) for u in users)
    assert any(u["stopped_after"] is not None for u in users) and any(u["kept_step"] > 0 for u in users)
    for u in users:  # a stopped user trains no more, and keeps a row from before it stopped
        if u["stopped_after"] is not None:
            assert u["kept_step"] < u["stopped_after"] and u["steps"] < 8
    assert sorted(p.name for p in (full / "eval").glob("validation-step*.jsonl")) == sorted(
        f"validation-step{k}.jsonl" for k in (0, 2, 4, 6, 8, 10, 12))
    first, last = list_checkpoints(full)  # the shared phase's own checkpoint (step 0), then the end
    assert first.name == "step-00000000"
    (row0, meta0), (row1, meta1) = read_shared_adapter(first), read_shared_adapter(last)
    assert meta0["frozen"] == meta1["frozen"] == "1" and meta0["steps"] == "6"
    assert torch.equal(row0["row"], row1["row"]), "a frozen shared adapter never changes in the personal phase"
    # Selection does not change the shared adapter: it trains on the validation split too, so it is
    # the one the same recipe without selection trains, bit for bit (the identity candidate is it).
    plain = tmp_path / "plain"
    flora_train("run", "recipes/quickstart.yaml", *SHARED, f"run_dir={plain}", "train.max_steps=1", "tracking.enabled=false")
    assert torch.equal(read_shared_adapter(list_checkpoints(plain)[0])[0]["row"], row0["row"])
    result = json.loads((full / "result.json").read_text())
    assert result["eval_shared"]["eval_shared/users"] == 24
    best_global = result["eval_global"]
    assert best_global["eval_global/users"] == 24 and 0 <= best_global["eval_global/accuracy_mean"] <= 1
    assert result["eval"]["eval/loss_mean"] < result["eval_base"]["eval_base/loss_mean"]

    # Cut after 6 steps, then resumed: the same rows, moments, kept rows, stops and shared adapter, bit for bit.
    cut = tmp_path / "cut"
    flora_train("run", "recipes/quickstart.yaml", *SHARED, *SELECT, f"run_dir={cut}", "train.max_steps=6", "tracking.enabled=false")
    # A validation file torn by a disk fault leaves its moment out of the best global choice, named.
    torn = cut / "eval" / "validation-step2.jsonl"
    torn.write_text(torn.read_text()[:-40])
    resumed = flora_train("run", "recipes/quickstart.yaml", *SHARED, *SELECT, f"run_dir={cut}",
                          "tracking.enabled=false", "--resume")
    assert f"{torn}:24: cannot be read (torn)" in resumed.stderr and "best global (step" in resumed.stdout
    assert json.loads((cut / "result.json").read_text())["eval_global_setting"] != "step 2"
    want, got = saved_state(full), saved_state(cut)
    assert set(got) == set(want)
    for user in want:
        for key in want[user]:
            assert torch.equal(got[user][key], want[user][key]), (user, key)
    assert torch.equal(read_shared_adapter(latest_checkpoint(cut))[0]["row"], row1["row"])
    changed = flora_train("run", "recipes/quickstart.yaml", *SHARED, *SELECT, f"run_dir={cut}", "adapter.shared.rank=2", "--resume",
                          check=False)
    assert changed.returncode == 2 and "adapter.shared" in changed.stderr and "Traceback" not in changed.stderr

    # The export carries the shared adapter once; serving it equals serving the run.
    export = full / "export" / "flora"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["shared_adapter"] == "shared-adapter" and (export / "shared-adapter" / "flora_adapter.safetensors").is_file()
    from_run, from_export = load_trained(full, device="cpu"), load_trained(export, device="cpu")
    assert torch.equal(from_run.slot.shared.row, row1["row"]) and torch.equal(from_export.slot.shared.row, row1["row"])
    # Both serve each user's kept row (where a validation chose one), not its last training row.
    served = {u: torch.where(want[u]["select.seen"] > 0, want[u]["select.kept"], want[u]["rows"]) for u in want}
    assert any(not torch.equal(served[u], want[u]["rows"]) for u in want)
    for source in (from_run, from_export):
        for user in want:
            assert torch.equal(source.row(user), served[user]), user
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"user_id": f"user-{i:06d}", "prompt": "favourite colour?"}) + "\n" for i in (1, 5, 9)))
    texts = []
    for source in (full, export):
        target = tmp_path / f"gen-{len(texts)}.jsonl"
        flora_train("generate", str(source), "--prompts", str(prompts), "--out", str(target), "--max-new-tokens", "6")
        texts.append([json.loads(line)["completion"] for line in target.read_text().splitlines()])
    assert texts[0] == texts[1] and len(texts[0]) == 3
    refused = flora_train("forget", str(full), "--users", "user-000001", check=False)
    assert refused.returncode == 2 and "holds a shared adapter" in refused.stderr and "Traceback" not in refused.stderr


def test_joint_trains_the_shared_adapter_in_every_step(tmp_path):
    run = tmp_path / "joint"
    joint = [a for a in SHARED if not a.startswith("train.shared_steps")] + ["train.shared_phase=joint", "tracking.enabled=false"]
    refused = flora_train("run", "recipes/quickstart.yaml", *joint, "train.shared_steps=6", f"run_dir={run}", check=False)
    assert refused.returncode == 2 and "train.shared_steps" in refused.stderr and "Traceback" not in refused.stderr
    out = flora_train("run", "recipes/quickstart.yaml", *joint, f"run_dir={run}").stdout
    assert "shared + personal" in out
    [only] = list_checkpoints(run)  # no shared phase, so no checkpoint of its own
    tensors, meta = read_shared_adapter(only)
    state = json.loads((only / "trainer_state.json").read_text())
    assert meta["frozen"] == "0" and meta["phase"] == "joint" and int(meta["steps"]) == state["next_step"] == 12
    assert "optim.exp_avg" in tensors and tensors["optim.exp_avg"].abs().max() > 0


def test_a_learning_rate_sweep_keeps_each_users_best_rate(tmp_path):
    """Two rates as two variants of every user in one job, on a shared adapter: each user keeps the
    rate whose kept row has the lower validation loss, and its rows equal a run at that rate alone
    (the variants draw their user's own batches; only the other rows sharing a step differ, so
    float32 reduction order). The shared adapter is the one a run without the sweep trains: it sees
    each user's data once an epoch, not once per variant (it trained on every variant's, twice as
    long, and the bench credited the sweep with a better shared adapter)."""
    common = [*SMALL, "data.validation_fraction=0.25", "train.select=best", "tracking.enabled=false",
              "adapter.shared.method=flora", "adapter.shared.rank=1", "adapter.shared.lr=0.05"]
    rates = (0.02, 0.2)
    alone = {}
    for lr in rates:
        run = tmp_path / f"lr{lr}"
        flora_train("run", "recipes/quickstart.yaml", *common, f"run_dir={run}", f"store.optimizer.lr={lr}")
        alone[lr] = (saved_state(run), {u["user_id"]: u for u in map(json.loads, flora_train("users", str(run), "--json").stdout.splitlines())})
    swept = tmp_path / "sweep"
    out = flora_train("run", "recipes/quickstart.yaml", *common, f"run_dir={swept}", f"train.sweep.lr=[{rates[0]},{rates[1]}]").stdout
    assert "per-user learning rates chosen on the validation split: 0.02:" in out
    [only] = list_checkpoints(swept)  # the variants' checkpoints are gone; this one holds one row per user
    shared, meta = read_shared_adapter(only)
    alone_shared, alone_meta = read_shared_adapter(list_checkpoints(tmp_path / f"lr{rates[0]}")[-1])
    assert meta["steps"] == alone_meta["steps"]
    assert sorted(shared) == sorted(alone_shared)
    for key, value in alone_shared.items():
        torch.testing.assert_close(shared[key], value, rtol=1e-5, atol=1e-7)
    chosen = json.loads((only / "trainer_state.json").read_text())["sweep"]["chosen"]
    state = saved_state(swept)
    assert sorted(state) == sorted(chosen) and len(chosen) == 24 and set(chosen.values()) <= set(rates)
    decided = 0
    for user, lr in chosen.items():
        losses = {r: alone[r][1][user]["validation_loss"] for r in rates}
        if abs(losses[rates[0]] - losses[rates[1]]) > 1e-3 * max(losses.values()):
            assert lr == min(losses, key=losses.get), (user, losses, lr)
            decided += 1
        for key in ("rows", "optim.exp_avg", "optim.exp_avg_sq", "optim.step"):
            torch.testing.assert_close(state[user][key], alone[lr][0][user][key], rtol=1e-3, atol=5e-5)
    assert decided >= 12
    resumed = flora_train("run", "recipes/quickstart.yaml", *common, f"run_dir={swept}", f"train.sweep.lr=[{rates[0]},{rates[1]}]",
                          "--resume", check=False)
    assert resumed.returncode == 2 and "sweep is done" in resumed.stderr and "Traceback" not in resumed.stderr
    # A reader that goes away (`flora-train users RUN | head`) ends the command quietly, never a traceback.
    proc = subprocess.Popen([sys.executable, "-m", "flora_train.cli", "users", str(swept), "--json"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # closed long before the command (seconds to import) writes its first line
    assert proc.wait(timeout=120) == 141 and "Traceback" not in proc.stderr.read()


def test_peft_export_of_lora_on_a_shared_lora_is_what_peft_computes(tmp_path):
    """A peft export writes the shared LoRA once (shared-adapter/) and each user's LoRA: PEFT with both
    adapters active gives flora_train's logits (LoRA deltas add, so the order of the two is free)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora"
    flora_train("run", "recipes/quickstart.yaml", *SHARED, f"run_dir={run}", "adapter.method=lora", "adapter.rank=4",
                "adapter.target_modules=[q_proj,v_proj]", "store.optimizer.lr=0.01", "export.format=peft",
                "tracking.enabled=false", "eval.at_end=false")
    out = run / "export" / "peft"
    assert json.loads((out / "manifest.json").read_text())["shared_adapter"] == "shared-adapter"
    index = json.loads((out / "index.json").read_text())
    ours = load_trained(run, device="cpu")
    ids = torch.randint(3, 200, (2, 9))
    for user in ("user-000002", "user-000019"):
        rows, pos, _ = ours.batch_rows([user, user])
        with torch.no_grad(), ours.slot.activate(rows, pos):
            want = ours.model(input_ids=ids).logits
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(run / "base_model")),
                                          str(out / "shared-adapter"), adapter_name="shared")
        model.load_adapter(str(out / index[user]), adapter_name="user")
        model.base_model.set_adapter(["shared", "user"])
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
            model.base_model.set_adapter("user")  # the user's adapter alone is not what was trained
            assert not torch.allclose(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
