"""``train.compile``: compiled decoder layers and audio encoder blocks compute the eager model's loss and gradients.

Parity in the PEFT/TRL sense: two recipes built from the same seed (so the same LoRA
initialisation), one with ``train.compile=true``, take the same batch; the loss and every
trainable tensor's gradient must agree to float32 rounding (inductor reorders reductions, so
not bit for bit). The checkpoint's speech LoRA has dropout 0.01, which both recipes switch off
before the first forward: inductor draws its own random numbers, so with dropout on, compiled
and eager runs are two different draws of the same distribution.
With full gradient checkpointing the backward recomputes each compiled layer, which must
give the same gradients too. CPU, fp32; compiling the tiny model's layer takes ~20 s.
"""

from __future__ import annotations

import pytest
import torch

BASE = ["seed=5", "precision=fp32", "model.device=cpu", "data.limit=2",
        "train.batch_size=4", "train.grad_accum=1", "eval.during_training=false", "train.report_to=[]"]


def build(tmp_path, compile_: bool, checkpointing: str, said: list[str]):
    from test_train_common import setup_recipe

    from phi4mm_lora.config import load_config

    out = tmp_path / f"run-{compile_}"
    cfg = load_config(None, [*BASE, f"train.compile={str(compile_).lower()}",
                             f"train.gradient_checkpointing={checkpointing}", f"output_dir={out}"])
    recipe = setup_recipe(cfg, out, log=said.append)
    recipe.model.train()
    for name, module in recipe.model.named_modules():
        if ".lora_dropout." in name and isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return recipe


def loss_and_grads(recipe) -> tuple[float, dict[str, torch.Tensor]]:
    from phi4mm_lora.train import loss as loss_mod
    from phi4mm_lora.train.finetune import _to_device

    batch = _to_device(recipe.collator(recipe.examples[:4]), recipe.accelerator.device)
    loss, _ = loss_mod.answer_loss_sum(recipe.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
    return float(loss), grads


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_compiled_layers_match_eager(tmp_path, tiny_native, checkpointing):
    said: list[str] = []
    eager = build(tmp_path, False, checkpointing, said)
    compiled = build(tmp_path, True, checkpointing, said)
    from phi4mm_lora.model.blocks import conformer_blocks, decoder_layers

    layers, blocks = decoder_layers(compiled.model), conformer_blocks(compiled.model)
    assert len(blocks) == compiled.model.config.audio_config.num_blocks
    assert layers and all(m._compiled_call_impl is not None for m in [*layers.values(), *blocks])
    assert all(m._compiled_call_impl is None for m in [*decoder_layers(eager.model).values(), *conformer_blocks(eager.model)])
    assert any(m.startswith(f"compile: torch.compile on {len(layers)} decoder layers and {len(blocks)} audio encoder "
                            "blocks") for m in said), said
    # compiling in place keeps parameter names: adapters save and resume under the same keys
    assert [n for n, _ in eager.model.named_parameters()] == [n for n, _ in compiled.model.named_parameters()]

    loss_e, grads_e = loss_and_grads(eager)
    loss_c, grads_c = loss_and_grads(compiled)
    assert loss_c == pytest.approx(loss_e, rel=1e-6)
    assert grads_e.keys() == grads_c.keys()
    for name, g in grads_e.items():
        scale = float(g.abs().max())
        assert scale > 0, f"{name} got no gradient: the comparison would be empty"
        assert float((grads_c[name] - g).abs().max()) <= 1e-5 * scale, name
