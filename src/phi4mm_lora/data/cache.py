"""On-disk cache of decoded + feature-extracted audio, so later epochs skip decoding.

Decoding FLAC, resampling and computing the 80-bin log-mel features costs far more than
reading a finished float32 array back. Each entry is one safetensors file holding
``features`` ([frames, 80], float32, exactly what ``Phi4MultimodalFeatureExtractor`` gives for
that clip alone) plus, as metadata, ``n_samples`` (16 kHz audio length) and
``audio_embed_size`` (how many audio tokens the processor puts in the prompt for it).

The key is a hash of the absolute path, mtime, size and the extractor's settings (including
its mel filter bank), so editing a file or changing the extractor never serves stale
features. Writes go to a temporary file first and are renamed, so two workers (or a crash)
never leave a half-written entry behind.

How the collator uses it (it builds every audio batch from per-clip features, cached or not):

1. ``entry = cache.get(ex.audio_path)`` for each example in the batch;
2. pad ``entry.features`` with zeros to the longest in the batch -> ``audio_input_features``
   [B, T, 80]; ``audio_attention_mask`` [B, T] = frame index < ``len(entry.features)``
   (the extractor returns no mask for a batch of one; pass ``None`` then);
3. ``audio_embed_sizes`` = ``[entry.audio_embed_size, ...]``;
4. in the text, replace the single audio token of ``ex.prompt`` by ``audio_token *
   entry.audio_embed_size`` before tokenizing (what the processor's ``replace_audio_token``
   does). Zero padding equals what the extractor produces for a padded batch (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from phi4mm_lora.data.audio import TARGET_SR, load_audio

_SETTINGS = (
    "feature_size", "sampling_rate", "hop_length", "n_fft", "win_length", "preemphasis",
    "padding_value", "audio_compression_rate", "audio_downsample_rate", "audio_feat_stride",
)
CACHE_VERSION = "1"


@dataclass(frozen=True)
class CachedAudio:
    """Features of one clip plus the lengths the processor/model need."""

    features: np.ndarray  # [frames, 80] float32
    n_samples: int
    audio_embed_size: int


def default_extractor() -> Any:
    """``Phi4MultimodalFeatureExtractor()`` with default parameters (those of the checkpoint)."""
    from transformers import Phi4MultimodalFeatureExtractor

    return Phi4MultimodalFeatureExtractor()


def extract_features(audio: np.ndarray, extractor: Any) -> CachedAudio:
    """Run the extractor on one 16 kHz mono clip (unbatched, so no padding is involved)."""
    out = extractor(audio, sampling_rate=TARGET_SR, return_tensors="np")
    feats = np.asarray(out["audio_input_features"][0], dtype=np.float32)
    embed = int(np.asarray(out["audio_embed_sizes"]).reshape(-1)[0])
    return CachedAudio(np.ascontiguousarray(feats), int(audio.shape[0]), embed)


class FeatureCache:
    """``get_or_compute(path)`` -> features; ``get(path)`` -> :class:`CachedAudio`."""

    def __init__(self, folder: str | Path, extractor: Any | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.extractor = extractor if extractor is not None else default_extractor()
        self._settings = self._settings_digest()
        self.hits = 0
        self.misses = 0

    def _settings_digest(self) -> str:
        fe = self.extractor
        settings = {k: getattr(fe, k, None) for k in _SETTINGS}
        settings["class"] = type(fe).__name__
        settings["version"] = CACHE_VERSION
        h = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode())
        mel = getattr(fe, "mel_filters", None)
        if mel is not None:
            h.update(np.ascontiguousarray(mel).tobytes())
        return h.hexdigest()

    def key(self, audio_path: str | Path) -> str:
        """Hash of absolute path + mtime + size + extractor settings."""
        p = Path(audio_path).resolve()
        st = p.stat()
        raw = f"{p}|{st.st_mtime_ns}|{st.st_size}|{self._settings}"
        return hashlib.sha1(raw.encode()).hexdigest()

    def entry_path(self, audio_path: str | Path) -> Path:
        k = self.key(audio_path)
        return self.folder / k[:2] / f"{k}.safetensors"

    def get(self, audio_path: str | Path) -> CachedAudio:
        """Cached entry, computing and storing it on a miss (decode errors name the file)."""
        path = self.entry_path(audio_path)
        if path.is_file():
            try:
                with safe_open(str(path), framework="numpy") as f:
                    meta = f.metadata() or {}
                    feats = f.get_tensor("features")
                self.hits += 1
                return CachedAudio(feats, int(meta["n_samples"]), int(meta["audio_embed_size"]))
            except Exception:  # a corrupt entry is recomputed, never fatal
                path.unlink(missing_ok=True)
        self.misses += 1
        entry = extract_features(load_audio(audio_path), self.extractor)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"features": entry.features}, str(tmp), metadata={
            "n_samples": str(entry.n_samples), "audio_embed_size": str(entry.audio_embed_size),
            "source": str(Path(audio_path).resolve()),
        })
        tmp.replace(path)
        return entry

    def get_or_compute(self, audio_path: str | Path) -> np.ndarray:
        """Features ``[frames, 80]`` of one clip; see :meth:`get` for the lengths."""
        return self.get(audio_path).features
