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
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from phi4mm_lora.config import AdapterConfig
from phi4mm_lora.errors import UserError
from phi4mm_lora.model.precision import AUDIO_TOWER, VISION_TOWER

AUDIO_PROJECTOR = ("model.embed_tokens_extend.audio_embed.up_proj_for_speech", "model.embed_tokens_extend.audio_embed.down_proj_for_speech")
VISION_PROJECTOR = (
    "model.embed_tokens_extend.image_embed.img_projection_up",
    "model.embed_tokens_extend.image_embed.img_projection_down",
    "model.embed_tokens_extend.image_embed.global_img_feature_extensor",
    "model.embed_tokens_extend.image_embed.sub_img_feature_extensor",
)
EXTRA_FILE = "trainable_modules.safetensors"

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


def _state_for_peft(weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for module, ab in weights.items():
        out[f"base_model.model.{module}.lora_A.weight"] = ab["A"]
        out[f"base_model.model.{module}.lora_B.weight"] = ab["B"]
    return out


def read_peft_folder(folder: Path) -> Pretrained:
    """A saved PEFT adapter folder as (config, weights)."""
    cfg_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights_file.is_file():
        raise UserError(f"{folder} is not a PEFT adapter folder (needs adapter_config.json and adapter_model.safetensors)")
    from phi4mm_lora.fileio import safetensors_header

    safetensors_header(weights_file, "adapter weights")
    try:
        cfg = LoraConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{cfg_file} is not a valid adapter config ({str(exc)[:160]}); the adapter is damaged") from None
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(weights_file)).items():
        m = re.match(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$", key)
        if m:
            weights.setdefault(m[1], {})[m[2]] = t
    return cfg, weights


def _load_weights(peft: PeftModel, name: str, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    try:
        result = set_peft_model_state_dict(peft, _state_for_peft(weights), adapter_name=name)
    except RuntimeError as exc:  # "size mismatch for ...": another base model or another rank
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise UserError(f"adapter {name!r} does not fit this model ({first[:200]}); it was trained on another base "
                        "model or with another adapter.r/target_modules") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UserError(f"adapter {name!r}: {len(unexpected)} tensors fit no module (e.g. {unexpected[0]})")


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
            _load_weights(peft, name, weights)
    assert peft is not None
    trainable = cfg.name if cfg.mode == "stacked" else base
    active = [base, cfg.name] if cfg.mode == "stacked" else [base]
    set_active(peft, active)
    if cfg.init_from:
        _, w = read_peft_folder(Path(cfg.init_from))
        _load_weights(peft, trainable, w)
        load_extra_modules(peft, Path(cfg.init_from))
    if lora_dtype is not None:
        for n, p in peft.named_parameters():
            if ".lora_" in n:
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
    mine = re.compile(rf"\.lora_[AB]\.{re.escape(state.trainable_adapter)}\.weight$")
    for name, p in peft.named_parameters():
        inner = name.replace("base_model.model.", "", 1)
        if ".lora_" in name:
            p.requires_grad_(bool(mine.search(name)))
        else:
            p.requires_grad_(any(inner == pre or inner.startswith(pre + ".") for pre in state.unfrozen_prefixes) and p.is_floating_point())


def extra_trainable_state(peft: PeftModel, state: AdapterState) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in peft.named_parameters():
        inner = name.replace("base_model.model.", "", 1)
        if ".lora_" not in name and p.requires_grad:
            out[inner] = p.detach().to("cpu").contiguous()
    return out


def save_trained(peft: PeftModel, state: AdapterState, out_dir: Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Only what trained, as a standard PEFT adapter folder that plain PEFT loads completely.

    Unfrozen modules (``adapter.trainable: unfreeze|vision``) are saved the way PEFT saves
    ``modules_to_save``: listed in ``adapter_config.json`` and stored in
    ``adapter_model.safetensors`` as ``base_model.model.<module>.<param>``. So
    ``PeftModel.from_pretrained(base, folder)`` (and the Hub, vLLM's PEFT loader, transformers'
    ``load_adapter``) applies them, instead of silently running the model without them. Only
    when the trained tensors are not whole modules (which PEFT cannot express) do they go to
    ``trainable_modules.safetensors``, with a warning that plain PEFT will ignore them.

    ``state_dict``: full tensors gathered beforehand (FSDP/DeepSpeed shard the live parameters,
    see :func:`phi4mm_lora.train.distributed.gather_trained`); by default the live parameters.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # LoRA on lm_head (tied to the embeddings) never changes the base embedding matrix, so PEFT's
    # default of saving the whole embedding layer would only add vocab x hidden frozen weights.
    kwargs = {} if state_dict is None else {"state_dict": state_dict}
    peft.save_pretrained(str(out_dir), selected_adapters=[state.trainable_adapter], save_embedding_layers=False, **kwargs)
    # PEFT puts a non-"default" adapter in a subfolder; flatten so the folder itself loads.
    sub = out_dir / state.trainable_adapter
    if sub.is_dir():
        for f in sub.iterdir():
            f.replace(out_dir / f.name)
        sub.rmdir()
    if state_dict is None:
        extra = extra_trainable_state(peft, state)
    else:
        extra = {k.replace("base_model.model.", "", 1): v.detach().to("cpu").contiguous()
                 for k, v in state_dict.items() if ".lora_" not in k}
    if extra:
        modules = modules_to_save_for(peft.base_model.model, set(extra))
        if modules is None:
            save_file(extra, str(out_dir / EXTRA_FILE), metadata={"format": "pt"})
            warnings.warn(f"{len(extra)} unfrozen tensors are not whole modules, so PEFT cannot carry them: they are in "
                          f"{out_dir / EXTRA_FILE}, which plain PeftModel.from_pretrained ignores; export with "
                          "`phi4mm-lora export RUN --format merged` to share this model", stacklevel=2)
        else:
            # PEFT loads a module's whole state dict: its persistent buffers (feature
            # normalisation of the audio encoder) go with the trained parameters
            # (named_buffers, not state_dict(): under FSDP that would be a collective on one process)
            inner = peft.base_model.model
            for m in modules:
                mod = inner.get_submodule(m)
                for k, v in mod.named_buffers():
                    owner, _, leaf = k.rpartition(".")
                    if leaf not in mod.get_submodule(owner)._non_persistent_buffers_set:  # fp32 like the master weights
                        extra.setdefault(f"{m}.{k}", v.detach().to("cpu", torch.float32 if v.is_floating_point()
                                                                    else v.dtype).contiguous())
            _add_modules_to_save(out_dir, extra, modules)
    return out_dir


def modules_to_save_for(model: torch.nn.Module, trained: set[str]) -> list[str] | None:
    """The fewest whole modules whose parameters are exactly ``trained`` (None if there are none).

    A module qualifies when every parameter below it trained (so it holds no frozen LoRA base
    layer and no untrained part); each trained tensor is covered by its highest qualifying
    ancestor. A tensor whose own module does not qualify (a bare parameter next to frozen ones)
    makes the set inexpressible as PEFT ``modules_to_save``.
    """
    total: dict[str, int] = {}
    hits: dict[str, int] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            total[prefix] = total.get(prefix, 0) + 1
            if name in trained:
                hits[prefix] = hits.get(prefix, 0) + 1
    chosen: set[str] = set()
    for name in trained:
        parts = name.split(".")
        whole = [".".join(parts[:i]) for i in range(1, len(parts))
                 if hits.get(".".join(parts[:i])) == total.get(".".join(parts[:i]))]
        if not whole or whole[-1] != ".".join(parts[:-1]):
            return None  # the parameter's own module also holds frozen tensors
        chosen.add(whole[0])
    return sorted(chosen)


def _add_modules_to_save(folder: Path, extra: dict[str, torch.Tensor], modules: list[str]) -> None:
    """Put unfrozen tensors into the adapter file in PEFT's ``modules_to_save`` format."""
    import json

    weights_file, cfg_file = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    tensors = dict(load_file(str(weights_file)))
    tensors.update({f"base_model.model.{k}": v.contiguous() for k, v in extra.items()})
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    cfg = json.loads(cfg_file.read_text())
    cfg["modules_to_save"] = modules
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def load_extra_modules(peft: PeftModel, folder: Path) -> int:
    """Load unfrozen-module weights saved with an adapter; returns how many tensors.

    Reads PEFT's ``modules_to_save`` tensors from ``adapter_model.safetensors`` (the non-LoRA
    keys) and, for runs saved before that format, ``trainable_modules.safetensors``.
    """
    tensors: dict[str, torch.Tensor] = {}
    weights_file = folder / "adapter_model.safetensors"
    if weights_file.is_file():
        tensors.update({k.replace("base_model.model.", "", 1): v for k, v in load_file(str(weights_file)).items()
                        if ".lora_" not in k})
    f = folder / EXTRA_FILE
    if f.is_file():
        from phi4mm_lora.fileio import safetensors_header

        safetensors_header(f, "trained-module weights")
        tensors.update(load_file(str(f)))
    if not tensors:
        return 0
    target = peft.base_model.model
    params = {**dict(target.named_buffers()), **dict(target.named_parameters())}
    missing = [k for k in tensors if k not in params]
    if missing:
        raise UserError(f"{folder}: {len(missing)} unfrozen-module tensors fit no module (e.g. {missing[0]})")
    wrong = [k for k, t in tensors.items() if tuple(t.shape) != tuple(params[k].shape)]
    if wrong:
        raise UserError(f"{folder}: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the model's is "
                        f"{tuple(params[wrong[0]].shape)}; it was trained on another base model")
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t.to(params[k].dtype))
    return len(tensors)


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


def lora_tensor_names(peft: torch.nn.Module) -> dict[str, list[str]]:
    """LoRA parameter names grouped by adapter name."""
    out: dict[str, list[str]] = {}
    for name, _ in peft.named_parameters():
        m = re.search(r"\.lora_(?:A|B)\.([A-Za-z0-9_]+)\.weight$", name)
        if m:
            out.setdefault(m[1], []).append(name)
    return out


__all__ = [
    "AdapterState",
    "attach_adapters",
    "apply_trainable",
    "save_trained",
    "merge_and_save",
    "read_peft_folder",
    "lora_tensor_names",
    "load_extra_modules",
    "modules_to_save_for",
]
