"""The published (official) checkpoint layout: the tiny folder against the outside definition,
loading it without running remote code, logits parity with the native tiny model, ``convert``
output in plain transformers + PEFT, and damaged downloads.

The expected facts below are copied by hand from shared docs/official-layout.md and domain.md
(the public config.json, tokenizer and processor files of microsoft/Phi-4-multimodal-instruct),
not imported from the project's writer.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from phi4mm_lora.config import AdapterConfig, ModelConfig
from phi4mm_lora.model.load import load_model

pytestmark = pytest.mark.compat

# --- facts from official-layout.md, verbatim -------------------------------------------------
SPEECH_LAYER = r"((layers.*self_attn\.(qkv|o)_proj)|(layers.*mlp\.(gate_up|down)_proj))"
VISION_LAYER = r"layers.*((self_attn\.(qkv_proj|o_proj))|(mlp\.(gate_up|down)_proj))"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
REMOTE_CODE = ["configuration_phi4mm.py", "modeling_phi4mm.py", "processing_phi4mm.py",
               "speech_conformer_encoder.py", "vision_siglip_navit.py"]
TOKENIZER_FILES = ["tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json"]
AUDIO_KEYS = ["attention_dim", "attention_heads", "num_blocks", "linear_units", "input_size", "time_reduction",
              "kernel_size", "ext_pw_out_channel", "depthwise_seperable_out_channel", "nemo_conv_settings",
              "relative_attention_bias_args", "activation_checkpointing"]
AUDIO_EMBD_KEYS = ["embedding_cls", "projection_cls", "compression_rate", "downsample_rate"]
IMAGE_EMBD_KEYS = ["crop_size", "embedding_cls", "enable_gradient_checkpointing", "hd_transform_order",
                   "image_token_compression_cls", "projection_cls", "use_hd_transform", "with_learnable_separator"]
DECODER_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "tie_word_embeddings", "rope_scaling", "original_max_position_embeddings",
                "max_position_embeddings", "partial_rotary_factor", "sliding_window", "eos_token_id",
                "_attn_implementation", "torch_dtype", "lm_head_bias", "mlp_bias", "attention_bias",
                "full_attn_mod", "interpolate_factor"]
SPECIAL_IDS = {"<|endoftext|>": 199999, "<|endoftext10|>": 200010, "<|endoftext11|>": 200011, "<|assistant|>": 200019,
               "<|end|>": 200020, "<|user|>": 200021, "<|system|>": 200022}
#: Official tensor-name fragments (present) and their native counterparts (must be absent).
OFFICIAL_NAMES = ["feed_forward_in.net.0.linear.weight", "feed_forward_out.net.2.weight", "self_attn.linear_q.weight",
                  "self_attn.linear_out.weight", "audio_projection.speech.0.weight", "audio_projection.vision.2.weight",
                  "img_projection.0.weight", "img_projection.2.weight", "image_embed.glb_GN", "image_embed.sub_GN"]
NATIVE_NAMES = ["feed_forward_in.gate_up_proj", "encoders.0.self_attn.q_proj", "up_proj_for_speech",
                "img_projection_up", "global_img_feature_extensor"]
DECODER_LINEARS = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]


def _shard_tensors(folder: Path) -> dict[str, tuple[str, torch.dtype]]:
    out = {}
    for shard in SHARDS:
        with safe_open(str(folder / shard), framework="pt") as f:
            for k in f.keys():
                out[k] = (shard, f.get_slice(k).get_dtype())
    return out


def test_tiny_official_folder_follows_the_published_layout(tiny_official):
    f = tiny_official
    files = {p.name for p in f.iterdir()}
    # weights: three bf16 shards, and an index naming exactly their tensors
    tensors = _shard_tensors(f)
    index = json.loads((f / "model.safetensors.index.json").read_text())
    assert {k: v for k, (v, _) in tensors.items()} == index["weight_map"]
    assert {d for _, d in tensors.values()} == {"BF16"}
    assert not [n for n in files if n.endswith(".safetensors") and n not in SHARDS]
    for m in range(2):
        for lin in DECODER_LINEARS:
            stem = f"model.layers.{m}.{lin}"
            assert f"{stem}.base_layer.weight" in tensors and f"{stem}.weight" not in tensors
            for ad in ("speech", "vision"):
                assert f"{stem}.lora_A.{ad}.weight" in tensors and f"{stem}.lora_B.{ad}.weight" in tensors
    for frag in OFFICIAL_NAMES:
        assert any(k.endswith(frag) or frag + "." in k for k in tensors), frag
    for frag in NATIVE_NAMES:
        assert not any(frag in k for k in tensors), frag
    # adapters, remote code, tokenizer and processor files
    for ad in ("speech-lora", "vision-lora"):
        assert (f / ad / "adapter_config.json").is_file() and list((f / ad).glob("*.safetensors"))
    assert set(REMOTE_CODE) <= files and set(TOKENIZER_FILES) <= files
    assert {"generation_config.json", "preprocessor_config.json", "processor_config.json"} <= files
    tok_cfg = json.loads((f / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "GPT2Tokenizer" and tok_cfg["chat_template"]
    vocab, added = json.loads((f / "vocab.json").read_text()), json.loads((f / "added_tokens.json").read_text())
    assert len(vocab) + len(added) == 200064 and max(vocab.values()) < 199999
    assert {k: added[k] for k in SPECIAL_IDS} == SPECIAL_IDS
    merges = (f / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and all(len(m.split(" ")) == 2 for m in merges[1:])
    pre = json.loads((f / "preprocessor_config.json").read_text())
    assert all(v.startswith("processing_phi4mm.") for v in pre["auto_map"].values())
    assert pre["feature_size"] == 80 and pre["sampling_rate"] == 16000 and pre["dynamic_hd"] >= 1
    assert [v for k, v in pre.items() if k.endswith("compression_rate")] == [8]
    assert not any(isinstance(v, dict) for k, v in pre.items() if k != "auto_map")  # flat keys
    proc = json.loads((f / "processor_config.json").read_text())
    assert proc["auto_map"]["AutoProcessor"].startswith("processing_phi4mm.")
    # config.json
    cfg = json.loads((f / "config.json").read_text())
    assert cfg["model_type"] == "phi4mm"
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_phi4mm.")
    assert cfg["speech_lora"]["layer"] == SPEECH_LAYER and cfg["vision_lora"]["layer"] == VISION_LAYER
    assert set(cfg["speech_lora"]) == set(cfg["vision_lora"]) == {"r", "lora_alpha", "dp", "layer"}
    audio = cfg["audio_processor"]
    assert audio["name"] == "cascades"
    assert set(AUDIO_KEYS) <= set(audio["config"]) and "depthwise_separable_out_channel" not in audio["config"]
    assert "conv_channels" in audio["config"]["nemo_conv_settings"]
    assert audio["config"]["relative_attention_bias_args"]["type"] == "t5"
    assert "t5_bias_max_distance" in audio["config"]["relative_attention_bias_args"]
    assert isinstance(audio["config"]["activation_checkpointing"], dict)
    assert audio["config"]["input_size"] == 80 and audio["config"]["time_reduction"] == 8
    assert audio["config"]["kernel_size"] == 3
    assert set(AUDIO_EMBD_KEYS) <= set(cfg["embd_layer"]["audio_embd_layer"])
    assert set(IMAGE_EMBD_KEYS) <= set(cfg["embd_layer"]["image_embd_layer"])
    assert cfg["embd_layer"]["audio_embd_layer"]["embedding_cls"] == "audio"
    assert cfg["embd_layer"]["image_embd_layer"]["embedding_cls"] == "tune_image"
    assert set(DECODER_KEYS) <= set(cfg) and cfg["vocab_size"] == 200064 and cfg["tie_word_embeddings"] is True
    assert cfg["eos_token_id"] == 199999 and cfg["torch_dtype"] == "bfloat16" and cfg["partial_rotary_factor"] == 0.75
    assert {"short_factor", "long_factor"} <= set(cfg["rope_scaling"])
    assert not [k for k in cfg if k in ("audio_config", "vision_config", "rope_parameters", "text_config")]


def test_published_regexes_match_inner_names_only():
    """Why the loader must re-anchor (official-layout.md): inner names match, full names don't."""
    from phi4mm_lora.model.convert import reanchor_layer_regex

    for layer in (SPEECH_LAYER, VISION_LAYER):
        for lin in DECODER_LINEARS:
            assert re.fullmatch(layer, f"layers.3.{lin}")
            assert not re.fullmatch(layer, f"model.layers.3.{lin}")
            assert re.fullmatch(reanchor_layer_regex(layer), f"model.layers.3.{lin}")
        for other in ("model.embed_tokens_extend.image_embed.img_processor.encoder.layers.0.self_attn.q_proj",
                      "model.embed_tokens_extend.audio_embed.encoder.encoders.0.self_attn.linear_q", "lm_head"):
            assert not re.fullmatch(reanchor_layer_regex(layer), other)


def _batch(processor):
    audio = (0.1 * np.random.default_rng(0).standard_normal(24000)).astype(np.float32)
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<|APA|>{processor.audio_token} rate"}], tokenize=False, add_generation_prompt=True)
    return processor(text=[text + '{"accuracy": 7}'], audio=[audio], return_tensors="pt")


def _round_to_bf16(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.to(torch.bfloat16).to(p.dtype))


def _logits(loaded, batch) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**{k: v.to(loaded.plan.device) for k, v in batch.items()}).logits


def test_official_logits_equal_native_with_speech_adapter(tiny_official, tiny_native):
    """fp32: within 1e-6 of the native tiny model with weights rounded to bf16 (the shards are
    bf16); bf16: exactly the native model rounded to bf16. Speech adapter active in both."""
    for precision, tol in (("fp32", 1e-6), ("bf16", 0.0)):
        off = load_model(ModelConfig(path=str(tiny_official), device="cpu"), precision, AdapterConfig())
        nat = load_model(ModelConfig(path=str(tiny_native), device="cpu"), precision, AdapterConfig())
        assert off.adapters.active == nat.adapters.active == ["speech"]
        _round_to_bf16(nat.model)
        batch = _batch(nat.processor)
        assert torch.equal(batch["input_ids"], _batch(off.processor)["input_ids"])
        got, want = _logits(off, batch), _logits(nat, batch)
        assert (got.float() - want.float()).abs().max() <= tol, precision
    # the speech adapter matters: without it the logits move
    with off.model.disable_adapter():
        assert not torch.equal(_logits(off, batch), got)


def test_official_processor_equals_native(tiny_official, tiny_native):
    from phi4mm_lora.model.load import load_processor

    off, nat = load_processor(tiny_official, "official"), load_processor(tiny_native, "native")
    a, b = _batch(off), _batch(nat)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 4.x saves the native processor's image and audio settings into the same
        # preprocessor_config.json, so a native folder written there loses dynamic_hd
        # (docs/compatibility.md); the official reader is not affected
        assert off.image_processor.dynamic_hd == nat.image_processor.dynamic_hd
    assert off.image_processor.dynamic_hd == json.loads((tiny_official / "preprocessor_config.json").read_text())["dynamic_hd"]
    assert off.tokenizer.chat_template == nat.tokenizer.chat_template


def test_no_remote_code_is_ever_imported(tiny_official, tmp_path, monkeypatch, capsys):
    """verify, inspect, one training step and convert on the official folder: the tripwire .py
    files never fire. The tripwire is live: importing one fails and leaves its mark."""
    import importlib.util

    from test_train_common import make_manifest, small_overrides

    from phi4mm_lora.cli import main
    from phi4mm_lora.config import load_config
    from phi4mm_lora.train.finetune import train

    mark = tmp_path / "fired.txt"
    monkeypatch.setenv("PHI4MM_LORA_TRIPWIRE", str(mark))
    assert main(["verify", "--model", str(tiny_official), "--precision", "fp32"]) == 0
    assert "verify passed" in capsys.readouterr().out
    assert main(["inspect", "--model", str(tiny_official), "--precision", "fp32"]) == 0
    manifest = make_manifest(tmp_path / "data", n=2)
    run = train(load_config(None, small_overrides(manifest, tmp_path / "run", model__path=str(tiny_official),
                                                  adapter__mode="pretrained", train__max_steps=1)), progress=False)
    assert run.summary["first_loss"] > 0 and (run.adapter_dir / "adapter_model.safetensors").is_file()
    assert main(["convert", str(tiny_official), str(tmp_path / "native")]) == 0
    assert not mark.exists() and not (tiny_official / "TRIPWIRE_FIRED").exists()
    assert not [m for m in sys.modules if m.split(".")[-1] in {p[:-3] for p in REMOTE_CODE} or "transformers_modules" in m]
    assert not list((tmp_path / "native").glob("*.py"))

    copy = tmp_path / "trip"
    copy.mkdir()
    shutil.copy(tiny_official / "modeling_phi4mm.py", copy)
    spec = importlib.util.spec_from_file_location("trip_modeling", copy / "modeling_phi4mm.py")
    with pytest.raises(ImportError, match="tripwire"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert mark.read_text().strip() == "modeling_phi4mm.py"


def test_converted_folder_loads_in_project_and_plain_transformers_peft(tiny_official, tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, Phi4MultimodalForCausalLM

    from phi4mm_lora.model.convert import convert_official_to_native

    out = convert_official_to_native(tiny_official, tmp_path / "native")
    for p in out.rglob("*.json"):
        assert "auto_map" not in json.loads(p.read_text()), p
    assert json.loads((out / "config.json").read_text())["model_type"] == "phi4_multimodal"
    processor = AutoProcessor.from_pretrained(out)  # native classes only; no remote code offered
    assert type(processor).__name__ == "Phi4MultimodalProcessor"
    batch = _batch(processor)
    plain = Phi4MultimodalForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    plain = PeftModel.from_pretrained(plain, out / "speech-lora", adapter_name="speech").eval()
    with torch.no_grad():
        want = plain(**batch).logits
    ours = load_model(ModelConfig(path=str(out), device="cpu"), "fp32", AdapterConfig())
    official = load_model(ModelConfig(path=str(tiny_official), device="cpu"), "fp32", AdapterConfig())
    assert (_logits(ours, batch) - want).abs().max() <= 1e-6
    assert (_logits(official, batch) - want).abs().max() <= 1e-6


# --- damaged downloads ------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("TRIPWIRE_FIRED"))
    return dst


def _one_line_exit_2(folder: Path, capsys, *needles: str) -> None:
    from phi4mm_lora.cli import main

    assert main(["verify", "--model", str(folder), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_truncated_shard_is_one_line_exit_2(tiny_official, tmp_path, capsys):
    folder = _copy(tiny_official, tmp_path / "ck")
    shard = folder / SHARDS[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    _one_line_exit_2(folder, capsys, SHARDS[1])
    shard.write_bytes(data[:6])  # not even a header
    _one_line_exit_2(folder, capsys, SHARDS[1])


def test_index_naming_a_missing_shard_is_one_line_exit_2(tiny_official, tmp_path, capsys):
    folder = _copy(tiny_official, tmp_path / "ck")
    (folder / SHARDS[2]).unlink()
    _one_line_exit_2(folder, capsys, SHARDS[2], "incomplete")


def test_stray_safetensors_beside_the_index_is_ignored(tiny_official, tmp_path):
    """official-layout.md: the index is the source of truth; another *.safetensors is not part of it."""
    folder = _copy(tiny_official, tmp_path / "ck")
    reference = load_model(ModelConfig(path=str(tiny_official), device="cpu"), "fp32", AdapterConfig())
    stray = {}
    for shard in SHARDS:
        with safe_open(str(folder / shard), framework="pt") as f:
            stray.update({k: f.get_tensor(k) + 0.5 for k in f.keys()})
    save_file(stray, str(folder / "model.safetensors"))
    loaded = load_model(ModelConfig(path=str(folder), device="cpu"), "fp32", AdapterConfig())
    batch = _batch(reference.processor)
    assert torch.equal(_logits(loaded, batch), _logits(reference, batch))
