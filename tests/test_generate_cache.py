"""eval.cache=static gives the same greedy token ids as the default dynamic cache.

transformers' ``StaticCache`` is allocated at its full length up front and attended through a
4D mask over every slot, the unused ones masked; the ``DynamicCache`` grows by one column per
token. Both must give the same answers on the production path (audio embedded row by row,
the decoder on left-padded embeddings), batched and one example at a time. The adapter here
is a fresh one with random non-zero weights, merged as evaluate merges it, so that answers
differ between recordings and the comparison means something. ``eval.compile`` (transformers'
compile path on the static cache) is checked once, at batch 2 for a few tokens: inductor needs
a C++ compiler and 15-20 s on one CPU core; ``scripts/bench_eval.py --cache-variants`` measures
it and compares its answers on a whole split.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from phi4mm_lora.config import load_config
from phi4mm_lora.data.audio import load_audio
from phi4mm_lora.errors import UserError
from phi4mm_lora.evaluate.embed import row_embeds
from phi4mm_lora.evaluate.generate import (
    STATIC_CACHE_ROUND,
    cache_options,
    generate_all,
    stop_ids,
)


def test_static_cache_gives_the_same_token_ids_batched_and_alone(merged_fresh_lora) -> None:
    loaded, picked = merged_fresh_lora
    exs = [e for e in picked if e.task == "mdd"]
    audio = {e.id: load_audio(e.audio_path) for e in exs}
    tok = loaded.processor.tokenizer

    def token_ids(rows, cache: str) -> list[list[int]]:
        ids, emb, mask = row_embeds(loaded.model, loaded.processor, rows, audio, torch.device("cpu"))
        opts = cache_options(cache, False, ids.shape[1] + 12)
        with torch.no_grad():
            out = loaded.model.generate(input_ids=ids, inputs_embeds=emb, attention_mask=mask, max_new_tokens=12,
                                        do_sample=False, eos_token_id=stop_ids(tok), pad_token_id=tok.pad_token_id,
                                        return_dict_in_generate=True, **opts)
        kv = out.get("cache", out.get("past_key_values"))  # renamed in transformers 5
        assert type(kv).__name__ == {"dynamic": "DynamicCache", "static": "StaticCache"}[cache]
        seq = out.sequences
        return seq[:, ids.shape[1]:].tolist() if seq.shape[1] > ids.shape[1] else seq.tolist()

    dynamic = token_ids(exs, "dynamic")
    assert len({tuple(r) for r in dynamic}) == len(exs), "answers must differ for the comparison to mean anything"
    assert token_ids(exs, "static") == dynamic  # batched, left padded
    for i, ex in enumerate(exs):  # alone, a row stops at its own end; batched, pad tokens follow it
        alone = token_ids([ex], "static")[0]
        assert alone == dynamic[i][: len(alone)]
        assert set(dynamic[i][len(alone):]) <= {tok.pad_token_id}


def test_generate_all_static_equals_dynamic(merged_fresh_lora) -> None:
    """What evaluate records (text, token count, stopped) with eval.cache=static, batch 8 and batch 1."""
    loaded, picked = merged_fresh_lora

    def answers(batch_size: int, cache: str) -> list[tuple[str, int, bool]]:
        gens = generate_all(loaded.model, loaded.processor, picked, batch_size=batch_size, max_new_tokens=8,
                            progress=False, cache=cache)
        assert all(g.error is None for g in gens)
        return [(g.text, g.n_tokens, g.finished) for g in gens]

    dynamic = answers(8, "dynamic")
    assert len(set(dynamic)) >= 3
    assert answers(8, "static") == dynamic
    assert answers(1, "static") == dynamic


def test_cache_options_and_config(monkeypatch, tmp_path: Path) -> None:
    assert cache_options() == {}
    static = cache_options("static", False, 300)
    # a static cache alone must not let transformers compile by itself on a GPU
    assert static["cache_implementation"] == "static" and static["disable_compile"] is True
    if "max_cache_len" in static:
        assert static["max_cache_len"] == STATIC_CACHE_ROUND * 2
    compiled = cache_options("static", True)
    assert "disable_compile" not in compiled and compiled["compile_config"]._compile_all_devices
    with pytest.raises(ValueError, match="static"):
        cache_options("dynamic", True)
    cfg = load_config(None, ["eval.cache=static", "eval.compile=true"])
    assert (cfg.eval.cache, cfg.eval.compile) == ("static", True)
    assert (load_config(None, []).eval.cache, load_config(None, []).eval.compile) == ("dynamic", False)
    with pytest.raises(UserError, match=r"eval\.compile: needs eval\.cache=static"):
        load_config(None, ["eval.compile=true"])
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without a C++ compiler: one clear line up front
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match=r"eval\.compile=true needs a C\+\+ compiler"):
        cache_options("static", True)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile (inductor) needs a C++ compiler")
def test_compiled_static_cache_gives_the_same_answers(merged_fresh_lora) -> None:
    """eval.compile=true: the decoding step and the audio encoder's blocks really go through
    torch.compile, with the same answers."""
    from phi4mm_lora.model.blocks import conformer_blocks, is_compiled

    loaded, picked = merged_fresh_lora
    exs = [e for e in picked if e.task == "apa"][:2]
    kw = {"batch_size": 2, "max_new_tokens": 6, "progress": False}
    dynamic = generate_all(loaded.model, loaded.processor, exs, **kw)
    blocks = conformer_blocks(loaded.model)
    assert blocks and not any(is_compiled(b) for b in blocks)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["frames"]["ok"]
    try:
        compiled = generate_all(loaded.model, loaded.processor, exs, cache="static", compile=True, **kw)
        assert all(is_compiled(b) for b in blocks)
    finally:  # the model is the session's: give the other tests its eager blocks back
        for b in blocks:
            b._compiled_call_impl = None
    assert torch._dynamo.utils.counters["frames"]["ok"] > before, "nothing was compiled"
    assert all(g.error is None for g in compiled)
    assert [(g.text, g.n_tokens) for g in compiled] == [(g.text, g.n_tokens) for g in dynamic]


def test_cudagraphs_compile_needs_no_cpp_compiler_and_is_checked_by_the_config(monkeypatch, tmp_path: Path) -> None:
    """eval.compile=cudagraphs: torch's backend of that name (traced, replayed as CUDA graphs, no code
    generation), so a machine without a C++ compiler can use it; bad values fail in the config."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    opts = cache_options("static", "cudagraphs")
    cc = opts["compile_config"]
    assert (cc.backend, cc.mode) == ("cudagraphs", "default") and cc._compile_all_devices
    assert "disable_compile" not in opts
    assert load_config(None, ["eval.cache=static", "eval.compile=cudagraphs"]).eval.compile == "cudagraphs"
    with pytest.raises(UserError, match=r"eval\.compile: needs eval\.cache=static"):
        load_config(None, ["eval.compile=cudagraphs"])
    with pytest.raises(UserError, match=r"eval\.compile"):
        load_config(None, ["eval.cache=static", "eval.compile=fast"])


def test_cudagraphs_compile_gives_the_same_answers_and_leaves_the_encoder_eager(merged_fresh_lora) -> None:
    """eval.compile=cudagraphs goes through torch.compile (frames traced) with the eager kernels, so
    the answers are the dynamic cache's; the audio encoder's blocks stay uncompiled (a graph per
    recording length would pile up). On a CPU torch replays no graph and runs the traced step."""
    from phi4mm_lora.model.blocks import conformer_blocks, is_compiled

    loaded, picked = merged_fresh_lora
    exs = [e for e in picked if e.task == "mdd"][:2]
    kw = {"batch_size": 2, "max_new_tokens": 6, "progress": False}
    dynamic = generate_all(loaded.model, loaded.processor, exs, **kw)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["frames"]["ok"]
    traced = generate_all(loaded.model, loaded.processor, exs, cache="static", compile="cudagraphs", **kw)
    assert torch._dynamo.utils.counters["frames"]["ok"] > before, "nothing was traced"
    assert not any(is_compiled(b) for b in conformer_blocks(loaded.model))
    assert all(g.error is None for g in traced)
    assert [(g.text, g.n_tokens) for g in traced] == [(g.text, g.n_tokens) for g in dynamic]
