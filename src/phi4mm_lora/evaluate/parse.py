"""Tolerant parsing of the model's JSON answers.

A fine-tuned model mostly answers with clean JSON, but an untrained or half-trained one
wraps it in prose or markdown fences, uses single quotes, leaves trailing commas, writes
unquoted keys, keeps chat tokens such as ``<|end|>``, or stops at ``max_new_tokens`` before
the closing brace. Scoring such an answer as "wrong" would measure the formatting, not the
pronunciation judgement, so we recover what can be recovered. What cannot be recovered is
returned as ``ok=False`` with a reason, so the caller counts and lists it (never drops it).

Decisions:

* APA scores must be numbers in 0-10. Floats are rounded half-up (7.5 -> 8). A value out
  of range is **rejected** (the answer fails to parse) rather than clamped: clamping would
  hide a model that does not follow the scale, and a rejected answer is visible in the
  parse-failure count.
* An answer cut off inside the object is repaired (open strings and objects are closed,
  a dangling key is dropped). The repair is recorded in ``notes``; if a required key is
  then missing the answer fails. A string cut off mid-way keeps what was written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

APA_KEYS: tuple[str, ...] = ("accuracy", "fluency", "prosodic", "total")
MDD_KEYS: tuple[str, ...] = ("word_transcript", "phoneme_transcript")

#: Other spellings a model may use for a key; matched after lower-casing.
_APA_ALIASES: dict[str, str] = {
    "accuracy": "accuracy",
    "acc": "accuracy",
    "fluency": "fluency",
    "flu": "fluency",
    "prosodic": "prosodic",
    "prosody": "prosodic",
    "pros": "prosodic",
    "total": "total",
    "overall": "total",
}
_MDD_ALIASES: dict[str, str] = {
    "word_transcript": "word_transcript",
    "words": "word_transcript",
    "word_transcription": "word_transcript",
    "phoneme_transcript": "phoneme_transcript",
    "phonemes": "phoneme_transcript",
    "phone_transcript": "phoneme_transcript",
    "phoneme_transcription": "phoneme_transcript",
}

# Chat-template tokens (``<|end|>``, ``<|endoftext|>``, ``<|assistant|>`` ...). ``<unk>`` in a
# phoneme transcript has no bars and is left alone.
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_END_TOKEN = re.compile(r"<\|(end|endoftext|im_end)\|>")
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)(?:```|$)", re.S)


@dataclass
class ParseResult:
    """Outcome of parsing one answer: ``value`` when ``ok``, else ``error`` says why."""

    ok: bool
    value: dict[str, Any] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "value": self.value, "error": self.error, "notes": list(self.notes)}


class _Truncated(Exception):
    """Internal: the text ended inside a value."""


class _LenientParser:
    """A small recursive-descent reader for JSON-like objects.

    It accepts single- or double-quoted strings, bare identifiers as keys, trailing commas,
    ``=`` in place of ``:``, and Python's True/False/None. On end of input it closes what
    is open (recorded in ``notes``) instead of failing, so truncated answers keep their
    complete fields.
    """

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.notes: list[str] = []

    def _ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def _peek(self) -> str:
        self._ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def parse_object(self) -> dict[str, Any]:
        assert self.s[self.i] == "{"
        self.i += 1
        out: dict[str, Any] = {}
        while True:
            c = self._peek()
            if c == "":
                self.notes.append("closed an unterminated object (truncated answer)")
                return out
            if c == "}":
                self.i += 1
                return out
            if c == ",":
                self.i += 1
                continue
            try:
                key = self._key()
            except _Truncated:
                self.notes.append("dropped a key cut off by truncation")
                return out
            c = self._peek()
            if c in (":", "="):
                self.i += 1
            elif c == "":
                self.notes.append("dropped a key without value (truncated answer)")
                return out
            else:
                raise ValueError(f"expected ':' after key {key!r} at offset {self.i}")
            if self._peek() == "":
                self.notes.append("dropped a key without value (truncated answer)")
                return out
            out[key] = self._value()

    def _key(self) -> str:
        c = self._peek()
        if c in "\"'":
            return self._string()
        m = re.compile(r"[A-Za-z_][A-Za-z0-9_ -]*").match(self.s, self.i)
        if not m:
            raise ValueError(f"expected a key at offset {self.i}")
        self.i = m.end()
        if self.i >= len(self.s):
            raise _Truncated
        return m.group(0).strip()

    def _string(self) -> str:
        quote = self.s[self.i]
        self.i += 1
        buf: list[str] = []
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "\\" and self.i + 1 < len(self.s):
                nxt = self.s[self.i + 1]
                buf.append({"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt))
                self.i += 2
                continue
            if c == quote:
                if quote == "'" and self._is_apostrophe():
                    buf.append(c)
                    self.i += 1
                    continue
                self.i += 1
                return "".join(buf)
            buf.append(c)
            self.i += 1
        self.notes.append("closed an unterminated string (truncated answer)")
        return "".join(buf)

    def _is_apostrophe(self) -> bool:
        """In a single-quoted string, a quote between two letters is an apostrophe (don't)."""
        before = self.s[self.i - 1] if self.i > 0 else ""
        after = self.s[self.i + 1] if self.i + 1 < len(self.s) else ""
        return before.isalpha() and after.isalpha()

    def _value(self) -> Any:
        c = self._peek()
        if c in "\"'":
            return self._string()
        if c == "{":
            return self.parse_object()
        if c == "[":
            self.i += 1
            items: list[Any] = []
            while True:
                c = self._peek()
                if c == "":
                    self.notes.append("closed an unterminated list (truncated answer)")
                    return items
                if c == "]":
                    self.i += 1
                    return items
                if c == ",":
                    self.i += 1
                    continue
                items.append(self._value())
        m = re.compile(r"[^,}\]\n]+").match(self.s, self.i)
        if not m:
            raise ValueError(f"expected a value at offset {self.i}")
        self.i = m.end()
        word = m.group(0).strip()
        literals = {"true": True, "false": False, "null": None, "none": None}
        if word.lower() in literals:
            return literals[word.lower()]
        try:
            return float(word) if re.search(r"[.eE]", word) else int(word)
        except ValueError:
            return word  # an unquoted string value; the task checks decide


def clean_answer(text: str) -> str:
    """Cut the answer at the first end-of-turn token and drop other chat tokens."""
    m = _END_TOKEN.search(text)
    if m:
        text = text[: m.start()]
    return _SPECIAL_TOKEN.sub("", text).strip()


def extract_object(text: str) -> ParseResult:
    """Find and read the first JSON-like object in a model answer.

    Strict ``json`` is tried first (fast, exact); the lenient reader is the fallback.
    """
    if not isinstance(text, str):
        return ParseResult(False, error=f"answer is {type(text).__name__}, not text")
    cleaned = clean_answer(text)
    notes: list[str] = []
    fence = _FENCE.search(cleaned)
    if fence and "{" in fence.group(1):
        cleaned = fence.group(1)
        notes.append("removed a markdown code fence")
    start = cleaned.find("{")
    if start < 0:
        return ParseResult(False, error="no '{' in the answer", notes=notes)
    body = cleaned[start:]
    try:
        obj, _ = json.JSONDecoder().raw_decode(body)
        if isinstance(obj, dict):
            return ParseResult(True, value=obj, notes=notes)
    except json.JSONDecodeError:
        pass
    # Typographic quotes (from some chat models) read as plain ones.
    body = body.translate(str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"}))
    parser = _LenientParser(body)
    try:
        obj = parser.parse_object()
    except (ValueError, RecursionError) as exc:
        return ParseResult(False, error=f"not a JSON object: {exc}", notes=notes)
    notes.append("parsed leniently (not strict JSON)")
    return ParseResult(True, value=obj, notes=notes + parser.notes)


def _canonical_keys(obj: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = aliases.get(str(k).strip().lower().replace(" ", "_").replace("-", "_"))
        if name is not None and name not in out:
            out[name] = v
    return out


def _score(value: Any) -> int:
    """A 0-10 score from an int, float or numeric string; raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", value)
        if not m:
            raise ValueError(f"{value!r} is not a number")
        value = float(m.group(1))
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a number")
    score = int(math.floor(value + 0.5))
    if not 0 <= score <= 10:
        raise ValueError(f"{value!r} is outside 0-10")
    return score


_APA_LOOSE = re.compile(
    r"\b(accuracy|fluency|prosodic|prosody|total)\b[\"']?\s*[:=]\s*[\"']?(-?\d+(?:\.\d+)?)", re.I
)


def parse_apa(text: str) -> ParseResult:
    """Read ``{"accuracy","fluency","prosodic","total"}`` as ints 0-10.

    Without any object in the answer, ``key: number`` pairs in prose are accepted as a last
    resort (recorded in notes). All four keys are required.
    """
    res = extract_object(text)
    notes = list(res.notes)
    if res.ok:
        obj = _canonical_keys(res.value or {}, _APA_ALIASES)
    else:
        pairs = _APA_LOOSE.findall(clean_answer(text)) if isinstance(text, str) else []
        if not pairs:
            return res
        obj = {}
        for k, v in pairs:
            obj.setdefault(_APA_ALIASES[k.lower()], v)
        notes.append("read key: value pairs from prose (no JSON object)")
    missing = [k for k in APA_KEYS if k not in obj]
    if missing:
        return ParseResult(False, error=f"missing key(s): {', '.join(missing)}", notes=notes)
    value: dict[str, int] = {}
    for k in APA_KEYS:
        try:
            value[k] = _score(obj[k])
        except ValueError as exc:
            return ParseResult(False, error=f"{k}: {exc}", notes=notes)
        if isinstance(obj[k], float) and not float(obj[k]).is_integer():
            notes.append(f"rounded {k} {obj[k]} -> {value[k]}")
    return ParseResult(True, value=value, notes=notes)


def parse_mdd(text: str) -> ParseResult:
    """Read ``{"word_transcript": str, "phoneme_transcript": str}``.

    A list of phones/words is joined with spaces. Both keys are required; the strings are
    returned stripped but otherwise as written (metrics normalise case and stress).
    """
    res = extract_object(text)
    if not res.ok:
        return res
    obj = _canonical_keys(res.value or {}, _MDD_ALIASES)
    missing = [k for k in MDD_KEYS if k not in obj]
    if missing:
        return ParseResult(False, error=f"missing key(s): {', '.join(missing)}", notes=res.notes)
    value: dict[str, str] = {}
    for k in MDD_KEYS:
        v = obj[k]
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            v = " ".join(v)
        if not isinstance(v, str):
            return ParseResult(False, error=f"{k} is {type(v).__name__}, not text", notes=res.notes)
        value[k] = " ".join(v.split())
    return ParseResult(True, value=value, notes=res.notes)


def parse_text(text: str) -> ParseResult:
    """Free-text answers (manifest tasks): chat tokens removed, whitespace collapsed."""
    if not isinstance(text, str):
        return ParseResult(False, error=f"answer is {type(text).__name__}, not text")
    return ParseResult(True, value={"text": " ".join(clean_answer(text).split())})


def parse_for_task(task: str, text: str) -> ParseResult:
    """Dispatch on the record's task name: apa, mdd, anything else is free text."""
    if task == "apa":
        return parse_apa(text)
    if task == "mdd":
        return parse_mdd(text)
    return parse_text(text)
