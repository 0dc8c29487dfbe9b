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
from transformers import Phi4MultimodalAudioConfig, Phi4MultimodalConfig, PretrainedConfig

from phi4mm_lora.errors import UserError
from phi4mm_lora.model.adapter_io import ADAPTER_CONFIG, lora_key, lora_parts, write_lora_weights
from phi4mm_lora.model.compat import rope_kwargs

#: The adapter regexes of the published config.json, verbatim. They are written against the
#: *inner* decoder's module names (remote code wraps ``self.model``), so as they are they match
#: no name of the full model; :func:`reanchor_layer_regex` fixes that.
OFFICIAL_LAYER_REGEX = {
    "speech": r"((layers.*self_attn\.(qkv|o)_proj)|(layers.*mlp\.(gate_up|down)_proj))",
    "vision": r"layers.*((self_attn\.(qkv_proj|o_proj))|(mlp\.(gate_up|down)_proj))",
}
#: The five remote-code files a published folder carries; nothing here ever imports them.
REMOTE_CODE_FILES = ("configuration_phi4mm.py", "modeling_phi4mm.py", "processing_phi4mm.py",
                     "speech_conformer_encoder.py", "vision_siglip_navit.py")
INDEX_FILE = "model.safetensors.index.json"

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



def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def reanchor_layer_regex(regex: str) -> str:
    """A published ``layer`` regex (inner-decoder names) as a regex over full-model names.

    PEFT fullmatches a string ``target_modules`` against each module name of the model it
    wraps. Remote code wraps the inner decoder (``layers.3.self_attn.qkv_proj``); we wrap the
    full model, where that module is ``model.layers.3.self_attn.qkv_proj``. Prefixing the
    inner decoder's attribute name keeps the regex's meaning exactly. A regex that already
    starts at ``model.`` (our own native configs) is left alone.
    """
    if regex.startswith(("model\\.", "^model\\.", "(?:model\\.")):
        return regex
    return rf"model\.(?:{regex})"


def native_key_to_official(key: str) -> str:
    return _rename(key, NATIVE_TO_OFFICIAL)


def official_key_to_native(key: str) -> str:
    return _rename(key, OFFICIAL_TO_NATIVE).replace(".base_layer.", ".")


# ----------------------------------------------------------------------------- config


#: native audio_config name -> name inside the official ``audio_processor.config`` (the
#: conformer's own names; the misspelt ``depthwise_seperable_out_channel`` is the real key).
_AUDIO_RENAMES = {
    "hidden_size": "attention_dim",
    "num_attention_heads": "attention_heads",
    "intermediate_size": "linear_units",
    "depthwise_separable_out_channel": "depthwise_seperable_out_channel",
}
#: Native audio fields the official file does not hold (defaults apply) or holds elsewhere.
_NATIVE_ONLY_AUDIO = ("model_type", "transformers_version", "dtype", "audio_token_id", "feature_layer",
                      "initializer_range", "nemo_final_size", "downsample_rate", "nemo_conv_channels",
                      "nemo_activation", "bias_max_distance", "bias_symmetric")
_OFFICIAL_ONLY_AUDIO = ("activation_checkpointing", "cnn_layer_norm", "input_layer", "encoder_embedding_config",
                        "bias_in_glu", "causal", "batch_norm", "ext_pw_kernel_size")
#: Decoder fields a published config.json carries at its top level.
_OFFICIAL_DECODER = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "hidden_act", "max_position_embeddings", "original_max_position_embeddings",
                     "initializer_range", "rms_norm_eps", "use_cache", "tie_word_embeddings", "bos_token_id",
                     "eos_token_id", "pad_token_id", "sliding_window", "embd_pdrop", "resid_pdrop", "attention_dropout")
_GENERIC_CONFIG_KEYS = ("_name_or_path", "architectures", "auto_map", "transformers_version", "_attn_implementation",
                        "model_type", "torch_dtype", "dtype", "lm_head_bias", "mlp_bias", "attention_bias",
                        "full_attn_mod", "interpolate_factor", "img_processor")


def native_config_to_official(config: Phi4MultimodalConfig, adapters: dict[str, dict]) -> dict:
    """The published config.json for a native config (``tiny --layout official``, export).

    ``adapters`` gives r / lora_alpha / dp per adapter; the ``layer`` regexes written are the
    published ones (they only fit adapters on the decoder linears, see :func:`write_official`).
    """
    d = config.to_dict()
    audio = dict(d["audio_config"])
    vision = dict(d["vision_config"])
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    partial = rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "longrope"))
    generic = set(PretrainedConfig().to_dict())
    off_audio = {_AUDIO_RENAMES.get(k, k): v for k, v in audio.items() if k not in _NATIVE_ONLY_AUDIO and k not in generic}
    off_audio.update({
        "nemo_conv_settings": {"conv_channels": audio["nemo_conv_channels"], "activation": audio.get("nemo_activation", "relu")},
        "relative_attention_bias_args": {"type": "t5", "t5_bias_max_distance": audio["bias_max_distance"],
                                         "t5_bias_symmetric": audio.get("bias_symmetric", False)},
        "activation_checkpointing": {"interval": 1, "module": "transformer", "offload": False},
        "cnn_layer_norm": True, "input_layer": "nemo_conv", "bias_in_glu": True, "causal": True,
        "batch_norm": False, "ext_pw_kernel_size": 1,
        "encoder_embedding_config": {"input_size": audio["input_size"]},
    })
    speech, vis = (adapters[n] for n in ("speech", "vision"))
    return {
        "_name_or_path": "Phi-4-multimodal-instruct",
        "architectures": ["Phi4MMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_phi4mm.Phi4MMConfig",
            "AutoModelForCausalLM": "modeling_phi4mm.Phi4MMForCausalLM",
            "AutoTokenizer": "Xenova/gpt-4o",
        },
        "model_type": "phi4mm",
        **{k: d[k] for k in _OFFICIAL_DECODER if k in d},
        # One id here as published; the end-of-turn id lives in generation_config.json.
        "eos_token_id": d["eos_token_id"][0] if isinstance(d.get("eos_token_id"), list) else d.get("eos_token_id"),
        "rope_theta": rope_theta,
        "partial_rotary_factor": partial,
        "rope_scaling": {"type": rope_type, **{k: v for k, v in rope.items() if k in ("short_factor", "long_factor")}},
        "_attn_implementation": "flash_attention_2",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1",
        "lm_head_bias": False, "mlp_bias": False, "attention_bias": False,
        "full_attn_mod": 1, "interpolate_factor": 1,
        "audio_processor": {"name": "cascades", "config": off_audio},
        "embd_layer": {
            "embedding_cls": "image_audio",
            "audio_embd_layer": {"compression_rate": 8, "downsample_rate": audio.get("downsample_rate", 1),
                                 "embedding_cls": "audio", "enable_gradient_checkpointing": True,
                                 "projection_cls": "mlp", "use_conv_downsample": False, "use_qformer": False},
            "image_embd_layer": {"crop_size": vision.get("crop_size", 448), "embedding_cls": "tune_image",
                                 "enable_gradient_checkpointing": True, "hd_transform_order": "sub_glb",
                                 "image_token_compression_cls": "avg_pool_2d", "projection_cls": "mlp",
                                 "use_hd_transform": True, "with_learnable_separator": True},
        },
        "speech_lora": {"r": speech["r"], "lora_alpha": speech["lora_alpha"], "dp": speech.get("dp", 0.0),
                        "layer": OFFICIAL_LAYER_REGEX["speech"]},
        "vision_lora": {"r": vis["r"], "lora_alpha": vis["lora_alpha"], "dp": vis.get("dp", 0.0),
                        "layer": OFFICIAL_LAYER_REGEX["vision"]},
        # Not in Microsoft's file (their vision tower size is hard-coded in remote code); tiny
        # checkpoints carry it so a tiny tower can be rebuilt. Absent -> the real SigLIP sizes.
        "phi4mm_lora_vision_config": {k: v for k, v in vision.items() if k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")},
    }


def official_config_to_native(official: dict, generation_eos: list[int] | None = None) -> tuple[Phi4MultimodalConfig, dict[str, dict]]:
    """Native config plus the two adapter specs (``layer`` re-anchored) from an official config.json.

    ``generation_eos``: the eos ids of the folder's generation_config.json, merged into the
    config's so generation stops at ``<|end|>`` as well.
    """
    d = json.loads(json.dumps(official))
    for key in ("speech_lora", "vision_lora"):
        if not isinstance(d.get(key), dict) or not isinstance(d[key].get("layer"), str):
            raise UserError(f"official config lacks {key!r} (with a 'layer' regex); this does not look like Phi-4-multimodal-instruct")
    adapters = {}
    for name in ("speech", "vision"):
        spec = d.pop(f"{name}_lora")
        adapters[name] = {**spec, "layer": reanchor_layer_regex(spec["layer"]), "published_layer": spec["layer"]}
    for k in _GENERIC_CONFIG_KEYS:
        d.pop(k, None)
    embd = d.pop("embd_layer", {})
    audio = dict(d.pop("audio_processor", {}).get("config", {}))
    for k in _OFFICIAL_ONLY_AUDIO:
        audio.pop(k, None)
    for native, official_name in _AUDIO_RENAMES.items():
        if official_name in audio:
            audio[native] = audio.pop(official_name)
    nemo = audio.pop("nemo_conv_settings", None) or {}
    if "conv_channels" in nemo:
        audio["nemo_conv_channels"] = nemo["conv_channels"]
    if "activation" in nemo:
        audio["nemo_activation"] = nemo["activation"]
    bias = audio.pop("relative_attention_bias_args", None) or {}
    if "t5_bias_max_distance" in bias:
        audio["bias_max_distance"] = bias["t5_bias_max_distance"]
    if "t5_bias_symmetric" in bias:
        audio["bias_symmetric"] = bias["t5_bias_symmetric"]
    audio["downsample_rate"] = embd.get("audio_embd_layer", {}).get("downsample_rate", 1)
    audio = {k: v for k, v in audio.items() if k in _AUDIO_FIELDS}
    image = embd.get("image_embd_layer", {})
    vision = {"crop_size": image.get("crop_size", 448), **d.pop("phi4mm_lora_vision_config", {})}
    rope = {("rope_type" if k == "type" else k): v for k, v in (d.pop("rope_scaling", None) or {}).items()}
    rope.update(rope_theta=d.pop("rope_theta", 10000.0), partial_rotary_factor=d.pop("partial_rotary_factor", 1.0))
    rope.setdefault("rope_type", "default")
    d = {k: v for k, v in d.items() if k in _DECODER_FIELDS}
    d.update(rope_kwargs(rope))
    if generation_eos:  # published: config.json names <|endoftext|>, generation_config.json adds <|end|>
        first = d.get("eos_token_id")
        ids = [first] if isinstance(first, int) else list(first or [])
        d["eos_token_id"] = ids + sorted(i for i in generation_eos if i not in ids)
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
    write_lora_weights(folder, weights)


def check_adapter_nonzero(name: str, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Refuse an adapter whose lora_B are all zero (the silent key-mismatch failure)."""
    if not weights:
        raise UserError(f"adapter {name!r}: no LoRA tensors found in the checkpoint")
    if all(float(ab["B"].abs().max()) == 0.0 for ab in weights.values()):
        raise UserError(
            f"adapter {name!r}: every lora_B is zero - the checkpoint keys were not matched "
            "(the adapter would do nothing). Check the checkpoint layout."
        )


# ----------------------------------------------------------------------------- official writer

#: What each stand-in remote-code file does when imported: leave a mark and fail. Real
#: remote code must never run, so the tiny folder's copies are tripwires for the tests.
_TRIPWIRE = '''"""phi4mm-lora tripwire standing in for Microsoft's {name}: importing it is a bug."""
import os
import pathlib

_mark = os.environ.get("PHI4MM_LORA_TRIPWIRE")
for _p in ([_mark] if _mark else []) + [str(pathlib.Path(__file__).with_name("TRIPWIRE_FIRED"))]:
    try:
        with open(_p, "a") as _f:
            _f.write("{name}\\n")
    except OSError:
        pass
raise ImportError("phi4mm-lora tripwire: remote code {name} was imported")
'''
_DECODER_LORA_MODULE = re.compile(r"^model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)$")


def _shard(tensors: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Split tensors (in name order) into ``n`` non-empty shards of about equal tensor counts.

    (The published shards are balanced by bytes; at toy width one embedding matrix outweighs
    the rest, so balancing by count is what keeps every shard in use.)
    """
    keys = sorted(tensors)
    if len(keys) < n:
        raise ValueError(f"cannot split {len(keys)} tensors into {n} shards")
    return [{k: tensors[k] for k in keys[i * len(keys) // n:(i + 1) * len(keys) // n]} for i in range(n)]


def write_official(out: Path, model: torch.nn.Module, adapters: dict[str, dict[str, dict[str, torch.Tensor]]],
                   specs: dict[str, dict], processor=None, shards: int = 3, dtype: torch.dtype | None = None,
                   tripwires: bool = False) -> None:
    """Write ``model`` + its speech/vision adapters as the published checkpoint stores them.

    Conventions from the shared official-layout.md: weights over ``shards`` files named by
    ``model.safetensors.index.json``, decoder linears as ``base_layer`` + ``lora_A/B.<adapter>``,
    ``speech-lora/`` and ``vision-lora/`` adapter folders, config.json with the published
    regexes and key names; with ``processor`` (the native processor) also GPT-2 style tokenizer
    files and flat processor files with ``auto_map``. ``dtype``: cast floating tensors (the
    published files are bf16); None keeps the model's. ``tripwires``: also write the five
    remote-code file names as stand-ins that fail when imported (the tiny test model only;
    an export must never ship .py files). Used by ``tiny --layout official`` and ``export``.
    """
    for name in ("speech", "vision"):
        bad = [m for m in adapters.get(name, {}) if not _DECODER_LORA_MODULE.match(m)]
        if name not in adapters or bad:
            raise UserError(
                f"the official layout holds exactly a speech and a vision adapter on the decoder linears; "
                f"adapter {name!r} {'is missing' if name not in adapters else f'targets {bad[0]}'}"
            )
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    lora_modules = set().union(*(a.keys() for a in adapters.values()))
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        name = f"{module}.base_layer.{leaf}" if module in lora_modules else native_key_to_official(key)
        tensors[name] = value
    for name, weights in adapters.items():
        for module, ab in weights.items():
            for part in ("A", "B"):
                tensors[lora_key(module, part, name)] = ab[part]
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, part in enumerate(_shard(tensors, shards), start=1):
        fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / "config.json").write_text(json.dumps(native_config_to_official(model.config, specs), indent=2))
    for name in ("speech", "vision"):
        _write_official_adapter(out / f"{name}-lora", adapters[name], specs[name], OFFICIAL_LAYER_REGEX[name], dtype)
    for fname in REMOTE_CODE_FILES if tripwires else ():
        (out / fname).write_text(_TRIPWIRE.format(name=fname))
    gen = getattr(model, "generation_config", None)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 199999, "eos_token_id": [200020, 199999], "pad_token_id": 199999, "transformers_version": "4.46.1"}
        if gen is None else {k: v for k, v in gen.to_dict().items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}, indent=2))
    if processor is not None:
        write_official_processor_files(out, processor)


def _write_official_adapter(folder: Path, weights: dict, spec: dict, layer: str, dtype: torch.dtype | None) -> None:
    """``speech-lora/`` / ``vision-lora/``: a PEFT folder over the inner decoder, as serving tools read it."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(spec["r"]), "lora_alpha": spec["lora_alpha"],
           "lora_dropout": float(spec.get("dp", 0.0)), "target_modules": layer, "bias": "none",
           "base_model_name_or_path": "TBA", "inference_mode": True}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
    write_lora_weights(folder, weights, dtype)


def write_official_processor_files(out: Path, processor) -> None:
    """Tokenizer and processor files as published: GPT-2 style tokenizer, flat processor settings, auto_map."""
    tok = processor.tokenizer
    spec = json.loads(tok.backend_tokenizer.to_str())
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (out / "vocab.json").write_text(json.dumps(spec["model"]["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {a["content"]: a["id"] for a in spec["added_tokens"]}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2, ensure_ascii=False))
    specials = {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    decoder = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
               for a in spec["added_tokens"]}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": decoder, **specials, "chat_template": tok.chat_template,
        "clean_up_tokenization_spaces": False, "model_max_length": 131072, "tokenizer_class": "GPT2Tokenizer",
    }, indent=2, ensure_ascii=False))
    audio, image = processor.audio_processor, processor.image_processor
    (out / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {
            "AutoProcessor": "processing_phi4mm.Phi4MMProcessor",
            "AutoFeatureExtractor": "processing_phi4mm.Phi4MMAudioFeatureExtractor",
            "AutoImageProcessor": "processing_phi4mm.Phi4MMImageProcessor",
        },
        "processor_class": "Phi4MMProcessor",
        "feature_extractor_type": "Phi4MMAudioFeatureExtractor",
        "image_processor_type": "Phi4MMImageProcessor",
        "feature_size": audio.feature_size,
        "sampling_rate": audio.sampling_rate,
        "audio_compression_rate": audio.audio_compression_rate,
        "audio_downsample_rate": audio.audio_downsample_rate,
        "audio_feat_stride": audio.audio_feat_stride,
        "dynamic_hd": image.dynamic_hd,
    }, indent=2))
    (out / "processor_config.json").write_text(json.dumps({
        "auto_map": {"AutoProcessor": "processing_phi4mm.Phi4MMProcessor"},
        "processor_class": "Phi4MMProcessor",
    }, indent=2))


# ----------------------------------------------------------------------------- official reader


def checkpoint_shards(folder: Path) -> dict[str, list[str]]:
    """Shard file -> tensor names of an official folder; the index is the source of truth.

    With ``model.safetensors.index.json`` only the files it names are read (any other
    ``*.safetensors`` lying beside them is not part of the checkpoint) and each must exist.
    Without an index the folder must hold exactly one weights file.
    """
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc}); re-download it") from None
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(fname, []).append(key)
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise UserError(f"{folder}: the index names {len(missing)} shard(s) that are not there (first: {missing[0]}); "
                            "the download is incomplete - fetch the missing file(s)")
        return files
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if not found:
        raise UserError(f"{folder} holds no *.safetensors weights; point model.path at a checkpoint folder")
    if len(found) > 1:
        raise UserError(f"{folder} holds {len(found)} *.safetensors files but no {INDEX_FILE} saying which belong "
                        "to the checkpoint; restore the index or keep one weights file")
    return {found[0]: []}


def _open_shard(path: Path):
    from safetensors import SafetensorError

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} cannot be read ({str(exc)[:120]}): truncated or corrupt download? Fetch it again") from None


def read_official(folder: Path, dtype: torch.dtype | None = None) -> tuple[Phi4MultimodalConfig, dict[str, torch.Tensor], dict[str, dict], dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """Native config, native base state dict, adapter specs and adapter weights of an official folder.

    Tensors are read one at a time from safetensors (memory-mapped), so peak memory stays
    near one copy of the weights.
    """
    from safetensors import SafetensorError

    try:
        official = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{folder / 'config.json'} is not valid JSON ({exc})") from None
    gen_file = folder / "generation_config.json"
    gen_eos = json.loads(gen_file.read_text()).get("eos_token_id") if gen_file.is_file() else None
    config, specs = official_config_to_native(official, [gen_eos] if isinstance(gen_eos, int) else gen_eos)
    base: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, dict[str, torch.Tensor]]] = {name: {} for name in specs}
    for fname, listed in checkpoint_shards(folder).items():
        with _open_shard(folder / fname) as f:
            keys = set(f.keys())
            absent = [k for k in listed if k not in keys]
            if absent:
                raise UserError(f"{folder / fname} lacks {len(absent)} tensor(s) the index names (e.g. {absent[0]}); "
                                "the file is incomplete or from another download")
            for key in listed or sorted(keys):
                try:
                    tensor = f.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError) as exc:
                    raise UserError(f"{folder / fname}: tensor {key} cannot be read ({str(exc)[:100]}): "
                                    "truncated or corrupt download?") from None
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                lora = lora_parts(key)
                if lora and lora[1] in ("A", "B") and lora[2] and key.endswith(".weight"):
                    module, part, adapter = lora
                    adapters.setdefault(adapter, {}).setdefault(module, {})[part] = tensor
                else:
                    base[official_key_to_native(key)] = tensor
    for name, weights in adapters.items():
        check_adapter_nonzero(name, weights)
        if name in specs:
            unmatched = [m for m in weights if not re.fullmatch(specs[name]["layer"], m)]
            if unmatched:
                raise UserError(f"adapter {name!r}: its layer regex {specs[name].get('published_layer', specs[name]['layer'])!r} "
                                f"does not cover {unmatched[0]}, which holds its LoRA weights")
    return config, base, specs, adapters


def build_from_official(folder: Path, dtype: torch.dtype | None = None, attn: str | None = None):
    """The native model (on CPU, weights assigned, rotary buffers rebuilt) plus specs and LoRA weights."""
    from transformers import Phi4MultimodalForCausalLM

    config, base, specs, adapters = read_official(folder, dtype=dtype)
    if attn:
        config._attn_implementation = attn
    with torch.device("meta"):
        model = Phi4MultimodalForCausalLM(config)
    missing, unexpected = model.load_state_dict(base, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith("inv_freq")]
    if missing or unexpected:
        raise UserError(f"{folder}: weights do not fit the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model, specs, adapters


def convert_official_to_native(src: Path, dst: Path) -> Path:
    """``phi4mm-lora convert``: an official folder becomes a native folder with PEFT adapters.

    Its processor and tokenizer files are written by the native processor (no ``auto_map`` to
    remote code); of the official side files only generation_config.json is carried over.
    """
    from phi4mm_lora.model.load import load_processor

    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json; pass the checkpoint folder")
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst} exists and is not empty; choose a new output folder")
    model, specs, adapters = build_from_official(src)
    processor = load_processor(src, "official")
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    for name, weights in adapters.items():
        write_peft_adapter(dst / f"{name}-lora", weights, specs[name])
    processor.save_pretrained(dst)
    if (src / "generation_config.json").is_file():
        (dst / "generation_config.json").write_bytes((src / "generation_config.json").read_bytes())
    return dst
