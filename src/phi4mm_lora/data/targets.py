"""The assistant answers the model is trained to produce, exactly as in the paper.

APA: ``{"accuracy": a, "fluency": f, "prosodic": p, "total": t}`` (integers 0-10;
completeness is left out because every test value is 10, so it teaches nothing).
MDD: ``{"word_transcript": ..., "phoneme_transcript": ...}`` where the phoneme transcript is
what the speaker actually *pronounced*: each word's canonical phones with the annotated
substitutions applied (``mispronunciations[].index`` indexes the word's phone list and
``pronounced-phone`` replaces ``canonical-phone``), stress digits removed, ``<unk>`` kept,
phones and words separated by single spaces.

Special pronounced-phone values (the release's README documents substitutions; copies of
the data are reported to also hold the following, so they are handled explicitly):

* deletion: empty, or one of :data:`DELETION_MARKS` (``<del>``/``<DEL>``, ``-`` ...; case
  ignored): the phone is left out of the transcript;
* distortion: a symbol containing ``*`` (e.g. ``AH*``, "like AH but distorted"): written as
  ``<unk>``, the paper's symbol for an unclear sound, so targets stay within ARPAbet + ``<unk>``;
* ``<unk>`` in any case: kept as ``<unk>``.

Answers are one-line JSON with the key order above.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

#: Pronounced-phone values that mean "this phone was not said at all".
DELETION_MARKS = frozenset({"", "<del>", "<deletion>", "del", "-", "<sil>", "sil"})
UNK = "<unk>"
_STRESS = re.compile(r"(?<=[A-Za-z])[0-9]$")


class RecordError(ValueError):
    """A malformed annotation record; the message says what is wrong with it."""


@dataclass(frozen=True)
class Mispronunciation:
    """One annotated substitution inside a word (``index`` into the word's phones)."""

    index: int
    canonical: str
    pronounced: str


@dataclass
class Word:
    """A word with its canonical phones (stress digits kept, as in the release) and scores."""

    text: str
    phones: list[str]
    phone_scores: list[float] = field(default_factory=list)
    accuracy: float | None = None
    stress: float | None = None
    total: float | None = None
    #: ``None`` when the record has no ``mispronunciations`` key at all.
    mispronunciations: list[Mispronunciation] | None = None


def strip_stress(phone: str) -> str:
    """``AH0`` -> ``AH``; ``<unk>`` and L2 symbols without digits are returned unchanged."""
    return _STRESS.sub("", phone.strip())


def normalise_phone(phone: str) -> str:
    """Stress removed; ``<UNK>``/``<unk>`` spelled ``<unk>``; ARPAbet upper-cased."""
    p = strip_stress(phone)
    if p.lower() == UNK or "*" in p:
        return UNK
    return p if p.startswith("<") else p.upper()


def _num(value: object, what: str) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RecordError(f"{what} is {value!r}, not a number") from None
    if x != x:  # NaN
        raise RecordError(f"{what} is NaN")
    return x


def parse_word(raw: dict, where: str) -> Word:
    """Build a :class:`Word` from a scores.json / hub ``words`` entry, validating indices."""
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: word entry is {type(raw).__name__}, not an object")
    text = str(raw.get("text", "")).strip()
    phones = raw.get("phones")
    if not isinstance(phones, (list, tuple)) or not all(isinstance(p, str) for p in phones):
        raise RecordError(f"{where}: word {text!r} has no phone list")
    phones = [p.strip() for p in phones]
    scores_raw = raw.get("phones-accuracy", raw.get("phones_accuracy")) or []
    phone_scores = [_num(s, f"{where}: phone score") for s in scores_raw]
    mis_raw = raw.get("mispronunciations")
    mis: list[Mispronunciation] | None = None
    if mis_raw is not None:
        mis = []
        for m in mis_raw:
            try:
                idx = int(m["index"])
                canon = str(m.get("canonical-phone", m.get("canonical_phone", "")))
                pron = m.get("pronounced-phone", m.get("pronounced_phone", ""))
            except (KeyError, TypeError, ValueError):
                raise RecordError(f"{where}: word {text!r} has a malformed mispronunciation {m!r}") from None
            if not 0 <= idx < len(phones):
                raise RecordError(
                    f"{where}: word {text!r} mispronunciation index {idx} is outside its "
                    f"{len(phones)} phones"
                )
            if canon and strip_stress(canon).upper() != strip_stress(phones[idx]).upper():
                raise RecordError(
                    f"{where}: word {text!r} mispronunciation says phone {idx} is {canon!r} "
                    f"but the word's phone is {phones[idx]!r}"
                )
            mis.append(Mispronunciation(idx, canon or phones[idx], "" if pron is None else str(pron).strip()))

    def opt(key: str) -> float | None:
        return None if raw.get(key) is None else _num(raw[key], f"{where}: word {key}")

    return Word(text, phones, phone_scores, opt("accuracy"), opt("stress"), opt("total"), mis)


def annotated_by_position(word: Word) -> list[str]:
    """What was heard for each canonical phone, from the mispronunciation indices.

    One entry per canonical phone: the phone itself (no stress), the pronounced phone of a
    substitution, ``""`` for a deletion, or several space-separated phones when the
    annotation gives more than one (extra sounds next to the canonical phone). MDD scoring
    uses this list as the canonical-to-annotated correspondence, so nothing is re-aligned.
    """
    out = [normalise_phone(p) for p in word.phones]
    for m in word.mispronunciations or []:
        if m.pronounced.strip().lower() in DELETION_MARKS:
            out[m.index] = ""
        else:
            out[m.index] = " ".join(normalise_phone(p) for p in m.pronounced.split())
    return out


def pronounced_phones(word: Word) -> list[str]:
    """The word's phones as pronounced: substitutions applied, deletions dropped, no stress."""
    return [p for entry in annotated_by_position(word) for p in entry.split()]


def canonical_phones(word: Word) -> list[str]:
    """The dictionary phones without stress digits (what a perfect speaker says)."""
    return [normalise_phone(p) for p in word.phones]


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def apa_answer(accuracy: float, fluency: float, prosodic: float, total: float) -> str:
    """``{"accuracy": 8, "fluency": 9, "prosodic": 9, "total": 8}`` (integers, halves round up)."""
    vals = {"accuracy": accuracy, "fluency": fluency, "prosodic": prosodic, "total": total}
    return _dumps({k: int(math.floor(_num(v, f"sentence {k}") + 0.5)) for k, v in vals.items()})


def mdd_answer(words: list[Word], text: str = "") -> str:
    """``{"word_transcript": "WE CALL IT BEAR", "phoneme_transcript": "W IY K AO L ..."}``."""
    word_tx = " ".join(w.text for w in words if w.text) or " ".join(text.split())
    phones = [p for w in words for p in pronounced_phones(w)]
    return _dumps({"word_transcript": word_tx, "phoneme_transcript": " ".join(phones)})
