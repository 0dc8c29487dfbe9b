"""``score --batch``: a CSV/JSONL list or a folder + sentence list in, results + summary out.

Real recordings (espeak-ng speech in several formats) and deliberately broken rows: every
broken row must be reported with its reason while the good rows are still scored.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from audio_formats import encode, espeak

from phi4mm_lora.cli import main
from phi4mm_lora.errors import UserError
from phi4mm_lora.evaluate.batch import read_rows

SCORE_KEYS = ("accuracy", "fluency", "prosodic", "total")


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("batch")
    x, sr = espeak("we call it bear", d / "bear.wav")
    encode(x, sr, d / "bear.webm")
    y, sr2 = espeak("seven small dogs", d / "dogs.wav")
    encode(y, sr2, d / "dogs.mp3")
    (d / "broken.ogg").write_bytes(b"OggS" + b"\0" * 100)
    return d


def test_csv_batch_scores_good_rows_and_reports_bad_ones(tiny_native: Path, speech: Path, tmp_path: Path, capsys) -> None:
    listing = speech / "list.csv"
    with listing.open("w", newline="") as f:  # relative paths are relative to the list
        w = csv.writer(f)
        w.writerow(["audio", "text"])
        w.writerow(["bear.webm", "We call it bear"])
        w.writerow([str(speech / "missing.wav"), "we call it bear"])
        w.writerow(["dogs.mp3", "seven small dogs zorblax"])
        w.writerow([str(speech / "dogs.wav"), "  "])
        w.writerow([str(speech / "broken.ogg"), "we call it bear"])
    out = tmp_path / "out" / "scores.jsonl"
    rc = main(["score", "--batch", str(listing), "--output", str(out), "--model", str(tiny_native),
               "eval.max_new_tokens=3", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == [2, 3, 4, 5, 6]  # CSV line numbers (header is line 1)
    good = [r for r in rows if not r["error"]]
    assert [Path(r["audio"]).name for r in good] == ["bear.webm", "dogs.mp3"]
    for r in good:
        assert set(r["scores"]) == set(SCORE_KEYS) and r["apa_raw"] and r["expected"]
        assert r["provenance"]["model"].startswith(str(tiny_native)) and r["provenance"]["precision"]
        assert r["provenance"]["adapter_merged"] is True
    assert good[1]["oov"] == ["zorblax"]
    errors = {r["row"]: r["error"] for r in rows if r["error"]}
    assert "not found" in errors[3] and errors[5] == "empty sentence" and "unreadable" in errors[6]
    summary = json.loads((out.parent / "scores.jsonl.summary.json").read_text())
    assert (summary["rows"], summary["scored"], summary["failed"]) == (5, 2, 3)
    assert [f["row"] for f in summary["failures"]] == [3, 5, 6]
    assert summary["oov_words"] == ["zorblax"] and summary["provenance"]["phi4mm_lora_version"]
    assert "scored 2/5 rows" in printed and "row 3" in printed


def test_folder_batch_with_a_sentence_list_to_csv(tiny_native: Path, speech: Path, tmp_path: Path) -> None:
    folder = tmp_path / "recordings"
    folder.mkdir()
    for name in ("bear.webm", "dogs.mp3"):
        (folder / name).write_bytes((speech / name).read_bytes())
    (folder / "extra.wav").write_bytes((speech / "bear.wav").read_bytes())  # no sentence listed
    sentences = tmp_path / "text"
    sentences.write_text("bear we call it bear\ndogs\tseven small dogs\n")
    out = tmp_path / "scores.csv"
    assert main(["score", "--batch", str(folder), "--sentences", str(sentences), "--output", str(out),
                 "--model", str(tiny_native), "eval.max_new_tokens=3", "--no-progress", "--json"]) == 0
    with out.open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [Path(r["audio"]).name for r in table] == ["bear.webm", "dogs.mp3", "extra.wav"]
    assert [r["text"] for r in table[:2]] == ["we call it bear", "seven small dogs"]
    assert all(k in table[0] for k in SCORE_KEYS) and not table[0]["error"]
    assert "no sentence for extra" in table[2]["error"]


def test_bad_batch_inputs_fail_before_loading(tmp_path: Path, speech: Path, capsys) -> None:
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("file_name,words\na.wav,hi\n")
    with pytest.raises(UserError, match="header must name an audio column"):
        read_rows(bad_header)
    bad_header.with_suffix(".txt").write_text("a.wav hi\n")
    jl = tmp_path / "list.jsonl"
    jl.write_text('{"path": "bear.wav", "sentence": "we call it bear"}\nnot json\n[1]\n')
    rows = read_rows(jl)
    assert rows[0].audio == str(tmp_path / "bear.wav") and rows[0].text == "we call it bear"
    assert "not JSON" in rows[1].error and "not a JSON object" in rows[2].error
    for argv, msg in [
        (["score", "--batch", str(tmp_path / "nope.csv")], "not found"),
        (["score", "--batch", str(speech)], "--sentences"),
        (["score", "--batch", str(bad_header.with_suffix(".txt"))], "use a .csv or .jsonl file"),
        (["score", "--batch", str(jl), str(speech / "bear.wav")], "not both"),
        (["score", str(speech / "bear.wav"), "--text", "hi", "--output", "x.csv"], "go with --batch"),
        (["score", "--batch", str(jl), "--output", str(tmp_path / "o.txt")], ".jsonl or .csv"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
