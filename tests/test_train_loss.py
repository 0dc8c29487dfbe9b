"""Answer-only loss equals the full-logits loss; accumulation and batch size do not change a step.

The parity tests are in the ``compat`` subset: ``make test`` also runs them on the oldest
supported transformers/peft, where the answer-only loss must not depend on release-specific
``logits_to_keep`` behaviour (docs/compatibility.md).
"""

from __future__ import annotations

import pytest
import torch
from test_train_common import make_manifest, max_diff, read_trained, small_overrides

from phi4mm_lora.config import load_config
from phi4mm_lora.data.collate import Collator
from phi4mm_lora.data.examples import build_examples
from phi4mm_lora.model.load import load_model
from phi4mm_lora.train.finetune import train
from phi4mm_lora.train.loss import answer_loss_sum, count_label_tokens, full_logits_loss, output_head

#: The demo's targets: decoder linears and a LoRA on the (tied) lm_head itself.
WITH_HEAD = r"(model\.layers\.\d+\.((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj)))|lm_head"


@pytest.fixture(scope="module")
def loaded():
    cfg = load_config(None, ["precision=fp32", "model.device=cpu"])
    return cfg, load_model(cfg.model, cfg.precision, cfg.adapter)


@pytest.fixture(scope="module")
def loaded_head_lora():
    cfg = load_config(None, ["precision=fp32", "model.device=cpu", "adapter.mode=fresh", "adapter.dropout=0",
                             f"adapter.target_modules={WITH_HEAD}", "adapter.trainable=unfreeze"])
    lm = load_model(cfg.model, cfg.precision, cfg.adapter)
    with torch.no_grad():  # a fresh lora_B is zero; make the head LoRA matter
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    return cfg, lm


@pytest.mark.compat
@pytest.mark.parametrize("side", ["right", "left"])
def test_answer_loss_equals_full_logits_loss(loaded, side):
    cfg, lm = loaded
    exs, _ = build_examples(cfg.data.model_copy(update={"limit": 3}), cfg.prompts, "train",
                            audio_token=lm.processor.audio_token)
    batch = Collator(lm.processor, padding_side=side)(exs[:5])  # APA and MDD mixed, padded
    model = lm.model.eval()
    with torch.no_grad():
        s, n = answer_loss_sum(model, batch)
        full = full_logits_loss(model, batch)
    assert n == count_label_tokens(batch["labels"]) > 0
    assert abs(float(s / n) - float(full)) <= 1e-5 * abs(float(full))


@pytest.mark.compat
@pytest.mark.parametrize("which", ["loaded", "loaded_head_lora"])
def test_gradients_match_full_logits_loss(which, request):
    """Loss within 1e-5 and every trainable gradient within 1e-5 (fp32) of the full-logits
    loss, also with a LoRA on lm_head and unfrozen encoder tensors."""
    cfg, lm = request.getfixturevalue(which)
    exs, _ = build_examples(cfg.data.model_copy(update={"limit": 2, "task": "mdd"}), cfg.prompts, "train",
                            audio_token=lm.processor.audio_token)
    batch = Collator(lm.processor)(exs)
    model = lm.model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    s, n = answer_loss_sum(model, batch)
    full = full_logits_loss(model, batch)
    assert abs(float(s / n) - float(full)) <= 1e-5 * abs(float(full))
    g1 = torch.autograd.grad(s / n, params)
    g2 = torch.autograd.grad(full, params)
    assert any(float(g.abs().max()) > 0 for g in g1)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.compat
def test_lm_head_only_sees_supervised_positions(loaded_head_lora):
    """The head runs on n_kept rows, not B x T (what keeps 200k-vocab logits small)."""
    cfg, lm = loaded_head_lora
    exs, _ = build_examples(cfg.data.model_copy(update={"limit": 2, "task": "apa"}), cfg.prompts, "train",
                            audio_token=lm.processor.audio_token)
    batch = Collator(lm.processor)(exs)
    seen = []
    handle = output_head(lm.model).register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            _, n = answer_loss_sum(lm.model, batch)
    finally:
        handle.remove()
    assert seen == [(1, n, 200064)] and n < batch["input_ids"].numel() // 4


def test_batch8_equals_batch1_times_accum8(tmp_path):
    manifest = make_manifest(tmp_path / "data", n=8)
    common = {"train__max_steps": 1, "train__group_by_length": False, "train__lr": 1e-3}
    big = train(load_config(None, small_overrides(manifest, tmp_path / "b8", train__batch_size=8,
                                                  train__grad_accum=1, **common)), progress=False)
    acc = train(load_config(None, small_overrides(manifest, tmp_path / "a8", train__batch_size=1,
                                                  train__grad_accum=8, **common)), progress=False)
    l1, l2 = big.summary["first_loss"], acc.summary["first_loss"]
    assert abs(l1 - l2) <= 1e-5 * abs(l1)
    a, b = read_trained(big.adapter_dir), read_trained(acc.adapter_dir)
    lora = [k for k in a if ".lora_" in k]
    assert max_diff({k: a[k] for k in lora}, {k: b[k] for k in lora}) <= 1e-6
    # Unfrozen encoder tensors: Adam's first step is lr * g / (|g| + eps), which turns fp32
    # rounding in gradient elements that are sums of cancelling terms (|g| ~ eps) into
    # ~1e-6..1e-5 differences; a real mismatch (wrong normalisation) would be ~lr = 1e-3.
    assert max_diff(a, b) <= 1e-5
    assert any(("lora_B" in k) and float(v.abs().max()) > 0 for k, v in a.items())  # something trained


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_to_a_multiple_changes_the_shape_not_the_loss(loaded, side):
    """train.pad_to_multiple_of: each batch's length rounded up (fewer distinct shapes for
    kernels that plan or compile per shape), the extra positions masked out, so the loss and its
    label count are those of the tight batch."""
    cfg, lm = loaded
    exs, _ = build_examples(cfg.data.model_copy(update={"limit": 3}), cfg.prompts, "train",
                            audio_token=lm.processor.audio_token)
    tight = Collator(lm.processor, padding_side=side)(exs[:5])
    padded = Collator(lm.processor, padding_side=side, pad_to_multiple_of=64)(exs[:5])
    length = tight["input_ids"].shape[1]
    assert length % 64 != 0, "pick examples whose length is not already a multiple"
    assert padded["input_ids"].shape[1] == -(-length // 64) * 64
    assert int(padded["attention_mask"].sum()) == int(tight["attention_mask"].sum())
    model = lm.model.eval()
    with torch.no_grad():
        (s1, n1), (s2, n2) = answer_loss_sum(model, tight), answer_loss_sum(model, padded)
    assert n1 == n2 > 0
    assert abs(float(s1) - float(s2)) <= 1e-5 * abs(float(s1))


def test_audio_padded_to_a_multiple_changes_the_encoder_shape_not_the_loss(loaded):
    """train.pad_audio_to_multiple_of: each batch's feature frames rounded up (fewer distinct
    shapes for the audio encoder's convolutions, whose cuDNN plans are built per shape), the extra
    frames masked; the audio tokens per recording, hence the text, are unchanged.

    The loss moves by a few 1e-5 of itself in fp32, more than rounding: the encoder normalises the
    zero padding frames (mean and variance) before its first, non-causal subsampling convolution,
    whose last valid outputs then see those frames instead of the convolution's own zero padding.
    Every shorter recording of a batch already meets exactly this; the option gives it to the
    longest one too."""
    cfg, lm = loaded
    exs, _ = build_examples(cfg.data.model_copy(update={"limit": 3}), cfg.prompts, "train",
                            audio_token=lm.processor.audio_token)
    model = lm.model.eval()
    for batch in (exs[:1], exs[:5]):
        tight = Collator(lm.processor)(batch)
        padded = Collator(lm.processor, audio_frames_multiple=80)(batch)
        frames = tight["audio_input_features"].shape[1]
        assert frames % 80 != 0, "pick recordings whose length is not already a multiple"
        assert padded["audio_input_features"].shape[1] == -(-frames // 80) * 80
        real = tight["audio_attention_mask"].sum(1) if len(batch) > 1 else torch.tensor([frames])
        assert torch.equal(padded["audio_attention_mask"].sum(1), real)  # the extra frames are masked
        assert torch.equal(padded["input_ids"], tight["input_ids"])
        with torch.no_grad():
            (s1, n1), (s2, n2) = answer_loss_sum(model, tight), answer_loss_sum(model, padded)
        assert n1 == n2 > 0
        assert abs(float(s1) - float(s2)) <= 1e-4 * abs(float(s1))
