"""Every kind of bad record is skipped and named in the report; strict mode makes it fatal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_data_fixtures import simple_entry, tone, write_release

from phi4mm_lora.config import DataConfig, PromptConfig
from phi4mm_lora.data import AudioError, build_examples, load_audio
from phi4mm_lora.errors import UserError


def _utts(**bad: dict) -> dict[str, dict]:
    utts = {f"ok{i}": {"split": "train", "spk": "0001"} for i in range(3)}
    for name, spec in bad.items():
        utts[name] = {"split": "train", "spk": "0001", **spec}
    return utts


def _build(root: Path, **cfg) -> tuple[list, object]:
    return build_examples(DataConfig(path=str(root), **cfg), PromptConfig(), "train")


def test_missing_scores_json_is_fatal(tmp_path: Path) -> None:
    root = write_release(tmp_path / "r", _utts(), write_scores=False)
    with pytest.raises(UserError, match=r"resource/scores\.json"):
        _build(root)


def test_bad_audio_files_are_reported_with_ids_and_run_goes_on(tmp_path: Path) -> None:
    nan = tone(0.5)
    nan[100] = np.nan
    utts = _utts(
        garbage={"audio": b"this is not audio at all" * 10},
        empty={"audio": np.zeros(0, np.float32)},
        nanaudio={"audio": nan, "subtype": "FLOAT"},
        missing={"audio": None},
        stereo44={"audio": tone(1.0, sr=44100, channels=2), "sr": 44100},
        longone={"audio": tone(3.0)},
    )
    root = write_release(tmp_path / "r", utts)
    ex, rep = _build(root, max_audio_seconds=2.0)
    ids = {e.utt_id for e in ex}
    assert ids == {"ok0", "ok1", "ok2", "stereo44"}  # stereo 44.1 kHz is fine
    assert rep.n_examples == 8 and rep.n_utterances == 9
    counts = rep.counts()
    assert counts == {"audio": 4, "too_long": 1}
    text = rep.summary()
    for name in ("garbage", "empty", "nanaudio", "missing", "longone"):
        assert name in text
    assert "8 examples used" in text
    with pytest.raises(UserError, match="garbage"):
        _build(root, max_audio_seconds=2.0, strict=True)


def test_wav_scp_without_scores_and_scores_without_audio(tmp_path: Path) -> None:
    utts = _utts(noscore={})
    scores = {u: simple_entry() for u in utts if u != "noscore"}
    scores["orphan"] = simple_entry()
    root = write_release(tmp_path / "r", utts, scores)
    ex, rep = _build(root)
    assert len(ex) == 6
    assert rep.counts() == {"no_scores": 1, "no_audio": 1}
    assert rep.n_utterances == 4 and "6 examples used from 4 records, 2 record(s) skipped" in rep.summary()
    assert "noscore" in rep.summary() and "orphan" in rep.summary()
    with pytest.raises(UserError, match="strict mode"):
        _build(root, strict=True)


def test_empty_transcript_is_reported(tmp_path: Path) -> None:
    utts = _utts(notext={})
    scores = {u: simple_entry() for u in utts}
    scores["notext"] = {**simple_entry(), "text": "   ", "words": []}
    root = write_release(tmp_path / "r", utts, scores)
    (root / "train" / "text").write_text("".join(f"{u} {'' if u == 'notext' else 'X'}\n" for u in utts))
    ex, rep = _build(root)
    assert rep.counts() == {"empty_text": 1} and "notext" in rep.summary()
    assert "notext" not in {e.utt_id for e in ex}


def test_load_audio_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....garbage")
    with pytest.raises(AudioError, match="broken.wav"):
        load_audio(bad)
    with pytest.raises(UserError, match="nope.flac"):
        load_audio(tmp_path / "nope.flac")


def test_stereo_44k_decodes_to_mono_16k(tmp_path: Path) -> None:
    p = tmp_path / "st.flac"
    left = tone(2.0, sr=44100, freq=440)
    sf.write(str(p), np.stack([left, np.zeros_like(left)], axis=1), 44100)
    x = load_audio(p)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 32000) <= 1
    # mixed down: the mean of a 0.3-amplitude tone and silence has amplitude ~0.15
    assert 0.13 < np.abs(x[1000:-1000]).max() < 0.17


def test_manifest_bad_lines_are_reported(tmp_path: Path) -> None:
    sf.write(str(tmp_path / "a.wav"), tone(0.5), 16000)
    lines = [
        json.dumps({"audio": "a.wav", "prompt": "Transcribe.", "answer": "hi", "id": "good"}),
        "{not json",
        json.dumps({"audio": "missing.wav", "prompt": "x", "answer": "y", "id": "nofile"}),
        json.dumps({"audio": "a.wav", "prompt": "<|audio|> then <|image|>", "answer": "y", "id": "noimg"}),
        json.dumps({"audio": "a.wav", "prompt": "Q: <|audio|> what?", "answer": "z", "id": "ph", "split": "test"}),
    ]
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="manifest", path=str(m))
    ex, rep = build_examples(cfg, PromptConfig(), "train", audio_token="<A>", image_token="<I>")
    assert [e.id for e in ex] == ["good"]
    assert ex[0].prompt == "<A>Transcribe." and ex[0].task == "manifest"
    assert ex[0].audio_path == str(tmp_path / "a.wav")
    assert rep.counts() == {"manifest": 3}
    s = rep.summary()
    assert "line 2" in s and "not JSON" in s and "missing.wav" in s and "noimg" in s
    ex_t, _ = build_examples(cfg, PromptConfig(), "test", audio_token="<A>")
    assert ex_t[0].prompt == "Q: <A> what?"
    with pytest.raises(UserError):
        build_examples(cfg.model_copy(update={"strict": True}), PromptConfig(), "train")
