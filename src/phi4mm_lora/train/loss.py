"""Answer-only cross-entropy without materialising the full ``[B, T, vocab]`` logits.

With Phi-4's 200,064-token vocabulary, full logits for a batch of 8 Speechocean762 APA
examples (~750 tokens each) are 8 x 750 x 200064 floats = 4.8 GB in fp32, plus as much
again for their gradient - while only the ~20-60 answer positions per row are supervised.
transformers' ``logits_to_keep`` accepts a boolean ``[B, T]`` mask and applies ``lm_head``
only to those hidden states, returning ``[n_kept, vocab]``. Calling the (possibly
DDP/FSDP-wrapped) top-level model keeps accelerate's gradient synchronisation intact, which
calling the inner decoder directly would bypass.

Normalisation: :func:`answer_loss_sum` returns the *sum* of token losses. The recipe divides
by the number of label tokens of the whole optimizer step (all micro-batches, all processes),
so batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same gradient; a per-micro-
batch mean would weight short answers more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phi4mm_lora.data.collate import IGNORE_INDEX

#: Batch keys that are not model inputs.
NON_MODEL_KEYS = ("labels", "example_ids")


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels shifted left by one: position ``i`` predicts token ``i + 1`` (last gets -100)."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Supervised next-token predictions in a batch (what the loss is averaged over)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def model_inputs(batch: dict) -> dict:
    """The batch without labels/ids (so the model computes no full-logit loss of its own)."""
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}


def answer_loss_sum(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over supervised positions, and how many there were.

    Logits are computed only where the next-token label is not -100, in the model's dtype,
    and upcast to fp32 for the softmax (bf16 log-softmax over 200k classes loses precision).
    """
    targets = next_token_targets(batch["labels"])
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    out = model(**model_inputs(batch), logits_to_keep=keep, use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss_sum, n


def full_logits_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Reference: the model's own loss over full logits (what the official recipe computes)."""
    return model(**model_inputs(batch), labels=batch["labels"], use_cache=False).loss
