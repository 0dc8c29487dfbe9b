"""The ``score`` command: any audio format in, four scores + phone feedback out.

The tiny model answers garbage, so the end-to-end test checks structure (and that the
garbage is reported as a parse error, with OOV words still named); the formatting of a real
answer is tested through :func:`feedback` with given raw answers.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from rich.console import Console

from phi4mm_lora.cli import main
from phi4mm_lora.config import load_config
from phi4mm_lora.data.examples import bundled_corpus_path
from phi4mm_lora.errors import UserError
from phi4mm_lora.evaluate.score import feedback, render
from phi4mm_lora.model.run_folder import Run

SCORE_KEYS = {"accuracy", "fluency", "prosodic", "total"}


@pytest.fixture(scope="module")
def corpus_flac() -> Path:
    return sorted((bundled_corpus_path() / "WAVE").rglob("*.flac"))[0]


@pytest.fixture(scope="module")
def stereo_wav(tmp_path_factory, corpus_flac: Path) -> Path:
    """A 44.1 kHz stereo WAV made from a corpus recording (left and right slightly different)."""
    x, sr = sf.read(str(corpus_flac), dtype="float32")
    y = soxr.resample(x, sr, 44100)
    out = tmp_path_factory.mktemp("audio") / "stereo_44k.wav"
    sf.write(str(out), np.stack([y, 0.8 * y], axis=1), 44100)
    return out


def test_score_json_wav_and_flac(tiny_native: Path, stereo_wav: Path, corpus_flac: Path, capsys) -> None:
    rc = main(["score", "--model", str(tiny_native), "--text", "We call it zorblax!", "--json",
               str(stereo_wav), str(corpus_flac), "eval.max_new_tokens=6"])
    assert rc == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["audio"] for r in results] == [str(stereo_wav), str(corpus_flac)]
    for r in results:
        assert set(r["scores"]) == SCORE_KEYS
        assert "mispronunciations" in r and (r["mispronunciations"] is None or isinstance(r["mispronunciations"], list))
        if r["scores"]["total"] is None:
            assert r["apa_error"]  # garbage answer: said why, not silently empty
        if r["mispronunciations"] is None:
            assert r["mdd_error"]
        assert r["oov"] == ["zorblax"]
        assert [e["word"] for e in r["expected"]] == ["we", "call", "it", "zorblax"]
        assert r["apa_raw"] and r["mdd_raw"]
        assert r["provenance"]["adapter_merged"] is True  # eval.merge_adapter's default on fp32


def test_each_recording_is_decoded_once(tiny_native: Path, stereo_wav: Path, corpus_flac: Path, monkeypatch,
                                        capsys) -> None:
    """The input check decodes; generation uses those samples (the real decoder, counted)."""
    import phi4mm_lora.data.audio as audio
    import phi4mm_lora.evaluate.generate as generate
    import phi4mm_lora.evaluate.score as score_mod

    real, calls = audio.load_audio, []

    def counted(path, *a, **kw):
        calls.append(str(path))
        return real(path, *a, **kw)

    for mod in (audio, generate, score_mod):
        monkeypatch.setattr(mod, "load_audio", counted)
    assert main(["score", "--model", str(tiny_native), "--text", "we call it bear", "--json",
                 str(stereo_wav), str(corpus_flac), "eval.max_new_tokens=2"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert sorted(calls) == sorted([str(stereo_wav), str(corpus_flac)])


def test_score_table_output(tiny_native: Path, corpus_flac: Path, capsys) -> None:
    assert main(["score", "--model", str(tiny_native), "--text", "we call it zorblax", str(corpus_flac),
                 "eval.max_new_tokens=4"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "zorblax" in out and "not parsed" in out
    assert "(merged)" in out  # the provenance line says the adapter was merged for inference
    m = re.search(r"time: 1 recording\(s\) x 2 tasks scored in ([0-9.]+) s with the model loaded "
                  r"\(loading took ([0-9.]+) s\)", out)
    assert m, out  # issue 11: the scoring time is printed, apart from loading
    assert 0 < float(m.group(1)) < 60 and float(m.group(2)) > 0


def test_feedback_formats_a_real_answer() -> None:
    apa = '{"accuracy": 8, "fluency": 7, "prosodic": 6, "total": 7}<|end|>'
    mdd = '{"word_transcript": "we call it bear", "phoneme_transcript": "W IY K AO L IH T B IH R"}'
    r = feedback("a.wav", "We call it bear zorblax", apa, mdd)
    assert r["scores"] == {"accuracy": 8, "fluency": 7, "prosodic": 6, "total": 7}
    assert r["apa_error"] is None and r["mdd_error"] is None
    assert r["word_transcript"] == "we call it bear"
    assert r["oov"] == ["zorblax"]
    issues = r["mispronunciations"]
    assert [(i["word"], i["kind"], i["expected"], i["heard"]) for i in issues] == [("bear", "substitution", "EH", "IH")]
    assert r["phone_error_rate"] == pytest.approx(1 / 10)
    json.dumps(r)  # JSON-ready as is
    buf = io.StringIO()
    console = Console(file=buf, width=120)
    for part in render(r):
        console.print(part)
    text = buf.getvalue()
    assert "bear" in text and "EH->IH" in text and "EH heard as IH" in text and "zorblax" in text
    assert "8/10" in text and "generally correct" in text  # accuracy 7-8 band of prompts/apa.txt


def test_feedback_unparseable_answers() -> None:
    r = feedback("a.wav", "hello", "garbage", "also garbage")
    assert r["scores"] == dict.fromkeys(SCORE_KEYS)
    assert r["apa_error"] and r["mdd_error"] and r["mispronunciations"] is None
    assert r["expected"][0]["phones"]  # expected phones shown even without an answer


def test_bad_inputs_are_one_line_errors(tmp_path: Path, corpus_flac: Path, capsys) -> None:
    cases = [
        (["score", "--text", "hi", str(tmp_path / "missing.wav")], "not found"),
        (["score", str(corpus_flac)], "--text is required"),
        (["score", "--text", "hi", "--adapter", str(tmp_path), str(corpus_flac)], "not an adapter"),
    ]
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF????")
    cases.append((["score", "--text", "hi", str(garbage)], "unreadable"))
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_adapter_resolution(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16,
                                                                      "target_modules": ["qkv_proj", "o_proj"]}))
    # a well-formed (if useless) weights file: opening an adapter checks the safetensors header
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(run / "adapter" / "adapter_model.safetensors"))
    opened = Run.open(run)
    assert (opened.adapter_dir, opened.root) == (run / "adapter", None)
    cfg = opened.configure(load_config())
    assert cfg.adapter.init_from == str(run / "adapter")
    assert cfg.adapter.mode == "fresh" and cfg.adapter.r == 8 and cfg.adapter.alpha == 16
    assert "qkv_proj" in cfg.adapter.target_modules
    (run / "config.yaml").write_text("adapter:\n  mode: stacked\n  r: 8\n  name: task\n")
    opened = Run.open(run / "adapter")
    assert (opened.adapter_dir, opened.root) == (run / "adapter", run)
    cfg = opened.configure(load_config())
    assert cfg.adapter.mode == "stacked" and cfg.adapter.name == "task"
    with pytest.raises(UserError, match="does not exist"):
        Run.open(tmp_path / "nope")
