"""``eval.batch_size=auto``: the largest generation batch that the GPU's free memory holds.

Why: on a GPU a decoding step is bound by the host, not by its rows. On the H200 a step took
71.5 ms at batch 32 with at most ~35 ms of GPU work in it (docs/benchmarks.md, "GPU
measurements"), so 4 times the rows per batch means about 4 times fewer steps for the same
answers (greedy rows do not depend on each other; a test checks batched = one at a time). What
limits the batch is memory. Per row, :func:`bytes_per_row` counts:

* the KV cache: 2 (keys, values) x layers x kv heads x head size x positions, in the weights'
  dtype (:func:`kv_cache_bytes`, checked against transformers' own cache by a test);
* the prefill's largest transients: the MLP's gate/up output and its product (3 x the
  intermediate size per position) plus a few hidden-size tensors, and the attention scores
  (heads x positions^2 in float32) in case the kernel materialises them;
* the last position's logits, copied to float32 by ``generate`` (twice the vocabulary).

The choice fills at most :data:`MARGIN` of the free memory, is a multiple of 8, at most
:data:`AUTO_MAX`, and no larger than the number of prompts (scoring one recording: 2, so that its
two tasks can share a batch on a GPU, :func:`~phi4mm_lora.evaluate.generate.plan_batches`). On a CPU a step costs
in proportion to its rows, so ``auto`` means :data:`AUTO_CPU` there. Should the estimate still
be too large, a batch that runs out of GPU memory is split in halves
(:func:`phi4mm_lora.evaluate.generate.generate_all`), so the answers stay the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from phi4mm_lora.data.collate import longest_tokens
from phi4mm_lora.data.examples import Example
from phi4mm_lora.evaluate.generate import max_tokens_for, static_cache_length

#: ``auto`` off a GPU (the default of ``eval.batch_size``).
AUTO_CPU = 8
#: ``auto`` never goes above this many rows.
AUTO_MAX = 256
#: Share of the free GPU memory the estimate may fill (the rest: fragmentation, the audio encoder).
MARGIN = 0.7


def kv_cache_bytes(config: Any, positions: int, dtype_bytes: int) -> int:
    """Bytes of one row's KV cache over ``positions`` positions (all decoder layers)."""
    cfg = getattr(config, "text_config", config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * positions * dtype_bytes


def bytes_per_row(config: Any, positions: int, dtype_bytes: int) -> int:
    """What one more row of a generation batch costs at its peak (module docstring)."""
    cfg = getattr(config, "text_config", config)
    prefill = positions * (3 * cfg.intermediate_size + 4 * cfg.hidden_size) * dtype_bytes
    scores = cfg.num_attention_heads * positions * positions * 4
    logits = 2 * cfg.vocab_size * 4
    return kv_cache_bytes(config, positions, dtype_bytes) + prefill + scores + logits


def auto_batch_size(available: float, per_row: int, prompts: int) -> int:
    """Rows that fit :data:`MARGIN` of ``available`` bytes: a multiple of 8 (when 8 fit), at most
    :data:`AUTO_MAX` and ``prompts``, at least 1."""
    n = int(available * MARGIN // per_row)
    n = n - n % 8 if n >= 8 else n
    return max(1, min(n, AUTO_MAX, max(prompts, 1)))


def free_memory(device: torch.device) -> float:
    """Bytes a new allocation can take: free on the device plus what torch holds but does not use."""
    free, _total = torch.cuda.mem_get_info(device)
    return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def positions_per_row(examples: Sequence[Example], tokenizer: Any, max_new_tokens: int, cache: str = "dynamic") -> int:
    """The most positions a row's KV cache holds in this run: the longest prompt plus its budget;
    with ``eval.cache=static`` rounded up as the static cache is allocated
    (:func:`~phi4mm_lora.evaluate.generate.static_cache_length`). transformers keeps the largest
    static cache of a run and reuses it for shorter batches, so the longest is what stays allocated."""
    positions = longest_tokens(examples, tokenizer) + max((max_tokens_for(ex.task, max_new_tokens) for ex in examples),
                                                          default=max_new_tokens)
    return static_cache_length(positions) if cache == "static" else positions


def resolve_batch_size(setting: int | str, model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example],
                       max_new_tokens: int, cache: str = "dynamic") -> tuple[int, str]:
    """``eval.batch_size`` as a number, and a line saying how ``auto`` chose it ("" when set);
    ``cache``: ``eval.cache`` (:func:`positions_per_row`)."""
    if setting != "auto":
        return int(setting), ""
    weights = model.get_input_embeddings().weight
    if weights.device.type != "cuda":
        return AUTO_CPU, f"auto: {AUTO_CPU} (no GPU: on a {weights.device.type.upper()} a step costs in proportion to its rows)"
    positions = positions_per_row(examples, tokenizer, max_new_tokens, cache)
    dtype_bytes = weights.element_size() if weights.is_floating_point() else 2
    per_row = bytes_per_row(model.config, positions, dtype_bytes)
    available = free_memory(weights.device)
    n = auto_batch_size(available, per_row, len(examples))
    return n, (f"auto: {n} ({available / 2**30:.1f} GiB free on the GPU, ~{per_row / 2**20:.0f} MiB per row "
               f"at {positions} positions)")


__all__ = ["AUTO_CPU", "AUTO_MAX", "MARGIN", "auto_batch_size", "bytes_per_row", "free_memory", "kv_cache_bytes",
           "positions_per_row", "resolve_batch_size"]
