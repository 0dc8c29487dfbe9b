"""Recordings in the formats phones and browsers produce decode to the same speech.

The files are espeak-ng speech encoded by FFmpeg's own encoders through PyAV (libopus,
libmp3lame, aac, flac; see ``audio_formats.py``), i.e. real files of each format, not files
the project wrote with its own reader in mind. Each must decode to 16 kHz mono with the
original's duration and waveform (lossy codecs: correlation, allowing the codec's delay).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from audio_formats import FORMATS, encode, espeak

from phi4mm_lora.data.audio import (
    TARGET_SR,
    AudioError,
    AudioTooLong,
    UnsupportedFormat,
    container_format,
    decode_bytes,
    load_audio,
    to_mono_16k,
)

NAMES = {".wav": "WAV", ".flac": "FLAC", ".mp3": "MP3", ".ogg": "OGG/Opus", ".webm": "WebM/Opus", ".m4a": "M4A"}


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[Path, np.ndarray]:
    d = tmp_path_factory.mktemp("formats")
    x, sr = espeak("we call it bear", d / "speech.wav")
    for suffix in FORMATS:
        encode(x, sr, d / f"speech{suffix}")
    return d, to_mono_16k(x, sr)


def _best_correlation(ref: np.ndarray, got: np.ndarray, max_lag: int = 1600) -> float:
    """Highest correlation over delays up to 0.1 s (AAC/MP3 encoders prepend silence)."""
    n = min(len(ref), len(got) - max_lag) - 1
    return max(float(np.corrcoef(ref[:n], got[lag: lag + n])[0, 1]) for lag in range(0, max_lag, 4))


@pytest.mark.parametrize("suffix", list(FORMATS))
def test_each_format_decodes_to_the_speech(speech, suffix: str) -> None:
    folder, ref = speech
    f = folder / f"speech{suffix}"
    x = load_audio(f)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - len(ref)) / TARGET_SR < 0.1, (len(x), len(ref))
    assert _best_correlation(ref, x) > 0.9
    data = f.read_bytes()
    assert container_format(data, f.name) == NAMES[suffix]
    np.testing.assert_array_equal(decode_bytes(data, f.name), x)  # an upload decodes like the file


def test_limits_and_refusals(speech, tmp_path: Path) -> None:
    folder, _ = speech
    webm = (folder / "speech.webm").read_bytes()
    with pytest.raises(AudioTooLong, match="limit"):
        decode_bytes(webm, "speech.webm", max_seconds=0.5)  # PyAV path stops decoding early
    with pytest.raises(AudioTooLong, match="limit is 0.5 s"):
        load_audio(folder / "speech.wav", max_seconds=0.5)  # libsndfile path reads the header only
    aiff = io.BytesIO()
    sf.write(aiff, np.zeros(1600, np.float32), 16000, format="AIFF")
    with pytest.raises(UnsupportedFormat, match="aiff, which is not accepted; accepted: WAV, FLAC, MP3"):
        container_format(aiff.getvalue(), "x.aiff")
    for junk in (b"hello, not audio", webm[:100]):
        with pytest.raises(UnsupportedFormat, match="not a recognised audio file"):
            container_format(junk, "junk")
    with pytest.raises(AudioError, match="empty"):
        decode_bytes(b"", "nothing")
    nan = tmp_path / "nan.wav"
    sf.write(str(nan), np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(nan)
