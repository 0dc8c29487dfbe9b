"""The real entry point on short runs: files, log lines, changed weights, refusals, hooks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_common import make_manifest, read_trained, small_overrides

from phi4mm_lora.cli import main
from phi4mm_lora.config import load_config
from phi4mm_lora.model.adapter_io import read_peft_folder
from phi4mm_lora.model.tiny import ensure_tiny
from phi4mm_lora.train import loss as loss_mod
from phi4mm_lora.train.finetune import train


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("data"), n=8)


@pytest.fixture()
def cfg_file(tmp_path) -> Path:
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  epochs: 1\n")
    return f


def test_train_writes_run_folder_and_changes_weights(manifest, cfg_file, tmp_path, capsys):
    out = tmp_path / "run"
    ov = small_overrides(manifest, out, adapter__mode="pretrained", adapter__trainable="lora",
                         train__max_steps=3, train__save_every_steps=1, train__keep_checkpoints=2,
                         train__lr=1e-2)
    assert main(["train", str(cfg_file), *ov, "--no-progress"]) == 0
    text = capsys.readouterr()
    log = text.out + text.err
    assert "step 3/3" in log and "summary:" in log and "loss curve:" in log
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "summary.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/COMPLETE",
                 "checkpoints/step-00000002/COMPLETE", "checkpoints/step-00000002/adapter/adapter_model.safetensors",
                 "checkpoints/step-00000002/training_state.pt"):
        assert (out / name).is_file(), name
    # a checkpoint per step, but only the newest two are kept (disk), the oldest deleted
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(out / "config.yaml").train.max_steps == 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] == rows[-1]["loss"]
    # trained weights differ from the checkpoint's pretrained speech adapter, same shapes
    _, before = read_peft_folder(ensure_tiny("native") / "speech-lora")
    _, after = read_peft_folder(out / "adapter")
    assert before.keys() == after.keys()
    changed = max(float((before[m][ab] - after[m][ab]).abs().max()) for m in before for ab in ("A", "B"))
    assert changed > 1e-3
    assert all(before[m]["A"].shape == after[m]["A"].shape for m in before)


def test_validate_prints_config_or_all_problems(cfg_file, capsys):
    assert main(["validate", str(cfg_file), "train.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert main(["validate", str(cfg_file), "train.lr=-1", "adapter.r=0", "train.nope=1",
                 "train.keep_checkpoints=0"]) == 2
    err = capsys.readouterr().err
    # every problem at once, also when one of them is an unknown key in the same section
    assert all(k in err for k in ("adapter.r", "train.nope", "train.lr", "train.keep_checkpoints"))


def test_nan_loss_stops_with_step_examples_and_checkpoint(manifest, cfg_file, tmp_path, capsys, monkeypatch):
    real = loss_mod.answer_loss_sum
    calls = {"n": 0}

    def flaky(model, batch):
        s, n = real(model, batch)
        calls["n"] += 1
        return (s * float("nan"), n) if calls["n"] == 3 else (s, n)

    monkeypatch.setattr(loss_mod, "answer_loss_sum", flaky)
    out = tmp_path / "nan"
    ov = small_overrides(manifest, out, train__save_every_steps=1)
    assert main(["train", str(cfg_file), *ov, "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "step 3" in err and "clip" in err and "step-00000002" in err
    assert not (out / "adapter").exists()


def test_refuses_quantised_lora(manifest, cfg_file, tmp_path, capsys, monkeypatch):
    import phi4mm_lora.model.load as load  # the one place check_plan runs for a training run

    monkeypatch.setattr(load, "check_plan", lambda m: ["LoRA quantised - cannot train: x.lora_A.speech"])
    assert main(["train", str(cfg_file), *small_overrides(manifest, tmp_path / "q")]) == 2
    assert "LoRA quantised - cannot train" in capsys.readouterr().err


def test_refuses_nothing_trainable(manifest, cfg_file, tmp_path, capsys, monkeypatch):
    import phi4mm_lora.model.adapters as adapters

    def freeze_all(peft, state):
        for p in peft.parameters():
            p.requires_grad_(False)

    monkeypatch.setattr(adapters, "apply_trainable", freeze_all)
    assert main(["train", str(cfg_file), *small_overrides(manifest, tmp_path / "z")]) == 2
    assert "no parameter requires grad" in capsys.readouterr().err


def test_evaluation_hook_after_each_epoch(manifest, tmp_path):
    seen = []

    def evaluate(model, processor, epoch):
        seen.append((epoch, model.training, processor.audio_token))
        return {"score": 0.25 * epoch, "n": 4}

    cfg = load_config(None, small_overrides(manifest, tmp_path / "ev", train__epochs=2, train__batch_size=4,
                                            eval__during_training=True))
    result = train(cfg, evaluate_fn=evaluate, progress=False)
    assert [s[0] for s in seen] == [1, 2] and not any(s[1] for s in seen)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["type"] == "eval"]
    assert [(r["epoch"], r["score"], r["step"]) for r in evals] == [(1, 0.25, 2), (2, 0.5, 4)]
    assert all(isinstance(r["seconds"], float) and r["seconds"] >= 0 for r in evals)  # its cost, next to the epoch's
    assert result.summary["eval"]["score"] == 0.5
    assert (result.run_dir / "loss_curve.png").stat().st_size > 5000
    # switched off: not called
    seen.clear()
    train(cfg.model_copy(update={"output_dir": str(tmp_path / "ev2"),
                                 "eval": cfg.eval.model_copy(update={"during_training": False})}),
          evaluate_fn=evaluate, progress=False)
    assert seen == []


def test_existing_run_needs_resume(manifest, cfg_file, tmp_path, capsys):
    ov = small_overrides(manifest, tmp_path / "twice", train__max_steps=1, train__save_every_steps=1)
    assert main(["train", str(cfg_file), *ov, "--no-progress"]) == 0
    assert main(["train", str(cfg_file), *ov, "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_demo_config_embedded_copy_in_sync():
    from phi4mm_lora.cli.train_cmds import DEMO_YAML

    repo_copy = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    # the repository copy starts with the editor's schema line (configs/run-config.schema.json)
    schema_line = "# yaml-language-server: $schema=run-config.schema.json\n"
    assert repo_copy.read_text() == schema_line + DEMO_YAML


def test_demo_command_short(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--eval-limit", "2", "data.limit=2", "train.epochs=1", "--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "loss curve:" in log and (out / "loss_curve.png").is_file()
    assert read_trained(out / "adapter")
    # before/after evaluation on the same held-out utterances, shown side by side
    before = json.loads((out / "eval-before" / "results.json").read_text())
    after = json.loads((out / "eval-after" / "results.json").read_text())
    assert before["mdd"]["n_total"] == after["mdd"]["n_total"] == 2
    assert "before vs after training" in log and "held-out" in log and "trained-on" in log
    assert (out / "eval-train-after" / "results.json").is_file() and (out / "demo.md").is_file()
    run = json.loads((out / "eval-after" / "run.json").read_text())
    assert str(out / "adapter") in json.dumps(run)  # the trained adapter is what was evaluated
    assert torch.isfinite(torch.tensor(json.loads((out / "summary.json").read_text())["final_loss"]))


def test_bf16_plan_and_gradient_checkpointing(manifest, tmp_path):
    """bf16 base weights train with fp32 trainable tensors; checkpointing changes nothing."""
    gc = train(load_config(None, small_overrides(manifest, tmp_path / "gc", train__max_steps=2,
                                                 train__gradient_checkpointing=True)), progress=False)
    plain = train(load_config(None, small_overrides(manifest, tmp_path / "plain", train__max_steps=2)), progress=False)
    a, b = read_trained(gc.adapter_dir), read_trained(plain.adapter_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    bf = train(load_config(None, small_overrides(manifest, tmp_path / "bf16", train__max_steps=2, precision="bf16")),
               progress=False)
    w = read_trained(bf.adapter_dir)
    assert bf.summary["precision"] == "bf16" and torch.isfinite(torch.tensor(bf.summary["final_loss"]))
    assert {v.dtype for v in w.values()} == {torch.float32}  # LoRA and unfrozen encoder in fp32
    assert abs(bf.summary["first_loss"] - plain.summary["first_loss"]) < 0.05
