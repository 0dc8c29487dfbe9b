"""Targets as in the paper, checked against transcripts written by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_fixtures import entry, tone, word, write_release

from phi4mm_lora.config import DataConfig, PromptConfig
from phi4mm_lora.data import build_examples
from phi4mm_lora.data.targets import RecordError, apa_answer, mdd_answer, parse_word


def _answers(tmp_path: Path, scores: dict) -> dict[str, str]:
    utts = {u: {"split": "train", "spk": "0001", "audio": tone(0.5)} for u in scores}
    root = write_release(tmp_path / "rel", utts, scores)
    ex, rep = build_examples(DataConfig(path=str(root)), PromptConfig(), "train")
    return {e.id: e.answer for e in ex} | {"_report": str(rep)}


def test_mdd_applies_substitutions_unk_and_missing_key(tmp_path: Path) -> None:
    scores = {
        "u1": entry("WE CALL IT BEAR", [
            word("WE", ["W", "IY0"]),
            word("CALL", ["K", "AO1", "L"], [(1, "AO1", "AA")]),
            word("IT", ["IH0", "T"], key=False),  # no mispronunciations key at all
            word("BEAR", ["B", "EH1", "R"], [(2, "R", "<unk>")]),
        ]),
        "u2": entry("THE THREE", [
            word("THE", ["DH", "AH0"], [(0, "DH", "D")]),
            word("THREE", ["TH", "R", "IY1"], [(0, "TH1", "S"), (1, "R", "L")]),
        ], acc=3.0, flu=4.5, pros=5, tot=4),
    }
    a = _answers(tmp_path, scores)
    assert json.loads(a["u1:mdd"]) == {
        "word_transcript": "WE CALL IT BEAR",
        "phoneme_transcript": "W IY K AA L IH T B EH <unk>",
    }
    assert json.loads(a["u2:mdd"]) == {"word_transcript": "THE THREE", "phoneme_transcript": "D AH S L IY"}
    assert a["u1:apa"] == '{"accuracy": 8, "fluency": 9, "prosodic": 9, "total": 8}'
    # fractional scores round half up (4.5 -> 5), not Python's half-to-even
    assert json.loads(a["u2:apa"]) == {"accuracy": 3, "fluency": 5, "prosodic": 5, "total": 4}
    assert "completeness" not in a["u1:apa"]


def test_deletions_are_left_out_and_distortions_are_unk() -> None:
    w = parse_word({"text": "THE", "phones": ["DH", "AH0"],
                    "mispronunciations": [{"canonical-phone": "DH", "index": 0, "pronounced-phone": "<del>"}]}, "t")
    w2 = parse_word({"text": "CAT", "phones": ["K", "AE1", "T"],
                     "mispronunciations": [{"canonical-phone": "T", "index": 2, "pronounced-phone": ""}]}, "t")
    w3 = parse_word({"text": "BED", "phones": ["B", "EH1", "D"],
                     "mispronunciations": [{"canonical-phone": "D", "index": 2, "pronounced-phone": "<DEL>"},
                                           {"canonical-phone": "EH1", "index": 1, "pronounced-phone": "AE*"}]}, "t")
    assert json.loads(mdd_answer([w, w2, w3]))["phoneme_transcript"] == "AH K AE B <unk>"


def test_answer_is_one_line_json_in_paper_key_order() -> None:
    s = apa_answer(7.0, 8.0, 6.6, 7.4)
    assert s == '{"accuracy": 7, "fluency": 8, "prosodic": 7, "total": 7}'
    assert "\n" not in mdd_answer([parse_word({"text": "A", "phones": ["AH0"]}, "t")])


def test_bad_mispronunciation_index_is_a_record_error() -> None:
    with pytest.raises(RecordError, match="index 3"):
        parse_word({"text": "WE", "phones": ["W", "IY0"],
                    "mispronunciations": [{"canonical-phone": "W", "index": 3, "pronounced-phone": "V"}]}, "t")
    with pytest.raises(RecordError, match="phone is 'W'"):
        parse_word({"text": "WE", "phones": ["W", "IY0"],
                    "mispronunciations": [{"canonical-phone": "IY0", "index": 0, "pronounced-phone": "V"}]}, "t")


def test_bad_scores_record_is_skipped_and_reported(tmp_path: Path) -> None:
    scores = {
        "good": entry("WE", [word("WE", ["W", "IY0"])]),
        "bad": entry("WE", [word("WE", ["W", "IY0"], [(5, "W", "V")])]),
    }
    a = _answers(tmp_path, scores)
    assert "good:mdd" in a and "bad:mdd" not in a
    assert "scores: 1" in a["_report"] and "bad" in a["_report"]
