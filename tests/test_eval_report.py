"""Report writing: results.json, report.md, PNG plots, comparison deltas, terminal table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from phi4mm_lora.evaluate.metrics import compute_all
from phi4mm_lora.evaluate.report import (
    PAPER_REFERENCE,
    compare_table,
    delta,
    per_vs_accuracy,
    render_table,
    write_report,
)


def _records(shift: int) -> list[dict]:
    """Eight utterances; ``shift`` makes predictions worse, one APA answer is unparseable."""
    recs = []
    phones = ["K AE T", "D AO G", "S AE T", "M AE T", "R AE N", "S AH N", "B IH G", "R EH D"]
    for u in range(8):
        ref = {"accuracy": 2 + u, "fluency": 3 + u % 5, "prosodic": 2 + u % 7, "total": 2 + u}
        pred = {k: max(0, min(10, v + (shift if u % 2 else -shift))) for k, v in ref.items()}
        recs.append({"id": f"u{u}", "task": "apa", "raw": json.dumps(pred), "parsed": pred, "reference": ref})
        hyp = phones[u] if u % 3 else phones[u].replace("AE", "AH")
        val = {"word_transcript": "word", "phoneme_transcript": hyp}
        recs.append(
            {
                "id": f"u{u}",
                "task": "mdd",
                "raw": json.dumps(val),
                "parsed": val,
                "reference": {"word_transcript": "word", "phoneme_transcript": phones[u]},
                "canonical_phones": phones[u],
                "annotated_phones": phones[u],
            }
        )
    recs[2].update(raw="no idea", parsed=None)
    return recs


def test_write_report_files_and_compare(tmp_path: Path) -> None:
    before_recs, after_recs = _records(3), _records(0)
    before, after = compute_all(before_recs), compute_all(after_recs)
    paths = write_report(
        after, after_recs, tmp_path, compare=before, compare_name="untrained", name="trained"
    )

    assert json.loads(paths["results"].read_text()) == after
    for key in ("apa_scatter", "per_vs_accuracy"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert paths[key].stat().st_size > 10_000
    md = paths["report"].read_text()
    assert "![APA scatter](apa_scatter.png)" in md and "per_vs_accuracy.png" in md
    assert "| metric | untrained | trained | delta | paper (LoRA ep. 3) |" in md
    assert "no idea" in md and "| apa | 1 | 8 |" in md

    # deltas are after - before, marked by direction
    acc_new, acc_old = after["summary"]["acc_pcc"], before["summary"]["acc_pcc"]
    assert acc_new > acc_old
    assert f"| Acc PCC | {acc_old:.3f} | {acc_new:.3f} | {acc_new - acc_old:+.3f} (+) | 0.656 |" in md
    per_new, per_old = after["summary"]["per"], before["summary"]["per"]
    assert per_new == per_old
    assert f"| PER | {per_old:.3f} | {per_new:.3f} | +0.000 (=) | 0.114 |" in md
    # paper reference column present in the single-run table
    assert "| F1 | " in md and f"| {PAPER_REFERENCE['f1']:.3f} |" in md


def test_delta_direction() -> None:
    assert delta("acc_pcc", 0.7, 0.5) == (pytest.approx(0.2), "+")
    assert delta("wer", 0.2, 0.5) == (pytest.approx(-0.3), "+")
    assert delta("per", 0.6, 0.5) == (pytest.approx(0.1), "-")
    assert delta("f1", None, 0.5) == (None, "")


def test_compare_table_rows() -> None:
    a = {"summary": {"acc_pcc": 0.5, "wer": 0.30}, "parse_failure_counts": {"apa": 10}}
    b = {"summary": {"acc_pcc": 0.25, "wer": 0.40}, "parse_failure_counts": {"apa": 30}}
    rows = compare_table(a, b, "after", "before")
    assert "| Acc PCC | 0.250 | 0.500 | +0.250 (+) | 0.656 |" in rows
    assert "| WER | 0.400 | 0.300 | -0.100 (+) | 0.140 |" in rows
    assert "| unparseable apa | 30 | 10 | -20 | - |" in rows
    assert "| F1 | - | - | - | 0.724 |" in rows


def test_per_vs_accuracy_points() -> None:
    pts = per_vs_accuracy(_records(0))
    # accuracy from the APA record of the same id; u0, u3, u6 have AE -> AH in 3 phones
    assert pts[0] == (2.0, pytest.approx(1 / 3)) and pts[1] == (3.0, 0.0)
    assert len(pts) == 8


def test_render_table() -> None:
    res = compute_all(_records(0))
    console = Console(record=True, width=140)
    console.print(render_table(res, compute_all(_records(3)), "untrained"))
    text = console.export_text()
    for name in ("Acc PCC", "Total PCC", "WER", "PER", "F1", "untrained", "0.656", "unparseable: apa 1/8"):
        assert name in text


def test_predictions_roundtrip_and_bad_files(tmp_path: Path) -> None:
    from phi4mm_lora.errors import UserError
    from phi4mm_lora.evaluate.report import load_predictions, load_results, save_predictions

    recs = _records(0)
    path = save_predictions(recs, tmp_path / "predictions.jsonl")
    assert load_predictions(path) == recs
    assert compute_all(load_predictions(path)) == compute_all(recs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "task": "apa"}\nnot json\n')
    with pytest.raises(UserError, match="2 problem"):
        load_predictions(bad)
    with pytest.raises(UserError, match="not found"):
        load_predictions(tmp_path / "missing.jsonl")
    write_report(compute_all(recs), recs, tmp_path / "run")
    assert load_results(tmp_path / "run")["summary"] == compute_all(recs)["summary"]
    with pytest.raises(UserError):
        load_results(path)
