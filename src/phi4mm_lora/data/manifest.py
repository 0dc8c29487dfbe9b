"""JSONL manifests: the escape hatch for any task that is not Speechocean762.

One example per line::

    {"audio": "clips/a.flac", "prompt": "<|audio|>Transcribe this.", "answer": "hello", "split": "train"}
    {"image": "img/b.png", "audio": "clips/b.wav", "prompt": "Describe.", "answer": "...", "id": "b"}

``audio``/``image`` paths are relative to the manifest's folder (absolute paths work too); at
least one of them is required. ``<|audio|>``/``<|image|>`` in the prompt mark where the media
go; without them the media tokens are put in front of the prompt. ``id`` defaults to
``line<N>``; ``split`` defaults to ``train`` (so an unlabelled manifest is never silently
used as its own test set). Bad lines are reported, not fatal, unless strict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from phi4mm_lora.data.problems import Problem
from phi4mm_lora.errors import UserError
from phi4mm_lora.fileio import read_text

AUDIO_PLACEHOLDER = "<|audio|>"
IMAGE_PLACEHOLDER = "<|image|>"
DEFAULT_SPLIT = "train"


@dataclass
class ManifestItem:
    """One valid manifest line (prompt still holds the generic placeholders)."""

    id: str
    split: str
    prompt: str
    answer: str
    audio_path: str | None
    image_path: str | None
    line: int
    language: str | None = None  # target language of the answer (picks CER / the BLEU tokenizer)


def _resolve(base: Path, value: object, key: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty path string")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise ValueError(f"{key} file {p} not found")
    return p


def read_manifest(path: str | Path) -> tuple[list[ManifestItem], list[tuple[str | None, Problem]]]:
    """Parse a manifest; returns valid items and (split, problem) pairs for the bad lines."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"manifest {p} not found; data.path must name a .jsonl file when data.source=manifest")
    base = p.parent
    items: list[ManifestItem] = []
    problems: list[tuple[str | None, Problem]] = []
    seen: set[str] = set()
    for n, raw in enumerate(read_text(p, "manifest").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"line {n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append((None, Problem("manifest", where, f"not JSON ({exc.msg})")))
            continue
        if not isinstance(obj, dict):
            problems.append((None, Problem("manifest", where, "not a JSON object")))
            continue
        ident = str(obj.get("id") or f"line{n}")
        split = str(obj.get("split") or DEFAULT_SPLIT)
        try:
            if ident in seen:
                raise ValueError(f"duplicate id {ident!r}")
            prompt, answer = obj.get("prompt"), obj.get("answer")
            if not isinstance(prompt, str) or not isinstance(answer, str) or not answer.strip():
                raise ValueError("needs string 'prompt' and non-empty string 'answer'")
            if obj.get("audio") is None and obj.get("image") is None:
                raise ValueError("needs an 'audio' and/or 'image' path")
            audio = _resolve(base, obj["audio"], "audio") if obj.get("audio") is not None else None
            image = _resolve(base, obj["image"], "image") if obj.get("image") is not None else None
            if AUDIO_PLACEHOLDER in prompt and audio is None:
                raise ValueError(f"prompt has {AUDIO_PLACEHOLDER} but the line has no audio")
            if IMAGE_PLACEHOLDER in prompt and image is None:
                raise ValueError(f"prompt has {IMAGE_PLACEHOLDER} but the line has no image")
        except ValueError as exc:
            problems.append((split, Problem("manifest", f"{where} ({ident})", str(exc))))
            continue
        seen.add(ident)
        language = obj.get("language") if isinstance(obj.get("language"), str) else None
        items.append(ManifestItem(ident, split, prompt, answer, str(audio) if audio else None,
                                  str(image) if image else None, n, language))
    return items, problems


def insert_media_tokens(prompt: str, has_audio: bool, has_image: bool, audio_token: str, image_token: str) -> str:
    """Swap generic placeholders for the processor's tokens, prepending any that are absent."""
    out = prompt
    if has_audio:
        out = out.replace(AUDIO_PLACEHOLDER, audio_token) if AUDIO_PLACEHOLDER in out else audio_token + out
    if has_image:
        out = out.replace(IMAGE_PLACEHOLDER, image_token) if IMAGE_PLACEHOLDER in out else image_token + out
    return out
