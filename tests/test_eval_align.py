"""Word-level feedback for the score command (CMUdict canonical phones vs heard phones)."""

from __future__ import annotations

import json

from rich.console import Console

from phi4mm_lora.evaluate.align import (
    canonical_words,
    find_mispronunciations,
    lookup_word,
    render_report,
    split_words,
)


def test_canonical_phones_from_cmudict() -> None:
    assert split_words("Hello, World! Don't-stop 'now'") == ["hello", "world", "don't", "stop", "now"]
    assert lookup_word("Cat") == [["K", "AE", "T"]]
    assert lookup_word("zorblaxian") == []
    words = canonical_words("The cat.")
    assert words[1].phones == ["K", "AE", "T"] and words[0].variants >= 2


def test_substitution_and_oov_word() -> None:
    # cat = K AE T, sat = S AE T; "zorblax" is not in CMUdict.
    rep = find_mispronunciations("The cat zorblax sat.", "DH AH0 K AH1 T S AE T")
    assert rep.oov == ["zorblax"]
    assert len(rep.issues) == 1
    issue = rep.issues[0]
    assert (issue.word, issue.word_index, issue.position, issue.kind, issue.expected, issue.heard) == (
        "cat",
        1,
        1,
        "substitution",
        "AE",
        "AH",
    )
    d = rep.to_dict()
    json.dumps(d)
    assert d["oov"] == ["zorblax"] and d["issues"][0]["expected"] == "AE"
    assert d["expected"][2] == {"word": "zorblax", "phones": None}


def test_pronunciation_variant_is_not_an_error() -> None:
    # "the" may be DH IY in CMUdict: not reported
    assert find_mispronunciations("the cat", "DH IY K AE T").issues == []


def test_deletion_insertion_and_unk() -> None:
    rep = find_mispronunciations("cat sat", "K AE S AE T S")
    kinds = [(i.word, i.kind, i.expected, i.heard) for i in rep.issues]
    assert ("cat", "deletion", "T", None) in kinds
    assert ("sat", "insertion", None, "S") in kinds
    rep = find_mispronunciations("cat", "K <unk> T")
    assert [(i.kind, i.expected, i.heard) for i in rep.issues] == [("substitution", "AE", "<unk>")]


def test_render_report() -> None:
    rep = find_mispronunciations("The cat zorblax sat.", "DH AH K AH T S AE T")
    console = Console(record=True, width=120)
    console.print(render_report(rep))
    text = console.export_text()
    assert "substitution" in text and "zorblax" in text and "AE" in text


def test_feedback_from_raw_answer() -> None:
    from phi4mm_lora.evaluate.align import feedback_from_answer

    res, rep = feedback_from_answer(
        "cat", '{"word_transcript": "cat", "phoneme_transcript": "K AH T"}<|end|>'
    )
    assert res.ok and rep is not None and rep.issues[0].heard == "AH"
    res, rep = feedback_from_answer("cat", "no json")
    assert not res.ok and rep is None
