"""eval.merge_adapter: the LoRA merged into the weights for inference changes no answer.

The tiny model's pretrained-style speech adapter is non-zero (each test checks it moves the
logits, so "same output" cannot come from an adapter that does nothing). Merging is PEFT's
``merge_and_unload``; these tests compare it with the unmerged PEFT model on the real
generation path, and check where it must not happen: quantised plans, and the training model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phi4mm_lora.config import load_config
from phi4mm_lora.data.audio import load_audio
from phi4mm_lora.data.examples import build_examples
from phi4mm_lora.evaluate.embed import row_embeds
from phi4mm_lora.evaluate.generate import generate_all
from phi4mm_lora.model.inference import load_for_inference, merge_for_inference
from phi4mm_lora.model.load import load_model
from phi4mm_lora.model.provenance import provenance, provenance_line

#: fp32 merged vs unmerged logits on the tiny model (measured max |diff| ~5e-7 at logits of
#: magnitude ~1.5): float32 re-association only.
FP32_ATOL = 1e-4


def _examples(loaded, n: int):
    cfg = load_config(None, ["data.task=both"])
    exs, _ = build_examples(cfg.data, cfg.prompts, "test", audio_token=loaded.processor.audio_token)
    return exs[:n]


def _logits(model, processor, exs) -> torch.Tensor:
    audio = {e.id: load_audio(e.audio_path) for e in exs}
    with torch.no_grad():
        _, emb, mask = row_embeds(model, processor, exs, audio, torch.device("cpu"))
        # the last 8 prompt positions (all positions would be ~1 GB over the 200,064-word vocabulary)
        return model(inputs_embeds=emb, attention_mask=mask, logits_to_keep=8).logits.float()


def test_merged_gives_the_same_text_and_logits_as_unmerged(tiny_native: Path) -> None:
    cfg = load_config(None, [f"model.path={tiny_native}", "precision=fp32"])
    unmerged = load_model(cfg.model, cfg.precision, cfg.adapter)
    merged = load_for_inference(cfg)
    assert merged.merge is not None and merged.merge.merged
    assert not any(hasattr(m, "lora_A") for m in merged.model.modules()), "LoRA layers left after the merge"
    exs = _examples(unmerged, 6)  # both tasks, batched as evaluate does
    a = generate_all(unmerged.model, unmerged.processor, exs, batch_size=4, max_new_tokens=10, progress=False)
    b = generate_all(merged.model, merged.processor, exs, batch_size=4, max_new_tokens=10, progress=False)
    assert [(g.text, g.n_tokens) for g in a] == [(g.text, g.n_tokens) for g in b]
    la, lb = _logits(unmerged.model, unmerged.processor, exs[:3]), _logits(merged.model, merged.processor, exs[:3])
    torch.testing.assert_close(lb, la, atol=FP32_ATOL, rtol=0)
    with unmerged.model.disable_adapter():
        base = _logits(unmerged.model, unmerged.processor, exs[:3])
    assert (la - base).abs().max() > 100 * FP32_ATOL, "the adapter must change the logits for this test to mean anything"
    prov = provenance(merged, cfg)
    assert prov["adapter_merged"] is True and "(merged)" in provenance_line(prov)


def test_quantised_plan_stays_unmerged_and_says_why(tiny_native: Path) -> None:
    cfg = load_config(None, [f"model.path={tiny_native}", "precision=nf4"])
    with pytest.warns(UserWarning, match=r"adapter not merged for inference \(precision nf4: 4-bit"):
        loaded = load_for_inference(cfg)
    assert loaded.merge is not None and not loaded.merge.merged
    assert any(hasattr(m, "lora_A") for m in loaded.model.modules())
    prov = provenance(loaded, cfg)
    assert prov["adapter_merged"] is False and "re-quantised" in prov["merge_note"]
    assert "unmerged: precision nf4" in provenance_line(prov)
    gens = generate_all(loaded.model, loaded.processor, _examples(loaded, 1), max_new_tokens=3, progress=False)
    assert gens[0].error is None and gens[0].n_tokens > 0


def test_merge_off_is_reported(tiny_native: Path) -> None:
    cfg = load_config(None, [f"model.path={tiny_native}", "eval.merge_adapter=false"])
    off = load_for_inference(cfg)
    assert not off.merge.merged and off.merge.reason == "eval.merge_adapter is off"
    assert any(hasattr(m, "lora_A") for m in off.model.modules())
    assert provenance(off, cfg)["adapter_merged"] is False


def test_tied_lm_head_lora_stays_unmerged_the_rest_merges(tiny_native: Path) -> None:
    """The demo config adapts lm_head, which the tiny model (like Phi-4) ties to the input
    embeddings: merging it would change the embeddings, so only the other layers merge."""
    cfg = load_config(None, [f"model.path={tiny_native}", "adapter.mode=fresh", "adapter.r=2",
                             r"adapter.target_modules=lm_head|model\.layers\.0\.self_attn\.o_proj"])
    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in loaded.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)  # a fresh lora_B is zero: make both adapted layers matter
    exs = _examples(loaded, 2)
    before = _logits(loaded.model, loaded.processor, exs)
    embed = loaded.model.get_input_embeddings().weight.detach().clone()
    res = merge_for_inference(loaded)
    assert res.merge.merged and "except lm_head" in res.merge.reason
    layers = {n.removeprefix("base_model.model."): m for n, m in res.model.named_modules() if hasattr(m, "lora_A")}
    assert layers["model.layers.0.self_attn.o_proj"].merged and not layers["lm_head"].merged
    assert torch.equal(res.model.get_input_embeddings().weight, embed)
    torch.testing.assert_close(_logits(res.model, res.processor, exs), before, atol=FP32_ATOL, rtol=0)


def test_evaluate_during_training_leaves_the_training_model_unmerged(tiny_native: Path, tmp_path: Path) -> None:
    from phi4mm_lora.evaluate.run import make_epoch_evaluator

    cfg = load_config(None, [f"model.path={tiny_native}", f"output_dir={tmp_path}", "eval.subset=1",
                             "eval.max_new_tokens=3", "eval.merge_adapter=true"])
    lm = load_model(cfg.model, cfg.precision, cfg.adapter)
    lm.model.train()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    make_epoch_evaluator(cfg)(lm.model, lm.processor, 1)
    after = dict(lm.model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "evaluation changed the training weights"
    assert not any(getattr(m, "merged", False) for m in lm.model.modules() if hasattr(m, "lora_A"))
    assert lm.model.training, "training mode must be restored"


def test_evaluate_command_records_the_merge(tiny_native: Path, tmp_path: Path) -> None:
    from phi4mm_lora.cli import main

    out = tmp_path / "ev"
    assert main(["evaluate", "--limit", "1", "--output", str(out), f"model.path={tiny_native}",
                 "eval.max_new_tokens=2", "data.task=apa"]) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["provenance"]["adapter_merged"] is True
    assert "(merged)" in (out / "report.md").read_text()


def test_merged_for_a_while_answers_as_unmerged_and_puts_the_exact_weights_back(tiny_native: Path) -> None:
    """Evaluation during training merges the training model's LoRA for its duration. Answers are
    the unmerged model's (fp32), and afterwards every weight is bit for bit what it was, even in
    bf16, where PEFT's own unmerge would leave the base weights a rounding step off."""
    from phi4mm_lora.model.inference import merged_for_a_while

    cfg = load_config(None, [f"model.path={tiny_native}", "precision=fp32"])
    lm = load_model(cfg.model, cfg.precision, cfg.adapter)
    exs = _examples(lm, 4)
    kw = {"batch_size": 4, "max_new_tokens": 8, "progress": False}
    want = generate_all(lm.model, lm.processor, exs, **kw)
    with merged_for_a_while(lm.model, lm.plan, list(lm.adapters.active)) as note:
        assert note.startswith("merged speech") and all(m.merged for m in lm.model.modules() if hasattr(m, "lora_A"))
        got = generate_all(lm.model, lm.processor, exs, **kw)
    assert [(g.text, g.n_tokens) for g in got] == [(g.text, g.n_tokens) for g in want]

    bf16 = load_model(cfg.model, "bf16", cfg.adapter)
    before = {n: p.detach().clone() for n, p in bf16.model.named_parameters()}
    with merged_for_a_while(bf16.model, bf16.plan, list(bf16.adapters.active)):
        changed = [n for n, p in bf16.model.named_parameters() if not torch.equal(p, before[n])]
        assert changed, "nothing was merged"
    assert all(torch.equal(p, before[n]) for n, p in bf16.model.named_parameters()), "weights not restored"
    assert not any(m.merged for m in bf16.model.modules() if hasattr(m, "lora_A"))
    bf16.model.merge_adapter()
    bf16.model.unmerge_adapter()
    drift = max(float((p.float() - before[n].float()).abs().max()) for n, p in bf16.model.named_parameters())
    assert drift > 0, "in bf16 PEFT's unmerge alone is expected to round: the copy back is what restores"


def test_training_with_evaluations_ends_with_the_weights_of_training_without(tiny_native: Path, tmp_path: Path) -> None:
    """The recipe evaluates with the LoRA merged for a while (eval.merge_adapter): a run that
    evaluates after every step trains exactly like one that never evaluates."""
    from test_train_common import make_manifest, read_trained, small_overrides

    from phi4mm_lora.evaluate.run import make_epoch_evaluator
    from phi4mm_lora.train.finetune import train

    manifest = make_manifest(tmp_path / "data", n=4)
    weights = []
    for label, evaluate in (("plain", False), ("evaluated", True)):
        over = small_overrides(manifest, tmp_path / label, adapter__trainable="lora", train__epochs=2,
                               eval__during_training=evaluate, eval__every_steps=1, eval__subset=1,
                               eval__max_new_tokens=2)
        cfg = load_config(None, over)
        result = train(cfg, evaluate_fn=make_epoch_evaluator(cfg) if evaluate else None, progress=False)
        assert (result.summary["eval_s"] is not None) == evaluate
        weights.append(read_trained(result.adapter_dir))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
