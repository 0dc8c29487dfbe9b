"""Mispronunciation detection and diagnosis (MDD) scoring.

The usual MDD evaluation (Li et al. 2016 and later work on L2-ARCTIC / Speechocean762)
compares three phone sequences for each utterance: the *canonical* phones (what the text
says), the *annotated* phones (what the human annotators heard) and the *recognised*
phones (the model's transcript). Both the annotation and the recognition are aligned to
the canonical sequence with Levenshtein alignment, so every canonical position gets an
annotated phone and a recognised phone (or ``None`` for a deletion):

==========================  =======================  ===========================
                            recognised == canonical  recognised != canonical
==========================  =======================  ===========================
annotated == canonical      TA (true acceptance)     FR (false rejection)
annotated != canonical      FA (false acceptance)    TR (true rejection)
==========================  =======================  ===========================

TR splits into CD (correct diagnosis: recognised == annotated) and DE (diagnosis error).
Precision = TR / (TR + FR), Recall = TR / (TR + FA), F1 their harmonic mean.

Decisions (documented because papers differ here):

* A deleted phone (``None``) is "not the canonical phone": a canonical phone missing from
  the recognition is a rejection; missing from the annotation is a mispronunciation.
  An annotated and a recognised deletion at the same position is a correct diagnosis.
* ``<unk>`` never equals a canonical phone: annotated ``<unk>`` is a mispronunciation,
  recognised ``<unk>`` a rejection. Recognised ``<unk>`` where the annotation says
  ``<unk>`` counts as a correct diagnosis (both say "unclear").
* Insertions (phones between canonical positions) are scored per *gap* between canonical
  phones (including before the first and after the last): a gap where either sequence
  inserts something is one extra unit, whose canonical content is "nothing". Annotated
  insertion + recognised insertion -> TR (CD when the inserted phones are identical, else
  DE); annotated only -> FA (missed); recognised only -> FR (false alarm). Gaps where
  neither inserts are not counted, so TA is not inflated by empty gaps. Pass
  ``count_insertions=False`` to score canonical positions only.
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


#: One edit costs this much; the remainder breaks ties (see :func:`align_sequences`).
_EDIT = 1 << 16


def _is_vowel(phone: str) -> bool:
    return phone[:1] in "AEIOU"


def _sub_cost(a: str, b: str) -> int:
    """0 for a hit; one edit, plus 1 when a vowel replaces a consonant or vice versa."""
    if _eq(a, b):
        return 0
    if UNK in (a, b):
        return _EDIT
    return _EDIT + (_is_vowel(a) != _is_vowel(b))


def align_sequences(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[int | None, int | None]]:
    """Levenshtein alignment as (ref index, hyp index) pairs; ``None`` marks a gap.

    The number of edits is minimal (it equals jiwer's S+D+I). Among alignments with that
    minimum, one with the fewest vowel<->consonant substitutions is chosen, so "K AE T"
    against "K AH" pairs AE with AH and deletes T (not the other way round): this matters
    for MDD, which asks *which* canonical phone was changed. ``<unk>`` never matches, not
    even ``<unk>``, so an unclear phone is never a hit.
    """
    n, m = len(ref), len(hyp)
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        d[i][0] = i * _EDIT
    for j in range(1, m + 1):
        d[0][j] = j * _EDIT
    for i in range(1, n + 1):
        ri, row, prev = ref[i - 1], d[i], d[i - 1]
        costs = [_sub_cost(ri, h) for h in hyp]  # one call per cell would dominate the run time
        left = row[0]
        for j in range(1, m + 1):
            diag, up = prev[j - 1] + costs[j - 1], prev[j] + _EDIT
            left = left + _EDIT
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
        elif i > 0 and d[i][j] == d[i - 1][j] + _EDIT:
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


def score_utterance(
    canonical: str | Sequence[str],
    annotated: str | Sequence[str],
    recognised: str | Sequence[str] | None,
    count_insertions: bool = True,
) -> UtteranceMDD:
    """Three-way alignment of one utterance (see module docstring for the rules).

    ``recognised=None`` (an unparseable answer) is scored as an empty transcript: every
    canonical phone is rejected.
    """
    can = normalize_phones(canonical)
    ann = anchor(can, normalize_phones(annotated))
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


def mdd_scores(
    items: Iterable[tuple[str | Sequence[str], str | Sequence[str], str | Sequence[str] | None]],
    count_insertions: bool = True,
) -> dict[str, Any]:
    """Corpus-level MDD from (canonical, annotated, recognised) triples: counts summed first."""
    total = MDDCounts()
    n = 0
    for can, ann, rec in items:
        total = total + score_utterance(can, ann, rec, count_insertions).counts
        n += 1
    out: dict[str, Any] = dict(total.scores())
    out["counts"] = asdict(total)
    out["n_utterances"] = n
    if total.tr + total.fa == 0:
        out["note"] = "no annotated mispronunciations: recall/F1 undefined"
    elif total.tr + total.fr == 0:
        out["note"] = "model rejected nothing: precision/F1 undefined"
    return out
