"""Answer-only loss equals the full-logits loss; accumulation and batch size do not change a step."""

from __future__ import annotations

import pytest
import torch
from test_train_common import make_manifest, max_diff, read_trained, small_overrides

from phi4mm_lora.config import load_config
from phi4mm_lora.data.collate import Collator
from phi4mm_lora.data.examples import build_examples
from phi4mm_lora.model.load import load_model
from phi4mm_lora.train.finetune import train
from phi4mm_lora.train.loss import answer_loss_sum, count_label_tokens, full_logits_loss


@pytest.fixture(scope="module")
def loaded():
    cfg = load_config(None, ["precision=fp32", "model.device=cpu"])
    return cfg, load_model(cfg.model, cfg.precision, cfg.adapter)


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


def test_gradients_match_full_logits_loss(loaded):
    cfg, lm = loaded
    exs, _ = build_examples(cfg.data.model_copy(update={"limit": 2, "task": "mdd"}), cfg.prompts, "train",
                            audio_token=lm.processor.audio_token)
    batch = Collator(lm.processor)(exs)
    model = lm.model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    s, n = answer_loss_sum(model, batch)
    g1 = torch.autograd.grad(s / n, params)
    g2 = torch.autograd.grad(full_logits_loss(model, batch), params)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


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
