"""The audio encoder run on several recordings at once, with what each gets alone.

transformers' ``Phi4MultimodalAudioModel`` lets a batch's padding into the real frames in two
places (tests/test_audio_padding.py pins both):

* **Attention.** Its boolean padding mask is added to the relative-position bias (+1 for a real
  frame, +0 for a padded one) instead of masking, so padded frames stay in every softmax.
* **Subsampling.** Its three stride-2 convolutions read one frame past a recording's end. Alone,
  that frame is the convolution's zero padding; in a batch it is the next padded frame, which
  after the feature normalisation and each activation is not zero.

Nothing else can carry padding into a real frame: the conformer's depthwise convolution is
causal (it reads the frame and earlier ones), and the rest works frame by frame.

:func:`exact_padding` closes both gaps while a batched call runs: forward pre-hooks zero each
stride-2 convolution's input past each recording's length, and a forward hook gives the
relative-position bias ``-inf`` at every recording's padded keys. Padding added to a +1/+0 mask
then weighs nothing, and a constant +1 on every real key does not change a softmax, so each
recording's frames are what it gets alone, to float rounding (``tests/test_audio_batch.py``).
The hooks sit outside the conformer blocks, so blocks compiled by ``eval.compile`` keep their graphs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: transformers unfolds an encoder input longer than this (after subsampling) into chunks:
#: a batch is exact only below it (40 s of audio; Speechocean762's recordings are shorter).
MAX_FRAMES = 500


def strided_convs(encoder: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The subsampling convolutions that read past a frame: stride 2 along time."""
    return [m for m in encoder.embed.conv if isinstance(m, torch.nn.Conv2d) and m.stride[0] > 1]


def subsampled_lengths(encoder: torch.nn.Module, frames: torch.Tensor) -> list[torch.Tensor]:
    """Each strided convolution's valid input length per recording, then the encoder's output length."""
    lengths = [frames]
    for conv in strided_convs(encoder):
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        lengths.append((lengths[-1] + 2 * p - k) // s + 1)
    return lengths


def fits_one_batch(encoder: torch.nn.Module, frames: torch.Tensor) -> bool:
    """Whether these recordings can be encoded together exactly (none is unfolded into chunks)."""
    return int(subsampled_lengths(encoder, frames)[-1].max()) <= MAX_FRAMES


def _past(valid: torch.Tensor, size: int) -> torch.Tensor:
    """(batch, size) True where a position lies past its row's valid length."""
    return torch.arange(size, device=valid.device)[None, :] >= valid[:, None]


@contextmanager
def exact_padding(encoder: torch.nn.Module, frames: torch.Tensor) -> Iterator[None]:
    """While active, ``encoder`` on right-padded features gives each row what it gets alone.

    ``frames``: each row's valid feature frames (the processor's ``audio_attention_mask`` summed).
    """
    lengths = subsampled_lengths(encoder, frames)
    if int(lengths[-1].max()) > MAX_FRAMES:
        raise ValueError(f"recordings over {MAX_FRAMES} encoder frames are unfolded into chunks: encode them alone")

    def zero_past(valid: torch.Tensor):
        def hook(_module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]  # (batch, channels, time, frequency)
            keep = ~_past(valid.to(x.device), x.shape[2])
            return (x * keep[:, None, :, None].to(x.dtype), *args[1:])

        return hook

    keys = lengths[-1]

    def mask_keys(_module: torch.nn.Module, _args: Any, bias: torch.Tensor) -> torch.Tensor:
        past = _past(keys.to(bias.device), bias.shape[-1])  # (batch, keys)
        return bias.expand(len(keys), *bias.shape[1:]).masked_fill(past[:, None, None, :], float("-inf"))

    handles = [conv.register_forward_pre_hook(zero_past(valid))
               for conv, valid in zip(strided_convs(encoder), lengths, strict=False)]
    handles.append(encoder.relative_attention_bias_layer.register_forward_hook(mask_keys))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


__all__ = ["MAX_FRAMES", "exact_padding", "fits_one_batch", "strided_convs", "subsampled_lengths"]
