"""Mispronunciation detection and diagnosis (MDD) scoring, as the MDD literature defines it.

Three phone sequences describe an utterance: the *canonical* phones (what the text says),
the *annotated* phones (what the annotators heard) and the *recognised* phones (the model's
transcript). Every canonical phone is one scored unit:

==========================  =======================  ===========================
                            recognised == canonical  recognised != canonical
==========================  =======================  ===========================
annotated == canonical      TA (true acceptance)     FR (false rejection)
annotated != canonical      FA (false acceptance)    TR (true rejection)
==========================  =======================  ===========================

TR splits into CD (correct diagnosis: recognised == annotated) and DE (diagnosis error).
Precision = TR / (TR + FR), recall = TR / (TR + FA), F1 their harmonic mean (the standard
definition used for L2-ARCTIC and Speechocean762, e.g. Li et al. 2016; Ahn & Nam 2025
Table 3). ``docs/metrics.md`` works through every rule by hand.

How the three sequences are put side by side:

* **Canonical -> annotated comes from the dataset, not from an alignment.** Speechocean762
  gives each mispronunciation's phone index within its word, so the data layer hands over
  one annotated entry per canonical phone (``annotated_at``, see
  :func:`annotation_from_positions`): the phone itself, ``""`` for a deletion, or several
  phones when the annotators heard extra sounds next to it. Only records without that list
  (old prediction files, other sources) fall back to aligning the annotated transcript,
  and the results say so (``annotation``: ``"dataset indices"`` or ``"aligned"``).
* **Only the recognised phones are aligned** to the canonical ones, by
  :func:`align_sequences` (minimum edit distance, with a documented tie-break).

Rules (each one a hand-worked test in tests/test_eval_mdd.py):

* A deleted phone (``None``) is "not the canonical phone": missing from the recognition it
  is a rejection, missing from the annotation a mispronunciation. An annotated and a
  recognised deletion at the same position is a correct diagnosis.
* ``<unk>`` never equals a canonical phone: annotated ``<unk>`` is a mispronunciation,
  recognised ``<unk>`` a rejection; ``<unk>`` against ``<unk>`` is a correct diagnosis.
* **Standard (the default, the headline):** insertions, annotated or recognised, are not
  scored; only canonical phones are units.
* **Insertion-aware variant** (``count_insertions=True``, reported beside the standard one
  as ``mdd_insertion_aware``): additionally, every *gap* between canonical phones (before
  the first, between two, after the last) where either side inserted something is one
  extra unit whose canonical content is "nothing". Annotated and recognised insertion ->
  TR (CD when the inserted phones are identical, else DE); annotated only -> FA (missed);
  recognised only -> FR (false alarm). Gaps where neither inserts are not units.
* **An unparseable answer (``recognised=None``) is a total failure**, never an empty
  transcript (an empty transcript rejects every phone, so it would "find" every
  mispronunciation): each correctly pronounced canonical phone is FR, each mispronounced
  one FA (and each annotated insertion gap FA in the insertion-aware variant). TR and TA
  are 0, so such an answer can only lower precision and recall.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

UNK = "<unk>"

#: Tokens that are not phones (word separators a model may emit).
_NOT_PHONE = re.compile(r"^[^A-Za-z<>]+$")


def normalize_phones(phones: str | Iterable[str] | None) -> list[str]:
    """ARPAbet tokens upper-cased with stress digits stripped; ``<unk>`` kept as is.

    Accepts a space-separated string or a list; separator tokens such as ``|`` or ``,``
    are dropped, so a model that marks word boundaries is not charged for them.
    """
    if phones is None:
        return []
    tokens = phones.split() if isinstance(phones, str) else [t for p in phones for t in str(p).split()]
    out: list[str] = []
    for tok in tokens:
        if tok.lower() in (UNK, "<unk>", "[unk]", "<spn>"):
            out.append(UNK)
            continue
        if _NOT_PHONE.match(tok):
            continue
        tok = re.sub(r"[^A-Za-z<>]", "", tok).upper()
        if tok:
            out.append(tok)
    return out


def _eq(a: str | None, b: str | None) -> bool:
    """Phone equality for scoring: ``<unk>`` and deletions never equal a phone."""
    return a is not None and b is not None and a == b and a != UNK


#: Alignment cost weights: the number of edits first, then the number of deletions +
#: insertions (fewer = more phones paired), then vowel<->consonant pairings. The weights
#: keep that order strict for any sequence shorter than a million phones.
_EDIT = 1 << 42
_INDEL = _EDIT + (1 << 21)


def _is_vowel(phone: str) -> bool:
    return phone[:1] in "AEIOU"


def _sub_cost(a: str, b: str) -> int:
    """0 for a hit; else one edit plus 1 when a vowel is paired with a consonant."""
    if _eq(a, b):
        return 0
    if UNK in (a, b):
        return _EDIT
    return _EDIT + (_is_vowel(a) != _is_vowel(b))


def align_sequences(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[int | None, int | None]]:
    """Levenshtein alignment as (ref index, hyp index) pairs; ``None`` marks a gap.

    The number of edits is minimal (it equals jiwer's S+D+I). Where several alignments
    have that minimum, the tie is broken deterministically, in this order:

    1. fewest deletions + insertions, i.e. as many recognised phones as possible paired
       with a canonical phone: canonical ``K W AY AH T`` against ``K AY AH AH T`` is
       "W->AY, AY->AH" (two substitutions), not "W deleted, AH inserted";
    2. fewest vowel<->consonant pairings: ``K AE T`` against ``K AH`` pairs AE with AH
       and deletes T (not T->AH with AE deleted);
    3. what is still tied is decided walking back from the end of both sequences,
       preferring a pair (match or substitution), then a deletion, then an insertion; so
       a recognised phone that could pair with either of two equal canonical phones
       pairs with the later one (``B EY B IY`` against ``B IY``: the second B).

    ``<unk>`` never matches, not even ``<unk>``, so an unclear phone is never a hit.
    """
    n, m = len(ref), len(hyp)
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        d[i][0] = i * _INDEL
    for j in range(1, m + 1):
        d[0][j] = j * _INDEL
    for i in range(1, n + 1):
        ri, row, prev = ref[i - 1], d[i], d[i - 1]
        costs = [_sub_cost(ri, h) for h in hyp]  # one call per cell would dominate the run time
        left = row[0]
        for j in range(1, m + 1):
            diag, up = prev[j - 1] + costs[j - 1], prev[j] + _INDEL
            left = left + _INDEL
            if diag < left:
                left = diag
            if up < left:
                left = up
            row[j] = left
    pairs: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and d[i][j] == d[i - 1][j - 1] + _sub_cost(ref[i - 1], hyp[j - 1]):
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif i > 0 and d[i][j] == d[i - 1][j] + _INDEL:
            pairs.append((i - 1, None))
            i -= 1
        else:
            pairs.append((None, j - 1))
            j -= 1
    pairs.reverse()
    return pairs


def edit_counts(ref: Sequence[str], hyp: Sequence[str]) -> dict[str, int]:
    """Hits, substitutions, deletions and insertions of the alignment."""
    c = {"hits": 0, "substitutions": 0, "deletions": 0, "insertions": 0}
    for i, j in align_sequences(ref, hyp):
        if i is None:
            c["insertions"] += 1
        elif j is None:
            c["deletions"] += 1
        elif _eq(ref[i], hyp[j]):
            c["hits"] += 1
        else:
            c["substitutions"] += 1
    return c


@dataclass
class Anchored:
    """A sequence laid onto canonical positions.

    ``at[i]`` is the phone at canonical position ``i`` (``None``: deleted); ``inserted[g]``
    the phones inserted in gap ``g`` (before canonical position ``g``; ``g == len`` is the
    end).
    """

    at: list[str | None]
    inserted: dict[int, list[str]]


def anchor(canonical: Sequence[str], other: Sequence[str]) -> Anchored:
    """Align ``other`` to ``canonical`` and index it by canonical position."""
    at: list[str | None] = [None] * len(canonical)
    inserted: dict[int, list[str]] = {}
    gap = 0
    for i, j in align_sequences(canonical, other):
        if i is None:
            assert j is not None
            inserted.setdefault(gap, []).append(other[j])
        else:
            at[i] = other[j] if j is not None else None
            gap = i + 1
    return Anchored(at, inserted)


def annotation_from_positions(canonical: Sequence[str], annotated_at: Sequence[str | None]) -> Anchored:
    """The annotation laid onto canonical positions straight from the dataset's indices.

    ``annotated_at[i]`` is what the annotators heard for canonical phone ``i``: the
    canonical phone itself (correct), another phone (substitution), ``""``/``None``
    (deletion) or several space-separated phones (extra sounds next to it). For several
    phones: when the canonical phone is among them, it is the phone at the position and
    the phones before/after it are insertions before/after it; otherwise the first phone
    is the substitute and the rest are inserted after it.
    """
    if len(annotated_at) != len(canonical):
        raise ValueError(f"{len(annotated_at)} annotated entries for {len(canonical)} canonical phones")
    at: list[str | None] = []
    inserted: dict[int, list[str]] = {}
    for i, (c, entry) in enumerate(zip(canonical, annotated_at, strict=True)):
        phones = normalize_phones(entry or "")
        if not phones:
            at.append(None)
            continue
        k = next((n for n, ph in enumerate(phones) if _eq(ph, c)), 0)
        at.append(phones[k])
        if phones[:k]:
            inserted.setdefault(i, []).extend(phones[:k])
        if phones[k + 1:]:
            inserted.setdefault(i + 1, []).extend(phones[k + 1:])
    return Anchored(at, inserted)


@dataclass
class MDDCounts:
    """The confusion counts; add them up over utterances for corpus-level scores."""

    ta: int = 0
    fr: int = 0
    fa: int = 0
    tr: int = 0
    cd: int = 0
    de: int = 0

    def __add__(self, other: MDDCounts) -> MDDCounts:
        return MDDCounts(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def scores(self) -> dict[str, float]:
        """Precision, recall, F1 and diagnosis accuracy (CD / TR); NaN where undefined."""
        p = self.tr / (self.tr + self.fr) if self.tr + self.fr else math.nan
        r = self.tr / (self.tr + self.fa) if self.tr + self.fa else math.nan
        if math.isnan(p) or math.isnan(r):
            f1 = math.nan
        else:
            f1 = 2 * p * r / (p + r) if p + r else 0.0
        da = self.cd / self.tr if self.tr else math.nan
        return {"precision": p, "recall": r, "f1": f1, "diagnosis_accuracy": da}


@dataclass
class PhoneEvent:
    """One scored unit: a canonical position, or an insertion gap (``canonical`` None)."""

    position: int
    canonical: str | None
    annotated: str | None
    recognised: str | None
    outcome: str  # "TA", "FR", "FA", "TR-CD", "TR-DE"
    gap: bool = False


@dataclass
class UtteranceMDD:
    """Per-utterance diagnostics: counts plus the scored units that were not TA."""

    counts: MDDCounts
    events: list[PhoneEvent] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": asdict(self.counts), "events": [asdict(e) for e in self.events]}


def _classify(correct: bool, accepted: bool, diagnosed: bool) -> str:
    if correct:
        return "TA" if accepted else "FR"
    if accepted:
        return "FA"
    return "TR-CD" if diagnosed else "TR-DE"


def _tally(counts: MDDCounts, outcome: str) -> None:
    if outcome == "TA":
        counts.ta += 1
    elif outcome == "FR":
        counts.fr += 1
    elif outcome == "FA":
        counts.fa += 1
    else:
        counts.tr += 1
        if outcome == "TR-CD":
            counts.cd += 1
        else:
            counts.de += 1


def _total_failure(can: list[str], ann: Anchored, count_insertions: bool) -> UtteranceMDD:
    """An unparseable answer: every judgement wrong (correct phones FR, mispronounced FA)."""
    result = UtteranceMDD(MDDCounts())
    for i, c in enumerate(can):
        outcome = "FR" if _eq(ann.at[i], c) else "FA"
        _tally(result.counts, outcome)
        result.events.append(PhoneEvent(i, c, ann.at[i], None, outcome))
    if count_insertions:
        for g in sorted(ann.inserted):
            _tally(result.counts, "FA")
            result.events.append(PhoneEvent(g, None, " ".join(ann.inserted[g]), None, "FA", gap=True))
    return result


def score_utterance(
    canonical: str | Sequence[str],
    annotated: str | Sequence[str] | None,
    recognised: str | Sequence[str] | None,
    count_insertions: bool = False,
    annotated_at: Sequence[str | None] | None = None,
) -> UtteranceMDD:
    """Score one utterance (rules in the module docstring).

    ``annotated_at`` (one entry per canonical phone, from the dataset's mispronunciation
    indices) is the annotation; without it ``annotated`` (a transcript) is aligned to the
    canonical phones instead. ``recognised=None`` is an unparseable answer: total failure.
    ``count_insertions=False`` is the standard definition, ``True`` the insertion-aware one.
    """
    can = normalize_phones(canonical)
    if annotated_at is not None:
        ann = annotation_from_positions(can, annotated_at)
    else:
        ann = anchor(can, normalize_phones(annotated))
    if recognised is None:
        return _total_failure(can, ann, count_insertions)
    rec = anchor(can, normalize_phones(recognised))
    result = UtteranceMDD(MDDCounts())
    for i, c in enumerate(can):
        a, r = ann.at[i], rec.at[i]
        diagnosed = a == r  # includes both deleted, and both <unk>
        outcome = _classify(_eq(a, c), _eq(r, c), diagnosed)
        _tally(result.counts, outcome)
        if outcome != "TA":
            result.events.append(PhoneEvent(i, c, a, r, outcome))
    if count_insertions:
        for g in sorted(set(ann.inserted) | set(rec.inserted)):
            a_ins, r_ins = ann.inserted.get(g, []), rec.inserted.get(g, [])
            outcome = _classify(not a_ins, not r_ins, a_ins == r_ins)
            _tally(result.counts, outcome)
            result.events.append(
                PhoneEvent(g, None, " ".join(a_ins) or None, " ".join(r_ins) or None, outcome, gap=True)
            )
    return result


MDDItem = tuple[Any, ...]
"""``(canonical, annotated, recognised)`` or ``(canonical, annotated, recognised, annotated_at)``."""


def mdd_scores(items: Iterable[MDDItem], count_insertions: bool = False) -> dict[str, Any]:
    """Corpus-level MDD from per-utterance items: counts summed first, then P/R/F1.

    Each item is ``(canonical, annotated, recognised)`` or, with the dataset's per-phone
    annotation, ``(canonical, annotated, recognised, annotated_at)``; ``recognised=None``
    marks an unparseable answer (total failure).
    """
    total = MDDCounts()
    n = n_unparsed = 0
    for item in items:
        can, ann, rec = item[0], item[1], item[2]
        ann_at = item[3] if len(item) > 3 else None
        total = total + score_utterance(can, ann, rec, count_insertions, ann_at).counts
        n += 1
        n_unparsed += rec is None
    out: dict[str, Any] = dict(total.scores())
    out["counts"] = asdict(total)
    out["n_utterances"] = n
    out["n_unparseable"] = n_unparsed
    out["definition"] = "insertion-aware" if count_insertions else "standard"
    if total.tr + total.fa == 0:
        out["note"] = "no annotated mispronunciations: recall/F1 undefined"
    elif total.tr + total.fr == 0:
        out["note"] = "model rejected nothing: precision/F1 undefined"
    return out
