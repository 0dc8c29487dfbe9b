"""What a loaded model holds, and what the full-size model would take under each precision plan.

:func:`model_report` describes a loaded model (``load_model``'s result, or a bare module):
parameters total/trainable per component with their dtypes, the LoRA adapters, which modules
bitsandbytes quantised, the bytes the weights take, and warnings for the states that make a
run useless (LoRA frozen or quantised, nothing trainable, an all-zero adapter, a pretrained
adapter thrown away).

:func:`architecture_report` answers "will it fit" without any weights: it builds the
full-size 5.6B architecture on the ``meta`` device (no memory, a few seconds), attaches both
pretrained adapters with PEFT exactly as the loader does, and sums bytes per parameter with
the plan's dtypes and bitsandbytes' packing:

* NF4 (double quant, blocksize 64, nested blocksize 256), per quantised weight of n values:
  ``ceil(n/2)`` packed bytes + ``ceil(n/64)`` uint8 absmax + ``4*ceil(ceil(n/64)/256)`` fp32
  absmax-of-absmax + 1,092 bytes of constants (16-entry NF4 code, 256-entry nested code and
  the offset, all fp32). About 0.516 byte per parameter.
* LLM.int8, per quantised weight of shape (out, in): ``out*in`` int8 bytes + ``4*out`` (one
  fp32 scale per output row).
* Biases of quantised linears and every other tensor: ``numel * dtype size``.

Optimizer state (AdamW): two fp32 moments per trainable parameter (8 bytes), plus a 4-byte
fp32 master copy when the trainable parameter itself is bf16/fp16 (mixed-precision training
keeps the update in fp32). Gradients: one per trainable parameter in its own dtype.
Activations are not included: they depend on batch, length and gradient checkpointing.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from phi4mm_lora.model.adapter_io import lora_adapter, lora_parts, strip_prefix
from phi4mm_lora.model.precision import (
    AUDIO_TOWER,
    VISION_TOWER,
    PrecisionPlan,
    check_plan,
    is_quantised_module,
    plan_for,
)

COMPONENTS = (
    "decoder",
    "audio encoder",
    "audio projector",
    "vision tower",
    "vision projector",
    "embeddings/lm_head",
    "other",
)
_HALF = (torch.float16, torch.bfloat16)

#: The published Phi-4-multimodal-instruct adapters (domain facts).
FULL_SIZE_ADAPTERS = {
    "speech": {"r": 320, "lora_alpha": 640, "dp": 0.01},
    "vision": {"r": 256, "lora_alpha": 512, "dp": 0.0},
}

NF4_FORMULA = (
    "NF4 double-quant per weight of n values: ceil(n/2) packed + ceil(n/64) uint8 absmax "
    "+ 4*ceil(ceil(n/64)/256) fp32 absmax-of-absmax + 1092 B constants (codes, offset)"
)
INT8_FORMULA = "LLM.int8 per weight (out, in): out*in int8 + 4*out fp32 row scales"
OPTIMIZER_FORMULA = (
    "AdamW: 8 B (two fp32 moments) per trainable param, + 4 B fp32 master copy when the "
    "trainable param is bf16/fp16"
)


# ----------------------------------------------------------------------------- helpers


def _inner(name: str) -> str:
    return strip_prefix(name).replace(".base_layer", "")


def component_of(name: str) -> str:
    """Component of a (PEFT-stripped) parameter or module name; LoRA is reported apart."""
    n = _inner(name)
    if n.startswith("model.layers.") or n.startswith("model.norm"):
        return "decoder"
    if n.startswith(AUDIO_TOWER + "."):
        return "audio encoder"
    if n.startswith("model.embed_tokens_extend.audio_embed."):
        return "audio projector"
    if n.startswith(VISION_TOWER + "."):
        return "vision tower"
    if n.startswith("model.embed_tokens_extend.image_embed."):
        return "vision projector"
    if n.startswith(("model.embed_tokens.", "lm_head.")):
        return "embeddings/lm_head"
    return "other"


def logical_numel(p: torch.Tensor) -> int:
    """Parameter count as the model sees it: a bnb Params4bit stores packed uint8 (n/2 values)."""
    qs = getattr(p, "quant_state", None)
    shape = getattr(qs, "shape", None)
    if shape is not None:
        return math.prod(shape)
    return p.numel()


def stored_bytes(p: torch.Tensor) -> int:
    """Bytes a parameter occupies, including bitsandbytes' quantisation statistics."""
    total = p.numel() * p.element_size()
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        s2 = getattr(qs, "state2", None)
        if s2 is not None:
            for t in (s2.absmax, s2.code):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    scb = getattr(p, "SCB", None)
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    return total


def nf4_bytes(n: int, blocksize: int = 64, nested_blocksize: int = 256) -> int:
    """Bytes of one NF4 double-quantised weight with ``n`` values (see module docstring)."""
    blocks = math.ceil(n / blocksize)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / nested_blocksize) + 4 * (16 + 256 + 1)


def int8_bytes(out_features: int, in_features: int) -> int:
    """Bytes of one LLM.int8 weight: int8 values plus one fp32 scale per output row."""
    return out_features * in_features + 4 * out_features


def optimizer_bytes(n: int, dtype: torch.dtype) -> int:
    """AdamW state for ``n`` trainable values of ``dtype`` (see :data:`OPTIMIZER_FORMULA`)."""
    return n * (8 + (4 if dtype in _HALF else 0))


def _dtype_name(p: torch.Tensor) -> str:
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        return f"nf4({str(p.dtype).replace('torch.', '')})" if getattr(qs, "quant_type", "nf4") == "nf4" else "4bit"
    if type(p).__name__ == "Int8Params":
        return "int8"
    return str(p.dtype).replace("torch.", "")


def _empty_component() -> dict[str, Any]:
    return {"params": 0, "trainable": 0, "dtypes": {}, "quantised_modules": 0, "bytes": 0}


def _tally(row: dict[str, Any], n: int, nbytes: int, dtype: str, trainable_key: str | None) -> None:
    """One parameter tensor into a component's or an adapter's row (``trainable_key``: where its
    count goes when it trains, None when it does not)."""
    row["params"] += n
    row["bytes"] += nbytes
    row["dtypes"][dtype] = row["dtypes"].get(dtype, 0) + n
    if trainable_key:
        row[trainable_key] += n


def _tied(model: torch.nn.Module) -> bool:
    try:
        return model.get_input_embeddings().weight is model.get_output_embeddings().weight
    except Exception:
        return False


def _fmt_warning_list(names: list[str], limit: int = 3) -> str:
    extra = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + extra


# ----------------------------------------------------------------------------- loaded model


def model_report(loaded: Any) -> dict[str, Any]:
    """Report on a ``Loaded`` (from ``load_model``) or on a bare (PEFT-wrapped) module."""
    model: torch.nn.Module = getattr(loaded, "model", loaded)
    state = getattr(loaded, "adapters", None)
    plan: PrecisionPlan | None = getattr(loaded, "plan", None)

    components = {c: _empty_component() for c in COMPONENTS}
    adapters: dict[str, dict[str, Any]] = {}
    total = trainable = total_bytes = 0
    zero_b: dict[str, bool] = {}
    zero_a: dict[str, bool] = {}
    for name, p in model.named_parameters():  # shared (tied) tensors are yielded once
        n = logical_numel(p)
        b = stored_bytes(p)
        total += n
        total_bytes += b
        if p.requires_grad:
            trainable += n
        lora = lora_parts(name)
        if lora and lora[2]:
            a = adapters.setdefault(
                lora[2],
                {"tensors": 0, "params": 0, "trainable_tensors": 0, "trainable_params": 0, "dtypes": {}, "quantised_modules": 0, "bytes": 0},
            )
            a["tensors"] += 1
            a["trainable_tensors"] += int(p.requires_grad)
            _tally(a, n, b, _dtype_name(p), "trainable_params" if p.requires_grad else None)
            if not p.is_meta and p.is_floating_point():
                is_zero = bool(torch.count_nonzero(p.detach()) == 0)
                key = zero_b if lora[1].endswith("B") else zero_a
                key[lora[2]] = key.get(lora[2], True) and is_zero
            continue
        _tally(components[component_of(name)], n, b, _dtype_name(p), "trainable" if p.requires_grad else None)

    quantised: list[str] = []
    for name, module in model.named_modules():
        if not is_quantised_module(module):
            continue
        quantised.append(_inner(name))
        adapter = lora_adapter(name)
        if adapter in adapters:
            adapters[adapter]["quantised_modules"] += 1
        else:
            components[component_of(name)]["quantised_modules"] += 1

    active = list(getattr(state, "active", []) or [])
    for name, a in adapters.items():
        a["active"] = name in active if state is not None else None
        a["trainable"] = a["trainable_tensors"] > 0
        a["lora_B_all_zero"] = zero_b.get(name)

    warns = _warnings(model, state, adapters, trainable, zero_a, zero_b)
    lora_tensors = sum(a["tensors"] for a in adapters.values())
    report: dict[str, Any] = {
        "kind": "model",
        "total_params": total,
        "trainable_params": trainable,
        "trainable_pct": round(100.0 * trainable / total, 4) if total else 0.0,
        "weight_bytes": total_bytes,
        "tied_embeddings": _tied(model),
        "components": {k: v for k, v in components.items() if v["params"] or k != "other"},
        "adapters": adapters,
        "lora_tensors": lora_tensors,
        "lora_trainable_tensors": sum(a["trainable_tensors"] for a in adapters.values()),
        "quantised_modules": len(quantised),
        "warnings": warns,
    }
    if plan is not None:
        report["plan"] = {
            "name": plan.name,
            "device": str(plan.device),
            "dtype": str(plan.dtype).replace("torch.", ""),
            "quant": plan.quant,
            "quantise_towers": plan.quantise_towers,
            "notes": list(plan.notes),
        }
    planned = getattr(loaded, "planned_quantised", None)
    if planned is not None:
        report["planned_quantised"] = len(planned)
    if state is not None:
        report["adapter_state"] = {
            "names": list(state.names),
            "trainable_adapter": state.trainable_adapter,
            "active": list(state.active),
            "unfrozen": list(state.unfrozen_prefixes),
        }
    for key in ("path", "layout"):
        if hasattr(loaded, key):
            report[key] = str(getattr(loaded, key))
    return report


def _warnings(model, state, adapters, trainable, zero_a, zero_b) -> list[str]:
    warns: list[str] = []
    problems = check_plan(model)
    lora_q = [p.split(": ", 1)[1] for p in problems if p.startswith("LoRA quantised")]
    if lora_q:
        warns.append(
            f"LoRA quantised - cannot train: {len(lora_q)} LoRA modules are bitsandbytes layers "
            f"({_fmt_warning_list(lora_q)}); quantise only base linears (use precision nf4/selective/int8)"
        )
    warns += [p for p in problems if not p.startswith("LoRA quantised")]
    if trainable == 0:
        warns.append("nothing trainable: no parameter requires grad - training would do nothing")
    if state is not None:
        mine = adapters.get(state.trainable_adapter)
        if mine is None:
            warns.append(f"LoRA frozen: the trainable adapter {state.trainable_adapter!r} has no LoRA tensors")
        elif mine["trainable_tensors"] < mine["tensors"]:
            warns.append(
                f"LoRA frozen: {mine['tensors'] - mine['trainable_tensors']} of {mine['tensors']} tensors of the "
                f"trainable adapter {state.trainable_adapter!r} do not require grad"
            )
    elif adapters and not any(a["trainable_tensors"] for a in adapters.values()):
        warns.append("LoRA frozen: no LoRA tensor requires grad")
    trainable_name = getattr(state, "trainable_adapter", None)
    for name in adapters:
        if zero_a.get(name) and zero_b.get(name):
            warns.append(f"adapter {name!r} is all zeros (lora_A and lora_B): it does nothing")
        elif zero_b.get(name) and name != trainable_name:
            warns.append(
                f"adapter {name!r} is all zeros (every lora_B = 0) and does not train: it does nothing "
                "(a checkpoint key mismatch loads lora_B as zeros)"
            )
    if state is not None:
        warns += list(state.warnings)
    return warns


# ----------------------------------------------------------------------------- full-size on meta


def full_size_config():
    """Phi-4-multimodal-instruct's config: decoder as published, towers at transformers' defaults."""
    from transformers import Phi4MultimodalConfig

    return Phi4MultimodalConfig(
        vocab_size=200064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=24,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    )


def _meta_model(config, dtype: torch.dtype):
    from transformers import Phi4MultimodalForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
    try:
        with torch.device("meta"):
            return Phi4MultimodalForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def _count_full_size(peft: torch.nn.Module, plan: PrecisionPlan, to_quantise: set[str],
                     shapes: dict[str, tuple[int, int]], loaded_adapters: set[str]) -> tuple[dict, dict, dict[str, int]]:
    """Per component and per adapter rows of the meta model under ``plan``, and the totals.

    A quantised weight counts its packed bytes; an adapter that this config does not load counts
    its parameters but no bytes; a trainable tensor adds its gradient and AdamW's state.
    """
    components = {c: _empty_component() for c in COMPONENTS}
    adapters: dict[str, dict[str, Any]] = {}
    sums = dict.fromkeys(("total", "trainable", "weight", "grad", "opt"), 0)
    for pname, p in peft.named_parameters():
        n = p.numel()
        module = _inner(pname).rsplit(".", 1)[0]
        if module in to_quantise and pname.endswith(".weight"):
            dtype = plan.quant
            b = nf4_bytes(n) if plan.quant == "nf4" else int8_bytes(*shapes[module])
        else:
            dtype, b = str(p.dtype).replace("torch.", ""), n * p.element_size()
        adapter = lora_adapter(pname)
        if adapter and adapter not in loaded_adapters:
            b = 0  # in the checkpoint, not loaded by this config
        sums["total"] += n
        sums["weight"] += b
        if p.requires_grad:
            sums["trainable"] += n
            sums["grad"] += n * p.element_size()
            sums["opt"] += optimizer_bytes(n, p.dtype)
        if adapter:
            row = adapters.setdefault(adapter, {"tensors": 0, "params": 0, "trainable_params": 0, "dtypes": {}, "bytes": 0})
            row["tensors"] += 1
            _tally(row, n, b, dtype, "trainable_params" if p.requires_grad else None)
        else:
            _tally(components[component_of(pname)], n, b, dtype, "trainable" if p.requires_grad else None)
    for q in to_quantise:
        components[component_of(q)]["quantised_modules"] += 1
    return components, adapters, sums


def architecture_report(precision: str, adapter_cfg=None, config=None) -> dict[str, Any]:
    """Exact parameter counts and memory of the full-size model under ``precision``, on meta.

    ``precision`` is one of the six plans (``auto`` means bf16: the plan a bf16 GPU picks).
    The plan is described for a bf16-capable CUDA GPU, whatever machine runs this.
    """
    from phi4mm_lora.config import DECODER_LORA_REGEX, AdapterConfig
    from phi4mm_lora.model.adapters import attach_adapters, unfrozen_prefixes
    from phi4mm_lora.model.convert import lora_config_from_spec

    adapter_cfg = adapter_cfg or AdapterConfig()
    config = config or full_size_config()
    name = "bf16" if precision == "auto" else precision
    plan = plan_for(name, torch.device("cuda"), bf16=True)

    base = _meta_model(config, plan.dtype)
    linear = [n for n, m in base.named_modules() if type(m) is torch.nn.Linear]
    to_quantise = set(plan.modules_to_quantise(linear, unfrozen_prefixes(adapter_cfg.trainable)))
    shapes = {n: (m.out_features, m.in_features) for n, m in base.named_modules() if n in to_quantise}
    pretrained = {
        k: (lora_config_from_spec({**spec, "layer": DECODER_LORA_REGEX}), None) for k, spec in FULL_SIZE_ADAPTERS.items()
    }
    # Counts describe the whole checkpoint (both adapters); bytes describe what this config
    # loads (the unused pretrained adapter is skipped unless adapter.keep_unused).
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # the notes come back in state.warnings
        peft, state = attach_adapters(base, adapter_cfg.model_copy(update={"keep_unused": True}), pretrained, lora_dtype=plan.lora_dtype)
    loaded_adapters = set(state.active) | {state.trainable_adapter} | (set(state.names) if adapter_cfg.keep_unused else set())

    components, adapters, sums = _count_full_size(peft, plan, to_quantise, shapes, loaded_adapters)
    total, trainable, weight_b, grad_b, opt_b = (sums[k] for k in ("total", "trainable", "weight", "grad", "opt"))
    for k, a in adapters.items():
        a["trainable"] = a["trainable_params"] > 0
        a["active"] = k in state.active
        a["loaded"] = k in loaded_adapters
        src = FULL_SIZE_ADAPTERS.get(k) if (k != state.trainable_adapter or adapter_cfg.mode != "fresh") else None
        a["r"] = src["r"] if src else adapter_cfg.r
        a["alpha"] = src["lora_alpha"] if src else adapter_cfg.alpha

    formulas = {"optimizer": OPTIMIZER_FORMULA, "gradients": "one gradient per trainable param in its dtype"}
    if plan.quant == "nf4":
        formulas["quantised"] = NF4_FORMULA
    elif plan.quant == "int8":
        formulas["quantised"] = INT8_FORMULA
    return {
        "kind": "architecture",
        "precision": plan.name,
        "assumed_device": "CUDA GPU with bf16",
        "plan": {
            "dtype": str(plan.dtype).replace("torch.", ""),
            "quant": plan.quant,
            "quantise_towers": plan.quantise_towers,
            "lora_dtype": str(plan.lora_dtype).replace("torch.", "") if plan.lora_dtype else "fp32 (PEFT autocast)",
        },
        "config": {
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "vocab_size": config.vocab_size,
            "tie_word_embeddings": bool(config.tie_word_embeddings),
        },
        "adapter": adapter_cfg.model_dump(mode="json"),
        "total_params": total,
        "base_params": total - sum(a["params"] for a in adapters.values()),
        "trainable_params": trainable,
        "trainable_pct": round(100.0 * trainable / total, 4) if total else 0.0,
        "tied_embeddings": bool(config.tie_word_embeddings),
        "components": {k: v for k, v in components.items() if v["params"] or k != "other"},
        "adapters": adapters,
        "lora_tensors": sum(a["tensors"] for a in adapters.values()),
        "quantised_modules": len(to_quantise),
        "weight_bytes": weight_b,
        "gradient_bytes": grad_b,
        "optimizer_bytes": opt_b,
        "training_state_bytes": weight_b + grad_b + opt_b,
        "formulas": formulas,
        "warnings": list(state.warnings),
    }


def gb(n: int | float) -> str:
    """Bytes as decimal gigabytes, 2 decimals (10^9, as GPU memory is usually quoted)."""
    return f"{n / 1e9:.2f} GB"


__all__ = [
    "architecture_report",
    "model_report",
    "full_size_config",
    "component_of",
    "logical_numel",
    "stored_bytes",
    "nf4_bytes",
    "int8_bytes",
    "optimizer_bytes",
    "gb",
    "NF4_FORMULA",
    "INT8_FORMULA",
    "OPTIMIZER_FORMULA",
]
