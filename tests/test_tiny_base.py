"""The pretrained tiny base (the demo's model): what it is made of, what it can do, how it is made.

The shipped asset (``assets/tiny-base/decoder.safetensors``) must sit on top of the seeded
random tiny model and change nothing but the decoder layers and final norm; it must really
copy a quoted word list and spell it as phones (greedy decoding over the full vocabulary,
prompts it never saw); and the script that made it must run (a few steps here).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Phi4MultimodalForCausalLM, Phi4MultimodalProcessor

from phi4mm_lora.data.prompts import generation_prompt
from phi4mm_lora.model.tiny import ensure_tiny
from phi4mm_lora.model.tiny_base import ASSET, EMBEDDINGS, ROWS, TRAINED
from phi4mm_lora.model.tokenizer import END_TOKEN_ID

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained_dir() -> Path:
    return ensure_tiny("native", base="pretrained")


def _model(folder: Path) -> torch.nn.Module:
    return Phi4MultimodalForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _greedy(model, processor, prompt: str) -> str:
    ids = processor.tokenizer(generation_prompt(prompt, processor.tokenizer), return_tensors="pt",
                              add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=40, do_sample=False, eos_token_id=END_TOKEN_ID,
                             pad_token_id=END_TOKEN_ID)
    return processor.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_the_base_is_the_random_tiny_model_plus_the_shipped_decoder(pretrained_dir: Path, tiny_native: Path) -> None:
    base, rand = _model(pretrained_dir).state_dict(), _model(tiny_native).state_dict()
    shipped = load_file(str(ASSET))
    rows = shipped.pop(ROWS)
    assert set(base) == set(rand)
    changed = {k for k in base if not torch.equal(base[k], rand[k])}
    assert changed - {"lm_head.weight"} == set(shipped) and all(TRAINED.fullmatch(k) for k in shipped)
    assert all(torch.equal(base[k], shipped[k]) for k in shipped if k != EMBEDDINGS)
    # of the embeddings (tied with the output head) only the rows of the tokens pretraining used
    assert torch.equal(base[EMBEDDINGS][rows], shipped[EMBEDDINGS])
    others = torch.ones(len(base[EMBEDDINGS]), dtype=torch.bool)
    others[rows] = False
    assert torch.equal(base[EMBEDDINGS][others], rand[EMBEDDINGS][others]) and others.sum() > 199_000
    assert json.loads((pretrained_dir / "phi4mm_lora_tiny.json").read_text())["base"] == "pretrained"
    # the adapters and processor are the random tiny model's, byte for byte
    for name in ("speech-lora/adapter_model.safetensors", "tokenizer.json"):
        assert (pretrained_dir / name).read_bytes() == (tiny_native / name).read_bytes(), name


@pytest.mark.parametrize("prompt, want", [
    ('Repeat "GREEN HORSE WINDOW TEACHER".', "GREEN HORSE WINDOW TEACHER"),
    ('Phones of "CAT DOG BED".', "K AE T D AO G B EH D"),
])
def test_the_shipped_base_copies_and_spells_and_the_random_one_does_not(pretrained_dir: Path, tiny_native: Path,
                                                                       prompt: str, want: str) -> None:
    processor = Phi4MultimodalProcessor.from_pretrained(pretrained_dir)
    assert _greedy(_model(pretrained_dir), processor, prompt) == want
    assert _greedy(_model(tiny_native), processor, prompt) != want


def test_the_script_that_made_it_runs(tmp_path: Path) -> None:
    asset = tmp_path / "decoder.safetensors"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_tiny_base.py"), "--steps", "12",
                           "--batch-size", "4", "--asset", str(asset)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(asset.with_suffix(".json").read_text())
    assert record["config"]["steps"] == 12
    made, shipped = load_file(str(asset)), load_file(str(ASSET))
    assert {k: v.shape for k, v in made.items()} == {k: v.shape for k, v in shipped.items()}  # the same layout
    assert torch.equal(made[ROWS], shipped[ROWS])  # the same tokens, found again from the same seed
    assert len(record["losses"]) == 2 and record["losses"][-1] < record["losses"][0]
