"""Feature cache: same features as the extractor, hits on the second read, invalidated on change."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_data_fixtures import tone

from phi4mm_lora.data import bundled_corpus_path, load_audio
from phi4mm_lora.data.cache import FeatureCache

transformers = pytest.importorskip("transformers")


def test_cache_matches_batched_extractor_and_hits(tmp_path: Path) -> None:
    files = sorted((bundled_corpus_path() / "WAVE").rglob("*.flac"))[:2]
    cache = FeatureCache(tmp_path / "fc")
    entries = [cache.get(f) for f in files]
    assert cache.misses == 2 and cache.hits == 0
    again = [cache.get(f) for f in files]
    assert cache.hits == 2
    for a, b in zip(entries, again, strict=True):
        np.testing.assert_array_equal(a.features, b.features)
        assert (a.n_samples, a.audio_embed_size) == (b.n_samples, b.audio_embed_size)
    fe = transformers.Phi4MultimodalFeatureExtractor()
    audio = [load_audio(f) for f in files]
    batch = fe(audio, sampling_rate=16000, return_tensors="np")
    T = max(e.features.shape[0] for e in entries)
    padded = np.stack([np.pad(e.features, ((0, T - len(e.features)), (0, 0))) for e in entries])
    np.testing.assert_allclose(padded, batch["audio_input_features"], rtol=1e-5, atol=1e-4)
    assert [e.audio_embed_size for e in entries] == list(batch["audio_embed_sizes"])
    assert [e.n_samples for e in entries] == [len(a) for a in audio]
    assert entries[0].features.shape[1] == 80


def test_cache_invalidated_when_file_changes(tmp_path: Path) -> None:
    p = tmp_path / "a.wav"
    sf.write(str(p), tone(1.0), 16000)
    cache = FeatureCache(tmp_path / "fc")
    first = cache.get_or_compute(p)
    sf.write(str(p), tone(1.5, freq=500), 16000)
    os.utime(p, ns=(os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns + 10**9))
    second = cache.get_or_compute(p)
    assert cache.misses == 2 and second.shape[0] > first.shape[0]


def test_corrupt_entry_is_recomputed(tmp_path: Path) -> None:
    src = next((bundled_corpus_path() / "WAVE").rglob("*.flac"))
    p = tmp_path / src.name
    shutil.copy(src, p)
    cache = FeatureCache(tmp_path / "fc")
    good = cache.get_or_compute(p)
    cache.entry_path(p).write_bytes(b"junk")
    np.testing.assert_array_equal(cache.get_or_compute(p), good)
