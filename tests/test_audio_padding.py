"""Why evaluation embeds each recording alone: transformers' Phi-4 audio encoder attends to padding.

transformers' ``Phi4MultimodalAudioModel`` adds its boolean padding mask to the float relative
position bias (``hs_mask.unsqueeze(1) + relative_attention_bias``), so a padded frame gets
+0 where a real one gets +1, not -inf: padded frames stay in every softmax. A batched encoder
therefore gives a shorter recording other features than it gets alone, which is why
``model/audio_encoder.py`` masks the padding while evaluation encodes recordings together
(tests/test_audio_batch.py). This test pins transformers' behaviour on the real architecture
(tiny random weights): if it fails, transformers masks padding itself now, and the hooks there
may be redundant.
"""

from __future__ import annotations

import torch


def test_padded_frames_change_the_real_frames_outputs(tiny_native):
    from phi4mm_lora.config import load_config
    from phi4mm_lora.model.load import load_model

    cfg = load_config(None, ["precision=fp32", "model.device=cpu", f"model.path={tiny_native}"])
    model = load_model(cfg.model, cfg.precision, cfg.adapter).model
    enc = next(m for n, m in model.named_modules() if n.endswith("audio_embed.encoder")).eval()
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 400, enc.config.input_size, generator=gen)
    tail = torch.randn(1, 240, enc.config.input_size, generator=gen) * 3
    mask = torch.cat([torch.ones(1, 400), torch.zeros(1, 240)], dim=1).bool()
    with torch.no_grad():
        alone = enc(feats, torch.ones(1, 400).bool())
        zeros = enc(torch.cat([feats, torch.zeros_like(tail)], dim=1), mask)
        noise = enc(torch.cat([feats, tail], dim=1), mask)
    n = alone.shape[1]
    scale = float(alone.abs().max())
    # same mask, different padding content: the real frames' outputs move (padding is attended to)
    assert float((zeros[:, :n] - noise[:, :n]).abs().max()) > 1e-2 * scale
    # and a padded batch is not the recording alone
    assert float((zeros[:, :n] - alone).abs().max()) > 1e-3 * scale
