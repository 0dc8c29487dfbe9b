"""The Phi-4-multimodal blocks that repeat: decoder layers and the audio encoder's conformer blocks.

One home for finding them under any wrapping (PEFT, DDP, ``torch.compile``), because three
concerns act on them block by block: gradient checkpointing (``train.memory_plan``),
``train.compile`` and ``eval.compile``.

Why compile block by block, as torchtune does: the blocks are alike, so one graph serves all of
them, and the data-dependent audio embedding between the encoders and the decoder would break a
whole-model graph. Shapes are dynamic from the start, since batches and recordings vary in
length. The audio encoder is frozen, yet it runs in every forward: at the published depth one
recording's encoder pass issues 7,738 ATen operators on the CPU (3,634 with its 24 blocks
compiled; docs/benchmarks.md), which on a GPU are launches the host has to issue one by one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

#: Decoder layers under any wrapping: ``...model.layers.N``, not the vision encoder's ``...encoder.layers.N``.
_DECODER_LAYER = re.compile(r"(?:^|\.)model\.layers\.(\d+)$")
_CONFORMER_BLOCK = re.compile(r"(?:^|\.)audio_embed\.encoder\.encoders\.(\d+)$")


def decoder_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Index -> decoder layer, for the layers that have transformers' checkpointing switch."""
    return {int(m.group(1)): mod for name, mod in model.named_modules()
            if (m := _DECODER_LAYER.search(name)) and hasattr(mod, "gradient_checkpointing")}


def conformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The audio encoder's conformer blocks, in order (transformers' ``audio_embed.encoder.encoders``)."""
    return [mod for name, mod in model.named_modules() if _CONFORMER_BLOCK.search(name)]


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module.compile()`` was called on it (its calls go through ``torch.compile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_each(modules: Iterable[torch.nn.Module]) -> int:
    """``module.compile(dynamic=True)`` on each module not compiled yet; returns how many it compiled.

    Compiling happens at each module's first call. A module already compiled (``train.compile``
    before evaluation during training) is left as it is, so its graphs are not traced again.
    """
    fresh = [m for m in modules if not is_compiled(m)]
    for m in fresh:
        m.compile(dynamic=True)
    return len(fresh)


__all__ = ["compile_each", "conformer_blocks", "decoder_layers", "is_compiled"]
