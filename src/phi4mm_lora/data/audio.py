"""Audio decoding without torchcodec or system FFmpeg.

``datasets`` 4+ decodes audio through torchcodec, which needs FFmpeg shared libraries and is
a common install failure. Files go through libsndfile first (via ``soundfile``: WAV, FLAC,
OGG/Opus and, with libsndfile >= 1.1, MP3), which is what training has always used; what
libsndfile cannot read - WebM/Opus from browsers, M4A/AAC from phones - is decoded by PyAV,
whose wheels bundle their own FFmpeg, so both work on any machine where ``pip install``
worked. ``soxr`` resamples. The model wants 16 kHz mono float32; stereo is mixed down and
other rates are resampled: both are normal, not errors.
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
#: Containers accepted for scoring (PyAV/FFmpeg demuxer name -> the name users know).
ACCEPTED_FORMATS: dict[str, str] = {
    "wav": "WAV", "flac": "FLAC", "mp3": "MP3", "ogg": "OGG/Opus",
    "matroska,webm": "WebM/Opus", "mov,mp4,m4a,3gp,3g2,mj2": "M4A",
}
#: File extensions of recordings a folder is scanned for (batch scoring).
RECORDING_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".webm", ".m4a", ".mp4", ".aac")


class AudioError(UserError):
    """An audio file that cannot be used; the message names the file and the reason."""


class AudioTooLong(AudioError):
    """A recording longer than the caller's limit (found before decoding all of it)."""


class UnsupportedFormat(AudioError):
    """A file in a container outside :data:`ACCEPTED_FORMATS` (or no audio at all)."""


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


def _decode_av(source: str | io.BytesIO, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """[frames, channels] float32 and the rate of the first audio stream, via PyAV (FFmpeg).

    Decoding stops with :class:`AudioTooLong` as soon as ``max_seconds`` is passed, so a
    small file that unpacks to hours of audio costs nothing.
    """
    import av

    try:
        with av.open(source, mode="r") as container:
            if not container.streams.audio:
                raise AudioError(f"audio {name} has no audio stream")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            chunks, total = [], 0
            for frame in container.decode(stream):
                x = frame.to_ndarray()  # planar: [channels, n]; packed: [1, n*channels]
                ch = len(frame.layout.channels)
                x = x.reshape(-1, ch) if not frame.format.is_planar else x.T
                if x.dtype.kind == "i":
                    x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
                chunks.append(np.asarray(x, dtype=np.float32))
                total += x.shape[0]
                if max_seconds is not None and rate and total / rate > max_seconds:
                    raise AudioTooLong(f"audio {name} is longer than the {max_seconds:g} s limit")
    except av.error.FFmpegError as exc:
        raise AudioError(f"audio {name} is unreadable ({exc})") from None
    if not chunks or not rate:
        raise AudioError(f"audio {name} is empty (0 samples); remove it or replace the file")
    return np.concatenate(chunks, axis=0), int(rate)


def _decode(source: str | bytes, name: str, target_sr: int, max_seconds: float | None) -> np.ndarray:
    """libsndfile first (what training uses), PyAV for what it cannot read; 16 kHz mono out."""
    def sf_source():
        return io.BytesIO(source) if isinstance(source, bytes) else source

    try:
        info = sf.info(sf_source())
    except (sf.LibsndfileError, RuntimeError, OSError):
        info = None
    if info is not None:
        if max_seconds is not None and info.samplerate and info.frames / info.samplerate > max_seconds:
            raise AudioTooLong(f"audio {name} is {info.frames / info.samplerate:.1f} s long; "
                               f"the limit is {max_seconds:g} s")
        try:
            data, sr = sf.read(sf_source(), dtype="float32", always_2d=False)
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            raise AudioError(f"audio {name} is unreadable ({exc}); convert it to WAV or FLAC") from None
    else:
        data, sr = _decode_av(io.BytesIO(source) if isinstance(source, bytes) else source, name, max_seconds)
    _check_samples(data, name)
    return to_mono_16k(data, sr, target_sr)


def load_audio(path: str | Path, target_sr: int = TARGET_SR, max_seconds: float | None = None) -> np.ndarray:
    """Decode a file (WAV, FLAC, MP3, OGG/Opus, WebM/Opus, M4A, ...) to 16 kHz mono float32.

    Raises :class:`AudioError` (a :class:`UserError`) naming the file when it is missing,
    unreadable, empty or holds NaN, so a collator failing mid-run says which sample it was,
    and :class:`AudioTooLong` past ``max_seconds``.
    """
    p = Path(path)
    if not p.is_file():
        raise AudioError(f"audio file {p} not found")
    return _decode(str(p), f"file {p}", target_sr, max_seconds)


def decode_bytes(data: bytes, name: str = "<bytes>", target_sr: int = TARGET_SR,
                 max_seconds: float | None = None) -> np.ndarray:
    """Decode in-memory audio (a hub Audio column's ``bytes``, an upload) like :func:`load_audio`."""
    if not data:
        raise AudioError(f"audio {name} is empty (0 bytes)")
    return _decode(bytes(data), name, target_sr, max_seconds)


def container_format(data: bytes, name: str = "<bytes>") -> str:
    """The user-facing name (``"WebM/Opus"``, ...) of an upload's container, from its content.

    The content decides, not the file name or the client's content type (browsers label
    recordings inconsistently). Raises :class:`UnsupportedFormat` for anything outside
    :data:`ACCEPTED_FORMATS` or without an audio stream.
    """
    import av

    accepted = ", ".join(ACCEPTED_FORMATS.values())
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            fmt, has_audio = container.format.name, bool(container.streams.audio)
    except av.error.FFmpegError:
        raise UnsupportedFormat(f"audio {name} is not a recognised audio file; accepted: {accepted}") from None
    if fmt not in ACCEPTED_FORMATS:
        raise UnsupportedFormat(f"audio {name} is {fmt}, which is not accepted; accepted: {accepted}")
    if not has_audio:
        raise UnsupportedFormat(f"audio {name} ({ACCEPTED_FORMATS[fmt]}) has no audio stream")
    return ACCEPTED_FORMATS[fmt]


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
