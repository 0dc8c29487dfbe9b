"""Speechocean762 as users have it: five forms of the same data give identical examples.

The forms follow the hub's published conventions, built here with the ``datasets`` library
(not the project's writer) from the bundled corpus in the ``mispeech/speechocean762`` schema
(columns audio, text, accuracy, completeness, fluency, prosodic, total, words, speaker,
gender, age; no id column, so utterance ids come from the audio file names):

1. the release folder (Kaldi layout; the bundled corpus itself);
2. a ``save_to_disk`` folder;
3. the hub repository's parquet layout, ``data/<split>-00000-of-00001.parquet``;
4. the hub's auto-converted parquet branch, ``default/<split>/0000.parquet``;
5. the hub id ``mispeech/speechocean762`` through ``datasets.load_dataset``, offline, from a
   datasets cache built here the way an online ``load_dataset`` fills it: the parquet
   builder with ``repo_id`` writes ``<cache>/mispeech___speechocean762/default/0.0.0/<hash>/``,
   which offline ``load_dataset`` finds by id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from phi4mm_lora.config import DataConfig, PromptConfig
from phi4mm_lora.data import build_examples, bundled_corpus_path, load_audio
from phi4mm_lora.data.speechocean import parquet_splits
from phi4mm_lora.errors import UserError

datasets = pytest.importorskip("datasets")
from test_data_layouts import _hub_dataset, _strip  # noqa: E402

HUB_ID = "mispeech/speechocean762"


def _build_cache(hub_repo: Path, cache: Path) -> None:
    """What ``load_dataset("mispeech/speechocean762")`` leaves in the cache when online.

    The builder is made the way ``load_dataset`` makes it for a repository (module factory:
    the parquet builder, config ``default`` over ``data/<split>-*.parquet``, dataset name
    ``speechocean762``), so the Arrow files and ``dataset_info.json`` are what an online load
    writes. Online, the builder also gets ``repo_id`` and names its folder
    ``mispeech___speechocean762`` (datasets' ``_relative_data_dir``); a builder over local
    files refuses a ``repo_id``, so the folder is given that name afterwards.
    """
    import shutil

    from datasets.load import dataset_module_factory, get_dataset_builder_class

    module = dataset_module_factory(str(hub_repo))
    name = HUB_ID.split("/")[1]
    builder_cls = get_dataset_builder_class(module, dataset_name=name)
    kwargs = {**module.builder_kwargs, "dataset_name": name}
    builder = builder_cls(cache_dir=str(cache / "build"), config_name="default", hash=module.hash, **kwargs)
    builder.download_and_prepare()
    shutil.move(str(cache / "build" / name), str(cache / "___".join(HUB_ID.split("/"))))


def test_five_forms_give_identical_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dd = _hub_dataset(bundled_corpus_path(), with_id=False)
    forms: dict[str, str] = {"release": str(bundled_corpus_path())}
    dd.save_to_disk(str(tmp_path / "saved"))
    forms["save_to_disk"] = str(tmp_path / "saved")
    for split, ds in dd.items():
        (tmp_path / "hub" / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
        (tmp_path / "converted" / "default" / split).mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(tmp_path / "converted" / "default" / split / "0000.parquet"))
    (tmp_path / "hub" / "README.md").write_text("---\nlicense: apache-2.0\n---\n")  # as on the hub
    forms["hub parquet"] = str(tmp_path / "hub")
    forms["auto-converted parquet"] = str(tmp_path / "converted")
    assert sorted(parquet_splits(tmp_path / "converted")) == ["test", "train"]

    cache = tmp_path / "hf-datasets-cache"
    _build_cache(tmp_path / "hub", cache)
    assert (cache / "mispeech___speechocean762" / "default").is_dir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "mispeech/speechocean762" is no local folder here
    forms["hub id (offline cache)"] = HUB_ID

    reference = None
    for name, path in forms.items():
        for split in ("train", "test"):
            ex, rep = build_examples(DataConfig(path=path), PromptConfig(), split,
                                     extract_dir=tmp_path / "extracted" / name.replace(" ", "_"))
            assert rep.n_problems == 0, (name, rep.problems[:3])
            assert len(ex) == 2 * (100 if split == "train" else 50), name
            if name == "release":
                continue
            ref, _ = build_examples(DataConfig(), PromptConfig(), split)
            assert _strip(ex) == _strip(ref), name
            a, b = ref[0], ex[0]
            np.testing.assert_array_equal(load_audio(a.audio_path), load_audio(b.audio_path))
        reference = reference or name
    assert reference == "release"


def test_unknown_hub_id_offline_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="datasets cache"):
        build_examples(DataConfig(path="nobody/no-such-dataset"), PromptConfig(), "train")
