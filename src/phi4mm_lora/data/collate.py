"""From :class:`Example` objects to a model batch with answer-only labels.

Supervision is the whole point of this module, so it is computed in one place and checked:

* the text of an example is :func:`~phi4mm_lora.data.prompts.training_text`: the generation
  prompt evaluation uses (the tokenizer's chat template), then the answer and ``<|end|>``;
* audio features are extracted clip by clip and zero-padded (:meth:`Collator._encode_clips`),
  and the single audio placeholder is expanded into one token per 80 ms, as the processor
  does: transformers' batched ``Phi4MultimodalFeatureExtractor`` (5.24) raises a tensor-size
  RuntimeError when a clip is shorter than the longest by less than about 15 ms (its mask for
  the shorter clip's last frames runs past the longest clip's frames). Equal-length batches
  are what length grouping makes, so the real recipe met it at any batch size above 1. One
  clip at a time is the reference the batched code reproduces (tests/test_data_cache.py);
* labels are ``-100`` everywhere except the answer tokens and the final ``<|end|>``, found as
  the last ``len(tokenize(answer + "<|end|>"))`` real tokens of each row and *verified* to be
  exactly those ids (a tokenizer that merged across the ``<|assistant|>`` boundary would make
  the verification fail loudly instead of training on shifted labels);
* padding side is passed to each tokenizer/processor call, never set on the shared tokenizer;
* ``position_ids`` are computed from the attention mask, so left and right padding give the
  same loss (the model would otherwise number left-padded rows from the pad tokens on).

Bad audio: a file that cannot be decoded raises :class:`BadSampleError` naming the example id
and the file. :func:`~phi4mm_lora.data.examples.build_examples` already decodes every file
once before training, so a failure here means the file changed or vanished during the run;
stopping with the sample named is safer than silently training on fewer examples.

Length grouping: :func:`batch_plan` orders one epoch into batches of similar length
(deterministic in ``seed`` and ``epoch``), which cuts padding roughly in half on
Speechocean762-like data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from phi4mm_lora.data.audio import AudioError, load_audio
from phi4mm_lora.data.examples import Example
from phi4mm_lora.data.prompts import END, training_text
from phi4mm_lora.errors import UserError

IGNORE_INDEX = -100
#: One audio token per 80 ms of audio (10 ms frames, 8x time reduction).
AUDIO_TOKENS_PER_SECOND = 12.5


class BadSampleError(UserError):
    """A sample that cannot be turned into model input; the message names example and file."""


def _load_image(ex: Example) -> Any:
    from PIL import Image

    try:
        with Image.open(ex.image_path) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise BadSampleError(f"example {ex.id}: image file {ex.image_path} is unusable ({exc})") from None


@dataclass
class Collator:
    """Callable turning a list of examples into ``dict`` of tensors plus ``example_ids``.

    ``padding_side`` is ``"left"`` or ``"right"``; both give identical losses because
    ``position_ids`` follow the attention mask. ``feature_cache`` (a
    :class:`~phi4mm_lora.data.cache.FeatureCache`) skips decoding + feature extraction for
    audio-only batches; batches with images always go through the processor.
    """

    processor: Any
    padding_side: str = "right"
    feature_cache: Any = None
    pad_to_multiple_of: int = 1  # train.pad_to_multiple_of: the token length rounded up, padding masked
    audio_frames_multiple: int = 1  # train.pad_audio_to_multiple_of: the feature frames rounded up, padding masked

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise UserError(f"padding side must be 'left' or 'right', not {self.padding_side!r}")
        self.tokenizer = self.processor.tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        self._answer_cache: dict[str, list[int]] = {}

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids that are supervised: the answer and its closing ``<|end|>``."""
        ids = self._answer_cache.get(answer)
        if ids is None:
            ids = self.tokenizer(answer + END, add_special_tokens=False)["input_ids"]
            self._answer_cache[answer] = ids
        return ids

    def _audio(self, ex: Example) -> np.ndarray:
        try:
            return load_audio(ex.audio_path)
        except AudioError as exc:
            raise BadSampleError(f"example {ex.id}: {exc}") from None

    def _encode(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        texts = [training_text(ex.prompt, ex.answer, self.tokenizer) for ex in examples]
        with_audio = [ex for ex in examples if ex.audio_path]
        with_image = [ex for ex in examples if ex.image_path]
        if with_audio and not with_image:
            return self._encode_clips(examples, texts)
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True,
                                  "padding_side": self.padding_side, "pad_to_multiple_of": self.pad_to_multiple_of}
        if with_audio:
            kwargs["audio"] = [self._audio(ex) for ex in with_audio]
        if with_image:
            kwargs["images"] = [_load_image(ex) for ex in with_image]
        return dict(self.processor(**kwargs))

    def _clip(self, ex: Example) -> Any:
        """Features of one recording: from the feature cache when there is one, else extracted now."""
        if self.feature_cache is None:
            from phi4mm_lora.data.cache import extract_features

            return extract_features(self._audio(ex), self.processor.audio_processor)
        try:
            return self.feature_cache.get(ex.audio_path)
        except AudioError as exc:
            raise BadSampleError(f"example {ex.id}: {exc}") from None

    def _encode_clips(self, examples: Sequence[Example], texts: list[str]) -> dict[str, torch.Tensor]:
        """The processor's output built from per-clip features (contract in data/cache.py)."""
        audio_token = self.processor.audio_token
        entries = []
        for i, ex in enumerate(examples):
            if not ex.audio_path:
                continue
            entry = self._clip(ex)
            entries.append(entry)
            texts[i] = texts[i].replace(audio_token, audio_token * entry.audio_embed_size, 1)
        out = dict(self.tokenizer(texts, return_tensors="pt", padding=True, padding_side=self.padding_side,
                                  pad_to_multiple_of=self.pad_to_multiple_of, add_special_tokens=False))
        m = self.audio_frames_multiple
        longest = -(-max(len(e.features) for e in entries) // m) * m
        feats = torch.zeros(len(entries), longest, entries[0].features.shape[1])
        mask = torch.zeros(len(entries), longest, dtype=torch.bool)
        for i, e in enumerate(entries):
            feats[i, : len(e.features)] = torch.from_numpy(np.asarray(e.features))
            mask[i, : len(e.features)] = True
        out["audio_input_features"] = feats
        out["audio_embed_sizes"] = torch.tensor([e.audio_embed_size for e in entries])
        if len(entries) > 1 or not mask.all():
            out["audio_attention_mask"] = mask
        return out

    def labels_for(self, examples: Sequence[Example], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``-100`` except the answer + ``<|end|>`` tokens, verified against the input ids."""
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, ex in enumerate(examples):
            want = self.answer_ids(ex.answer)
            real = torch.nonzero(attention_mask[row], as_tuple=False).flatten()
            pos = real[-len(want):]
            got = input_ids[row, pos].tolist()
            if len(pos) != len(want) or got != want:
                raise BadSampleError(
                    f"example {ex.id}: the answer tokens are not the end of the tokenized text "
                    f"(expected {want[:8]}..., found {got[:8]}...); the tokenizer merges across the "
                    "assistant boundary or the text was truncated"
                )
            labels[row, pos] = input_ids[row, pos]
        return labels

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        if not examples:
            raise ValueError("empty batch")
        batch = self._encode(examples)
        batch.pop("num_img_tokens", None)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        batch["labels"] = self.labels_for(examples, ids, mask)
        batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        batch["example_ids"] = [ex.id for ex in examples]
        return batch


def estimate_length(ex: Example, tokenizer: Any | None = None) -> int:
    """Approximate sequence length in tokens (text tokens + one audio token per 80 ms).

    Used only to group similar lengths; with no tokenizer, 4 characters count as a token.
    """
    text = training_text(ex.prompt, ex.answer, tokenizer)
    n_text = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer is not None else len(text) // 4
    n_audio = int((ex.duration or 0.0) * AUDIO_TOKENS_PER_SECOND) if ex.audio_path else 0
    return n_text + n_audio


def longest_tokens(examples: Sequence[Example], tokenizer: Any, candidates: int = 16) -> int:
    """Tokens of the longest example: the rough estimate (no tokenizer) picks the ``candidates``
    longest, the tokenizer counts their text (audio: one token per 80 ms). 0 for no examples."""
    longest = sorted(examples, key=lambda ex: -estimate_length(ex))[:candidates]
    return max((estimate_length(ex, tokenizer) for ex in longest), default=0)


def batch_plan(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
    megabatch_mult: int = 16,
) -> list[list[int]]:
    """One epoch's batches as lists of example indices, deterministic in (seed, epoch).

    Indices are shuffled; with ``group_by_length`` each window of ``batch_size *
    megabatch_mult`` shuffled indices is sorted by length (longest first) before being cut
    into batches, and the batch order is shuffled again - similar lengths share a batch
    (little padding) while the epoch stays random. The last batch may be smaller.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * megabatch_mult
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    partial = [b for b in batches if len(b) != batch_size]
    rng.shuffle(full)
    return full + partial


__all__ = [
    "IGNORE_INDEX",
    "BadSampleError",
    "Collator",
    "batch_plan",
    "estimate_length",
]
