"""``eval.batch_size=auto`` (:mod:`phi4mm_lora.evaluate.batch_size`) and the out-of-memory retry in halves.

The estimate's KV-cache term is checked against the cache transformers really allocates, on the
tiny model with the real architecture; the choice's arithmetic on its own; and a batch that runs
out of GPU memory (raised by a hook on the real model, as CUDA raises it) is retried in halves
with the same answers.
"""

from __future__ import annotations

import pytest
import torch

from phi4mm_lora.config import load_config
from phi4mm_lora.errors import UserError
from phi4mm_lora.evaluate.batch_size import (
    AUTO_CPU,
    AUTO_MAX,
    MARGIN,
    auto_batch_size,
    bytes_per_row,
    kv_cache_bytes,
    positions_per_row,
    resolve_batch_size,
)
from phi4mm_lora.evaluate.generate import generate_all


def test_kv_cache_term_equals_the_cache_transformers_allocates(merged_fresh_lora) -> None:
    loaded, _ = merged_fresh_lora
    model = loaded.model
    for positions in (7, 30):
        ids = torch.randint(0, 1000, (3, positions))
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values
        real = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        element = model.get_input_embeddings().weight.element_size()
        assert real == 3 * kv_cache_bytes(model.config, positions, element)
        assert bytes_per_row(model.config, positions, element) > kv_cache_bytes(model.config, positions, element)


def test_auto_choice_fills_the_margin_in_multiples_of_8_within_its_caps() -> None:
    per_row = 100 * 2**20
    assert auto_batch_size(10 * 2**30, per_row, 5000) == 64  # 0.7 x 10 GiB / 100 MiB = 71.7 -> 64
    assert auto_batch_size(10 * 2**30, per_row, 2) == 2  # no batch larger than the prompts (one recording's two)
    assert auto_batch_size(1e15, per_row, 5000) == AUTO_MAX
    assert auto_batch_size(500 * 2**20, per_row, 5000) == 3  # under 8 rows: what fits
    assert auto_batch_size(50 * 2**20, per_row, 5000) == 1  # never 0: one row is tried, and split no further
    n = auto_batch_size(80 * 2**30, 170 * 2**20, 2500)
    assert n % 8 == 0 and n * 170 * 2**20 <= MARGIN * 80 * 2**30


def test_auto_on_a_cpu_is_the_default_and_numbers_pass_through(merged_fresh_lora) -> None:
    loaded, picked = merged_fresh_lora
    tok = loaded.processor.tokenizer
    n, how = resolve_batch_size("auto", loaded.model, tok, picked, 128)
    assert n == AUTO_CPU and how.startswith(f"auto: {AUTO_CPU} (no GPU")
    assert resolve_batch_size(3, loaded.model, tok, picked, 128) == (3, "")


def test_a_static_cache_is_counted_at_its_allocated_length(merged_fresh_lora) -> None:
    """transformers allocates a static cache at the rounded length (generate.cache_options) and keeps
    the run's largest, so auto must count that many positions, not the dynamic cache's."""
    from phi4mm_lora.data.collate import longest_tokens
    from phi4mm_lora.evaluate.generate import STATIC_CACHE_ROUND, cache_options

    loaded, picked = merged_fresh_lora
    tok = loaded.processor.tokenizer
    dynamic = positions_per_row(picked, tok, 128)
    assert dynamic == longest_tokens(picked, tok) + 120  # MDD's own budget, under the cap
    static = positions_per_row(picked, tok, 128, "static")
    assert static % STATIC_CACHE_ROUND == 0 and dynamic <= static < dynamic + STATIC_CACHE_ROUND
    assert static == cache_options("static", False, dynamic)["max_cache_len"]


def test_config_takes_auto_or_a_positive_number() -> None:
    assert load_config(None, ["eval.batch_size=auto"]).eval.batch_size == "auto"
    assert load_config(None, ["eval.batch_size=64"]).eval.batch_size == 64
    for bad in ("0", "big"):
        with pytest.raises(UserError, match=r"eval\.batch_size"):
            load_config(None, [f"eval.batch_size={bad}"])


def test_a_batch_out_of_gpu_memory_is_retried_in_halves_with_the_same_answers(merged_fresh_lora) -> None:
    loaded, picked = merged_fresh_lora
    model = loaded.model
    kw = {"batch_size": 8, "max_new_tokens": 4, "progress": False}
    want = generate_all(model, loaded.processor, picked, **kw)
    seen: list[int] = []

    def device_holds_two(_module, args, kwargs):  # a prefill of more than 2 rows runs out of memory
        x = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
        if x is not None and x.shape[1] > 1:
            seen.append(x.shape[0])
            if x.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (raised by the test's hook)")

    handle = model.register_forward_pre_hook(device_holds_two, with_kwargs=True)
    try:
        got = generate_all(model, loaded.processor, picked, **kw)
    finally:
        handle.remove()
    assert [(g.text, g.n_tokens, g.error) for g in got] == [(g.text, g.n_tokens, g.error) for g in want]
    per_task = len(picked) // 2
    assert seen[:3] == [per_task, per_task // 2, per_task - per_task // 2], seen  # halves, not one by one
    assert all(g.error is None for g in got)
