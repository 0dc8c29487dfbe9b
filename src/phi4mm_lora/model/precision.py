"""Precision plans: which weights are stored in which dtype, and which are quantised.

The failure users hit is a blanket 4-bit load that also quantises the LoRA layers and the
towers they want to train, leaving nothing trainable. A plan here is explicit: it names the
exact modules to quantise (decoder base linears, and for ``selective`` the towers that do not
train too), and everything that trains - LoRA, unfrozen towers, projectors - is excluded by
construction and checked again after loading (:func:`check_plan`).

| plan      | decoder base linears | frozen tower linears | everything else                  |
|-----------|----------------------|----------------------|----------------------------------|
| bf16      | bf16                 | bf16                 | bf16 (LoRA fp32)                 |
| fp16      | fp16 (+ loss scale)  | fp16                 | fp16 (LoRA fp32)                 |
| fp32      | fp32                 | fp32                 | fp32                             |
| int8      | LLM.int8             | float                | float (bf16 or fp32), LoRA fp32  |
| nf4       | NF4 (double quant)   | float                | float (bf16 or fp32), LoRA fp32  |
| selective | NF4 (double quant)   | NF4 (trained: bf16)  | bf16, LoRA bf16                  |

``nf4`` is classic QLoRA on the decoder; ``selective`` is the smallest plan: every frozen
linear in NF4, everything that trains or is tiny-but-sensitive (projectors, norms,
embeddings/head) in bf16.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from dataclasses import dataclass, field

import torch

from phi4mm_lora.errors import UserError
from phi4mm_lora.model.adapter_io import is_lora, strip_prefix

DECODER_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)")
AUDIO_TOWER = "model.embed_tokens_extend.audio_embed.encoder"
VISION_TOWER = "model.embed_tokens_extend.image_embed.img_processor"
PLANS: tuple[str, ...] = ("bf16", "fp16", "fp32", "int8", "nf4", "selective")


class PrecisionFallback(UserWarning):
    """``precision: auto`` could not use bf16 and picked another plan."""


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU; an explicit request that cannot be met is an error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device=cuda but no CUDA GPU is visible; use model.device=auto or cpu")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("model.device=mps but MPS is not available; use model.device=auto or cpu")
    return torch.device(requested)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bf16; False when the backend cannot even be asked."""
    try:
        if device.type == "cuda":
            return bool(torch.cuda.is_bf16_supported())
        if device.type == "mps":
            return bool(getattr(torch.backends.mps, "is_macos_or_newer", lambda *a: False)(14, 0))
    except Exception:  # no driver / no MPS backend on this build
        return False
    return True  # CPU computes bf16 (slowly); auto still prefers fp32 there


def bitsandbytes_problem(device: torch.device) -> str | None:
    """Why bitsandbytes cannot quantise on this device, or None when it can."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    if device.type == "mps":
        return "bitsandbytes has no MPS backend"
    return None


@dataclass
class PrecisionPlan:
    """Resolved plan: storage dtype, quantisation kind, and where LoRA lives."""

    name: str
    device: torch.device
    dtype: torch.dtype
    quant: str | None = None  # None | "int8" | "nf4"
    quantise_towers: bool = False
    lora_dtype: torch.dtype | None = None  # None: PEFT default (fp32 adapters)
    notes: list[str] = field(default_factory=list)

    @property
    def quantised(self) -> bool:
        return self.quant is not None

    def modules_to_quantise(self, linear_names: list[str], trainable_prefixes: list[str]) -> list[str]:
        """Exact module names this plan quantises, given the model's nn.Linear names."""
        if not self.quant:
            return []
        chosen = []
        for name in linear_names:
            if any(name == p or name.startswith(p + ".") for p in trainable_prefixes):
                continue
            if DECODER_LINEAR.fullmatch(name):
                chosen.append(name)
            elif self.quantise_towers and name.startswith((AUDIO_TOWER + ".", VISION_TOWER + ".")):
                chosen.append(name)
        return chosen

    def bnb_config(self, skip: list[str]):
        """transformers' BitsAndBytesConfig with an explicit skip list (every other linear)."""
        from transformers import BitsAndBytesConfig

        if self.quant == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16_supported(self.device) else torch.float32,
            bnb_4bit_quant_storage=torch.uint8,
            llm_int8_skip_modules=skip,
        )


def working_plans(device: torch.device) -> list[str]:
    plans = ["fp32"]
    if bf16_supported(device):
        plans.insert(0, "bf16")
    if device.type != "cpu":
        plans.append("fp16")
    if bitsandbytes_problem(device) is None:
        plans += ["int8", "nf4", "selective"]
    return plans


def _why_not(precision: str, device: torch.device) -> str:
    if precision == "fp16" and device.type == "cpu":
        return "fp16 training is not supported on CPU"
    if precision == "bf16":
        if device.type == "cuda":
            try:
                name = torch.cuda.get_device_name(device)
                major, minor = torch.cuda.get_device_capability(device)
                return f"this GPU ({name}, compute capability {major}.{minor}) has no bf16 support; use fp16"
            except Exception:  # pragma: no cover - no driver to ask
                return "this GPU has no bf16 support; use fp16"
        return f"the {device.type} device lacks bf16"
    if precision in ("int8", "nf4", "selective"):
        return bitsandbytes_problem(device) or "bitsandbytes cannot run here"
    return "not available on this device"


def plan_for(precision: str, device: torch.device, bf16: bool = True, notes: list[str] | None = None) -> PrecisionPlan:
    """The plan ``precision`` means on ``device`` (``bf16``: whether it computes bf16), unchecked.

    :func:`resolve_plan` checks the plan can run here first; the architecture report uses this
    directly to describe a plan for a machine it is not running on (a bf16-capable GPU).
    """
    notes = list(notes or [])
    half = torch.bfloat16 if bf16 and device.type != "cpu" else torch.float32
    if precision == "bf16":
        return PrecisionPlan("bf16", device, torch.bfloat16, notes=notes)
    if precision == "fp16":
        return PrecisionPlan("fp16", device, torch.float16, notes=notes)
    if precision == "fp32":
        return PrecisionPlan("fp32", device, torch.float32, notes=notes)
    if precision == "int8":
        return PrecisionPlan("int8", device, half, quant="int8", notes=notes)
    if precision == "nf4":
        return PrecisionPlan("nf4", device, half, quant="nf4", notes=notes)
    if precision == "selective":
        keep = torch.bfloat16 if bf16 else torch.float32
        return PrecisionPlan("selective", device, keep, quant="nf4", quantise_towers=True, lora_dtype=keep, notes=notes)
    raise UserError(f"unknown precision {precision!r}; choose one of auto, {', '.join(PLANS)}")


def resolve_plan(precision: str, device: torch.device) -> PrecisionPlan:
    """Turn a requested plan into a concrete one, or explain which plans do work here.

    ``auto`` picks bf16 on a GPU that has it; otherwise it falls back (fp16 on an older GPU,
    fp32 on CPU/MPS) with a one-line warning. An explicit plan this machine cannot run is a
    :class:`UserError` that names the plans that do work here.
    """
    notes: list[str] = []
    if precision == "auto":
        if device.type == "cuda" and bf16_supported(device):
            precision = "bf16"
        elif device.type == "cuda":
            precision = "fp16"
            notes.append("precision auto: this GPU lacks bf16, using fp16 with loss scaling")
        else:
            precision = "fp32"
            notes.append(f"precision auto: no CUDA GPU ({device.type}), using fp32")
        if notes:
            warnings.warn(notes[-1], PrecisionFallback, stacklevel=2)
    if precision not in PLANS:
        raise UserError(f"unknown precision {precision!r}; choose one of auto, {', '.join(PLANS)}")
    ok = working_plans(device)
    if precision not in ok:
        why = _why_not(precision, device)
        raise UserError(f"precision {precision!r} cannot run on this machine ({why}); plans that work here: {', '.join(ok)}")
    return plan_for(precision, device, bf16_supported(device), notes)


def is_quantised_module(module: torch.nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except Exception:  # pragma: no cover - no bnb, nothing can be quantised
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantised_modules(model: torch.nn.Module) -> list[str]:
    """Names of bitsandbytes modules (PEFT's wrappers are looked through via their base layer)."""
    names = []
    for name, module in model.named_modules():
        if is_quantised_module(module):
            names.append(strip_prefix(name).replace(".base_layer", ""))
    return names


def check_plan(model: torch.nn.Module) -> list[str]:
    """Problems that make a model untrainable: quantised LoRA/trainable modules, non-float grads.

    The trainer refuses a model for which this returns anything (``load_model`` raises).
    """
    problems = []
    for name, module in model.named_modules():
        if not is_quantised_module(module):
            continue
        if is_lora(name):
            problems.append(f"LoRA quantised - cannot train: {name}")
        elif any(p.requires_grad for p in module.parameters(recurse=False)):
            problems.append(f"trainable module quantised - cannot train: {name}")
    for name, p in model.named_parameters():
        if p.requires_grad and not p.is_floating_point():
            problems.append(f"trainable tensor is not floating point ({p.dtype}): {name}")
    return problems
