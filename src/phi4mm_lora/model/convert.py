"""Official (remote-code) checkpoint layout <-> native transformers layout, without remote code.

Microsoft's checkpoint stores the decoder linears PEFT-style inside the model
(``...qkv_proj.base_layer.weight`` + ``lora_A.speech.weight`` ...), names conformer and
projector modules differently, and nests audio settings under other names in config.json.
Executing the remote code breaks on current transformers, so we read the tensors and config
as data, rename them, and hand the LoRA tensors to ordinary PEFT adapters. Known pitfall this
module guards against: a key-prefix mismatch that silently loads every ``lora_B`` as zeros;
:func:`check_adapter_nonzero` is run on every converted adapter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Phi4MultimodalAudioConfig, Phi4MultimodalConfig

from phi4mm_lora.errors import UserError

_AUDIO = "model.embed_tokens_extend.audio_embed"
_IMAGE = "model.embed_tokens_extend.image_embed"

#: Native name <-> official name, one row per renamed module (facts from domain.md).
#: ``<N>`` is a block index, ``<IO>`` in|out, ``<QKV>`` q|k|v; a trailing "." marks a prefix.
_RENAMES: list[tuple[str, str]] = [
    (f"{_AUDIO}.encoder.encoders.<N>.feed_forward_<IO>.gate_up_proj.", f"{_AUDIO}.encoder.encoders.<N>.feed_forward_<IO>.net.0.linear."),
    (f"{_AUDIO}.encoder.encoders.<N>.feed_forward_<IO>.down_proj.", f"{_AUDIO}.encoder.encoders.<N>.feed_forward_<IO>.net.2."),
    (f"{_AUDIO}.encoder.encoders.<N>.self_attn.<QKV>_proj.", f"{_AUDIO}.encoder.encoders.<N>.self_attn.linear_<QKV>."),
    (f"{_AUDIO}.encoder.encoders.<N>.self_attn.o_proj.", f"{_AUDIO}.encoder.encoders.<N>.self_attn.linear_out."),
    (f"{_AUDIO}.up_proj_for_speech.", f"{_AUDIO}.audio_projection.speech.0."),
    (f"{_AUDIO}.down_proj_for_speech.", f"{_AUDIO}.audio_projection.speech.2."),
    (f"{_AUDIO}.up_proj_for_vision_speech.", f"{_AUDIO}.audio_projection.vision.0."),
    (f"{_AUDIO}.down_proj_for_vision_speech.", f"{_AUDIO}.audio_projection.vision.2."),
    (f"{_IMAGE}.img_projection_up.", f"{_IMAGE}.img_projection.0."),
    (f"{_IMAGE}.img_projection_down.", f"{_IMAGE}.img_projection.2."),
    (f"{_IMAGE}.global_img_feature_extensor", f"{_IMAGE}.glb_GN"),
    (f"{_IMAGE}.sub_img_feature_extensor", f"{_IMAGE}.sub_GN"),
]
_SLOTS = {"<N>": r"(?P<N>\d+)", "<IO>": r"(?P<IO>in|out)", "<QKV>": r"(?P<QKV>q|k|v)"}


def _rule(src: str, dst: str) -> tuple[str, str]:
    """A (regex, replacement) pair for one template row; whole names unless src ends in '.'."""
    pattern = re.escape(src)
    for slot, group in _SLOTS.items():
        pattern = pattern.replace(re.escape(slot), group)
        dst = dst.replace(slot, rf"\g<{slot[1:-1]}>")
    return "^" + pattern + ("" if src.endswith(".") else "$"), dst


NATIVE_TO_OFFICIAL: list[tuple[str, str]] = [_rule(n, o) for n, o in _RENAMES]
OFFICIAL_TO_NATIVE: list[tuple[str, str]] = [_rule(o, n) for n, o in _RENAMES]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[A-Za-z0-9_]+)\.weight$")
_AUDIO_RENAMES = {  # native name -> official name inside audio_processor.config
    "hidden_size": "attention_dim",
    "num_attention_heads": "attention_heads",
    "intermediate_size": "linear_units",
}
_OFFICIAL_ONLY_AUDIO = ("activation_checkpointing", "cnn_layer_norm", "input_layer", "encoder_embedding_config")


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def native_key_to_official(key: str) -> str:
    return _rename(key, NATIVE_TO_OFFICIAL)


def official_key_to_native(key: str) -> str:
    return _rename(key, OFFICIAL_TO_NATIVE).replace(".base_layer.", ".")


# ----------------------------------------------------------------------------- config


def native_config_to_official(config: Phi4MultimodalConfig, adapters: dict[str, dict]) -> dict:
    """The official config.json for a native config (used to write tiny official checkpoints)."""
    d = config.to_dict()
    audio = dict(d.pop("audio_config"))
    vision = dict(d.pop("vision_config"))
    rope = dict(d.pop("rope_parameters") or {})
    for k in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype", "nemo_final_size"):
        d.pop(k, None)
    off_audio = {_AUDIO_RENAMES.get(k, k): v for k, v in audio.items() if k not in ("model_type", "downsample_rate", "transformers_version", "dtype")}
    off_audio["nemo_conv_settings"] = {"conv_channels": off_audio.pop("nemo_conv_channels")}
    off_audio["relative_attention_bias_args"] = {"type": "t5", "t5_bias_max_distance": off_audio.pop("bias_max_distance")}
    off_audio.update({"activation_checkpointing": "", "cnn_layer_norm": True, "input_layer": "nemo_conv", "encoder_embedding_config": {"input_size": audio["input_size"]}})
    out = {
        **d,
        "model_type": "phi4mm",
        "architectures": ["Phi4MMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_phi4mm.Phi4MMConfig",
            "AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM",
            "AutoTokenizer": "Xenova/gpt-4o",
        },
        "rope_theta": rope.pop("rope_theta", 10000.0),
        "partial_rotary_factor": rope.pop("partial_rotary_factor", 1.0),
        "rope_scaling": {"type": rope.pop("rope_type", "longrope"), **rope},
        "audio_processor": {"name": "cascades", "config": off_audio},
        "embd_layer": {
            "embedding_cls": "image_audio",
            "audio_embd_layer": {"embedding_cls": "audio", "downsample_rate": audio.get("downsample_rate", 1)},
            "image_embd_layer": {"embedding_cls": "tune_image", "use_hd_transform": True, "crop_size": vision.get("crop_size", 448), "hd_transform_order": "sub_glb"},
        },
        "speech_lora": adapters["speech"],
        "vision_lora": adapters["vision"],
        # Not in Microsoft's file (their vision tower size is hard-coded in remote code); our tiny
        # checkpoints carry it so the converter can rebuild a tiny tower. Absent -> SigLIP defaults.
        "phi4mm_lora_vision_config": {k: v for k, v in vision.items() if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")},
    }
    return out


def official_config_to_native(official: dict) -> tuple[Phi4MultimodalConfig, dict[str, dict]]:
    """Native config plus the two adapter specs from an official config.json dict."""
    d = json.loads(json.dumps(official))
    for key in ("speech_lora", "vision_lora"):
        if key not in d:
            raise UserError(f"official config lacks {key!r}; this does not look like Phi-4-multimodal-instruct")
    adapters = {"speech": d.pop("speech_lora"), "vision": d.pop("vision_lora")}
    for k in ("_name_or_path", "architectures", "auto_map", "transformers_version", "_attn_implementation", "model_type", "torch_dtype", "dtype"):
        d.pop(k, None)
    embd = d.pop("embd_layer", {})
    audio = dict(d.pop("audio_processor", {}).get("config", {}))
    for k in _OFFICIAL_ONLY_AUDIO:
        audio.pop(k, None)
    for native, official_name in _AUDIO_RENAMES.items():
        if official_name in audio:
            audio[native] = audio.pop(official_name)
    if "nemo_conv_settings" in audio:
        audio["nemo_conv_channels"] = audio.pop("nemo_conv_settings")["conv_channels"]
    if "relative_attention_bias_args" in audio:
        audio["bias_max_distance"] = audio.pop("relative_attention_bias_args")["t5_bias_max_distance"]
    audio["downsample_rate"] = embd.get("audio_embd_layer", {}).get("downsample_rate", 1)
    audio = {k: v for k, v in audio.items() if k in _AUDIO_FIELDS}
    image = embd.get("image_embd_layer", {})
    vision = {"crop_size": image.get("crop_size", 448), **d.pop("phi4mm_lora_vision_config", {})}
    rope = d.pop("rope_scaling", None)
    if rope:
        rope = {("rope_type" if k == "type" else k): v for k, v in rope.items()}
        rope.setdefault("rope_theta", d.pop("rope_theta", 10000.0))
        rope.setdefault("partial_rotary_factor", d.pop("partial_rotary_factor", 1.0))
        d["rope_parameters"] = rope
    d = {k: v for k, v in d.items() if k in _DECODER_FIELDS}
    return Phi4MultimodalConfig(**d, audio_config=audio, vision_config=vision), adapters


def _fields(cls) -> set[str]:
    return set(getattr(cls, "__dataclass_fields__", {})) or set(cls().to_dict())


_AUDIO_FIELDS = _fields(Phi4MultimodalAudioConfig) - {"model_type"}
_DECODER_FIELDS = _fields(Phi4MultimodalConfig) - {"model_type", "audio_config", "vision_config"}


# ----------------------------------------------------------------------------- adapters


def lora_config_from_spec(spec: dict) -> LoraConfig:
    """PEFT config for an official ``{"r", "lora_alpha", "layer", "dp"}`` adapter spec."""
    return LoraConfig(r=int(spec["r"]), lora_alpha=spec["lora_alpha"], lora_dropout=float(spec.get("dp", 0.0)), target_modules=spec["layer"], bias="none")


def write_peft_adapter(folder: Path, weights: dict[str, dict[str, torch.Tensor]], spec: dict) -> None:
    """Save ``{module: {"A", "B"}}`` as a standard PEFT adapter folder."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = lora_config_from_spec(spec)
    cfg.base_model_name_or_path = None
    cfg.save_pretrained(str(folder))
    tensors = {}
    for module, ab in weights.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = ab["A"].contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = ab["B"].contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def check_adapter_nonzero(name: str, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Refuse an adapter whose lora_B are all zero (the silent key-mismatch failure)."""
    if not weights:
        raise UserError(f"adapter {name!r}: no LoRA tensors found in the checkpoint")
    if all(float(ab["B"].abs().max()) == 0.0 for ab in weights.values()):
        raise UserError(
            f"adapter {name!r}: every lora_B is zero - the checkpoint keys were not matched "
            "(the adapter would do nothing). Check the checkpoint layout."
        )


# ----------------------------------------------------------------------------- files


def write_official(out: Path, model: torch.nn.Module, adapters: dict[str, dict[str, dict[str, torch.Tensor]]], specs: dict[str, dict]) -> None:
    """Write ``model`` + adapters in Microsoft's remote-code layout (for tests and the tiny model)."""
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    lora_modules = set().union(*(a.keys() for a in adapters.values()))
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in lora_modules:
            tensors[f"{module}.base_layer.{leaf}"] = value.contiguous()
        else:
            tensors[native_key_to_official(key)] = value.contiguous()
    for name, weights in adapters.items():
        for module, ab in weights.items():
            tensors[f"{module}.lora_A.{name}.weight"] = ab["A"].contiguous()
            tensors[f"{module}.lora_B.{name}.weight"] = ab["B"].contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(native_config_to_official(model.config, specs), indent=2))


def safetensor_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no *.safetensors weights; point model.path at a checkpoint folder")
    return files


def read_official(folder: Path, dtype: torch.dtype | None = None) -> tuple[Phi4MultimodalConfig, dict[str, torch.Tensor], dict[str, dict], dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """Native config, native base state dict, adapter specs and adapter weights of an official folder.

    Tensors are read one at a time from safetensors (memory-mapped), so peak memory stays
    near one copy of the weights.
    """
    official = json.loads((folder / "config.json").read_text())
    config, specs = official_config_to_native(official)
    base: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, dict[str, torch.Tensor]]] = {name: {} for name in specs}
    for file in safetensor_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                m = _LORA_KEY.match(key)
                if m:
                    adapters.setdefault(m["adapter"], {}).setdefault(m["module"], {})[m["ab"]] = tensor
                else:
                    base[official_key_to_native(key)] = tensor
    for name, weights in adapters.items():
        check_adapter_nonzero(name, weights)
    return config, base, specs, adapters


def convert_official_to_native(src: Path, dst: Path) -> Path:
    """``phi4mm-lora convert``: an official folder becomes a native folder with PEFT adapters."""
    from transformers import Phi4MultimodalForCausalLM

    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json; pass the checkpoint folder")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst} exists and is not empty; choose a new output folder")
    config, base, specs, adapters = read_official(src)
    with torch.device("meta"):
        model = Phi4MultimodalForCausalLM(config)
    missing, unexpected = model.load_state_dict(base, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(("inv_freq",))]
    if missing or unexpected:
        raise UserError(f"{src}: weights do not fit the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    for name, weights in adapters.items():
        write_peft_adapter(dst / f"{name}-lora", weights, specs[name])
    for extra in src.iterdir():
        if extra.is_file() and extra.suffix in (".json", ".jinja") and extra.name not in ("config.json", "model.safetensors.index.json") or extra.name == "tokenizer.model":
            (dst / extra.name).write_bytes(extra.read_bytes())
    return dst
