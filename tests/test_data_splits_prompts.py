"""Speaker-disjoint splits, the validation carve-out, and prompt files."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_data_fixtures import write_release

from phi4mm_lora.config import DataConfig, PromptConfig
from phi4mm_lora.data import build_examples
from phi4mm_lora.errors import UserError


def test_speaker_in_two_splits_is_refused(tmp_path: Path) -> None:
    utts = {"a1": {"split": "train", "spk": "0001"}, "a2": {"split": "test", "spk": "0001"},
            "b1": {"split": "test", "spk": "0002"}}
    root = write_release(tmp_path / "r", utts)
    with pytest.raises(UserError, match=r"0001 \(test/train\)"):
        build_examples(DataConfig(path=str(root)), PromptConfig(), "train")


def test_validation_is_carved_by_speaker_and_deterministic() -> None:
    cfg = DataConfig(validation_fraction=0.25, task="apa")
    tr, _ = build_examples(cfg, PromptConfig(), "train", seed=3)
    va, _ = build_examples(cfg, PromptConfig(), "validation", seed=3)
    va2, _ = build_examples(cfg, PromptConfig(), "validation", seed=3)
    va_other, _ = build_examples(cfg, PromptConfig(), "validation", seed=4)
    assert len(tr) + len(va) == 100
    assert {e.speaker for e in tr}.isdisjoint({e.speaker for e in va})
    assert [e.id for e in va] == [e.id for e in va2]
    assert {e.speaker for e in va} != {e.speaker for e in va_other}
    with pytest.raises(UserError, match="available: test, train"):
        build_examples(DataConfig(), PromptConfig(), "validation")


def test_prompt_layout_and_user_files(tmp_path: Path) -> None:
    ex, _ = build_examples(DataConfig(limit=1), PromptConfig(), "test", audio_token="<AUD>")
    apa, mdd = ex
    assert apa.id.endswith(":apa") and mdd.id.endswith(":mdd")
    assert apa.prompt.startswith("<|APA|><AUD>") and mdd.prompt.startswith("<|MDD|><AUD>")
    assert apa.prompt.count("<AUD>") == 1 and "<|user|>" not in apa.prompt
    for band in ("9-10", "0-2", "8-10", "0-3"):
        assert band in apa.prompt
    text = apa.prompt.split('"')[1]
    assert text and text in mdd.prompt  # the {text} placeholder carries the sentence
    own = tmp_path / "apa.txt"
    own.write_text("Score it. {text}")
    ex2, _ = build_examples(DataConfig(limit=1, task="apa"), PromptConfig(apa=str(own)), "test", audio_token="<A>")
    assert ex2[0].prompt == f"<|APA|><A>Score it. {text}"
    with pytest.raises(UserError, match="not found"):
        build_examples(DataConfig(task="mdd"), PromptConfig(mdd=str(tmp_path / "none.txt")), "test")


def test_limit_and_single_task(tmp_path: Path) -> None:
    ex, rep = build_examples(DataConfig(limit=7, task="mdd"), PromptConfig(), "train")
    assert len(ex) == 7 and {e.task for e in ex} == {"mdd"} and rep.n_examples == 7
