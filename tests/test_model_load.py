"""Loading both tiny layouts, official->native conversion parity, same-seed reproducibility."""

from __future__ import annotations

import filecmp
import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import Phi4MultimodalForCausalLM

from phi4mm_lora.config import AdapterConfig, ModelConfig
from phi4mm_lora.errors import UserError
from phi4mm_lora.model.load import detect_layout, load_model
from phi4mm_lora.model.tiny import build_tiny, tiny_config


def _inputs(processor, seconds: float = 1.5):
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<|MDD|>{processor.audio_token} transcribe"}], tokenize=False, add_generation_prompt=True
    )
    return processor(text=[text + '{"word_transcript": "a"}'], audio=[audio], return_tensors="pt")


# Written by hand from the domain facts (not imported from the converter under test).
HAND_MAP = [
    (r"feed_forward_(in|out)\.net\.0\.linear\.", r"feed_forward_\1.gate_up_proj."),
    (r"feed_forward_(in|out)\.net\.2\.", r"feed_forward_\1.down_proj."),
    (r"encoders\.(\d+)\.self_attn\.linear_q\.", r"encoders.\1.self_attn.q_proj."),
    (r"encoders\.(\d+)\.self_attn\.linear_k\.", r"encoders.\1.self_attn.k_proj."),
    (r"encoders\.(\d+)\.self_attn\.linear_v\.", r"encoders.\1.self_attn.v_proj."),
    (r"encoders\.(\d+)\.self_attn\.linear_out\.", r"encoders.\1.self_attn.o_proj."),
    (r"audio_projection\.speech\.0\.", "up_proj_for_speech."),
    (r"audio_projection\.speech\.2\.", "down_proj_for_speech."),
    (r"audio_projection\.vision\.0\.", "up_proj_for_vision_speech."),
    (r"audio_projection\.vision\.2\.", "down_proj_for_vision_speech."),
    (r"img_projection\.0\.", "img_projection_up."),
    (r"img_projection\.2\.", "img_projection_down."),
    (r"glb_GN$", "global_img_feature_extensor"),
    (r"sub_GN$", "sub_img_feature_extensor"),
    (r"\.base_layer\.", "."),
]


def _read_indexed(folder) -> dict[str, torch.Tensor]:
    """Every tensor the safetensors index names (official-layout.md: the index is the truth), as fp32."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    raw = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            raw.update({k: f.get_tensor(k).float() for k in f.keys() if weight_map.get(k) == shard})
    assert raw.keys() == weight_map.keys()
    return raw


def _reference_from_official(folder) -> Phi4MultimodalForCausalLM:
    """Plain model whose decoder weights are W + (alpha/r) B A of the speech adapter."""
    cfg = json.loads((folder / "config.json").read_text())
    scale = cfg["speech_lora"]["lora_alpha"] / cfg["speech_lora"]["r"]
    raw = _read_indexed(folder)
    state = {}
    for k, v in raw.items():
        if ".lora_" in k:
            continue
        new = k
        for pat, rep in HAND_MAP:
            new = re.sub(pat, rep, new)
        if ".base_layer." in k:
            module = k.split(".base_layer.")[0]
            a, b = raw[f"{module}.lora_A.speech.weight"], raw[f"{module}.lora_B.speech.weight"]
            v = v + scale * (b @ a)
        state[new] = v
    torch.manual_seed(123)
    model = Phi4MultimodalForCausalLM(tiny_config()).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected[:5]
    assert set(missing) <= {"lm_head.weight"}, missing[:5]
    model.tie_weights()
    return model


def test_layouts_detected(tiny_native, tiny_official, tmp_path):
    assert detect_layout(tiny_native) == "native"
    assert detect_layout(tiny_official) == "official"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="not Phi-4-multimodal"):
        detect_layout(tmp_path)


def test_official_conversion_matches_reference_logits(tiny_official):
    loaded = load_model(ModelConfig(path=str(tiny_official)), "fp32", AdapterConfig())
    assert loaded.layout == "official"
    batch = _inputs(loaded.processor)
    reference = _reference_from_official(tiny_official)
    with torch.no_grad():
        got = loaded.model(**batch).logits
        want = reference(**batch).logits
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_converted_adapters_equal_originals_and_nonzero(tiny_official, tiny_native):
    """Same seed: the native tiny's PEFT adapters are the official file's lora tensors."""
    off = load_model(ModelConfig(path=str(tiny_official)), "fp32", AdapterConfig(keep_unused=True))
    nat = load_model(ModelConfig(path=str(tiny_native)), "fp32", AdapterConfig(keep_unused=True))
    raw = {k: v for k, v in _read_indexed(tiny_official).items() if ".lora_" in k}
    assert len(raw) == 2 * 2 * 4 * 2  # adapters x A/B x modules x layers
    for name, p in off.model.named_parameters():
        m = re.search(r"base_model\.model\.(.+)\.lora_([AB])\.(speech|vision)\.weight$", name)
        if not m:
            continue
        orig = raw.pop(f"{m[1]}.lora_{m[2]}.{m[3]}.weight")
        assert torch.equal(p.detach(), orig)
        if m[2] == "B":
            assert p.abs().max() > 0
        # the shards hold bf16: the native (fp32) adapter rounded to bf16 is the official one
        assert torch.equal(dict(nat.model.named_parameters())[name].detach().to(torch.bfloat16).float(), orig)
    assert not raw, f"official LoRA tensors never loaded: {list(raw)[:3]}"


def test_convert_command_writes_loadable_native(tiny_official, tmp_path):
    from phi4mm_lora.cli import main

    out = tmp_path / "native"
    assert main(["convert", str(tiny_official), str(out)]) == 0
    assert detect_layout(out) == "native"
    assert (out / "speech-lora" / "adapter_model.safetensors").is_file()
    a = load_model(ModelConfig(path=str(out)), "fp32", AdapterConfig())
    b = load_model(ModelConfig(path=str(tiny_official)), "fp32", AdapterConfig())
    batch = _inputs(a.processor)
    with torch.no_grad():
        assert torch.allclose(a.model(**batch).logits, b.model(**batch).logits, atol=1e-6)
    assert main(["convert", str(tiny_official), str(out)]) == 2  # refuses a non-empty target


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = build_tiny(tmp_path / "a", "native", seed=3)
    b = build_tiny(tmp_path / "b", "native", seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    c = build_tiny(tmp_path / "c", "native", seed=4)
    assert not filecmp.cmp(a / "model.safetensors", c / "model.safetensors", shallow=False)


def test_processes_building_the_tiny_model_at_once_all_get_it(tmp_path):
    """torchrun workers on a fresh machine all call ensure_tiny at the same moment."""
    import os
    import subprocess
    import sys

    code = "from phi4mm_lora.model.tiny import ensure_tiny; print(ensure_tiny())"
    env = dict(os.environ, PHI4MM_LORA_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for _, e in outs]
    assert {o.strip().splitlines()[-1] for o, _ in outs} == {str(tmp_path / "tiny-native-seed0")}
    assert (tmp_path / "tiny-native-seed0" / "config.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tiny-") and p.is_dir()]


def test_tiny_tokenizer_has_real_special_ids(tiny_native):
    loaded = load_model(ModelConfig(path=str(tiny_native)), "fp32", AdapterConfig())
    tok = loaded.processor.tokenizer
    assert tok.convert_tokens_to_ids("<|endoftext11|>") == 200011 == loaded.model.config.audio_config.audio_token_id
    assert tok.convert_tokens_to_ids("<|endoftext10|>") == 200010
    assert tok.convert_tokens_to_ids("<|end|>") == 200020
    assert loaded.model.config.eos_token_id == [199999, 200020]
    # The processor expands one placeholder into one token per 80 ms of audio.
    batch = _inputs(loaded.processor, seconds=2.0)
    n_audio = int((batch["input_ids"] == 200011).sum())
    assert n_audio == int(batch["audio_embed_sizes"][0]) and 23 <= n_audio <= 27


def test_missing_and_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(ModelConfig(path=str(tmp_path / "nope")), "fp32", AdapterConfig())
    with pytest.raises(UserError, match="no config.json"):
        load_model(ModelConfig(path=str(tmp_path)), "fp32", AdapterConfig())
