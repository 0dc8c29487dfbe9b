"""The release folder and the hub dataset (save_to_disk and parquet) give identical examples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from phi4mm_lora.config import DataConfig, PromptConfig
from phi4mm_lora.data import build_examples, bundled_corpus_path, load_audio
from phi4mm_lora.data.speechocean import read_release

datasets = pytest.importorskip("datasets")


def _hub_dataset(release: Path, with_id: bool) -> datasets.DatasetDict:
    """The bundled corpus in the mispeech/speechocean762 schema, audio as embedded bytes."""
    src = read_release(release)
    scores = json.loads((release / "resource" / "scores.json").read_text())
    parts = {}
    for split in ("train", "test"):
        rows: dict[str, list] = {k: [] for k in ("audio", "text", "accuracy", "completeness", "fluency",
                                                 "prosodic", "total", "words", "speaker", "gender", "age")}
        if with_id:
            rows["id"] = []
        for u in (u for u in src.utterances if u.split == split):
            s = scores[u.utt_id]
            rows["audio"].append({"bytes": Path(u.audio_path).read_bytes(), "path": Path(u.audio_path).name})
            for k in ("text", "accuracy", "completeness", "fluency", "prosodic", "total", "words"):
                rows[k].append(s[k])
            rows["speaker"].append(u.speaker)
            rows["gender"].append(u.gender)
            rows["age"].append(u.age)
            if with_id:
                rows["id"].append(u.utt_id)
        ds = datasets.Dataset.from_dict(rows)
        parts[split] = ds.cast_column("audio", datasets.Audio(sampling_rate=16000, decode=False))
    return datasets.DatasetDict(parts)


def _strip(examples: list) -> list[tuple]:
    return [(e.id, e.utt_id, e.task, e.prompt, e.answer, e.split, e.speaker, e.duration) for e in examples]


@pytest.mark.parametrize("form", ["save_to_disk", "parquet"])
def test_hub_layout_gives_identical_examples(tmp_path: Path, form: str) -> None:
    release = bundled_corpus_path()
    dd = _hub_dataset(release, with_id=(form == "parquet"))
    hub = tmp_path / "hub"
    if form == "save_to_disk":
        dd.save_to_disk(str(hub))
    else:
        for split, ds in dd.items():
            (hub / "data").mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(hub / "data" / f"{split}-00000-of-00001.parquet"))
    for split in ("train", "test"):
        ex_rel, rep_rel = build_examples(DataConfig(), PromptConfig(), split)
        ex_hub, rep_hub = build_examples(DataConfig(path=str(hub)), PromptConfig(), split,
                                         extract_dir=tmp_path / "extracted")
        assert rep_rel.n_problems == rep_hub.n_problems == 0
        assert len(ex_rel) == 2 * (100 if split == "train" else 50)
        assert _strip(ex_rel) == _strip(ex_hub)
        for a, b in list(zip(ex_rel, ex_hub, strict=True))[:6]:
            assert b.audio_path is not None and Path(b.audio_path).is_relative_to(tmp_path)
            np.testing.assert_array_equal(load_audio(a.audio_path), load_audio(b.audio_path))


def test_hub_rows_without_id_or_path_get_stable_ids(tmp_path: Path) -> None:
    rows = {"audio": [], "text": [], "accuracy": [], "completeness": [], "fluency": [], "prosodic": [],
            "total": [], "words": [], "speaker": [], "gender": [], "age": []}
    import io

    import soundfile as sf
    for _ in range(3):
        buf = io.BytesIO()
        sf.write(buf, np.zeros(1600, np.float32) + 0.1, 16000, format="WAV")
        rows["audio"].append({"bytes": buf.getvalue(), "path": None})
        for k, v in (("text", "WE"), ("accuracy", 8), ("completeness", 10), ("fluency", 9), ("prosodic", 9),
                     ("total", 8), ("speaker", "1"), ("gender", "m"), ("age", 9)):
            rows[k].append(v)
        rows["words"].append([{"text": "WE", "phones": ["W", "IY0"], "phones-accuracy": [2.0, 2.0],
                               "accuracy": 10, "stress": 10, "total": 10, "mispronunciations": []}])
    ds = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(decode=False))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hub"))
    cfg = DataConfig(path=str(tmp_path / "hub"), task="apa")
    ex1, _ = build_examples(cfg, PromptConfig(), "train", extract_dir=tmp_path / "x")
    ex2, _ = build_examples(cfg, PromptConfig(), "train", extract_dir=tmp_path / "x")
    assert [e.id for e in ex1] == ["train-000000:apa", "train-000001:apa", "train-000002:apa"]
    assert [e.id for e in ex1] == [e.id for e in ex2]
    assert ex1[0].speaker == "0001"  # numeric speaker ids are zero-padded like the release


def test_single_dataset_with_split_column(tmp_path: Path) -> None:
    dd = _hub_dataset(bundled_corpus_path(), with_id=True)
    both = datasets.concatenate_datasets([
        dd["train"].add_column("split", ["train"] * len(dd["train"])),
        dd["test"].add_column("split", ["test"] * len(dd["test"])),
    ])
    both.save_to_disk(str(tmp_path / "one"))
    cfg = DataConfig(path=str(tmp_path / "one"), task="mdd", feature_cache=str(tmp_path / "fc"))
    ex, rep = build_examples(cfg, PromptConfig(), "test")
    ref, _ = build_examples(DataConfig(task="mdd"), PromptConfig(), "test")
    assert _strip(ex) == _strip(ref) and rep.n_problems == 0
    assert all(Path(e.audio_path).is_relative_to(tmp_path / "fc" / "extracted") for e in ex)
