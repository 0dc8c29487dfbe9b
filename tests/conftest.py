"""Shared test setup: one tiny-model cache per test session, CPU only, no network.

The tiny model is built once into a fresh session folder (never reused from an earlier run,
so a broken builder cannot hide behind a stale cache); subprocesses inherit the folder via
PHI4MM_LORA_CACHE.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_CACHE = Path(tempfile.mkdtemp(prefix="phi4mm-lora-test-cache-"))
os.environ["PHI4MM_LORA_CACHE"] = str(_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tiny_native() -> Path:
    from phi4mm_lora.model.tiny import ensure_tiny

    return ensure_tiny("native", seed=0)


@pytest.fixture(scope="session")
def tiny_official() -> Path:
    from phi4mm_lora.model.tiny import ensure_tiny

    return ensure_tiny("official", seed=0)


@pytest.fixture(scope="session")
def merged_fresh_lora(tiny_native: Path):
    """The tiny model with a fresh r=4 adapter of random non-zero weights, merged as evaluate
    merges it (a fresh lora_B is zero, so answers would not depend on the recording), and both
    tasks' test examples of three recordings of different lengths: what generation tests compare."""
    import torch
    from picks import three_lengths_both_tasks

    from phi4mm_lora.config import load_config
    from phi4mm_lora.data.examples import build_examples
    from phi4mm_lora.model.inference import merge_for_inference
    from phi4mm_lora.model.load import load_model

    cfg = load_config(None, [f"model.path={tiny_native}", "adapter.mode=fresh", "adapter.r=4", "data.task=both"])
    with pytest.warns(UserWarning, match="discarded"):
        loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in loaded.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
    loaded = merge_for_inference(loaded)
    assert loaded.merge.merged
    loaded.model.eval()
    examples, _ = build_examples(cfg.data, cfg.prompts, "test", audio_token=loaded.processor.audio_token)
    return loaded, three_lengths_both_tasks(examples)


#: The core subset ``make test`` also runs on the oldest supported transformers/peft
#: (docs/compatibility.md): loading both layouts, adapter modes, a training run with resume,
#: generation, evaluate end to end, the answer-only loss. Listed here rather than marked in
#: each file; test_official_layout.py and the loss parity tests carry the mark themselves.
COMPAT_SUBSET = {
    "test_model_load.py": ["test_layouts_detected", "test_official_conversion_matches_reference_logits",
                           "test_convert_command_writes_loadable_native", "test_tiny_tokenizer_has_real_special_ids"],
    "test_adapters.py": ["test_pretrained_mode_trains_exactly_the_speech_adapter",
                         "test_fresh_mode_replaces_adapter_with_new_rank_and_warns",
                         "test_stacked_all_linear_trains_only_new_adapter_with_base_active",
                         "test_unfreeze_adds_audio_encoder_and_projector",
                         "test_save_reload_reproduces_logits_in_peft_and_transformers",
                         "test_merge_matches_unmerged_and_saves"],
    "test_verify_cli.py": ["test_verify_passes"],
    "test_train_resume.py": ["test_sigkill_then_resume_equals_uninterrupted"],
    "test_evaluate_e2e.py": ["test_left_padded_batch_equals_one_at_a_time", "test_evaluate_twice_with_comparison"],
    "test_score.py": ["test_score_json_wav_and_flac"],
    "test_doctor.py": ["test_versions_outside_the_tested_range_warn_once"],
    # gradient checkpointing modes through each release's own per-layer switches
    "test_memory_plan.py": ["test_selective_recomputes_every_other_decoder_layer",
                            "test_micro_batches_and_checkpointing_do_not_change_the_weights"],
    # PEFT's input-cast switch (issue 10) across PEFT releases, forward and checkpointed backward
    "test_lora_input_cast.py": ["test_bf16_steps_are_identical_with_lora_inputs_kept_in_bf16",
                                "test_gradient_checkpointing_recomputes_with_the_same_setting"],
    # why evaluation embeds audio clip by clip; fails on a release that masks audio padding
    "test_audio_padding.py": ["test_padded_frames_change_the_real_frames_outputs"],
    # the decoder's attention function is registered through each release's attention interfaces
    "test_attention.py": ["test_one_token_step_equals_repeated_kv_heads", "test_tiny_model_generates_what_eager_generates"],
}


def pytest_collection_modifyitems(config, items):
    seen: dict[str, set[str]] = {}
    for item in items:
        fname = item.path.name
        base = item.name.split("[")[0]
        seen.setdefault(fname, set()).add(base)
        if base in COMPAT_SUBSET.get(fname, ()):
            item.add_marker(pytest.mark.compat)
    if config.option.markexpr == "compat" and not config.option.keyword:
        lost = [f"{f}::{t}" for f, names in COMPAT_SUBSET.items() if f in seen for t in names if t not in seen[f]]
        if lost:
            raise pytest.UsageError(f"compat subset names tests that no longer exist: {lost}")
