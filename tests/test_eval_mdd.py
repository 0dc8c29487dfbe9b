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
    # c: K AE T; the gap after T (gap 3) is one extra unit when either side inserts there.
    # a inserts S, r inserts S -> TR-CD
    assert counts("K AE T", "K AE T S", "K AE T S") == {"ta": 3, "fr": 0, "fa": 0, "tr": 1, "cd": 1, "de": 0}
    # a inserts S, r inserts Z -> TR-DE
    assert counts("K AE T", "K AE T S", "K AE T Z") == {"ta": 3, "fr": 0, "fa": 0, "tr": 1, "cd": 0, "de": 1}
    # a inserts S, r does not -> FA (missed insertion)
    assert counts("K AE T", "K AE T S", "K AE T") == {"ta": 3, "fr": 0, "fa": 1, "tr": 0, "cd": 0, "de": 0}
    # a has none, r inserts Z -> FR (false alarm)
    assert counts("K AE T", "K AE T", "K AE T Z") == {"ta": 3, "fr": 1, "fa": 0, "tr": 0, "cd": 0, "de": 0}
    # insertions ignored on request: only canonical positions count
    assert counts("K AE T", "K AE T", "K AE T Z", count_insertions=False)["fr"] == 0
    # gaps where nobody inserts are not units (TA stays at 3)
    assert counts("K AE T", "K AE T", "K AE T")["ta"] == 3


def test_unparseable_answer_rejects_everything() -> None:
    # r = None: an empty transcript. c = a = K AE T -> 3 FR; with one annotated error it is TR.
    assert counts("K AE T", "K AE T", None)["fr"] == 3
    assert counts("K AE T", "K AH T", None) == {"ta": 0, "fr": 2, "fa": 0, "tr": 1, "cd": 0, "de": 1}


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
