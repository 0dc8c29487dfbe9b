"""Generated corpus (needs espeak-ng), the data CLI handlers, and the committed corpus."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from phi4mm_lora.cli.data_cmds import register
from phi4mm_lora.data import bundled_corpus_path
from phi4mm_lora.data.corpus import UttPlan, _plan, annotate
from phi4mm_lora.errors import UserError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="command"))
    return ap


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed (`make install` adds it with apt); without it make-corpus cannot "
    "synthesise speech - that refusal is tested in test_make_corpus_without_espeak_says_how_to_fix",
)
def test_make_corpus_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    args = _parser().parse_args(["make-corpus", str(out), "--n", "6", "--seed", "5"])
    assert args.handler(args) == 0
    for split in ("train", "test"):
        for f in ("wav.scp", "text", "utt2spk", "spk2utt", "spk2age", "spk2gender"):
            assert (out / split / f).is_file()
    scores = json.loads((out / "resource" / "scores.json").read_text())
    assert len(scores) == 6
    train_spk = {ln.split()[0] for ln in (out / "train" / "spk2utt").read_text().splitlines()}
    test_spk = {ln.split()[0] for ln in (out / "test" / "spk2utt").read_text().splitlines()}
    assert train_spk and test_spk and train_spk.isdisjoint(test_spk)
    for line in (out / "train" / "wav.scp").read_text().splitlines():
        utt, rel = line.split()
        info = sf.info(str(out / rel))
        assert info.samplerate == 16000 and info.channels == 1 and info.format == "FLAC"
        assert utt in scores and 0.5 < info.duration < 15
    with pytest.raises(UserError, match="not empty"):
        args.handler(args)


def test_scores_follow_the_substitutions() -> None:
    plan = _plan(12, 1)[0]
    plan.pauses.clear()
    plan.gap, plan.speed = 0, 160
    clean = UttPlan(plan.utt, plan.speaker, plan.words, {}, 160, 0, {}, False)
    bad = UttPlan(plan.utt, plan.speaker, plan.words,
                  {(w, 0): "<unk>" for w in range(len(plan.words))}, 160, 0, {}, False)
    a_clean, a_bad = annotate(clean), annotate(bad)
    assert a_clean["accuracy"] == 10 and a_bad["accuracy"] < a_clean["accuracy"]
    assert a_bad["total"] < a_clean["total"]
    assert all(w["mispronunciations"][0]["pronounced-phone"] == "<unk>" for w in a_bad["words"])
    assert all(w["phones-accuracy"][0] == 0.0 for w in a_bad["words"])
    paused = UttPlan(plan.utt, plan.speaker, plan.words, {}, 110, 5, {0: 800}, False)
    a_p = annotate(paused)
    assert a_p["fluency"] < a_clean["fluency"] and a_p["prosodic"] < a_clean["prosodic"]


def test_bundled_corpus_shape() -> None:
    root = bundled_corpus_path()
    scores = json.loads((root / "resource" / "scores.json").read_text())
    n_train = len((root / "train" / "wav.scp").read_text().splitlines())
    n_test = len((root / "test" / "wav.scp").read_text().splitlines())
    assert (n_train, n_test) == (100, 50) and len(scores) == 150
    words = [w for s in scores.values() for w in s["words"]]
    pron = [m["pronounced-phone"] for w in words for m in w.get("mispronunciations", [])]
    assert "<unk>" in pron and len(pron) > 20
    assert any("mispronunciations" not in w for w in words)
    canon = [m["canonical-phone"] for w in words for m in w.get("mispronunciations", [])]
    assert any(c[-1].isdigit() for c in canon)  # stress digits kept on canonical phones


def test_data_stats_prints_counts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    png = tmp_path / "s.png"
    args = _parser().parse_args(["data", "stats", str(bundled_corpus_path()), "--plot", str(png)])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "split train: 100 utterances, examples: apa 100, mdd 100" in out
    assert "split test: 50 utterances, examples: apa 50, mdd 50" in out
    assert "no problems found" in out and "accuracy" in out
    assert png.stat().st_size > 10_000


def test_data_stats_reports_problems(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(bundled_corpus_path(), root)
    wav = next((root / "WAVE").rglob("*.flac"))
    wav.write_bytes(b"broken")
    args = _parser().parse_args(["data", "stats", str(root)])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "1 record(s) skipped" in out and wav.stem in out
    args = _parser().parse_args(["data", "stats", str(root), "--strict"])
    with pytest.raises(UserError, match=wav.stem):
        args.handler(args)


def test_make_corpus_without_espeak_says_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from phi4mm_lora.data.corpus import make_corpus

    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng on this PATH
    with pytest.raises(UserError, match="espeak-ng is not installed"):
        make_corpus(tmp_path / "c", 6, 0)


def test_data_stats_on_a_manifest(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    clip = next((bundled_corpus_path() / "WAVE").rglob("*.flac"))
    lines = [json.dumps({"audio": str(clip), "prompt": "Say it.", "answer": "ok", "split": s}) for s in
             ("train", "train", "test")] + ["oops"]
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(lines))
    args = _parser().parse_args(["data", "stats", str(m)])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "split train: 2 utterances, examples: manifest 2" in out
    assert "split test: 1 utterances, examples: manifest 1" in out
    assert "manifest: 1" in out and "line 4" in out


def test_data_commands_through_the_real_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`phi4mm-lora data stats` / `make-corpus` as a user runs them (cli.main, not the handler)."""
    from phi4mm_lora.cli import main

    png = tmp_path / "stats.png"
    assert main(["data", "stats", str(bundled_corpus_path()), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "test" in out and png.is_file() and png.stat().st_size > 10_000
    assert main(["data", "stats", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("keep me")
    assert main(["make-corpus", str(occupied), "--n", "2"]) == 2
    assert (occupied / "x").read_text() == "keep me"  # nothing lost


def test_make_corpus_without_espeak_says_how_to_fix(tmp_path: Path, monkeypatch, capsys) -> None:
    """No espeak-ng on PATH: one-line error naming the install command, exit 2, nothing written."""
    from phi4mm_lora.cli import main

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    out = tmp_path / "c"
    assert main(["make-corpus", str(out), "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "espeak-ng is not installed" in err and "apt-get install espeak-ng" in err
    assert not out.exists() or not any(out.iterdir())
