"""Which LoRA adapters exist, which one trains, and what else is unfrozen.

Native transformers has no LoRA inside Phi-4-multimodal: the pretrained ``speech`` and
``vision`` adapters are ordinary PEFT adapters. This module attaches them (and any new one)
with PEFT, then sets ``requires_grad`` explicitly for every parameter - PEFT's own
``set_adapter`` silently marks active adapters trainable, which would make a "frozen" base
adapter train in stacked mode.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from phi4mm_lora.config import AdapterConfig
from phi4mm_lora.errors import UserError
from phi4mm_lora.model import adapter_io
from phi4mm_lora.model.precision import AUDIO_TOWER, VISION_TOWER

AUDIO_PROJECTOR = ("model.embed_tokens_extend.audio_embed.up_proj_for_speech", "model.embed_tokens_extend.audio_embed.down_proj_for_speech")
VISION_PROJECTOR = (
    "model.embed_tokens_extend.image_embed.img_projection_up",
    "model.embed_tokens_extend.image_embed.img_projection_down",
    "model.embed_tokens_extend.image_embed.global_img_feature_extensor",
    "model.embed_tokens_extend.image_embed.sub_img_feature_extensor",
)

#: A pretrained adapter read from a checkpoint: (LoRA config, {module: {"A", "B"}}).
Pretrained = tuple[LoraConfig, dict[str, dict[str, torch.Tensor]]]


@dataclass
class AdapterState:
    """What was attached: adapter names, the one that trains, and what the user should know."""

    names: list[str]
    trainable_adapter: str
    active: list[str]
    unfrozen_prefixes: list[str]
    warnings: list[str] = field(default_factory=list)


def unfrozen_prefixes(trainable: str) -> list[str]:
    """Module prefixes trained besides LoRA for a trainable set."""
    if trainable == "unfreeze":
        return [AUDIO_TOWER, *AUDIO_PROJECTOR]
    if trainable == "vision":
        return [VISION_TOWER, *VISION_PROJECTOR]
    return []


def resolve_targets(model: torch.nn.Module, target: str, include_towers: bool) -> str:
    """Turn ``all-linear`` or a user regex into a regex PEFT fullmatches, checking it matches."""
    linear_names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear or _is_bnb_linear(m)]
    if target == "all-linear":
        names = [n for n in linear_names if n.startswith("model.layers.")]
        if include_towers:
            names += [n for n in linear_names if n.startswith((AUDIO_TOWER + ".", VISION_TOWER + "."))]
        return "(" + "|".join(re.escape(n) for n in names) + ")"
    matched = [n for n in linear_names if re.fullmatch(target, n)]
    if not matched:
        raise UserError(
            f"LoRA target regex {target!r} matches no linear module; it must match whole names such as "
            "'model.layers.0.self_attn.qkv_proj' (try adapter.target_modules=all-linear)"
        )
    return target


def _is_bnb_linear(module: torch.nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def attach_adapters(model: torch.nn.Module, cfg: AdapterConfig, pretrained: dict[str, Pretrained], lora_dtype: torch.dtype | None = None) -> tuple[PeftModel, AdapterState]:
    """Wrap ``model`` in PEFT according to the adapter mode; return the model and what was done."""
    notes: list[str] = []
    base = cfg.base
    if cfg.mode in ("pretrained", "stacked") and base not in pretrained:
        raise UserError(
            f"adapter.mode={cfg.mode} needs the pretrained {base!r} adapter, but the checkpoint has none "
            f"(found: {sorted(pretrained) or 'none'}); use adapter.mode=fresh"
        )
    fresh_cfg = None
    if cfg.mode in ("fresh", "stacked"):
        target = resolve_targets(model, cfg.target_modules, cfg.include_towers)
        fresh_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target, bias="none")
    # with init_from the fresh adapter is a trained one (evaluate/score --adapter RUN): nothing is lost
    if cfg.mode == "fresh" and base in pretrained and not cfg.init_from:
        notes.append(
            f"pretrained {base!r} adapter discarded: a fresh r={cfg.r} adapter replaces it, so the model's "
            f"{'audio' if base == 'speech' else 'image'} understanding is lost until it is retrained"
        )

    order: list[tuple[str, LoraConfig, dict | None]] = []
    if cfg.mode == "fresh":
        order.append((base, fresh_cfg, None))
    else:
        order.append((base, pretrained[base][0], pretrained[base][1]))
    for other, (ocfg, oweights) in pretrained.items():
        if other != base and cfg.keep_unused:
            order.append((other, ocfg, oweights))
    if cfg.mode == "stacked":
        order.append((cfg.name, fresh_cfg, None))

    autocast = lora_dtype is None
    peft: PeftModel | None = None
    for name, lcfg, weights in order:
        lcfg = LoraConfig(**{**lcfg.to_dict(), "inference_mode": False})
        with warnings.catch_warnings():
            # PEFT warns on every load when lm_head (tied to the embeddings) is a LoRA target.
            # Training and generation are unaffected: the LoRA delta is a separate module and the
            # tied matrix stays frozen; only merging changes both (see merge_and_save).
            warnings.filterwarnings("ignore", message=r".*tie_word_embeddings=True.*ensure_weight_tying")
            if peft is None:
                peft = get_peft_model(model, lcfg, adapter_name=name, autocast_adapter_dtype=autocast)
            else:
                # peft < 0.19 has no autocast_adapter_dtype here; lora_dtype is applied below either way
                kwargs = {"autocast_adapter_dtype": autocast} if _accepts(peft.add_adapter, "autocast_adapter_dtype") else {}
                peft.add_adapter(name, lcfg, **kwargs)
        if weights is not None:
            adapter_io.load_lora(peft, name, weights)
    assert peft is not None
    trainable = cfg.name if cfg.mode == "stacked" else base
    active = [base, cfg.name] if cfg.mode == "stacked" else [base]
    set_active(peft, active)
    if cfg.init_from:
        adapter_io.load_adapter(peft, trainable, Path(cfg.init_from))
    if lora_dtype is not None:
        for n, p in peft.named_parameters():
            if adapter_io.is_lora(n):
                p.data = p.data.to(lora_dtype)
    state = AdapterState([n for n, _, _ in order], trainable, active, unfrozen_prefixes(cfg.trainable), notes)
    apply_trainable(peft, state)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return peft, state


def _accepts(fn, kwarg: str) -> bool:
    import inspect

    return kwarg in inspect.signature(fn).parameters


def set_active(peft: PeftModel, active: list[str]) -> None:
    """Activate one or several adapters (stacked mode runs base + task together)."""
    peft.base_model.set_adapter(active if len(active) > 1 else active[0])


def apply_trainable(peft: PeftModel, state: AdapterState) -> None:
    """Exactly the trainable adapter's LoRA tensors and the unfrozen modules require grad."""
    for name, p in peft.named_parameters():
        if adapter_io.is_lora(name):
            p.requires_grad_(adapter_io.lora_adapter(name) == state.trainable_adapter)
        else:
            inner = adapter_io.strip_prefix(name)
            p.requires_grad_(any(inner == pre or inner.startswith(pre + ".") for pre in state.unfrozen_prefixes) and p.is_floating_point())


def save_trained(peft: PeftModel, state: AdapterState, out_dir: Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Only what trained (the trainable adapter + unfrozen modules), as a standard PEFT adapter
    folder that plain PEFT loads completely; see :func:`phi4mm_lora.model.adapter_io.save_adapter`.

    ``state_dict``: full tensors gathered beforehand (FSDP/DeepSpeed shard the live parameters,
    see :func:`phi4mm_lora.train.distributed.gather_trained`); by default the live parameters.
    """
    return adapter_io.save_adapter(peft, state.trainable_adapter, out_dir, state_dict)


def merge_and_save(peft: PeftModel, state: AdapterState, out_dir: Path, processor=None) -> Path:
    """Merge the active adapter(s) into the base weights and save a plain transformers model.

    A LoRA on ``lm_head`` merges into the matrix ``lm_head`` shares with the input embeddings
    (Phi-4 ties them), so the merged model's embeddings change too; keep such adapters unmerged
    where the input side must stay exactly the base model's.
    """
    merged = peft.merge_and_unload(adapter_names=state.active)
    merged.save_pretrained(str(out_dir))
    if processor is not None:
        processor.save_pretrained(str(out_dir))
    return out_dir


__all__ = [
    "AdapterState",
    "attach_adapters",
    "apply_trainable",
    "save_trained",
    "merge_and_save",
]
