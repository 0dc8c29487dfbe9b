"""The decoder's attention (model/attention.py): a one-token GQA step attends on the kv heads.

The reference is the definition of grouped-query attention as transformers' eager path
computes it: every key/value head repeated for its query heads (``repeat_kv``), then softmax
attention with the padding mask. The packed step must equal it, masked or not; anything that is
not a one-token GQA step must be transformers' SDPA function itself. At model level, the tiny
model (4 query heads over 2 kv heads, like the real 24 over 8) loaded with ``sdpa`` must
generate what ``eager`` generates, batched and left padded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from phi4mm_lora.model.attention import NAME, implementation, sdpa_kv_heads


class _Layer(torch.nn.Module):
    """What the attention functions read off a decoder attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _reference(q, k, v, mask, groups: int) -> torch.Tensor:
    """GQA by definition: kv head j serves query heads j*groups .. j*groups+groups-1."""
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("masked", [True, False])
def test_one_token_step_equals_repeated_kv_heads(masked: bool) -> None:
    torch.manual_seed(0)
    batch, kv_heads, groups, keys, dim = 3, 2, 3, 7, 8
    q = torch.randn(batch, kv_heads * groups, 1, dim)
    k, v = torch.randn(batch, kv_heads, keys, dim), torch.randn(batch, kv_heads, keys, dim)
    mask = None
    if masked:  # left padding: row 0 none, row 1 two slots, row 2 four slots
        mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
        mask[1, ..., :2] = False
        mask[2, ..., :4] = False
    out, _ = sdpa_kv_heads(_Layer(groups), q, k, v, mask, scaling=dim ** -0.5)
    assert out.shape == (batch, 1, kv_heads * groups, dim)
    torch.testing.assert_close(out, _reference(q, k, v, mask, groups), rtol=1e-5, atol=1e-6)


def test_everything_else_is_transformers_sdpa() -> None:
    """Prefill (several query tokens) and layers without GQA go through transformers' own function."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    ours, _ = sdpa_kv_heads(_Layer(2), q, k, v, None, scaling=8 ** -0.5)
    stock, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](_Layer(2), q, k, v, None, scaling=8 ** -0.5)
    assert torch.equal(ours, stock)
    q1, k1 = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 5, 8)
    ours, _ = sdpa_kv_heads(_Layer(1), q1, k1, k1, None)
    assert torch.equal(ours, ALL_ATTENTION_FUNCTIONS["sdpa"](_Layer(1), q1, k1, k1, None)[0])
    assert implementation("sdpa") == NAME and implementation("eager") == "eager"


def test_tiny_model_generates_what_eager_generates(tiny_native: Path) -> None:
    from phi4mm_lora.config import load_config
    from phi4mm_lora.model.load import load_model

    def loaded(attn: str, *more: str):
        cfg = load_config(None, [f"model.path={tiny_native}", f"model.attn_implementation={attn}", *more])
        return load_model(cfg.model, cfg.precision, cfg.adapter).model

    # model.sdpa_cudnn is process-wide: each load sets it, so one load cannot leak into the next
    packed = loaded("sdpa", "model.sdpa_cudnn=true")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    eager = loaded("eager")  # the default: off (a GPU measured it slower, docs/benchmarks.md "third lease")
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert packed.config._attn_implementation == NAME and eager.config._attn_implementation == "eager"
    text = packed.get_base_model() if hasattr(packed, "get_base_model") else packed
    assert text.model.layers[0].self_attn.num_key_value_groups > 1, "the tiny model must have GQA for this test"
    torch.manual_seed(2)
    ids = torch.randint(200, 5000, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padded rows
    mask[2, :6] = 0
    kw = {"attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "pad_token_id": 0,
          "return_dict_in_generate": True, "output_scores": True}
    with torch.no_grad():
        a, b = packed.generate(ids, **kw), eager.generate(ids, **kw)
    assert a.sequences.tolist() == b.sequences.tolist()
    for sa, sb in zip(a.scores, b.scores, strict=True):
        torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-4)
