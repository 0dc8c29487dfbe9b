"""Prompt embeddings for generation: recordings encoded several at a time, each once.

* **Several recordings per encoder call** (``eval.encoder_batch``). transformers' Phi-4 audio
  encoder, batched as it is, gives a shorter recording other features than it gets alone: its
  padding is attended to and read by the subsampling convolutions (tests/test_audio_padding.py).
  :func:`~phi4mm_lora.model.audio_encoder.exact_padding` closes both gaps, so a batch gives each
  recording its own features to float rounding (tests/test_audio_batch.py); 1 encodes each
  recording alone, as before. On an H200 a recording alone cost ~48 ms of preparation, nearly
  all of it the host issuing the encoder's ~8,000 operators one by one (docs/benchmarks.md).
  The prompt rows are then embedded one by one around the kept audio rows, and the decoder runs
  batched on the left-padded rows.
* **Once per recording.** Evaluation asks two tasks (APA, MDD) about every recording, and the
  audio rows of a prompt (the encoder's output, projected, at the audio placeholder positions)
  depend on the recording alone, not on the text around them. :class:`AudioRows` keeps them
  from the first task's prompt and copies them into the second's: the encoder runs half as
  often, and the embeddings are bit for bit the same (tests/test_generate_embed.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from phi4mm_lora.data.audio import TARGET_SR
from phi4mm_lora.data.examples import Example
from phi4mm_lora.data.prompts import generation_prompt

#: Fallback pad id when the tokenizer has none (Phi-4's <|endoftext|>).
EOS_ID = 199999


def _load_image(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def processor_inputs(processor: Any, examples: Sequence[Example], audio: dict[str, np.ndarray]) -> dict[str, Any]:
    """Left-padded model inputs for a batch (audio already decoded)."""
    tok = processor.tokenizer
    texts = [generation_prompt(ex.prompt, tok) for ex in examples]
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True, "padding_side": "left"}
    with_audio = [audio[ex.id] for ex in examples if ex.audio_path]
    if with_audio:
        kwargs["audio"] = with_audio
        kwargs["sampling_rate"] = TARGET_SR
    images = [_load_image(ex.image_path) for ex in examples if ex.image_path]
    if images:
        kwargs["images"] = images
    out = dict(processor(**kwargs))
    out.pop("num_img_tokens", None)
    return out


def inner_model(model: torch.nn.Module) -> Any:
    """The ``Phi4MultimodalModel`` under a PEFT wrapper / causal-LM head (None if absent)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    return inner if hasattr(inner, "embed_tokens_extend") else None


class AudioRows:
    """Each recording's audio rows, kept from its first prompt until its last one is embedded.

    A recording is ``(utt_id, audio_path)``: the examples of one utterance share both. Prompts
    with an image are left out, since the audio projection differs there. ``uses`` counts the
    prompts still to come per recording, so an entry lives only between a recording's first and
    last task (generation interleaves the tasks' batches to keep that short).
    """

    def __init__(self, examples: Sequence[Example], encoder_batch: int = 1) -> None:
        self.uses = Counter(self.key(ex) for ex in examples if not ex.image_path)
        self.rows: dict[tuple, torch.Tensor] = {}
        self.encoded = 0  # recordings that went through the encoder
        self.encoder_batch = encoder_batch
        self.encoder_calls = 0  # batched encoder calls (a recording encoded alone is not counted)

    @staticmethod
    def key(ex: Example) -> tuple:
        return ex.utt_id, ex.audio_path

    def encode(self, inner: Any, processor: Any, examples: Sequence[Example], audio: dict[str, np.ndarray],
               device: torch.device) -> None:
        """Encode, ``encoder_batch`` at a time and shortest first, the recordings of ``examples``
        that will be asked for and are not kept yet; what is left (a group of one, a recording too
        long to batch) is encoded alone by :meth:`embed`."""
        todo: dict[tuple, Example] = {}
        for ex in examples:
            key = self.key(ex)
            if ex.audio_path and not ex.image_path and self.uses.get(key, 0) > 0 and key not in self.rows:
                todo.setdefault(key, ex)
        group_size = max(self.encoder_batch, 1)
        order = sorted(todo.values(), key=lambda e: (len(audio[e.id]), e.id))
        for i in range(0, len(order), group_size):
            if len(order[i: i + group_size]) > 1:
                self._encode_group(inner, processor, order[i: i + group_size], audio, device)

    def _encode_group(self, inner: Any, processor: Any, group: list[Example], audio: dict[str, np.ndarray],
                      device: torch.device) -> None:
        from phi4mm_lora.model.audio_encoder import exact_padding, fits_one_batch

        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in processor_inputs(processor, group, audio).items()}
        ids = b.pop("input_ids")
        b.pop("attention_mask", None)
        encoder = inner.embed_tokens_extend.audio_embed.encoder
        frames = b["audio_attention_mask"].sum(1)
        if not fits_one_batch(encoder, frames):
            return
        with exact_padding(encoder, frames):
            emb = inner.embed_tokens_extend(ids, inner.embed_tokens(ids), **b)
        at = ids == inner.embed_tokens_extend.audio_token_id
        for row, ex in enumerate(group):
            self.rows[self.key(ex)] = emb[row][at[row]]
        self.encoded += len(group)
        self.encoder_calls += 1

    def embed(self, inner: Any, ex: Example, ids: torch.Tensor, features: dict[str, Any]) -> torch.Tensor:
        """``inner.embed_tokens_extend(ids, ...)`` for a one-row prompt, reusing its recording's rows."""
        key = self.key(ex)
        if ex.image_path or self.uses.get(key, 0) <= 0 or "audio_input_features" not in features:
            # not shared, or asked again after its last use (a failed batch retried row by row)
            return inner.embed_tokens_extend(ids, inner.embed_tokens(ids), **features)
        at = ids == inner.embed_tokens_extend.audio_token_id
        if key in self.rows:
            emb = inner.embed_tokens(ids)
            emb[at] = self.rows[key]
        else:
            emb = inner.embed_tokens_extend(ids, inner.embed_tokens(ids), **features)
            self.rows[key] = emb[at]
            self.encoded += 1
        self.uses[key] -= 1
        if self.uses[key] <= 0:
            del self.rows[key]
        return emb


def row_embeds(model: torch.nn.Module, processor: Any, examples: Sequence[Example], audio: dict[str, np.ndarray],
               device: torch.device, rows: AudioRows | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, inputs_embeds, attention_mask)``, each row embedded alone.

    ``rows`` shares the audio rows of one recording between its prompts (:class:`AudioRows`);
    None embeds every prompt from scratch.
    """
    inner = inner_model(model)
    rows = rows or AudioRows([])
    rows.encode(inner, processor, examples, audio, device)
    rows_ids, rows_emb = [], []
    for ex in examples:
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in processor_inputs(processor, [ex], audio).items()}
        ids = b.pop("input_ids")
        b.pop("attention_mask", None)
        rows_ids.append(ids[0])
        rows_emb.append(rows.embed(inner, ex, ids, b)[0])
    longest = max(len(r) for r in rows_ids)
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else EOS_ID
    pad_emb = inner.embed_tokens(torch.tensor([pad], device=device))[0]
    ids = torch.full((len(rows_ids), longest), pad, dtype=rows_ids[0].dtype, device=device)
    emb = pad_emb.expand(len(rows_ids), longest, -1).clone()
    mask = torch.zeros(len(rows_ids), longest, dtype=torch.long, device=device)
    for i, (r_ids, r_emb) in enumerate(zip(rows_ids, rows_emb, strict=True)):
        n = len(r_ids)
        ids[i, longest - n:] = r_ids
        emb[i, longest - n:] = r_emb
        mask[i, longest - n:] = 1
    return ids, emb, mask
