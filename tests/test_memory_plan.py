"""The memory plan (issue 10, "get the fastest setting that fits without tuning it by hand").

The GPU cases are the issue's own, with the full-size model's training state taken from the exact
meta-device byte counts in docs/benchmarks.md ("Full-size memory per plan") and the peaks measured
on an H200 (shared/docs/gpu-measurements.md); the chooser is a pure function, so no GPU is needed.
The recipe tests train the tiny model on CPU: micro-batches change how a batch goes through the
model, never the optimizer's step.
"""

from __future__ import annotations

import pytest
import torch
from test_train_common import make_manifest, max_diff, read_trained, small_overrides

from phi4mm_lora.config import load_config
from phi4mm_lora.errors import UserError
from phi4mm_lora.model.blocks import decoder_layers
from phi4mm_lora.train import memory_plan as mp

TRAINABLE = 461_373_440  # the pretrained speech LoRA, r=320
#: bf16 plan: weights 11.33 GB with the LoRA in fp32 (the recipe trains fp32 master weights).
BF16 = mp.Footprint(weights=int(11.33e9), trainable=4 * TRAINABLE, layers=32, hidden=3072, act_bytes=2)
#: selective precision plan: NF4 base, bf16 everything else, LoRA included (4.50 GB of weights).
SELECTIVE = mp.Footprint(weights=int(4.50e9), trainable=2 * TRAINABLE, layers=32, hidden=3072, act_bytes=2)
TOKENS = 752  # the longest example of the bundled corpus the measured runs trained on (mean ~525)
H100, CARD24, CARD12 = 79.2e9, 23.6e9, 11.7e9  # what torch.cuda.mem_get_info reports free on such cards


def test_calibration_reproduces_the_h200_measurements():
    assert BF16.state == pytest.approx(16.87e9, rel=0.002)
    assert mp.estimate_peak(BF16, "none", 8 * TOKENS) == pytest.approx(46.5e9, rel=0.002)
    assert mp.estimate_peak(BF16, "full", 8 * TOKENS) == pytest.approx(18.9e9, rel=0.002)
    # not used to fit: nf4 measured 14.1 GB (full checkpointing, batch 8; weights 6.55 GB), and the
    # selective precision plan 8.4 GB at batch 1 and 8.9 GB at batch 8
    nf4 = mp.Footprint(weights=int(6.55e9), trainable=4 * TRAINABLE, layers=32, hidden=3072, act_bytes=2)
    assert mp.estimate_peak(nf4, "full", 8 * TOKENS) == pytest.approx(14.1e9, rel=0.02)
    assert mp.estimate_peak(SELECTIVE, "full", TOKENS) == pytest.approx(8.4e9, rel=0.05)
    assert mp.estimate_peak(SELECTIVE, "full", 8 * TOKENS) == pytest.approx(8.9e9, rel=0.05)
    none, sel, full = (mp.estimate_peak(BF16, m, 8 * TOKENS) for m in ("none", "selective", "full"))
    assert none > sel > full


def test_an_80gb_h100_trains_batch_8_without_checkpointing():
    plan = mp.choose_plan(BF16, batch_size=8, grad_accum=1, longest_tokens=TOKENS, available=H100, device="cuda:0")
    assert (plan.gradient_checkpointing, plan.micro_batch, plan.passes) == ("none", 8, 1)
    assert plan.mode_source == plan.micro_source == "auto"
    assert plan.lines()[0] == ("memory plan: gradient checkpointing none (auto: needs ~46.5 GB of 79.2 GB free "
                               "on cuda:0)")
    assert "micro-batch 8 x 1 pass(es) per batch, x grad_accum 1 = 8 examples" in plan.lines()[1]


def test_a_24gb_card_checkpoints_and_a_smaller_one_also_splits_the_batch():
    plan = mp.choose_plan(BF16, batch_size=8, grad_accum=1, longest_tokens=TOKENS, available=CARD24)
    assert (plan.gradient_checkpointing, plan.micro_batch) == ("full", 8)
    assert mp.fits(plan.estimate, CARD24) and not mp.fits(mp.estimate_peak(BF16, "selective", 8 * TOKENS), CARD24)
    # long examples: full checkpointing at micro-batch 8 no longer fits, so the batch is split
    plan = mp.choose_plan(BF16, batch_size=8, grad_accum=1, longest_tokens=3000, available=CARD24)
    assert plan.micro_batch < 8 and plan.estimate * (1 + mp.MARGIN) + mp.RESERVE <= CARD24
    assert plan.passes == -(-8 // plan.micro_batch)


def test_the_selective_precision_plan_stays_within_12gb_at_batch_1_and_24gb_at_batch_8():
    b1 = mp.choose_plan(SELECTIVE, batch_size=1, grad_accum=8, longest_tokens=TOKENS, available=12e9)
    assert b1.micro_batch == 1 and b1.estimate <= 12e9 and b1.gradient_checkpointing == "selective"
    b8 = mp.choose_plan(SELECTIVE, batch_size=8, grad_accum=1, longest_tokens=TOKENS, available=24e9)
    assert b8.micro_batch == 8 and b8.estimate <= 24e9 and b8.gradient_checkpointing == "full"


def test_an_explicit_value_always_wins():
    # more memory than needed, yet checkpointing: the config says so
    plan = mp.choose_plan(BF16, batch_size=8, grad_accum=1, longest_tokens=TOKENS, available=H100, mode="full")
    assert (plan.gradient_checkpointing, plan.micro_batch, plan.mode_source) == ("full", 8, "config")
    assert plan.lines()[0] == ("memory plan: gradient checkpointing full (set in config; needs ~18.9 GB of 79.2 GB "
                               "free on cpu)")
    # a micro-batch set in the config: the mode is chosen around it
    plan = mp.choose_plan(BF16, batch_size=8, grad_accum=1, longest_tokens=TOKENS, available=CARD24, micro_batch=1)
    assert (plan.gradient_checkpointing, plan.micro_batch, plan.micro_source) == ("selective", 1, "config")
    # both set and estimated not to fit: kept (the estimate may be pessimistic), never refused
    plan = mp.choose_plan(BF16, batch_size=8, grad_accum=1, longest_tokens=TOKENS, available=CARD24,
                          mode="none", micro_batch=8)
    assert (plan.gradient_checkpointing, plan.micro_batch) == ("none", 8) and plan.estimate > CARD24
    assert plan.lines()[0].endswith("more than fits: expect an out-of-memory error)")


def test_cpu_has_no_limit_so_the_fastest_setting_is_used():
    plan = mp.choose_plan(BF16, batch_size=8, grad_accum=2, longest_tokens=10**6, available=None)
    assert (plan.gradient_checkpointing, plan.micro_batch, plan.estimate) == ("none", 8, None)
    assert plan.lines()[0] == "memory plan: gradient checkpointing none (auto: cpu has no memory limit to plan for)"


def test_an_impossible_fit_is_one_line_naming_what_to_change():
    with pytest.raises(UserError) as err:
        mp.choose_plan(BF16, batch_size=8, grad_accum=1, longest_tokens=TOKENS, available=CARD12, device="cuda:0")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("memory plan: gradient checkpointing full at micro-batch 1 needs ~")
    assert "11.7 GB free" in msg and "precision=nf4 or selective" in msg and "adapter.r" in msg
    # a mode fixed in the config that cannot fit even at micro-batch 1: the message names that key
    with pytest.raises(UserError, match=r"train\.gradient_checkpointing=auto"):
        mp.choose_plan(BF16, batch_size=8, grad_accum=1, longest_tokens=2000, available=CARD24, mode="none")


def test_micro_batch_sizes_and_the_split_keep_every_example_in_order():
    assert mp.micro_batch_sizes(8) == [8, 4, 3, 2, 1]
    assert mp.micro_batch_sizes(1) == [1]
    assert mp.split_batch([5, 1, 7, 2, 9], 2) == [[5, 1], [7, 2], [9]]
    assert mp.split_batch([5, 1], 8) == [[5, 1]]


def test_pooling_regroups_a_steps_examples_into_fewer_passes_longest_first():
    lengths = [5, 90, 40, 70, 10, 60, 30, 80]
    passes = mp.pool_step([[0, 1], [2, 3], [4, 5], [6, 7]], lengths, 3)
    assert sorted(i for p in passes for i in p) == list(range(8))  # every example once
    assert [len(p) for p in passes] == [3, 3, 2]  # as few passes as fit, sizes within one of each other
    assert passes[0] == [1, 7, 3]  # the longest together: little padding
    assert mp.passes_per_step(8, 8, 16) == 4 and mp.passes_per_step(8, 8, 4) == 16 and mp.passes_per_step(8, 1, 8) == 1
    # what the recipe's loop runs: step 1 of an epoch of 4 batches of 2, 2 per step
    from phi4mm_lora.train.finetune import step_micro_batches

    batches = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert step_micro_batches(batches, 1, 1, 0, 2, 4, lengths) == [[7, 5, 6, 4]]  # pooled, longest first
    assert step_micro_batches(batches, 1, 1, 0, 2, 2) == [[4, 5], [6, 7]]  # not pooled: as planned
    assert step_micro_batches(batches, 1, 2, 1, 1, 4, lengths) == [[6, 7]]  # one batch per process: nothing to pool
    # set in the config: kept up to the step's examples
    plan = mp.choose_plan(BF16, batch_size=8, grad_accum=8, longest_tokens=TOKENS, available=200e9, micro_batch=16)
    assert (plan.micro_batch, plan.pooled, plan.as_dict()["passes_per_step"]) == (16, True, 4)
    assert mp.choose_plan(BF16, batch_size=8, grad_accum=2, longest_tokens=TOKENS, available=None,
                          micro_batch=100).micro_batch == 16


H200 = 140.0e9  # free on the measured H200 with the model loaded (143.8 GB card)


def test_auto_pools_a_steps_batches_without_checkpointing_where_memory_allows():
    """The paper's 8 x 8 step: passes of 16 without checkpointing measured 22.1 examples/s on an
    H200 against 15-17.7 one batch at a time, so auto pools as far as memory allows, never with
    recomputation, never on a device of unknown memory, and not when a step is one batch."""
    def plan(available, grad_accum=8, **kw):
        return mp.choose_plan(BF16, batch_size=8, grad_accum=grad_accum, longest_tokens=TOKENS, available=available, **kw)

    big = plan(H200)
    assert big.pooled and big.gradient_checkpointing == "none" and big.micro_source == "auto"
    assert mp.fits(big.estimate, H200) and not mp.fits(mp.estimate_peak(BF16, "none", 32 * TOKENS), H200)
    assert big.micro_batch == 22 and big.as_dict()["passes_per_step"] == 3  # 64 examples in 3 passes of 21-22
    assert any("pooled into 3 pass(es)" in line for line in big.lines())
    h100 = plan(H100)  # 16 would need ~76 GB + margin; 13 fits: 5 passes instead of 8
    assert (h100.micro_batch, h100.gradient_checkpointing, h100.as_dict()["passes_per_step"]) == (13, "none", 5)
    assert plan(None).micro_batch == 8  # CPU, MPS: no pooling where memory is unknown
    assert plan(H200, grad_accum=1).micro_batch == 8  # one batch a step: nothing to pool
    assert plan(H200, mode="full").gradient_checkpointing == "full" and not plan(H200, mode="full").pooled
    assert plan(H200, micro_batch=8).micro_batch == 8  # set in the config: kept


def test_old_configs_still_load_and_resume():
    for old, new in ((True, "full"), (False, "none")):
        assert load_config(None, [f"train.gradient_checkpointing={str(old).lower()}"]).train.gradient_checkpointing == new
    from phi4mm_lora.train.preflight import resume_changes

    saved = load_config(None, []).model_dump(mode="json")
    saved["train"]["gradient_checkpointing"] = True  # as a checkpoint written before the modes saved it
    del saved["train"]["micro_batch"]
    assert resume_changes(saved, load_config(None, ["train.micro_batch=2"])) == {}
    with pytest.raises(UserError, match="train.micro_batch: must be a whole number >= 1, or auto"):
        load_config(None, ["train.micro_batch=0"])
    # a micro-batch is "at most": a config's micro_batch above a batch_size lowered by an override is one pass
    assert load_config(None, ["train.micro_batch=9"]).train.micro_batch == 9
    plan = mp.choose_plan(BF16, batch_size=8, grad_accum=1, longest_tokens=TOKENS, available=None, micro_batch=9)
    assert (plan.micro_batch, plan.passes, plan.micro_source) == (8, 1, "config")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("mp-data"), n=4)


def _train(manifest, out, **extra):
    from phi4mm_lora.train.finetune import train

    lines: list[str] = []
    overrides = small_overrides(manifest, out, **{"train__batch_size": 4, "train__epochs": 2,
                                                  "train__group_by_length": False, "adapter__trainable": "lora",
                                                  "train__lr": 1e-4, **extra})
    result = train(load_config(None, overrides), progress=False, log=lines.append)
    return result, read_trained(result.adapter_dir), lines


def test_micro_batches_and_checkpointing_do_not_change_the_weights(manifest, tmp_path):
    """Weights after 2 steps (fp32, CPU, no dropout): one pass per batch of 4 vs four passes of 1
    with every other layer recomputed vs two passes of 2 with every layer recomputed.

    The loss of a step is divided by the label tokens of the whole step (train/loss.py), so the
    split is exact up to fp32 rounding. lr is 1e-4: a fresh LoRA's B starts at 0, so A's first
    gradients are tiny and Adam's g / (|g| + eps) turns their rounding into ~1e-5 at lr 1e-3.
    With LoRA dropout the masks are drawn per pass, so split runs differ like two seeds would."""
    ref, w_ref, lines = _train(manifest, tmp_path / "a", train__micro_batch=4, train__gradient_checkpointing="none")
    assert "memory plan: gradient checkpointing none (set in config)" in lines
    assert ref.summary["memory_plan"]["passes_per_step"] == 1
    # what each micro-batch is costed at: the longest example, as the collator makes it
    from phi4mm_lora.data.collate import Collator
    from phi4mm_lora.data.examples import build_examples
    from phi4mm_lora.model.load import load_processor, resolve_path

    cfg = load_config(None, small_overrides(manifest, tmp_path / "x"))
    processor = load_processor(resolve_path(cfg.model))
    examples, _ = build_examples(cfg.data, cfg.prompts, "train", audio_token=processor.audio_token, seed=0)
    longest = max(Collator(processor)([ex])["input_ids"].shape[1] for ex in examples)
    assert abs(ref.summary["memory_plan"]["longest_tokens"] - longest) <= 0.1 * longest
    for micro, mode in ((1, "selective"), (2, "full")):
        res, w, lines = _train(manifest, tmp_path / f"m{micro}", train__micro_batch=micro,
                               train__gradient_checkpointing=mode)
        plan = res.summary["memory_plan"]
        assert (plan["micro_batch"], plan["gradient_checkpointing"], plan["passes_per_step"]) == (micro, mode, 4 // micro)
        assert any(ln.startswith(f"memory plan: micro-batch {micro} x {4 // micro} pass(es)") for ln in lines)
        assert res.summary["steps"] == 2 and res.losses == pytest.approx(ref.losses, rel=1e-5)
        assert max_diff(w, w_ref) <= 1e-6  # measured: 7e-8 (micro 1, selective), 7e-9 (micro 2, full)
    # two batches of 2 per step, pooled into one pass of 4 (longest first): the same step, the same weights
    res, w, lines = _train(manifest, tmp_path / "pooled", train__batch_size=2, train__grad_accum=2,
                           train__micro_batch=4, train__gradient_checkpointing="none")
    assert res.summary["memory_plan"]["passes_per_step"] == 1 and res.summary["steps"] == 2
    assert any("the 2 batches of 2 of each optimizer step pooled into 1 pass(es)" in ln for ln in lines), lines
    assert res.losses == pytest.approx(ref.losses, rel=1e-5) and max_diff(w, w_ref) <= 1e-6
    assert max(float(v.abs().max()) for k, v in w_ref.items() if "lora_B" in k) > 1e-4  # it trained: 100 x the bound


def test_selective_recomputes_every_other_decoder_layer(tiny_native):
    from phi4mm_lora.config import AdapterConfig, ModelConfig
    from phi4mm_lora.model.load import load_model

    loaded = load_model(ModelConfig(path=str(tiny_native), device="cpu"), "fp32", AdapterConfig())
    model = loaded.model
    layers = decoder_layers(model)
    assert sorted(layers) == list(range(model.config.num_hidden_layers)) and len(layers) >= 2
    assert mp.apply_checkpointing(model, "selective") == (len(layers) + 1) // 2
    assert [layers[i].gradient_checkpointing for i in sorted(layers)][:2] == [True, False]
    # transformers really recomputes the switched-on layers in backward: their MLP starts twice
    # (the layer's own hooks stay outside the checkpoint, so a submodule is watched, and with a
    # pre-hook: torch stops a recompute once the last saved tensor is back, inside the MLP)
    from phi4mm_lora.data.collate import Collator
    from phi4mm_lora.data.examples import build_examples
    from phi4mm_lora.train.loss import answer_loss_sum

    examples, _ = build_examples(load_config(None, ["data.limit=1"]).data, load_config(None, []).prompts, "train",
                                 audio_token=loaded.processor.audio_token, seed=0)
    batch = Collator(loaded.processor)(examples[:1])
    calls = {0: 0, 1: 0}
    hooks = [layers[i].mlp.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in (0, 1)]
    model.train()
    answer_loss_sum(model, batch)[0].backward()
    for h in hooks:
        h.remove()
    assert calls == {0: 2, 1: 1}
    assert mp.apply_checkpointing(model, "full") == len(layers)
    assert mp.apply_checkpointing(model, "none") == 0
    assert not any(layer.gradient_checkpointing for layer in layers.values())
    fp = mp.footprint(model, torch.float32)
    assert fp.act_bytes == 4 and fp.layers == len(layers) and fp.hidden == model.config.hidden_size
    assert fp.trainable == 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert fp.weights >= fp.trainable > 0
    # the tiny model's estimate scales down with its decoder: a few MB of activations per 1,000 tokens
    assert mp.activation_bytes(fp, "none", 1000) < mp.activation_bytes(BF16, "none", 1000) / 100
