"""``phi4mm-lora export``: each format loads back with plain tools and gives the run's logits.

Two real (tiny, 2-step) training runs: a ``fresh`` LoRA on the decoder *and the tied lm_head*,
and a ``pretrained``-mode ``unfreeze`` run (speech adapter + audio encoder + projector) that
evaluated itself after its epoch. The reference is the run as this project loads it for
``score``/``evaluate``; every export is loaded with something else: plain transformers, plain
PEFT, or the project's official-layout reader.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import Phi4MultimodalForCausalLM, Phi4MultimodalProcessor

from phi4mm_lora.cli import main
from phi4mm_lora.config import AdapterConfig, ModelConfig, load_config
from phi4mm_lora.export.card import fmt
from phi4mm_lora.model.load import load_model
from phi4mm_lora.model.run_folder import Run

DECODER_AND_HEAD = r"(model\.layers\.\d+\.((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj)))|lm_head"


def _train(out: Path, *extra: str, evaluate: bool = False) -> Path:
    from phi4mm_lora.train import train

    cfg = load_config(None, [
        f"output_dir={out}", "seed=0", "precision=fp32", "model.device=cpu", "data.limit=2", "adapter.dropout=0.0",
        "train.batch_size=2", "train.grad_accum=1", "train.lr=1e-2", "train.epochs=1", "train.max_grad_norm=null",
        "train.gradient_checkpointing=false", "eval.subset=1", "eval.max_new_tokens=4", "eval.batch_size=2",
        f"eval.during_training={str(evaluate).lower()}", *extra,
    ])
    evaluate_fn = None
    if evaluate:
        from phi4mm_lora.evaluate.run import make_epoch_evaluator

        evaluate_fn = make_epoch_evaluator(cfg)
    train(cfg, evaluate_fn=evaluate_fn, progress=False)
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_native) -> Path:
    return _train(tmp_path_factory.mktemp("runs") / "lora", "adapter.mode=fresh", "adapter.r=4", "adapter.alpha=8",
                  f"adapter.target_modules={DECODER_AND_HEAD}")


@pytest.fixture(scope="module")
def unfreeze_run(tmp_path_factory, tiny_native) -> Path:
    return _train(tmp_path_factory.mktemp("runs") / "unfreeze", "adapter.mode=pretrained",
                  "adapter.trainable=unfreeze", evaluate=True)


def _batch(processor):
    audio = (0.1 * np.random.default_rng(3).standard_normal(16000)).astype(np.float32)
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<|APA|>{processor.audio_token} rate"}], tokenize=False, add_generation_prompt=True)
    return processor(text=[text + '{"accuracy": 5}<|end|>'], audio=[audio], return_tensors="pt")


@functools.cache
def _reference(run: Path):
    """The run as score/evaluate load it, and its logits on one audio batch (once per run)."""
    cfg = Run.open(run).configure(load_config(None, ["precision=fp32", "model.device=cpu"]))
    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    batch = _batch(loaded.processor)
    with torch.no_grad():
        return batch, loaded.model(**batch).logits


def _export(run: Path, out: Path, fmt_name: str) -> Path:
    assert main(["export", str(run), "--to", str(out), "--format", fmt_name]) == 0
    return out


@pytest.mark.parametrize("which", ["lora_run", "unfreeze_run"])
def test_merged_loads_with_plain_transformers_and_equals_the_run(which, request, tmp_path) -> None:
    run = request.getfixturevalue(which)
    batch, want = _reference(run)
    out = _export(run, tmp_path / "merged", "merged")
    model = Phi4MultimodalForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        got = model(**batch).logits
    assert float((got - want).abs().max()) < 1e-5
    tiny = request.getfixturevalue("tiny_native")
    processor = Phi4MultimodalProcessor.from_pretrained(out)  # processor files travel with the weights
    assert processor.tokenizer.get_vocab() == Phi4MultimodalProcessor.from_pretrained(tiny).tokenizer.get_vocab()
    if which == "lora_run":  # LoRA on the tied lm_head: merged into an untied head, embeddings unchanged
        assert model.config.tie_word_embeddings is False
        base = Phi4MultimodalForCausalLM.from_pretrained(tiny, dtype=torch.float32)
        assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
        assert not torch.equal(model.lm_head.weight, base.lm_head.weight)


@pytest.mark.parametrize("which", ["lora_run", "unfreeze_run"])
def test_adapter_export_loads_with_plain_peft(which, request, tmp_path, tiny_native) -> None:
    run = request.getfixturevalue(which)
    batch, want = _reference(run)
    out = _export(run, tmp_path / "adapter", "adapter")
    pc = json.loads((out / "adapter_config.json").read_text())
    assert pc["base_model_name_or_path"] == str(tiny_native)  # the run's base model, ready for the hub
    if which == "unfreeze_run":
        assert pc["modules_to_save"]
    base = Phi4MultimodalForCausalLM.from_pretrained(pc["base_model_name_or_path"], dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = model(**batch).logits
    assert float((got - want).abs().max()) < 1e-5
    assert Run.open(out).adapter_dir == out and Run.open(out).root == out  # usable as --adapter itself


def test_official_loads_back_through_the_official_reader(unfreeze_run: Path, tmp_path) -> None:
    batch, want = _reference(unfreeze_run)
    out = _export(unfreeze_run, tmp_path / "official", "official")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi4mm" and {"speech_lora", "vision_lora"} <= set(config)
    assert not list(out.glob("*.py"))  # never remote code
    from phi4mm_lora.model.load import detect_layout

    assert detect_layout(out) == "official"
    loaded = load_model(ModelConfig(path=str(out), device="cpu"), "fp32", AdapterConfig(mode="pretrained"))
    assert loaded.layout == "official"
    with torch.no_grad():
        got = loaded.model(**batch).logits
    assert float((got - want).abs().max()) < 1e-5


def test_official_refuses_what_it_cannot_hold(lora_run: Path, tmp_path, capsys) -> None:
    assert main(["export", str(lora_run), "--to", str(tmp_path / "o"), "--format", "official"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lm_head" in err and "--format merged" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_model_card_holds_the_runs_numbers(unfreeze_run: Path, tmp_path, tiny_native) -> None:
    out = _export(unfreeze_run, tmp_path / "adapter", "adapter")
    card = (out / "README.md").read_text()
    summary = json.loads((unfreeze_run / "summary.json").read_text())
    results = json.loads((unfreeze_run / "eval" / "epoch-1" / "results.json").read_text())
    assert card.startswith("---\n") and "library_name: peft" in card
    for key in ("steps", "final_loss", "first_loss", "trainable_params"):
        assert f"| {key} | {fmt(summary[key])} |" in card, key
    numbers = [v for v in results["summary"].values() if v is not None]
    assert numbers and all(fmt(v) in card for v in numbers)
    assert str(tiny_native) in card and "<|APA|>" in card and "<|MDD|>" in card
    assert "Listen to the recording" in card  # the instruction text itself
    assert "PeftModel.from_pretrained" in card and "mode: pretrained" in card
    assert "lr: 0.01" in card and "at most 2 utterances" in card  # the run's own config and data, not defaults
    assert "More Information Needed" not in card


@pytest.fixture(scope="module")
def stacked_run(tmp_path_factory, tiny_native) -> Path:
    """A stacked-mode run folder (a task adapter over the frozen speech adapter), written by the
    project's savers without training: the task adapter's B made non-zero by hand."""
    from phi4mm_lora.config import dump_config
    from phi4mm_lora.model.adapters import save_trained

    run = tmp_path_factory.mktemp("runs") / "stacked"
    cfg = load_config(None, [f"output_dir={run}", "precision=fp32", "model.device=cpu", "adapter.mode=stacked",
                             "adapter.r=4", "adapter.alpha=8", "adapter.target_modules=all-linear"])
    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    with torch.no_grad():
        for n, p in loaded.model.named_parameters():
            if ".lora_B.task." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    run.mkdir(parents=True)
    dump_config(cfg, run / "config.yaml")
    save_trained(loaded.model, loaded.adapters, run / "adapter")
    return run


@pytest.mark.parametrize("fmt_name", ["merged", "official"])
def test_stacked_run_exports_with_the_task_adapter_merged(fmt_name, stacked_run, tmp_path) -> None:
    batch, want = _reference(stacked_run)
    out = _export(stacked_run, tmp_path / fmt_name, fmt_name)
    if fmt_name == "merged":
        model = Phi4MultimodalForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    else:  # base weights hold the task adapter; the speech slot keeps the frozen speech adapter
        model = load_model(ModelConfig(path=str(out), device="cpu"), "fp32", AdapterConfig(mode="pretrained")).model
    with torch.no_grad():
        got = model(**batch).logits
    assert float((got - want).abs().max()) < 1e-5


def test_adapter_export_rewrites_an_old_side_file_run(unfreeze_run: Path, tmp_path, tiny_native) -> None:
    """Runs saved before modules_to_save kept unfrozen tensors in trainable_modules.safetensors; they still
    load, and the adapter export turns them into a folder plain PEFT loads completely."""
    import shutil

    from safetensors.torch import load_file, save_file

    old = tmp_path / "old-run"
    shutil.copytree(unfreeze_run, old, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    ad = old / "adapter"
    tensors = load_file(str(ad / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".lora_" in k}, str(ad / "adapter_model.safetensors"))
    save_file({k.replace("base_model.model.", "", 1): v for k, v in tensors.items() if ".lora_" not in k},
              str(ad / "trainable_modules.safetensors"))
    pc = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**pc, "modules_to_save": None}))
    batch, want = _reference(unfreeze_run)
    _, old_logits = _reference(old)
    assert float((old_logits - want).abs().max()) < 1e-6  # the old format still loads in this project
    out = _export(old, tmp_path / "adapter", "adapter")
    assert not (out / "trainable_modules.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    base = Phi4MultimodalForCausalLM.from_pretrained(tiny_native, dtype=torch.float32).eval()
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, str(out)).eval()(**batch).logits
    assert float((got - want).abs().max()) < 1e-5
