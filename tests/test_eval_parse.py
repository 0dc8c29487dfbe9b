"""Tolerant parsing of model answers: a table of malformed answers and what they parse to."""

from __future__ import annotations

import pytest

from phi4mm_lora.evaluate.parse import parse_apa, parse_for_task, parse_mdd, parse_text

GOOD = {"accuracy": 8, "fluency": 7, "prosodic": 6, "total": 7}

APA_CASES = [
    # (answer, expected value or None for a failure, substring of the error)
    ('{"accuracy": 8, "fluency": 7, "prosodic": 6, "total": 7}', GOOD, None),
    ('{"accuracy": 8, "fluency": 7, "prosodic": 6, "total": 7}<|end|><|endoftext|>', GOOD, None),
    (
        'Here you go:\n```json\n{"accuracy": 8, "fluency": 7, "prosodic": 6, "total": 7}\n```\nDone.',
        GOOD,
        None,
    ),
    ("{'accuracy': 8, 'fluency': 7, 'prosodic': 6, 'total': 7}", GOOD, None),
    ('{"accuracy": 8, "fluency": 7, "prosodic": 6, "total": 7,}', GOOD, None),
    ("{accuracy: 8, fluency: 7, prosodic: 6, total: 7}", GOOD, None),
    ('{"Accuracy": 8, "Fluency": 7, "Prosody": 6, "Total": 7}', GOOD, None),
    ('{"accuracy": "8", "fluency": "7/10", "prosodic": 6.0, "total": 7}', GOOD, None),
    # floats round half up: 7.5 -> 8, 6.4 -> 6
    ('{"accuracy": 7.5, "fluency": 7, "prosodic": 6.4, "total": 7}', GOOD, None),
    # truncated after the last value: only the brace is missing -> recovered
    ('{"accuracy": 8, "fluency": 7, "prosodic": 6, "total": 7', GOOD, None),
    ('<|assistant|>{"accuracy": 8, "fluency": 7, "prosodic": 6, "total": 7\n', GOOD, None),
    # prose without braces but with key: value pairs
    ("accuracy: 8, fluency: 7, prosodic: 6, total: 7", GOOD, None),
    # truncated inside a key: the last key is lost -> failure naming it
    ('{"accuracy": 8, "fluency": 7, "prosodic": 6, "tot', None, "missing key(s): total"),
    ('{"accuracy": 8, "fluency": 7, "prosodic": 6, "total":', None, "missing key(s): total"),
    # out of range is rejected, not clamped
    ('{"accuracy": 11, "fluency": 7, "prosodic": 6, "total": 7}', None, "outside 0-10"),
    ('{"accuracy": -1, "fluency": 7, "prosodic": 6, "total": 7}', None, "outside 0-10"),
    ('{"accuracy": "good", "fluency": 7, "prosodic": 6, "total": 7}', None, "not a number"),
    ('{"accuracy": true, "fluency": 7, "prosodic": 6, "total": 7}', None, "not a number"),
    ('{"accuracy": 8, "fluency": 7}', None, "missing key(s): prosodic, total"),
    ("I'm sorry, I can't listen to audio.", None, "no '{'"),
    ("", None, "no '{'"),
    ("{[}", None, "not a JSON object"),
]


@pytest.mark.parametrize(("answer", "expected", "error"), APA_CASES)
def test_parse_apa_table(answer: str, expected: dict | None, error: str | None) -> None:
    res = parse_apa(answer)
    if expected is None:
        assert not res.ok, res
        assert res.value is None
        assert error in res.error
    else:
        assert res.ok, res.error
        assert res.value == expected
        assert all(isinstance(v, int) for v in res.value.values())


def test_parse_apa_records_repairs_in_notes() -> None:
    res = parse_apa('{"accuracy": 8, "fluency": 7, "prosodic": 6, "total": 7')
    assert any("truncated" in n for n in res.notes)
    res = parse_apa('{"accuracy": 7.5, "fluency": 7, "prosodic": 6, "total": 7}')
    assert any("rounded accuracy" in n for n in res.notes)


MDD_CASES = [
    (
        '{"word_transcript": "the cat", "phoneme_transcript": "DH AH K AE T"}',
        {"word_transcript": "the cat", "phoneme_transcript": "DH AH K AE T"},
        None,
    ),
    (
        '```json\n{"word_transcript": "the cat", "phoneme_transcript": "DH AH K <unk> T"}\n```<|end|>',
        {"word_transcript": "the cat", "phoneme_transcript": "DH AH K <unk> T"},
        None,
    ),
    # single quotes with an apostrophe inside a word
    (
        "{'word_transcript': 'I don't know', 'phoneme_transcript': 'AY D OW N T N OW'}",
        {"word_transcript": "I don't know", "phoneme_transcript": "AY D OW N T N OW"},
        None,
    ),
    # list of phones instead of a string; extra whitespace collapsed
    (
        '{"word_transcript": " the  cat ", "phoneme_transcript": ["DH", "AH", "K", "AE", "T"],}',
        {"word_transcript": "the cat", "phoneme_transcript": "DH AH K AE T"},
        None,
    ),
    # truncated inside the phoneme string: what was written is kept
    (
        '{"word_transcript": "hello world", "phoneme_transcript": "HH AH L OW W',
        {"word_transcript": "hello world", "phoneme_transcript": "HH AH L OW W"},
        None,
    ),
    # truncated before the phoneme key: failure
    ('{"word_transcript": "hello world", "phon', None, "missing key(s): phoneme_transcript"),
    ('{"word_transcript": "hi", "phoneme_transcript": 5}', None, "not text"),
    ("HH AH L OW", None, "no '{'"),
]


@pytest.mark.parametrize(("answer", "expected", "error"), MDD_CASES)
def test_parse_mdd_table(answer: str, expected: dict | None, error: str | None) -> None:
    res = parse_mdd(answer)
    if expected is None:
        assert not res.ok
        assert error in res.error
    else:
        assert res.ok, res.error
        assert res.value == expected


def test_parse_text_and_dispatch() -> None:
    assert parse_text("  Bonjour   le monde <|end|> junk").value == {"text": "Bonjour le monde"}
    assert (
        parse_for_task("apa", '{"accuracy": 1, "fluency": 2, "prosodic": 3, "total": 4}').value["total"] == 4
    )
    assert parse_for_task("mdd", "nothing").ok is False
    assert parse_for_task("translate_fr", "salut").value == {"text": "salut"}
    assert parse_apa(None).ok is False  # type: ignore[arg-type]
