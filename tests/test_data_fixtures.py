"""Small hand-made Speechocean762 release folders for the data tests (no tests in here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf


def tone(seconds: float = 1.0, sr: int = 16000, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x] * channels, axis=1)


def word(text: str, phones: list[str], mis: list[tuple[int, str, str]] | None = None, key: bool = True) -> dict:
    w: dict = {"text": text, "accuracy": 10, "stress": 10, "total": 10, "phones": phones,
               "phones-accuracy": [2.0] * len(phones)}
    if mis is not None or key:
        w["mispronunciations"] = [
            {"canonical-phone": c, "index": i, "pronounced-phone": p} for i, c, p in (mis or [])
        ]
    return w


def entry(text: str, words: list[dict], acc: float = 8, flu: float = 9, pros: float = 9, tot: float = 8) -> dict:
    return {"text": text, "accuracy": acc, "completeness": 10.0, "fluency": flu, "prosodic": pros,
            "total": tot, "words": words}


def simple_entry(text: str = "WE CALL") -> dict:
    return entry(text, [word("WE", ["W", "IY0"]), word("CALL", ["K", "AO1", "L"])])


def write_release(
    root: Path,
    utts: dict[str, dict],
    scores: dict[str, dict] | None = None,
    write_scores: bool = True,
) -> Path:
    """utts: id -> {"split", "spk", "audio": ndarray | bytes | None, "sr", "ext"}; scores default per utt."""
    root.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[str]] = {}
    for utt, u in utts.items():
        by_split.setdefault(u["split"], []).append(utt)
        rel = Path("WAVE") / f"SPEAKER{u['spk']}" / f"{utt}{u.get('ext', '.wav')}"
        u["rel"] = str(rel)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        audio = u.get("audio", tone())
        if isinstance(audio, bytes):
            (root / rel).write_bytes(audio)
        elif audio is not None:
            sf.write(str(root / rel), audio, u.get("sr", 16000), subtype=u.get("subtype", "PCM_16"))
    for split, ids in by_split.items():
        d = root / split
        d.mkdir(exist_ok=True)
        spks = sorted({utts[i]["spk"] for i in ids})
        (d / "wav.scp").write_text("".join(f"{i} {utts[i]['rel']}\n" for i in ids))
        (d / "text").write_text("".join(f"{i} SOME TEXT\n" for i in ids))
        (d / "utt2spk").write_text("".join(f"{i} {utts[i]['spk']}\n" for i in ids))
        (d / "spk2utt").write_text("".join(f"{s} {' '.join(i for i in ids if utts[i]['spk'] == s)}\n" for s in spks))
        (d / "spk2age").write_text("".join(f"{s} 20\n" for s in spks))
        (d / "spk2gender").write_text("".join(f"{s} f\n" for s in spks))
    if write_scores:
        if scores is None:
            scores = {utt: simple_entry() for utt in utts}
        (root / "resource").mkdir(exist_ok=True)
        (root / "resource" / "scores.json").write_text(json.dumps(scores))
    return root
