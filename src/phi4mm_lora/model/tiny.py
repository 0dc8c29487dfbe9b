"""A tiny, randomly initialised Phi-4-multimodal with the real native architecture.

Tests and the demo cannot download the 5.6B checkpoint, but they must run the very code
paths the real model uses: the native ``Phi4MultimodalForCausalLM`` (decoder, conformer
audio encoder, SigLIP vision tower, projectors), the real feature extractor and image
processor, a real BPE tokenizer with Phi-4's special-token ids, and non-zero pretrained-style
``speech`` / ``vision`` PEFT adapters. Only the sizes shrink. ``--layout official`` writes
the same weights the way the published checkpoint stores them (shared official-layout.md:
three bf16 shards and an index, the published adapter regexes and key names, GPT-2 style
tokenizer files, processor files naming remote code, five remote-code files that are
tripwires here); tests check that folder against the document, not against this writer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    Phi4MultimodalConfig,
    Phi4MultimodalFeatureExtractor,
    Phi4MultimodalForCausalLM,
    Phi4MultimodalProcessor,
)

from phi4mm_lora.config import DECODER_LORA_REGEX, TinyBase
from phi4mm_lora.model import convert
from phi4mm_lora.model.compat import Phi4MultimodalImageProcessor, rope_kwargs
from phi4mm_lora.model.tokenizer import EOS_IDS, VOCAB_SIZE, build_tokenizer

#: Pretrained-style adapters of the tiny model (the real ones: speech r=320/640, vision r=256/512).
TINY_ADAPTERS = {
    "speech": {"r": 8, "lora_alpha": 16, "dp": 0.01, "layer": DECODER_LORA_REGEX},
    "vision": {"r": 4, "lora_alpha": 8, "dp": 0.0, "layer": DECODER_LORA_REGEX},
}


def _rope(head_dim: int, factor: float = 0.75) -> dict:
    half = int(head_dim * factor) // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": factor,
        "short_factor": [1.0 + 0.05 * i for i in range(half)],
        "long_factor": [1.0 + 0.5 * i for i in range(half)],
    }


#: The published model's depth and head counts: 32 decoder layers with 24 query / 8 kv heads,
#: 24 conformer blocks, 27 SigLIP layers. ``tiny_config(**FULL_DEPTH)`` keeps them at toy width:
#: every step then runs the real number of operators on tiny tensors, a CPU stand-in for the
#: host work (dispatch, PEFT's Python, launches) of a step of the 5.6B model
#: (``--full-depth`` of scripts/bench_train_cpu.py and scripts/bench_eval.py).
FULL_DEPTH = {"layers": 32, "heads": 24, "kv_heads": 8, "hidden": 192, "audio_blocks": 24, "vision_layers": 27}


def tiny_config(layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64, audio_blocks: int = 2,
                vision_layers: int = 2) -> Phi4MultimodalConfig:
    """The real layout at toy width: by default 2 decoder layers, 2 conformer blocks, 2 SigLIP layers."""
    return Phi4MultimodalConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        **rope_kwargs(_rope(hidden // heads)),
        eos_token_id=EOS_IDS,
        audio_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_blocks": audio_blocks,
            "num_attention_heads": 2,
            "ext_pw_out_channel": 64,
            "depthwise_separable_out_channel": 64,
            "nemo_conv_channels": 64,
            "bias_max_distance": 500,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
        },
    )


def tiny_processor(seed: int = 0) -> Phi4MultimodalProcessor:
    """Real feature extractor and image processor (at most 4 crops) and the project's BPE."""
    return Phi4MultimodalProcessor(
        image_processor=Phi4MultimodalImageProcessor(dynamic_hd=4),
        audio_processor=Phi4MultimodalFeatureExtractor(),
        tokenizer=build_tokenizer(seed),
    )


def _adapter_state(model: torch.nn.Module, spec: dict, gen: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """Random non-zero LoRA A/B for every module the adapter's regex targets (like a trained one)."""
    import re

    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(spec["layer"], name):
            a = torch.randn(spec["r"], module.in_features, generator=gen) / module.in_features**0.5
            b = torch.randn(module.out_features, spec["r"], generator=gen) * 0.02
            out[name] = {"A": a, "B": b}
    return out


def build_tiny(out_dir: str | Path, layout: Literal["native", "official"] = "native", seed: int = 0,
               base: TinyBase = "random", full_depth: bool = False) -> Path:
    """Write the tiny checkpoint to ``out_dir`` (atomically: a crash leaves no half folder).

    ``base="pretrained"``: the same seeded model with the shipped pretrained weights applied
    (decoder layers, final norm, the used tokens' embeddings; :mod:`phi4mm_lora.model.tiny_base`):
    it can copy a quote and spell it as phones. They were made from the seed-0 model, so only
    seed 0 takes them. ``full_depth``: the published depth and head counts (:data:`FULL_DEPTH`),
    for benchmarks of the host work per step.
    """
    from phi4mm_lora.errors import UserError

    if base == "pretrained" and (seed != 0 or full_depth):
        raise UserError("the pretrained tiny base exists for seed 0 at tiny depth only (its weights were trained from that model)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new folder or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        torch.manual_seed(seed)
        config = tiny_config(**FULL_DEPTH) if full_depth else tiny_config()
        model = Phi4MultimodalForCausalLM(config).eval()
        gen = torch.Generator().manual_seed(seed + 1)
        # Random init leaves these at zero/one; give them values so a wrong key mapping shows.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "feature_extensor" in name or name.endswith("global_invstd") or name.endswith("global_mean"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        if base == "pretrained":
            from phi4mm_lora.model.tiny_base import apply_base

            apply_base(model)
        adapters = {name: _adapter_state(model, spec, gen) for name, spec in TINY_ADAPTERS.items()}
        processor = tiny_processor(seed)
        if layout == "native":
            model.save_pretrained(tmp)
            for name, spec in TINY_ADAPTERS.items():
                convert.write_peft_adapter(tmp / f"{name}-lora", adapters[name], spec)
            processor.save_pretrained(tmp)
        else:  # the published conventions: bf16 shards + index, side files, tripwire .py files
            convert.write_official(tmp, model, adapters, TINY_ADAPTERS, processor=processor,
                                   dtype=torch.bfloat16, tripwires=True)
        (tmp / "phi4mm_lora_tiny.json").write_text(json.dumps({"seed": seed, "layout": layout, "base": base,
                                                                "full_depth": full_depth}, indent=1))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_cache_dir() -> Path:
    """Where the tiny model is built on first use (PHI4MM_LORA_CACHE overrides, for CI)."""
    root = os.environ.get("PHI4MM_LORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "phi4mm-lora")
    return Path(root)


def ensure_tiny(layout: Literal["native", "official"] = "native", seed: int = 0, cache_dir: Path | None = None,
                base: TinyBase = "random", full_depth: bool = False) -> Path:
    """Return the cached tiny model, building it once (``base``, ``full_depth``: see :func:`build_tiny`).

    Several processes (torchrun/accelerate workers, parallel test runs) may ask at the same
    moment on a fresh machine; an exclusive lock on a file next to the model makes one of
    them build while the others wait and then reuse it.
    """
    root = cache_dir or default_cache_dir()
    name = f"tiny-{layout}-seed{seed}" + ("-pretrained" if base == "pretrained" else "") + ("-fulldepth" * full_depth)
    target = root / name
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock, build_tiny's atomic rename still avoids half folders
            pass
        if not (target / "config.json").is_file():
            if target.exists():  # left by a build that was killed before its atomic rename (older versions)
                shutil.rmtree(target)
            build_tiny(target, layout=layout, seed=seed, base=base, full_depth=full_depth)
    return target


__all__ = ["FULL_DEPTH", "build_tiny", "ensure_tiny", "tiny_config", "tiny_processor", "TINY_ADAPTERS"]
