"""MDD precision/recall/F1 on hand-worked cases.

Notation per canonical position: c = canonical, a = annotated, r = recognised.
TA: a==c, r==c   FR: a==c, r!=c   FA: a!=c, r==c   TR: a!=c, r!=c (CD if r==a, else DE).
P = TR/(TR+FR), R = TR/(TR+FA).
"""

from __future__ import annotations

import math
import random

import jiwer
import pytest

from phi4mm_lora.evaluate.mdd import (
    MDDCounts,
    align_sequences,
    anchor,
    edit_counts,
    mdd_scores,
    normalize_phones,
    score_utterance,
)


def counts(can: str, ann: str, rec: str | None, **kw: bool) -> dict[str, int]:
    c = score_utterance(can, ann, rec, **kw).counts
    return {"ta": c.ta, "fr": c.fr, "fa": c.fa, "tr": c.tr, "cd": c.cd, "de": c.de}


def test_substitution_correctly_diagnosed() -> None:
    # c: K AE T / a: K AH T / r: K AH T
    # K: TA; AE: a=AH!=c, r=AH!=c -> TR, r==a -> CD; T: TA.  P = 1/1, R = 1/1.
    assert counts("K AE T", "K AH T", "K AH T") == {"ta": 2, "fr": 0, "fa": 0, "tr": 1, "cd": 1, "de": 0}
    s = MDDCounts(ta=2, tr=1, cd=1).scores()
    assert s["precision"] == 1.0 and s["recall"] == 1.0 and s["f1"] == 1.0


def test_substitution_wrong_diagnosis() -> None:
    # AE annotated as AH, recognised as EH: both reject it, but the diagnosis differs -> TR-DE.
    assert counts("K AE T", "K AH T", "K EH T") == {"ta": 2, "fr": 0, "fa": 0, "tr": 1, "cd": 0, "de": 1}


def test_missed_error_and_false_rejection() -> None:
    # c: DH IH S / a: D IH S / r: DH IY S
    # DH: a=D (mispronounced), r=DH (accepted) -> FA
    # IH: a=IH (correct),      r=IY (rejected) -> FR
    # S: TA.  TR = 0 -> P = 0/(0+1) = 0, R = 0/(0+1) = 0, F1 = 0 (p + r == 0).
    assert counts("DH IH S", "D IH S", "DH IY S") == {"ta": 1, "fr": 1, "fa": 1, "tr": 0, "cd": 0, "de": 0}
    s = MDDCounts(ta=1, fr=1, fa=1).scores()
    assert s["precision"] == 0.0 and s["recall"] == 0.0 and s["f1"] == 0.0


def test_annotated_deletion_detected() -> None:
    # c: S T AA P / a: S AA P (T deleted) / r: S AA P
    # alignment c-a: S=S, T=<del>, AA=AA, P=P (cost 1, unique).
    # T: a=None (mispronounced), r=None (rejected) -> TR, both deleted -> CD.  TA = 3.
    assert counts("S T AA P", "S AA P", "S AA P") == {"ta": 3, "fr": 0, "fa": 0, "tr": 1, "cd": 1, "de": 0}


def test_recognition_deletes_a_correct_phone() -> None:
    # c = a = S T AA P; r: S AA P -> T is "not the canonical phone" -> FR.
    # TR = 0, FR = 1 -> P = 0; TR + FA = 0 -> R undefined (NaN), F1 NaN.
    assert counts("S T AA P", "S T AA P", "S AA P") == {"ta": 3, "fr": 1, "fa": 0, "tr": 0, "cd": 0, "de": 0}
    s = MDDCounts(ta=3, fr=1).scores()
    assert s["precision"] == 0.0 and math.isnan(s["recall"]) and math.isnan(s["f1"])


def test_annotated_substitution_recognised_as_deletion() -> None:
    # c: AE / a: AH / r: (nothing) -> a!=c, r=None!=c -> TR; r != a -> DE.
    assert counts("AE", "AH", "") == {"ta": 0, "fr": 0, "fa": 0, "tr": 1, "cd": 0, "de": 1}


def test_unk() -> None:
    # c: B IH G / a: B <unk> G
    # r: B IH G    -> IH: a=<unk> is a mispronunciation, r==c accepted -> FA
    assert counts("B IH G", "B <unk> G", "B IH G") == {"ta": 2, "fr": 0, "fa": 1, "tr": 0, "cd": 0, "de": 0}
    # r: B <unk> G -> TR, and r == a (both unclear) -> CD
    assert counts("B IH G", "B <unk> G", "B <unk> G") == {
        "ta": 2,
        "fr": 0,
        "fa": 0,
        "tr": 1,
        "cd": 1,
        "de": 0,
    }
    # a = c, r: B <unk> G -> <unk> never equals the canonical phone -> FR
    assert counts("B IH G", "B IH G", "B <UNK> G") == {"ta": 2, "fr": 1, "fa": 0, "tr": 0, "cd": 0, "de": 0}


def test_insertions_scored_per_gap() -> None:
    # Insertion-aware variant: the gap after T (gap 3) is one extra unit when either side inserts.
    ins = {"count_insertions": True}
    # a inserts S, r inserts S -> TR-CD
    assert counts("K AE T", "K AE T S", "K AE T S", **ins) == {"ta": 3, "fr": 0, "fa": 0, "tr": 1, "cd": 1, "de": 0}
    # a inserts S, r inserts Z -> TR-DE
    assert counts("K AE T", "K AE T S", "K AE T Z", **ins) == {"ta": 3, "fr": 0, "fa": 0, "tr": 1, "cd": 0, "de": 1}
    # a inserts S, r does not -> FA (missed insertion)
    assert counts("K AE T", "K AE T S", "K AE T", **ins) == {"ta": 3, "fr": 0, "fa": 1, "tr": 0, "cd": 0, "de": 0}
    # a has none, r inserts Z -> FR (false alarm)
    assert counts("K AE T", "K AE T", "K AE T Z", **ins) == {"ta": 3, "fr": 1, "fa": 0, "tr": 0, "cd": 0, "de": 0}
    # the standard definition (the default) scores canonical positions only
    assert counts("K AE T", "K AE T", "K AE T Z")["fr"] == 0
    assert counts("K AE T", "K AE T S", "K AE T") == {"ta": 3, "fr": 0, "fa": 0, "tr": 0, "cd": 0, "de": 0}
    # gaps where nobody inserts are not units (TA stays at 3)
    assert counts("K AE T", "K AE T", "K AE T", **ins)["ta"] == 3


def test_unparseable_answer_is_a_total_failure() -> None:
    # r = None: every judgement wrong. c = a = K AE T -> 3 FR; an annotated error is FA (missed),
    # never TR (an empty transcript would have "found" it).
    assert counts("K AE T", "K AE T", None)["fr"] == 3
    assert counts("K AE T", "K AH T", None) == {"ta": 0, "fr": 2, "fa": 1, "tr": 0, "cd": 0, "de": 0}
    assert counts("K AE T", "K AH T", "") == {"ta": 0, "fr": 2, "fa": 0, "tr": 1, "cd": 0, "de": 1}


def test_corpus_scores_sum_counts_first() -> None:
    # Cases 1 + 3 + "missed/false rejection":
    #   K AE T:   TA 2, TR 1 (CD)
    #   DH IH S:  TA 1, FR 1, FA 1
    #   S T AA P: TA 3, TR 1 (CD)
    # total TA 6, FR 1, FA 1, TR 2 -> P = 2/3, R = 2/3, F1 = 2/3.
    out = mdd_scores(
        [
            ("K AE T", "K AH T", "K AH T"),
            ("DH IH S", "D IH S", "DH IY S"),
            ("S T AA P", "S AA P", "S AA P"),
        ]
    )
    assert out["counts"] == {"ta": 6, "fr": 1, "fa": 1, "tr": 2, "cd": 2, "de": 0}
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["diagnosis_accuracy"] == 1.0
    assert out["n_utterances"] == 3


def test_normalize_phones_strips_stress_and_separators() -> None:
    assert normalize_phones("dh ah0 K AE1 T | <UNK> ,") == ["DH", "AH", "K", "AE", "T", "<unk>"]
    assert normalize_phones(["HH AH0", "L OW1"]) == ["HH", "AH", "L", "OW"]
    assert normalize_phones(None) == []


def test_anchor_places_insertions_in_gaps() -> None:
    a = anchor(["K", "AE", "T"], ["S", "K", "AE", "T", "S"])
    assert a.at == ["K", "AE", "T"]
    assert a.inserted == {0: ["S"], 3: ["S"]}


def test_per_utterance_events() -> None:
    u = score_utterance("K AE T", "K AH T", "K EH T")
    assert [(e.position, e.canonical, e.annotated, e.recognised, e.outcome) for e in u.events] == [
        (1, "AE", "AH", "EH", "TR-DE")
    ]
    assert u.to_dict()["counts"]["de"] == 1


@pytest.mark.parametrize("seed", range(8))
def test_alignment_cost_equals_jiwer(seed: int) -> None:
    """The Levenshtein aligner used for MDD finds the same edit distance as jiwer."""
    rng = random.Random(seed)
    phones = "AA AE AH B D EH F G IY K L M N P R S T UW".split()
    for _ in range(25):
        ref = [rng.choice(phones) for _ in range(rng.randint(1, 12))]
        hyp = [rng.choice(phones) for _ in range(rng.randint(0, 12))]
        c = edit_counts(ref, hyp)
        j = jiwer.process_words(" ".join(ref), " ".join(hyp))
        assert c["substitutions"] + c["deletions"] + c["insertions"] == (
            j.substitutions + j.deletions + j.insertions
        )
        assert c["hits"] + c["substitutions"] + c["deletions"] == len(ref)
        pairs = align_sequences(ref, hyp)
        assert [i for i, _ in pairs if i is not None] == list(range(len(ref)))
        assert [j for _, j in pairs if j is not None] == list(range(len(hyp)))


def test_alignment_prefers_vowel_for_vowel() -> None:
    # Both alignments of "K AE T" vs "K AH" cost 2 edits; the one pairing AE with AH
    # (vowel for vowel) and deleting T is chosen, in either direction of the tie.
    assert anchor(["K", "AE", "T"], ["K", "AH"]).at == ["K", "AH", None]
    assert anchor(["K", "AE", "T"], ["AH", "T"]).at == [None, "AH", "T"]
    # so the annotated substitution AE->AH is diagnosed at AE: c K AE T / a K AH T / r K AH
    # K: TA; AE: TR-CD; T: a=T (correct), r deleted -> FR.
    assert counts("K AE T", "K AH T", "K AH") == {"ta": 1, "fr": 1, "fa": 0, "tr": 1, "cd": 1, "de": 0}


# ----------------------------------------------------------------------------- hand-worked rules
#
# One case per rule, worked out by hand from the definition (docs/metrics.md repeats them).
# The annotation comes as the dataset gives it: one entry per canonical phone (``at``),
# built from Speechocean762's mispronunciation indices; "" is a deletion, "X Y" means the
# annotators heard X and an extra Y. Each case lists the standard figures (canonical phones
# only: the headline) and the insertion-aware ones.

NAN = float("nan")


def figures(can: str, at: list[str], rec: str | None, ins: bool) -> tuple[dict[str, int], tuple[float, float, float]]:
    ann = " ".join(" ".join(a.split()) for a in at if a)
    u = score_utterance(can, ann, rec, count_insertions=ins, annotated_at=at)
    c = u.counts
    s = c.scores()
    return ({"ta": c.ta, "fr": c.fr, "fa": c.fa, "tr": c.tr, "cd": c.cd, "de": c.de},
            (s["precision"], s["recall"], s["f1"]))


def check(got: tuple[float, float, float], want: tuple[float, float, float]) -> None:
    for g, w in zip(got, want, strict=True):
        if math.isnan(w):
            assert math.isnan(g), got
        else:
            assert g == pytest.approx(w), got


@pytest.mark.parametrize("ins", [False, True])
def test_rule_substitution(ins: bool) -> None:
    # SEVEN: c S EH V AH N, annotated V->W; recognised S IH W AH N.
    # S TA; EH: a=EH correct, r=IH -> FR; V: a=W, r=W -> TR-CD; AH TA; N TA.
    # TA 3, FR 1, TR 1 (CD 1): P = 1/(1+1) = 1/2, R = 1/(1+0) = 1, F1 = 2/3. No insertions: same both ways.
    c, f = figures("S EH V AH N", ["S", "EH", "W", "AH", "N"], "S IH W AH N", ins)
    assert c == {"ta": 3, "fr": 1, "fa": 0, "tr": 1, "cd": 1, "de": 0}
    check(f, (1 / 2, 1.0, 2 / 3))


@pytest.mark.parametrize("ins", [False, True])
def test_rule_deletion(ins: bool) -> None:
    # STOP: c S T AA P, annotated T deleted ("" at index 1).
    # recognised S AA P: T: a deleted, r deleted -> TR-CD. TA 3, TR 1: P = R = F1 = 1.
    c, f = figures("S T AA P", ["S", "", "AA", "P"], "S AA P", ins)
    assert c == {"ta": 3, "fr": 0, "fa": 0, "tr": 1, "cd": 1, "de": 0}
    check(f, (1.0, 1.0, 1.0))
    # recognised S T AA: T: a deleted, r=T -> FA; P: a=P, r deleted -> FR.
    # TA 2, FR 1, FA 1: P = 0/(0+1) = 0, R = 0/(0+1) = 0, F1 = 0.
    c, f = figures("S T AA P", ["S", "", "AA", "P"], "S T AA", ins)
    assert c == {"ta": 2, "fr": 1, "fa": 1, "tr": 0, "cd": 0, "de": 0}
    check(f, (0.0, 0.0, 0.0))


def test_rule_annotated_insertion() -> None:
    # STOP said "S AH T AA B": at index 0 the annotators heard "S AH" (S, then an extra AH),
    # at index 3 P->B. Recognised S T AA B (the extra AH missed).
    at = ["S AH", "T", "AA", "B"]
    # standard: S, T, AA TA; P: a=B, r=B -> TR-CD. TA 3, TR 1: P = R = F1 = 1.
    c, f = figures("S T AA P", at, "S T AA B", False)
    assert c == {"ta": 3, "fr": 0, "fa": 0, "tr": 1, "cd": 1, "de": 0}
    check(f, (1.0, 1.0, 1.0))
    # insertion-aware: + gap 1 (after S): annotated [AH], recognised nothing -> FA.
    # TA 3, FA 1, TR 1: P = 1/1 = 1, R = 1/(1+1) = 1/2, F1 = 2/3.
    c, f = figures("S T AA P", at, "S T AA B", True)
    assert c == {"ta": 3, "fr": 0, "fa": 1, "tr": 1, "cd": 1, "de": 0}
    check(f, (1.0, 1 / 2, 2 / 3))
    # recognised S AH T AA B: the gap is TR-CD too -> TR 2: P = R = F1 = 1.
    c, f = figures("S T AA P", at, "S AH T AA B", True)
    assert c == {"ta": 3, "fr": 0, "fa": 0, "tr": 2, "cd": 2, "de": 0}


def test_rule_recognised_insertion() -> None:
    # STOP with P->B annotated, nothing inserted; recognised S AH T AA B.
    # Recognised alignment: S=S, AH inserted, T=T, AA=AA, P~B (2 edits, the only minimum).
    at = ["S", "T", "AA", "B"]
    # standard: the insertion is not a unit. TA 3, TR 1 (CD): P = R = F1 = 1.
    c, f = figures("S T AA P", at, "S AH T AA B", False)
    assert c == {"ta": 3, "fr": 0, "fa": 0, "tr": 1, "cd": 1, "de": 0}
    check(f, (1.0, 1.0, 1.0))
    # insertion-aware: gap 1 annotated nothing, recognised [AH] -> FR.
    # TA 3, FR 1, TR 1: P = 1/2, R = 1, F1 = 2/3.
    c, f = figures("S T AA P", at, "S AH T AA B", True)
    assert c == {"ta": 3, "fr": 1, "fa": 0, "tr": 1, "cd": 1, "de": 0}
    check(f, (1 / 2, 1.0, 2 / 3))


@pytest.mark.parametrize("ins", [False, True])
def test_rule_unk(ins: bool) -> None:
    # SHOP: c SH AA P, annotated P-><unk>.
    at = ["SH", "AA", "<unk>"]
    # recognised SH AA P: P: a=<unk> (mispronounced), r=P -> FA. TA 2, FA 1:
    # P = 0/0 undefined, R = 0/(0+1) = 0, F1 undefined.
    c, f = figures("SH AA P", at, "SH AA P", ins)
    assert c == {"ta": 2, "fr": 0, "fa": 1, "tr": 0, "cd": 0, "de": 0}
    check(f, (NAN, 0.0, NAN))
    # recognised SH <unk> <unk>: AA: a correct, r=<unk> (never the canonical phone) -> FR;
    # P: a=<unk>, r=<unk> -> TR-CD. TA 1, FR 1, TR 1: P = 1/2, R = 1, F1 = 2/3.
    c, f = figures("SH AA P", at, "SH <unk> <unk>", ins)
    assert c == {"ta": 1, "fr": 1, "fa": 0, "tr": 1, "cd": 1, "de": 0}
    check(f, (1 / 2, 1.0, 2 / 3))


@pytest.mark.parametrize("ins", [False, True])
def test_rule_two_substitutions_in_one_word(ins: bool) -> None:
    # QUIET: c K W AY AH T, annotated W->AY (index 1) and AY->AH (index 2), so what was heard
    # is K AY AH AH T. Recognised K AY AY AH T: one substitution W~AY (the only 1-edit alignment).
    # K TA; W: a=AY, r=AY -> TR-CD; AY: a=AH, r=AY (= canonical) -> FA; AH TA; T TA.
    # TA 3, FA 1, TR 1: P = 1/1 = 1, R = 1/(1+1) = 1/2, F1 = 2/3.
    at = ["K", "AY", "AH", "AH", "T"]
    c, f = figures("K W AY AH T", at, "K AY AY AH T", ins)
    assert c == {"ta": 3, "fr": 0, "fa": 1, "tr": 1, "cd": 1, "de": 0}
    check(f, (1.0, 1 / 2, 2 / 3))


def test_annotation_is_taken_from_indices_not_realigned() -> None:
    # QUIET again, recognised K AY AH AH T (what was heard). The recognition is aligned:
    # "W~AY, AY~AH" (2 edits, both paired) beats "W deleted, AH inserted" (2 edits, 2 unpaired).
    # W: a=AY, r=AY -> TR-CD; AY: a=AH, r=AH -> TR-CD; K, AH, T TA. TA 3, TR 2: P = R = F1 = 1.
    at = ["K", "AY", "AH", "AH", "T"]
    c, f = figures("K W AY AH T", at, "K AY AH AH T", False)
    assert c == {"ta": 3, "fr": 0, "fa": 0, "tr": 2, "cd": 2, "de": 0}
    check(f, (1.0, 1.0, 1.0))
    # From the indices, the annotation says AY (index 2) was said as AH, whatever an
    # alignment would make of the transcript. Recognised K AY AY AH T then misses it (FA),
    # as in test_rule_two_substitutions_in_one_word; an annotation read as "AY correct"
    # would have called it TA.
    c, _ = figures("K W AY AH T", at, "K AY AY AH T", False)
    assert c["fa"] == 1 and c["ta"] == 3


def test_rule_equal_cost_ties() -> None:
    # 1. Vowel for vowel: c K AE T, annotated AE->AH; recognised K AH. "AE~AH, T deleted" and
    #    "AE deleted, T~AH" both cost 2 edits with 1 substitution; the vowel pairing wins.
    #    K TA; AE: a=AH, r=AH -> TR-CD; T: a=T, r deleted -> FR. TA 1, FR 1, TR 1:
    #    P = 1/2, R = 1, F1 = 2/3 (both definitions: no insertions).
    for ins in (False, True):
        c, f = figures("K AE T", ["K", "AH", "T"], "K AH", ins)
        assert c == {"ta": 1, "fr": 1, "fa": 0, "tr": 1, "cd": 1, "de": 0}
        check(f, (1 / 2, 1.0, 2 / 3))
    # 2. Most pairs: c S T, annotated S->Z; recognised T Z. "S~T, T~Z" (2 substitutions) and
    #    "S deleted, T=T, Z inserted" both cost 2 edits; the one pairing every phone wins.
    #    S: a=Z, r=T -> TR-DE; T: a=T, r=Z -> FR. TA 0, FR 1, TR 1: P = 1/2, R = 1, F1 = 2/3
    #    (both definitions: nothing inserted).
    for ins in (False, True):
        c, f = figures("S T", ["Z", "T"], "T Z", ins)
        assert c == {"ta": 0, "fr": 1, "fa": 0, "tr": 1, "cd": 0, "de": 1}
        check(f, (1 / 2, 1.0, 2 / 3))
    # 3. Still tied: walking back from the end, a pair beats a deletion, so the recognised B
    #    pairs with the later B. c B EY B IY, annotated second B->P; recognised B IY.
    #    B1: a=B, r deleted -> FR; EY: a=EY, r deleted -> FR; B2: a=P, r=B -> FA; IY TA.
    #    TA 1, FR 2, FA 1, TR 0: P = 0/2 = 0, R = 0/1 = 0, F1 = 0 (both definitions).
    for ins in (False, True):
        c, f = figures("B EY B IY", ["B", "EY", "P", "IY"], "B IY", ins)
        assert c == {"ta": 1, "fr": 2, "fa": 1, "tr": 0, "cd": 0, "de": 0}
        check(f, (0.0, 0.0, 0.0))


def test_rule_unparseable() -> None:
    # SEVEN with V->W, no parseable answer: S, EH, AH, N FR; V FA. TA 0, FR 4, FA 1, TR 0:
    # P = 0/4 = 0, R = 0/1 = 0, F1 = 0.
    c, f = figures("S EH V AH N", ["S", "EH", "W", "AH", "N"], None, False)
    assert c == {"ta": 0, "fr": 4, "fa": 1, "tr": 0, "cd": 0, "de": 0}
    check(f, (0.0, 0.0, 0.0))
    # STOP said S AH T AA B, unparseable: standard FR 3 (S, T, AA), FA 1 (P);
    # insertion-aware adds the missed insertion gap: FA 2.
    c, _ = figures("S T AA P", ["S AH", "T", "AA", "B"], None, False)
    assert c == {"ta": 0, "fr": 3, "fa": 1, "tr": 0, "cd": 0, "de": 0}
    c, _ = figures("S T AA P", ["S AH", "T", "AA", "B"], None, True)
    assert c == {"ta": 0, "fr": 3, "fa": 2, "tr": 0, "cd": 0, "de": 0}


def test_corpus_of_rules_pools_counts() -> None:
    # substitution (TA 3 FR 1 TR 1) + two substitutions (TA 3 FA 1 TR 1) + unparseable SEVEN
    # (FR 4 FA 1): TR 2, FR 5, FA 2 -> P = 2/7, R = 2/4 = 1/2, F1 = 2*(2/7)(1/2)/(2/7+1/2) = 4/11.
    out = mdd_scores([
        ("S EH V AH N", "", "S IH W AH N", ["S", "EH", "W", "AH", "N"]),
        ("K W AY AH T", "", "K AY AY AH T", ["K", "AY", "AH", "AH", "T"]),
        ("S EH V AH N", "", None, ["S", "EH", "W", "AH", "N"]),
    ])
    assert out["counts"] == {"ta": 6, "fr": 5, "fa": 2, "tr": 2, "cd": 2, "de": 0}
    assert out["precision"] == pytest.approx(2 / 7)
    assert out["recall"] == pytest.approx(1 / 2)
    assert out["f1"] == pytest.approx(4 / 11)
    assert out["n_unparseable"] == 1 and out["definition"] == "standard"
