"""Adapter modes give exactly the expected trainable tensors; save/reload/merge/switch work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import Phi4MultimodalForCausalLM

from phi4mm_lora.config import AdapterConfig, ModelConfig
from phi4mm_lora.errors import UserError
from phi4mm_lora.model.adapters import AUDIO_PROJECTOR, merge_and_save, save_trained
from phi4mm_lora.model.load import load_model
from phi4mm_lora.model.precision import AUDIO_TOWER
from phi4mm_lora.model.tiny import tiny_config

CFG = tiny_config()
N_LAYERS = CFG.num_hidden_layers
DECODER_MODULES = 4  # qkv_proj, o_proj, gate_up_proj, down_proj


def _batch(processor):
    audio = (0.1 * np.random.default_rng(1).standard_normal(16000)).astype(np.float32)
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<|APA|>{processor.audio_token} rate"}], tokenize=False, add_generation_prompt=True
    )
    return processor(text=[text + '{"accuracy": 5}<|end|>'], audio=[audio], return_tensors="pt")


def _plain_count(prefixes: tuple[str, ...]) -> tuple[int, int]:
    """Tensors and parameters under module prefixes, counted on a plain (non-PEFT) model."""
    with torch.device("meta"):
        m = Phi4MultimodalForCausalLM(CFG)
    named = [(n, p) for n, p in m.named_parameters() if n.startswith(prefixes)]
    return len(named), sum(p.numel() for _, p in named)


def _trainable(loaded):
    return {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}


def _load(path, **adapter):
    return load_model(ModelConfig(path=str(path)), "fp32", AdapterConfig(**adapter))


def test_pretrained_mode_trains_exactly_the_speech_adapter(tiny_native):
    loaded = _load(tiny_native)
    assert loaded.adapters.names == ["speech"]  # the unused vision adapter is not loaded by default
    tr = _trainable(loaded)
    assert len(tr) == N_LAYERS * DECODER_MODULES * 2
    assert all(".lora_A.speech." in n or ".lora_B.speech." in n for n in tr)


def test_fresh_mode_replaces_adapter_with_new_rank_and_warns(tiny_native):
    with pytest.warns(UserWarning, match="discarded"):
        loaded = _load(tiny_native, mode="fresh", r=3, alpha=6, dropout=0.05)
    tr = _trainable(loaded)
    assert len(tr) == N_LAYERS * DECODER_MODULES * 2
    assert all(p.shape[0] == 3 for n, p in tr.items() if ".lora_A." in n)
    assert all(float(p.detach().abs().max()) == 0.0 for n, p in tr.items() if ".lora_B." in n)  # PEFT init
    assert any("discarded" in w for w in loaded.adapters.warnings)


def test_stacked_all_linear_trains_only_new_adapter_with_base_active(tiny_native):
    loaded = _load(tiny_native, mode="stacked", name="task", r=2, target_modules="all-linear")
    tr = _trainable(loaded)
    assert len(tr) == N_LAYERS * DECODER_MODULES * 2
    assert all(".task." in n for n in tr)
    assert loaded.adapters.active == ["speech", "task"]
    # The frozen base adapter is present, frozen, and active (it changes the logits).
    speech = [p for n, p in loaded.model.named_parameters() if ".lora_B.speech." in n]
    assert speech and not any(p.requires_grad for p in speech)


def test_stacked_with_towers_adds_tower_linears(tiny_native):
    loaded = _load(tiny_native, mode="stacked", name="task", r=2, target_modules="all-linear", include_towers=True)
    tr = _trainable(loaded)
    with torch.device("meta"):
        plain = Phi4MultimodalForCausalLM(CFG)
    towers = [n for n, m in plain.named_modules() if type(m) is torch.nn.Linear and n.startswith(
        ("model.embed_tokens_extend.audio_embed.encoder.", "model.embed_tokens_extend.image_embed.img_processor."))]
    assert len(tr) == 2 * (N_LAYERS * DECODER_MODULES + len(towers))


def test_unfreeze_adds_audio_encoder_and_projector(tiny_native):
    tr = _trainable(_load(tiny_native, trainable="unfreeze"))
    n_enc, _ = _plain_count(("model.embed_tokens_extend.audio_embed.encoder.",))
    n_proj, _ = _plain_count(("model.embed_tokens_extend.audio_embed.up_proj_for_speech.",
                              "model.embed_tokens_extend.audio_embed.down_proj_for_speech."))
    assert n_enc > 10 and n_proj == 4
    assert len(tr) == N_LAYERS * DECODER_MODULES * 2 + n_enc + n_proj


def test_vision_trainable_set(tiny_native):
    tr = _trainable(_load(tiny_native, base="vision", trainable="vision"))
    n_tower, _ = _plain_count(("model.embed_tokens_extend.image_embed.",))
    # image_embed = vision tower + projectors + the two feature extensors
    assert len(tr) == N_LAYERS * DECODER_MODULES * 2 + n_tower
    assert all(".vision." in n for n in tr if ".lora_" in n)


def test_bad_adapter_requests_are_user_errors(tiny_native, tmp_path):
    with pytest.raises(UserError, match="matches no linear module"):
        _load(tiny_native, mode="fresh", target_modules=r"model\.nothing\.here")
    # A checkpoint without the pretrained adapter: stacked mode must say what to do.
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_native, bare, ignore=shutil.ignore_patterns("speech-lora"))
    with pytest.raises(UserError, match="adapter.mode=fresh"):
        _load(bare, mode="stacked")


def _train_steps(loaded, batch, steps=2):
    torch.manual_seed(0)  # dropout masks: the same trained weights whatever ran before (test order)
    opt = torch.optim.SGD([p for p in loaded.model.parameters() if p.requires_grad], lr=0.5)
    loaded.model.train()
    labels = batch["input_ids"].clone()
    for _ in range(steps):
        opt.zero_grad()
        loaded.model(**batch, labels=labels).loss.backward()
        opt.step()
    loaded.model.eval()


def test_save_reload_reproduces_logits_in_peft_and_transformers(tiny_native, tmp_path):
    loaded = _load(tiny_native, mode="stacked", name="task", r=4, target_modules="all-linear")
    batch = _batch(loaded.processor)
    _train_steps(loaded, batch)
    with torch.no_grad():
        want = loaded.model(**batch).logits
    out = save_trained(loaded.model, loaded.adapters, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_" in k for k in keys) and len(keys) == N_LAYERS * DECODER_MODULES * 2

    # Our loader: init_from puts the trained weights back into the same stacked setup.
    again = _load(tiny_native, mode="stacked", name="task", r=4, target_modules="all-linear", init_from=str(out))
    with torch.no_grad():
        assert torch.allclose(again.model(**batch).logits, want, atol=1e-6)

    # Plain PEFT: base + frozen speech adapter merged, then the task adapter on top.
    base = _load(tiny_native)
    merged = base.model.merge_and_unload()
    peft = PeftModel.from_pretrained(merged, str(out))
    with torch.no_grad():
        assert torch.allclose(peft.eval()(**batch).logits, want, atol=1e-5)

    # transformers' own load_adapter on the same merged base.
    base2 = _load(tiny_native).model.merge_and_unload()
    try:
        base2.load_adapter(str(out), adapter_name="task")
    except ImportError as exc:  # transformers' PEFT integration wants its own minimum peft
        import peft as peft_lib
        from packaging.version import Version
        from transformers.integrations import peft as tf_peft

        need = getattr(tf_peft, "MIN_PEFT_VERSION", "0")
        if Version(peft_lib.__version__) >= Version(need):
            raise
        pytest.skip(f"transformers' load_adapter needs peft>={need}, installed {peft_lib.__version__} ({exc}); "
                    "see docs/compatibility.md")
    with torch.no_grad():
        assert torch.allclose(base2.eval()(**batch).logits, want, atol=1e-5)


def test_unfrozen_modules_saved_and_restored(tiny_native, tmp_path):
    loaded = _load(tiny_native, trainable="unfreeze")
    batch = _batch(loaded.processor)
    _train_steps(loaded, batch)
    with torch.no_grad():
        want = loaded.model(**batch).logits
    out = save_trained(loaded.model, loaded.adapters, tmp_path / "adapter")
    # PEFT's own format for whole trained modules, not a side file plain PEFT would ignore
    assert not (out / "trainable_modules.safetensors").exists()
    saved = json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert saved == sorted([AUDIO_TOWER, *AUDIO_PROJECTOR])
    again = _load(tiny_native, trainable="unfreeze", init_from=str(out))
    with torch.no_grad():
        assert torch.allclose(again.model(**batch).logits, want, atol=1e-6)

    # plain transformers + PEFT, nothing of this project: the same model, unfrozen modules included
    base = Phi4MultimodalForCausalLM.from_pretrained(tiny_native, dtype=torch.float32).eval()
    with torch.no_grad():
        without = PeftModel.from_pretrained(base, str(out)).eval()
        got = without(**batch).logits
    assert torch.allclose(got, want, atol=1e-5)
    # and the unfrozen modules matter: leaving them out gives another model
    bare = tmp_path / "lora-only"
    bare.mkdir()
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["modules_to_save"] = None
    (bare / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if ".lora_" in k},
              str(bare / "adapter_model.safetensors"))
    base = Phi4MultimodalForCausalLM.from_pretrained(tiny_native, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(PeftModel.from_pretrained(base, str(bare)).eval()(**batch).logits, want, atol=1e-4)


def test_merge_matches_unmerged_and_saves(tiny_native, tmp_path):
    loaded = _load(tiny_native)
    batch = _batch(loaded.processor)
    with torch.no_grad():
        want = loaded.model(**batch).logits
    out = merge_and_save(loaded.model, loaded.adapters, tmp_path / "merged", loaded.processor)
    merged = Phi4MultimodalForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, want, atol=1e-4)


def test_switching_active_adapter_changes_logits(tiny_native):
    from phi4mm_lora.model.adapters import set_active

    loaded = _load(tiny_native, keep_unused=True)
    assert loaded.adapters.names == ["speech", "vision"]
    batch = _batch(loaded.processor)
    with torch.no_grad():
        speech = loaded.model(**batch).logits
        set_active(loaded.model, ["vision"])
        vision = loaded.model(**batch).logits
        set_active(loaded.model, ["speech"])
        back = loaded.model(**batch).logits
    assert not torch.allclose(speech, vision, atol=1e-4)
    assert torch.equal(speech, back)
