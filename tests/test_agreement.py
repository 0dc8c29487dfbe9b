"""Where two decoding paths' answers part, and whether rounding explains it
(:mod:`phi4mm_lora.evaluate.agreement`; ``scripts/bench_score.py`` reports it for each variant).

The second lease's compiled scoring path gave answers unlike the eager path's in bf16 on the
random full-size model, and the bench could not say why. The checks: the definition on logits
written by hand, then the real model: the static cache against the dynamic one (the same function)
and a real fault, the attention mask left out of a left-padded batch (padding read as text).
"""

from __future__ import annotations

import torch

from phi4mm_lora.data.audio import load_audio
from phi4mm_lora.evaluate.agreement import TOLERANCE, compare_paths
from phi4mm_lora.evaluate.embed import row_embeds
from phi4mm_lora.evaluate.generate import greedy_ids, stop_ids


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows)


def test_definition_on_hand_written_logits() -> None:
    # one row, vocabulary of 4, two steps; std of [4, 3.9, 0, 0] is 2.28
    ref_step0 = _logits([[4.0, 3.9, 0.0, 0.0]])
    near = _logits([[3.95, 3.96, 0.0, 0.0]])  # the variant's rounding flips the near tie
    same = compare_paths([[0, 1]], [ref_step0, ref_step0], [[0, 1]], [ref_step0, ref_step0])[0]
    assert same.step is None and same.noise == 0.0 and same.verdict == "same"

    flip = compare_paths([[0, 2]], [ref_step0, ref_step0], [[1, 3]], [near, near], TOLERANCE["bf16"])[0]
    std = ref_step0[0].std().item()
    assert flip.step == 0 and flip.rank == 1  # the variant took the baseline's runner-up
    assert abs(flip.gap - 0.1 / std) < 1e-6
    assert abs(flip.noise - 0.06 / std) < 1e-6  # |3.9 - 3.96| is the largest difference
    assert flip.first == flip.noise  # it parted at the first token
    assert flip.verdict == "rounding" and flip.gap <= 2 * flip.noise  # true of any flip

    wrong = _logits([[0.0, 0.0, 0.0, 9.0]])  # a path computing something else
    bad = compare_paths([[0]], [ref_step0], [[3]], [wrong], TOLERANCE["bf16"])[0]
    assert bad.step == 0 and bad.rank == 2 and bad.noise > TOLERANCE["bf16"] and bad.verdict == "suspect"
    # in fp32 the same small flip is more than rounding
    assert compare_paths([[0]], [ref_step0], [[1]], [near])[0].verdict == "suspect"
    # a large difference is suspect even when the arg max happens to agree
    lucky = compare_paths([[0]], [ref_step0], [[0]], [_logits([[9.0, -5.0, 3.0, 0.0]])], TOLERANCE["bf16"])[0]
    assert lucky.step is None and lucky.verdict == "suspect"
    # noise counts only the steps that read the same tokens: after the parting the inputs differ
    later = compare_paths([[0, 0, 0]], [ref_step0] * 3, [[0, 1, 2]], [ref_step0, near, wrong], TOLERANCE["bf16"])[0]
    assert later.step == 1 and later.verdict == "rounding" and later.first == 0.0 < later.noise


def test_static_cache_is_rounding_and_a_missing_mask_is_not(merged_fresh_lora) -> None:
    loaded, picked = merged_fresh_lora
    exs = [e for e in picked if e.task == "mdd"]
    audio = {e.id: load_audio(e.audio_path) for e in exs}
    dyn = greedy_ids(loaded.model, loaded.processor, exs, 6, audio, "dynamic", logits=True)
    static = greedy_ids(loaded.model, loaded.processor, exs, 6, audio, "static", logits=True)
    assert len(dyn[1]) == 6 and dyn[1][0].shape[0] == len(exs) and dyn[1][0].dtype == torch.float32
    for p in compare_paths(*dyn, *static):
        assert p.verdict == "same" and p.noise < 1e-4

    ids, emb, mask = row_embeds(loaded.model, loaded.processor, exs, audio, torch.device("cpu"))
    padded = [i for i, n in enumerate(mask.sum(1).tolist()) if n < mask.shape[1]]
    assert padded, "the batch must hold rows of different lengths"
    tok = loaded.processor.tokenizer
    # The fault: the padding holds a word's embedding and the mask is left out, so rows read it as
    # text. (Pad tokens embed to zeros, which a missing mask lets through almost unnoticed.)
    word = loaded.model.get_input_embeddings()(torch.tensor(tok.encode(" the")[-1:]))[0]
    emb = torch.where(mask.bool()[..., None], emb, word)
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, inputs_embeds=emb, attention_mask=torch.ones_like(mask),
                                    max_new_tokens=6, do_sample=False, eos_token_id=stop_ids(tok),
                                    pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True)
    fault = (out.sequences[:, ids.shape[1]:].tolist(), out.logits)
    partings = compare_paths(*dyn, *fault)
    # No parting the fault causes is put down to rounding. In fp32 the fault stands far above
    # rounding wherever it changed anything (0.02-3.8 against 1e-6 here; how much depends on
    # the fresh adapter, whose lora_A comes from the global random state); a row whose attention
    # all but ignores its few padded keys may be left as it was.
    assert all(p.verdict != "rounding" for p in partings)
    assert any(partings[i].verdict == "suspect" and partings[i].noise > 10 * TOLERANCE["fp32"] for i in padded)
    assert all(partings[i].verdict == "suspect" or partings[i].noise < 1e-4 for i in padded)
    longest = [i for i in range(len(exs)) if i not in padded]
    assert all(partings[i].verdict == "same" for i in longest)  # nothing was padded there
