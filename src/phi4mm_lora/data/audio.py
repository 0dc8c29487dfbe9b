"""Audio decoding without torchcodec/FFmpeg.

``datasets`` 4+ decodes audio through torchcodec, which needs FFmpeg shared libraries and is
a common install failure. Everything here goes through libsndfile (via ``soundfile``: WAV,
FLAC, OGG and, with libsndfile >= 1.1, MP3) and ``soxr`` for resampling, so the data layer
works on any machine where ``pip install`` worked. The model wants 16 kHz mono float32;
stereo is mixed down and other rates are resampled: both are normal, not errors.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from phi4mm_lora.errors import UserError

TARGET_SR = 16000
#: File extensions tried when a listed audio file is missing (the release uses .WAV).
AUDIO_EXTS = (".wav", ".WAV", ".flac", ".FLAC", ".ogg", ".mp3")


class AudioError(UserError):
    """An audio file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class AudioInfo:
    """What a cheap check of one file found."""

    path: str
    duration: float
    sample_rate: int
    channels: int


def to_mono_16k(data: np.ndarray, sr: int, target_sr: int = TARGET_SR) -> np.ndarray:
    """Mix to mono (mean of channels) and resample with soxr; returns contiguous float32."""
    x = np.asarray(data, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    elif x.ndim != 1:
        raise ValueError(f"audio must be 1-D or [frames, channels], got shape {x.shape}")
    if sr != target_sr and x.size:
        x = soxr.resample(x, sr, target_sr, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(x)


def _check_samples(x: np.ndarray, name: str) -> None:
    if x.size == 0:
        raise AudioError(f"audio {name} is empty (0 samples); remove it or replace the file")
    if not np.isfinite(x).all():
        raise AudioError(f"audio {name} contains NaN/inf samples; re-export the file")


def load_audio(path: str | Path, target_sr: int = TARGET_SR) -> np.ndarray:
    """Decode a file to 16 kHz mono float32.

    Raises :class:`AudioError` (a :class:`UserError`) naming the file when it is missing,
    unreadable, empty or holds NaN, so a collator failing mid-run says which sample it was.
    """
    p = Path(path)
    if not p.is_file():
        raise AudioError(f"audio file {p} not found")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"audio file {p} is unreadable ({exc}); convert it to WAV or FLAC") from None
    _check_samples(data, str(p))
    return to_mono_16k(data, sr, target_sr)


def decode_bytes(data: bytes, name: str = "<bytes>", target_sr: int = TARGET_SR) -> np.ndarray:
    """Decode in-memory audio (e.g. the ``bytes`` of a hub Audio column) like :func:`load_audio`."""
    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"audio {name} is unreadable ({exc})") from None
    _check_samples(x, name)
    return to_mono_16k(x, sr, target_sr)


def riff_declared_frames(path: Path) -> int | None:
    """Frames a WAV's ``data`` chunk header declares (None: not RIFF/WAVE, or a streaming size).

    libsndfile quietly shortens a WAV whose data chunk claims more bytes than the file holds,
    so its frame count cannot reveal a cut-off copy; the RIFF header (``fmt `` block align,
    ``data`` size, per the RIFF/WAVE format) can.
    """
    import struct

    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = None
            while chunk := fh.read(8):
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"fmt ":
                    fmt = fh.read(size + (size & 1))
                    block_align = struct.unpack("<H", fmt[12:14])[0] if len(fmt) >= 14 else None
                elif cid == b"data":
                    if not block_align or size in (0, 0xFFFFFFFF):
                        return None
                    return size // block_align
                else:
                    fh.seek(size + (size & 1), 1)
    except OSError:
        return None
    return None


def probe_audio(path: str | Path, full: bool = True) -> AudioInfo:
    """Check a file is usable and return its duration.

    ``full=False`` reads only the header (fast, catches missing/garbage files and zero length);
    ``full=True`` also decodes the samples to catch NaN and truncated data (fewer samples
    than the header declares: :func:`riff_declared_frames` for WAV). Decoding a few
    seconds of FLAC costs about a millisecond, so examples are built with ``full=True``.
    """
    p = Path(path)
    if not p.is_file():
        raise AudioError(f"audio file {p} not found")
    try:
        info = sf.info(str(p))
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioError(f"audio file {p} is unreadable ({exc})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"audio {p} is empty (0 samples); remove it or replace the file")
    if full:
        try:
            data, _ = sf.read(str(p), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            raise AudioError(f"audio file {p} is unreadable ({exc})") from None
        _check_samples(data, str(p))
        declared = max(info.frames, riff_declared_frames(p) or 0)
        if data.shape[0] < declared - 1:
            raise AudioError(f"audio {p} is truncated: its header says {declared / info.samplerate:.2f} s, the file "
                             f"holds {data.shape[0] / info.samplerate:.2f} s; copy or export it again")
        duration = data.shape[0] / info.samplerate
    else:
        duration = info.frames / info.samplerate
    return AudioInfo(str(p), float(duration), int(info.samplerate), int(info.channels))


def resolve_audio_path(path: Path) -> Path | None:
    """The file itself, or the same stem with another audio extension (release: .WAV)."""
    if path.is_file():
        return path
    for ext in AUDIO_EXTS:
        cand = path.with_suffix(ext)
        if cand.is_file():
            return cand
    return None
