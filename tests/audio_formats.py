"""Encode test recordings into the formats phones and browsers produce, with PyAV's encoders.

A helper for the tests (not a test module): the files are written by FFmpeg's own muxers and
encoders (libopus, libmp3lame, aac), i.e. by the definition of each format outside this
project, so decoding them checks the project against real files.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

#: suffix -> (PyAV container format, encoder, encoder sample rate)
FORMATS: dict[str, tuple[str, str, int]] = {
    ".wav": ("wav", "pcm_s16le", 16000),
    ".flac": ("flac", "flac", 16000),
    ".mp3": ("mp3", "libmp3lame", 22050),
    ".ogg": ("ogg", "libopus", 48000),
    ".webm": ("webm", "libopus", 48000),
    ".m4a": ("ipod", "aac", 44100),
}


def encode(samples: np.ndarray, sr: int, out: Path) -> Path:
    """Write mono float samples at ``sr`` to ``out`` in the format its suffix names."""
    import av

    fmt, codec, rate = FORMATS[out.suffix]
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)[None, :]
    with av.open(str(out), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = sr
        for f in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(f):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out


def espeak(text: str, out: Path) -> tuple[np.ndarray, int]:
    """Speak ``text`` with espeak-ng into ``out`` (WAV); returns its samples and rate.

    Without espeak-ng (``make system-deps`` installs it) a recording of the bundled corpus -
    espeak-ng speech of other words - stands in, so the format and service tests still run.
    """
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        from phi4mm_lora.data.examples import bundled_corpus_path

        flacs = sorted((bundled_corpus_path() / "WAVE").rglob("*.flac"))
        x, sr = sf.read(str(flacs[sum(map(ord, text)) % len(flacs)]), dtype="float32")
        sf.write(str(out), x, sr)
        return x, sr
    subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", str(out), text], check=True, capture_output=True)
    x, sr = sf.read(str(out), dtype="float32")
    return x, sr
