"""Helpers shared by the tests/test_train_*.py files (this module holds no tests).

The training tests run on a small JSONL manifest of equal-length clips cut from the bundled
corpus, with short prompts: each step takes well under a second on CPU, and equal audio
lengths keep the audio encoder from seeing padded frames (transformers' Phi-4 audio encoder
attends to padding, tests/test_audio_padding.py - a property of the model, which would
otherwise hide the exact batch-size/accumulation invariances these tests check).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file

from phi4mm_lora.data.audio import load_audio
from phi4mm_lora.data.examples import bundled_corpus_path

ANSWERS = ["yes", "no thanks", "the cat sat on the mat", "seven", "a b c d e f", "hello there world",
           "WAIT FRIEND", "ok", "blue green red yellow", "one two", "it is what it is", "fine"]
PROMPTS = ["<|audio|>What was said?", "Transcribe: <|audio|>", "<|audio|>Words, please.",
           "Listen carefully and write the words <|audio|>"]


def make_manifest(root: Path, n: int = 8, seconds: float = 2.0) -> Path:
    """``n`` clips of exactly ``seconds`` s with short, varied prompts and answers."""
    root.mkdir(parents=True, exist_ok=True)
    flacs = sorted((bundled_corpus_path() / "WAVE").rglob("*.flac"))
    lines = []
    for i in range(n):
        audio = load_audio(flacs[i])[: int(seconds * 16000)]
        audio = np.pad(audio, (0, int(seconds * 16000) - len(audio)))
        wav = root / f"clip{i}.wav"
        sf.write(wav, audio, 16000)
        lines.append({"audio": wav.name, "prompt": PROMPTS[i % len(PROMPTS)], "answer": ANSWERS[i % len(ANSWERS)],
                      "id": f"clip{i}", "split": "train"})
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root / "train.jsonl"


def small_overrides(manifest: Path, out: Path, **extra: object) -> list[str]:
    """A fast fp32 CPU run on the manifest; ``extra`` as dotted keys with ``__`` for dots."""
    base = {
        "output_dir": str(out), "seed": 7, "precision": "fp32", "model.device": "cpu",
        "data.source": "manifest", "data.path": str(manifest),
        "adapter.mode": "fresh", "adapter.r": 4, "adapter.alpha": 8, "adapter.dropout": 0.0,
        "adapter.trainable": "unfreeze",
        "train.batch_size": 2, "train.grad_accum": 1, "train.lr": 1e-3, "train.epochs": 1,
        "train.gradient_checkpointing": False, "train.log_every_steps": 1, "eval.during_training": False,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def read_trained(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors a run saved as trained (adapter + unfrozen modules)."""
    out = dict(load_file(str(folder / "adapter_model.safetensors")))
    extra = folder / "trainable_modules.safetensors"
    if extra.is_file():
        out.update({f"extra.{k}": v for k, v in load_file(str(extra)).items()})
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def setup_recipe(cfg, out: Path, log=None):
    """The training recipe for ``cfg``, set up (model, data, optimizer) and ready to step, without
    the pre-flight checks ``train()`` runs first; ``log`` receives its printed lines."""
    from phi4mm_lora.train.finetune import FinetuneRecipe
    from phi4mm_lora.train.preflight import Preflight

    recipe = FinetuneRecipe(cfg, Preflight(run_dir=out), progress=False, log=log or (lambda _m: None))
    recipe.setup()
    return recipe
