"""The decoder's SDPA attention, with one-token decoding steps run on the key/value heads.

Phi-4-mini has 24 query heads and 8 key/value heads. Before SDPA, transformers expands the
key/value cache to 24 heads (``repeat_kv``) whenever there is an attention mask, and batched,
left-padded generation always has one. That expansion copies the whole cache at every layer
and decoding step: on an H200 at batch 32 it was ~29% of a step's GPU time
(docs/benchmarks.md, "GPU measurements, 2026-11-27"). transformers 5.24 avoids it for eager
decoding steps, but not under ``torch.compile`` (``eval.compile``), and 5.17 not at all.

A decoding step has one query token, so the three query heads that share a key/value head can
be laid out as three query rows of that head. Each row's softmax is computed alone and they
all share the padding mask, so the answer is the same attention; only the kv copy is gone.
Everything else (prefill, training, the audio and vision encoders, which have no GQA) is
transformers' own SDPA function unchanged.

Registered under :data:`NAME` with transformers' attention and mask interfaces; the loader
uses it wherever the config says ``sdpa``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: The attention implementation name the loader passes for ``model.attn_implementation=sdpa``.
#: It contains "sdpa" so that transformers runs its SDPA availability checks on it.
NAME = "sdpa_kv_heads"


def _packable(module: torch.nn.Module, query: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> bool:
    """A one-token step of a GQA layer whose mask (if any) is shared by all heads."""
    groups = getattr(module, "num_key_value_groups", 1)
    return (groups > 1 and query.shape[2] == 1 and kwargs.get("position_bias") is None
            and (mask is None or mask.shape[1] == 1))


def sdpa_kv_heads(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; a one-token GQA step attends on the key/value heads.

    ``query`` (batch, heads, 1, dim) becomes (batch, kv_heads, groups, dim): query head
    ``k * groups + g`` is repeat_kv's copy ``g`` of kv head ``k``, so row ``g`` of kv head ``k``
    is exactly that head. The mask (batch, 1, 1, keys) broadcasts over the rows.
    """
    if not _packable(module, query, attention_mask, kwargs):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    rows = query.reshape(batch, heads // module.num_key_value_groups, module.num_key_value_groups, dim)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def implementation(requested: str) -> str:
    """The name to load with: :data:`NAME` for ``sdpa``, anything else as given."""
    return NAME if requested == "sdpa" else requested


AttentionInterface.register(NAME, sdpa_kv_heads)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
