"""Each recording goes through the audio encoder once per evaluation (evaluate/embed.py), and
one recording's two tasks share one batch on a GPU when they are all there is (scoring).

The APA and MDD prompts of one utterance hear the same recording. Their audio rows (the
encoder's output at the audio placeholder positions) must be reused, not recomputed, and the
prompt embeddings must be bit for bit those of embedding each prompt from scratch, which is
what transformers' ``embed_tokens_extend`` does. Counted with a forward hook on the real
audio encoder of the tiny model; the adapter is a fresh one with random non-zero weights,
merged, so that answers differ between recordings.
"""

from __future__ import annotations

import torch

from phi4mm_lora.data.audio import load_audio
from phi4mm_lora.evaluate.embed import AudioRows, inner_model, row_embeds
from phi4mm_lora.evaluate.generate import generate_all, generate_batch, plan_batches


class _EncoderCalls:
    """Counts the audio encoder's forward calls (the real module, observed by a hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        self.hook = inner_model(model).embed_tokens_extend.audio_embed.encoder.register_forward_hook(self._seen)

    def _seen(self, *_: object) -> None:
        self.n += 1

    def __enter__(self) -> _EncoderCalls:
        return self

    def __exit__(self, *_: object) -> None:
        self.hook.remove()


def test_second_task_reuses_the_audio_rows_bit_for_bit(merged_fresh_lora) -> None:
    loaded, picked = merged_fresh_lora
    audio = {e.id: load_audio(e.audio_path) for e in picked}
    apa, mdd = [e for e in picked if e.task == "apa"], [e for e in picked if e.task == "mdd"]
    cpu = torch.device("cpu")
    with torch.no_grad():
        fresh = [row_embeds(loaded.model, loaded.processor, b, audio, cpu) for b in (apa, mdd)]
        rows = AudioRows(picked)
        with _EncoderCalls(loaded.model) as calls:
            shared = [row_embeds(loaded.model, loaded.processor, b, audio, cpu, rows) for b in (apa, mdd)]
    assert calls.n == rows.encoded == len(apa) == 3  # once per recording, not once per prompt
    assert rows.rows == {} and not any(rows.uses.values())  # nothing kept after the last task
    for (ids_a, emb_a, mask_a), (ids_b, emb_b, mask_b) in zip(fresh, shared, strict=True):
        assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)
        assert torch.equal(emb_a, emb_b)
    assert len({AudioRows.key(e) for e in picked}) == 3  # one entry per recording, shared by its two tasks


def test_generate_all_encodes_each_recording_once_with_unchanged_answers(merged_fresh_lora) -> None:
    loaded, picked = merged_fresh_lora
    with _EncoderCalls(loaded.model) as calls:
        gens = generate_all(loaded.model, loaded.processor, picked, batch_size=2, max_new_tokens=6, progress=False)
    assert calls.n == len({e.utt_id for e in picked}) == 3
    audio = {e.id: load_audio(e.audio_path) for e in picked}
    alone = [generate_batch(loaded.model, loaded.processor, [e], 6, audio)[0] for e in picked]  # rows not shared
    assert [(g.text, g.n_tokens, g.finished) for g in gens] == [(g.text, g.n_tokens, g.finished) for g in alone]
    assert len({g.text for g in gens}) >= 3


def test_tasks_take_turns_so_a_recordings_rows_are_kept_briefly(merged_fresh_lora) -> None:
    _, picked = merged_fresh_lora
    order = [b[0].task for b in plan_batches(picked, 1)]
    assert order == ["apa", "mdd"] * 3
    assert [b[0].utt_id for b in plan_batches(picked, 1)][::2] == [b[0].utt_id for b in plan_batches(picked, 1)][1::2]


def test_one_recordings_tasks_share_a_batch_and_keep_their_own_budgets(merged_fresh_lora) -> None:
    """Scoring one recording on a GPU: APA and MDD in one batch, decoded for MDD's budget, APA cut
    at its own: every answer is what that prompt gets alone with its task's budget."""
    loaded, picked = merged_fresh_lora
    pair = [e for e in picked if e.utt_id == picked[0].utt_id]
    assert sorted(e.task for e in pair) == ["apa", "mdd"]
    assert [len(b) for b in plan_batches(pair, 8, share_small=True)] == [2]  # what generate_all does on a GPU
    assert [len(b) for b in plan_batches(pair, 8)] == [1, 1]  # and on a CPU
    audio = {e.id: load_audio(e.audio_path) for e in pair}
    together = generate_batch(loaded.model, loaded.processor, plan_batches(pair, 8, share_small=True)[0], 200, audio)
    together.sort(key=lambda g: [e.id for e in pair].index(g.id))
    alone = [generate_batch(loaded.model, loaded.processor, [e], 200, audio)[0] for e in pair]
    assert [(g.text, g.n_tokens, g.finished) for g in together] == [(g.text, g.n_tokens, g.finished) for g in alone]
    tokens = {g.task: g.n_tokens for g in together}
    assert tokens["apa"] == 40 < tokens["mdd"], tokens  # the random adapter runs on: APA really was cut at its budget
