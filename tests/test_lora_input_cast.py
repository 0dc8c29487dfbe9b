"""bf16 training keeps LoRA inputs in bf16 (PEFT's ``disable_input_dtype_casting``): same weights.

:meth:`FinetuneRecipe.train_step` runs forward and backward under PEFT's switch when the step
autocasts (``recipe.uncast_lora_inputs``, set from the accelerator). These tests run the
project's own recipe (``setup -> fit -> cleanup``, as ``train()`` does) on the tiny model on
CPU, as shipped and with that attribute flipped back to PEFT's default cast, and compare the
trained tensors element for element.

Why they are identical (no tolerance): under autocast ``lora_A`` runs in bf16 either way. With
the cast, a bf16 input is widened to fp32 (exact), passes the (identity) dropout, and autocast
rounds it back to bf16 for the matmul (exact again, the values came from bf16); in backward the
same two casts are exact too. So the matmuls see the same bits in both runs.

Dropout > 0 is *not* bit-identical on CPU, and is documented here rather than asserted equal:
CPU dropout (``at::_dropout``, not the fused kernel) draws the same mask for a bf16 and an fp32
tensor of the same size from the same RNG state, but multiplies by ``1 / (1 - p)`` stored in the
input's dtype: in bf16 that is rounded (p = 0.05: 1.0547 instead of 1.0526, +0.2%; p = 0.01:
1.0078 instead of 1.0101, -0.2%), and the product is rounded again. That is a scale error of at
most half a bf16 ulp (2^-8) on the kept LoRA inputs, far below dropout's own noise; measured
end to end (3 steps, p = 0.05, lr 1e-3) the LoRA tensors then differ by up to 1.3e-3, i.e.
Adam's first steps turning small gradient differences into ~lr-sized ones. On CUDA, dropout is
the fused kernel, which scales in fp32 and rounds once; whether its mask for a bf16 tensor
equals the one for an fp32 tensor depends on the kernel's vector width per dtype (not measured
here: no GPU). :func:`test_cpu_dropout_of_bf16_draws_the_same_mask` pins the CPU behaviour.

fp32 plans do not autocast, so nothing changes for them: the flag is never switched off (and
``tests/test_train_parity.py`` still matches the weights of the b3a40f9 recipe in fp32).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from test_train_common import make_manifest, read_trained, setup_recipe, small_overrides

from phi4mm_lora.config import load_config


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("data"), n=8)


def run_recipe(manifest: Path, out: Path, uncast: bool | None = None, **extra) -> tuple[dict, list, list]:
    """The recipe for 3 steps (batch 2 x grad_accum 2: the first micro-batch under ``no_sync``);
    ``uncast`` overrides the recipe's choice. Returns the trained tensors, the losses and, per
    call of the first decoder layer's ``lora_A``: the set of every LoRA layer's cast flag and the
    dtype ``lora_A`` received."""
    cfg = load_config(None, small_overrides(manifest, out, train__epochs=2, train__max_steps=3, train__grad_accum=2,
                                            **extra))
    recipe = setup_recipe(cfg, out)
    if uncast is not None:
        recipe.uncast_lora_inputs = uncast
    lora = [m for m in recipe.model.modules() if isinstance(m, BaseTunerLayer)]
    first = next(m for n, m in recipe.model.named_modules() if isinstance(m, BaseTunerLayer) and ".layers.0." in n)
    calls = []

    def record(_module, args):
        calls.append(({m.cast_input_dtype_enabled for m in lora}, args[0].dtype))

    handle = first.lora_A[recipe.adapters.trainable_adapter].register_forward_pre_hook(record)
    try:
        recipe.fit()
    finally:
        handle.remove()
    result = recipe.cleanup()
    return read_trained(result.adapter_dir), result.losses, calls


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in a.items())  # something trained


def test_bf16_steps_are_identical_with_lora_inputs_kept_in_bf16(manifest, tmp_path):
    shipped, losses, calls = run_recipe(manifest, tmp_path / "as-is", precision="bf16")
    cast, cast_losses, cast_calls = run_recipe(manifest, tmp_path / "cast", uncast=False, precision="bf16")
    assert_identical(shipped, cast)
    assert losses == cast_losses
    # the switch did something: lora_A got bf16 as shipped, fp32 with PEFT's cast; 3 steps x 2 micro-batches
    assert calls == [({False}, torch.bfloat16)] * 6
    assert cast_calls == [({True}, torch.float32)] * 6


def test_gradient_checkpointing_recomputes_with_the_same_setting(manifest, tmp_path):
    """Non-reentrant checkpointing recomputes each layer inside ``acc.backward``: the context
    must cover backward, or the recomputed forward would cast (and differ from the saved one)."""
    shipped, _, calls = run_recipe(manifest, tmp_path / "as-is", precision="bf16", train__gradient_checkpointing="full")
    cast, _, cast_calls = run_recipe(manifest, tmp_path / "cast", uncast=False, precision="bf16",
                                     train__gradient_checkpointing="full")
    assert_identical(shipped, cast)
    assert calls == [({False}, torch.bfloat16)] * 12  # 6 forwards + 6 recomputations in backward
    assert cast_calls == [({True}, torch.float32)] * 12


def test_fp32_plan_never_switches_casting_off(manifest, tmp_path):
    _, _, calls = run_recipe(manifest, tmp_path / "fp32", precision="fp32")
    assert calls == [({True}, torch.float32)] * 6


def test_cpu_dropout_of_bf16_draws_the_same_mask():
    """Why dropout > 0 is not bit-identical on CPU (module docstring): same mask, but the
    ``1 / (1 - p)`` scale is a bf16 number, off by up to half a bf16 ulp."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    for p in (0.01, 0.05, 0.1):
        torch.manual_seed(0)
        wide = torch.nn.functional.dropout(x.float(), p, training=True)
        torch.manual_seed(0)
        narrow = torch.nn.functional.dropout(x, p, training=True)
        kept = wide != 0
        assert torch.equal(kept, narrow != 0)
        assert float(torch.tensor(1 / (1 - p), dtype=torch.bfloat16)) != 1 / (1 - p)  # the bf16 scale is rounded ...
        assert not torch.equal(wide.bfloat16(), narrow)  # ... so the values differ
        rel = ((narrow.float() - wide) / wide)[kept].abs().max()
        assert float(rel) <= 2 * 2.0**-8  # the scale's rounding plus the product's, each <= 2^-8
