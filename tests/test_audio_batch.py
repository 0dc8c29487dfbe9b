"""Recordings encoded together get what each gets alone (model/audio_encoder.py, eval.encoder_batch).

The reference is transformers' own encoder on one recording, unpadded: what evaluation did
before, one call per recording. Batched under ``exact_padding``, every recording's frames must
equal it to float rounding whatever the padding holds (zeros or loud noise), while the same
batch without it must not (so the comparison can fail). At generation level, batching the
encoder must leave every answer as encoding one recording at a time gives it. All on the real
architecture with tiny random weights (2 conformer blocks; the masking is per block).
"""

from __future__ import annotations

import pytest
import torch
from test_generate_embed import _EncoderCalls

from phi4mm_lora.data.audio import load_audio
from phi4mm_lora.evaluate.embed import AudioRows, row_embeds
from phi4mm_lora.evaluate.generate import generate_all
from phi4mm_lora.model.audio_encoder import MAX_FRAMES, exact_padding, fits_one_batch, subsampled_lengths


@pytest.fixture(scope="module")
def encoder(tiny_native):
    from phi4mm_lora.config import load_config
    from phi4mm_lora.model.load import load_model

    cfg = load_config(None, ["precision=fp32", "model.device=cpu", f"model.path={tiny_native}"])
    model = load_model(cfg.model, cfg.precision, cfg.adapter).model
    return next(m for n, m in model.named_modules() if n.endswith("audio_embed.encoder")).eval()


@pytest.mark.parametrize("padding", ["zeros", "noise"])
def test_each_recording_in_a_batch_gets_its_frames_alone(encoder, padding: str) -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = [400, 237, 613, 81]  # odd and even, so every strided convolution meets a boundary
    feats = [torch.randn(1, n, encoder.config.input_size, generator=gen) for n in lengths]
    batch = torch.randn(len(lengths), max(lengths), encoder.config.input_size, generator=gen)
    batch *= 3.0 if padding == "noise" else 0.0
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, (f, n) in enumerate(zip(feats, lengths, strict=True)):
        batch[i, :n], mask[i, :n] = f[0], True
    with torch.no_grad():
        with exact_padding(encoder, mask.sum(1)):
            together = encoder(batch, mask)
        plain = encoder(batch, mask)  # transformers as it is
        alone = [encoder(f, None)[0] for f in feats]  # no mask: what one recording's prompt passes
    assert [len(a) for a in alone] == subsampled_lengths(encoder, mask.sum(1))[-1].tolist()
    worst_plain = 0.0
    for i, a in enumerate(alone):
        scale = float(a.abs().max())
        assert float((together[i, : len(a)] - a).abs().max()) <= 1e-5 * scale
        worst_plain = max(worst_plain, float((plain[i, : len(a)] - a).abs().max()) / scale)
    assert worst_plain > 1e-2  # without the masking the shorter recordings' frames move
    # the hooks are gone afterwards: transformers' behaviour is back
    with torch.no_grad():
        assert torch.equal(encoder(batch, mask), plain)


def test_recordings_transformers_would_unfold_are_left_to_encode_alone(encoder) -> None:
    limit = MAX_FRAMES * 8  # feature frames: three stride-2 convolutions
    assert fits_one_batch(encoder, torch.tensor([limit, 100]))
    assert not fits_one_batch(encoder, torch.tensor([limit + 1, 100]))
    with pytest.raises(ValueError, match="alone"):
        with exact_padding(encoder, torch.tensor([limit + 1, 100])):
            pass


def test_batched_encoder_leaves_embeddings_and_answers_as_alone(merged_fresh_lora) -> None:
    loaded, picked = merged_fresh_lora  # both tasks of three recordings of different lengths
    audio = {e.id: load_audio(e.audio_path) for e in picked}
    apa, mdd = [e for e in picked if e.task == "apa"], [e for e in picked if e.task == "mdd"]
    cpu = torch.device("cpu")
    with torch.no_grad():
        alone = [row_embeds(loaded.model, loaded.processor, b, audio, cpu, AudioRows(picked, 1)) for b in (apa, mdd)]
        rows = AudioRows(picked, 16)
        with _EncoderCalls(loaded.model) as calls:
            together = [row_embeds(loaded.model, loaded.processor, b, audio, cpu, rows) for b in (apa, mdd)]
    assert calls.n == rows.encoder_calls == 1 and rows.encoded == 3  # three recordings, one call
    for (ids_a, emb_a, mask_a), (ids_b, emb_b, mask_b) in zip(alone, together, strict=True):
        assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)
        torch.testing.assert_close(emb_b, emb_a, rtol=1e-5, atol=1e-5 * float(emb_a.abs().max()))

    def answers(encoder_batch: int) -> list[tuple]:
        gens = generate_all(loaded.model, loaded.processor, picked, batch_size=8, max_new_tokens=12,
                            progress=False, encoder_batch=encoder_batch)
        return [(g.text, g.n_tokens, g.finished) for g in gens]

    with _EncoderCalls(loaded.model) as calls:
        batched = answers(16)
    assert calls.n == 1
    assert batched == answers(1)
    assert len({text for text, *_ in batched}) >= 3  # the answers depend on the recording
