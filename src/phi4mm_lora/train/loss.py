"""Answer-only cross-entropy without materialising the full ``[B, T, vocab]`` logits.

With Phi-4's 200,064-token vocabulary, full logits for a batch of 8 Speechocean762 APA
examples (~750 tokens each) are 8 x 750 x 200064 floats = 4.8 GB in fp32, plus as much
again for their gradient - while only the ~20-60 answer positions per row are supervised.
So ``lm_head`` is applied to the supervised positions' hidden states only. transformers'
boolean ``logits_to_keep`` mask would do that, but only newer releases accept a mask (5.17
fails with "too many indices"), so the selection is made here, version-independently: a
forward pre-hook on ``lm_head`` hands it ``hidden[keep]`` instead of all positions. Every
supported release applies ``lm_head`` to ``hidden_states[:, slice(0, None), :]`` when no
``logits_to_keep`` is given, so the hook always sees ``[B, T, hidden]``; anything else
raises instead of computing a wrong loss. Calling the (possibly DDP/FSDP-wrapped) top-level
model keeps accelerate's gradient synchronisation intact, which calling the inner decoder
directly would bypass.

Normalisation: :func:`answer_loss_sum` returns the *sum* of token losses. The recipe divides
by the number of label tokens of the whole optimizer step (all micro-batches, all processes),
so batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same gradient; a per-micro-
batch mean would weight short answers more.
"""

from __future__ import annotations

from contextlib import contextmanager

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


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The ``lm_head`` module under any wrapping (PEFT, DDP/FSDP ``.module``, a LoRA on lm_head)."""
    heads = [(name, m) for name, m in model.named_modules() if name.rpartition(".")[2] == "lm_head"]
    if not heads:
        raise RuntimeError(f"{type(model).__name__} has no lm_head module")
    return min(heads, key=lambda nm: nm[0].count("."))[1]


@contextmanager
def head_on_positions(model: torch.nn.Module, keep: torch.Tensor):
    """While active, ``lm_head`` sees only the hidden states where ``keep`` ([B, T] bool) is
    True, as one ``[1, n_kept, hidden]`` batch: the model returns ``[1, n_kept, vocab]`` logits."""

    def select(_module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != keep.shape:
            raise RuntimeError(f"lm_head got hidden states of shape {tuple(hidden.shape)}, expected "
                               f"{tuple(keep.shape)} + (hidden,): this transformers release slices them itself")
        return (hidden[keep].unsqueeze(0), *args[1:])

    handle = output_head(model).register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def answer_loss_sum(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over supervised positions, and how many there were.

    Logits are computed only where the next-token label is not -100, in the model's dtype,
    and upcast to fp32 for the softmax (bf16 log-softmax over 200k classes loses precision).
    """
    targets = next_token_targets(batch["labels"])
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    with head_on_positions(model, keep):
        out = model(**model_inputs(batch), use_cache=False)
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss_sum, n


def full_logits_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Reference: the model's own loss over full logits (what the official recipe computes)."""
    return model(**model_inputs(batch), labels=batch["labels"], use_cache=False).loss
