"""Learnability: the recipe really teaches the model what the labels say.

If masking, the audio/label alignment or the label shift were wrong, a model could not learn
to reproduce the answers of a handful of utterances token for token. Here the tiny model
(unfreeze strategy, fresh adapter, high learning rate) is trained through the real recipe on 16
generated utterances of the bundled corpus (task mdd), then greedy decoding - prompt up to
``<|assistant|>``, ``model.generate``, eos ``<|end|>`` - must give the exact MDD answer for at
least 14 of them.

The tiny model's output head is tied to frozen random embeddings (std 0.02, hidden 64), so its
logits cannot grow enough for the answer tokens to win over 200,064 classes through the
decoder LoRA alone; the adapter here also targets ``lm_head`` (a regex in
``adapter.target_modules``) - a capacity choice for the toy model, not part of what is tested.
"""

from __future__ import annotations

import pytest
import torch

from phi4mm_lora.config import load_config
from phi4mm_lora.data.audio import load_audio
from phi4mm_lora.data.collate import prompt_text
from phi4mm_lora.data.examples import build_examples
from phi4mm_lora.train.finetune import train

END_ID = 200020
DECODER_AND_HEAD = r"(model\.layers\.\d+\.((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj)))|lm_head"


def greedy(model, processor, ex, max_new_tokens: int) -> str:
    inputs = processor(text=[prompt_text(ex)], audio=[load_audio(ex.audio_path)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=END_ID, pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_tiny_model_learns_16_mdd_answers(tmp_path):
    cfg = load_config(None, [
        f"output_dir={tmp_path / 'run'}", "seed=0", "precision=fp32", "model.device=cpu",
        "data.task=mdd", "data.limit=16", f"data.feature_cache={tmp_path / 'features'}",
        "adapter.mode=fresh", "adapter.trainable=unfreeze", "adapter.r=32", "adapter.alpha=256",
        "adapter.dropout=0.0", f"adapter.target_modules={DECODER_AND_HEAD}",
        "train.batch_size=4", "train.grad_accum=1", "train.lr=1e-3", "train.scheduler=constant",
        "train.max_grad_norm=null", "train.epochs=75", "train.gradient_checkpointing=false",
        "train.log_every_steps=20", "train.keep_checkpoints=1", "eval.during_training=false",
    ])
    result = train(cfg, progress=False)
    assert result.summary["final_loss"] < result.summary["first_loss"]
    # evaluate what was saved (a fresh model + the run's adapter), not the in-memory weights
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from phi4mm_lora.model.adapters import load_extra_modules
    from phi4mm_lora.model.load import load_model

    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    set_peft_model_state_dict(loaded.model, load_file(str(result.adapter_dir / "adapter_model.safetensors")),
                              adapter_name=loaded.adapters.trainable_adapter)
    load_extra_modules(loaded.model, result.adapter_dir)
    model, processor = loaded.model.eval(), loaded.processor
    examples, _ = build_examples(cfg.data, cfg.prompts, "train", audio_token=processor.audio_token)
    assert len(examples) == 16
    exact = 0
    misses = []
    for ex in examples:
        n = len(processor.tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + 4
        got = greedy(model, processor, ex, n)
        exact += got == ex.answer
        if got != ex.answer:
            misses.append((ex.id, got[:80], ex.answer[:80]))
    assert exact >= 14, f"{exact}/16 exact; misses: {misses[:3]}"
