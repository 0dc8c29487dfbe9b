"""Reading Speechocean762 from either of its two published forms into the same records.

(a) the release directory (Kaldi layout: ``WAVE/SPEAKERxxxx/<utt>.WAV``, ``train/`` and
``test/`` with ``wav.scp``, ``text``, ``utt2spk``, ``spk2utt``, ``spk2age``, ``spk2gender``,
and ``resource/scores.json``), and (b) the hub dataset saved locally (``save_to_disk``
folder or parquet files). Layout (b) is read through pyarrow with the audio column never
decoded by ``datasets`` (which would need torchcodec + FFmpeg): embedded audio bytes are
written once, undecoded, to an extraction folder so every example has a file path the
collator can decode with soundfile, exactly like the release.

Record problems (an utterance without scores, scores without audio, malformed scores,
empty text) are returned as :class:`Problem` entries rather than raised; only a release
without ``resource/scores.json`` is fatal, because then nothing can be trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phi4mm_lora.data.audio import load_audio, resolve_audio_path
from phi4mm_lora.data.problems import Problem
from phi4mm_lora.data.targets import RecordError, Word, _num, parse_word
from phi4mm_lora.errors import UserError
from phi4mm_lora.fileio import read_text

SENTENCE_KEYS = ("accuracy", "completeness", "fluency", "prosodic", "total")
VALIDATION_SPLIT = "validation"


@dataclass
class Utterance:
    """One scored recording, the same whichever layout it came from."""

    utt_id: str
    speaker: str
    split: str
    text: str
    scores: dict[str, float]
    words: list[Word]
    audio_path: str | None = None
    age: int | None = None
    gender: str | None = None
    audio_array: np.ndarray | None = field(default=None, repr=False, compare=False)

    def audio(self) -> np.ndarray:
        """16 kHz mono float32 samples (decoded on demand)."""
        if self.audio_array is not None:
            return self.audio_array
        if self.audio_path is None:
            raise UserError(f"utterance {self.utt_id} has no audio")
        return load_audio(self.audio_path)


@dataclass
class SourceData:
    """Everything read from one data folder; problems keyed by split (``None``: all splits)."""

    utterances: list[Utterance]
    problems: list[tuple[str | None, Problem]]
    layout: str

    def splits(self) -> list[str]:
        return sorted({u.split for u in self.utterances})


# ---------------------------------------------------------------- shared parsing


def build_utterance(
    utt_id: str, entry: dict, *, speaker: str, split: str, audio_path: str | None,
    age: object = None, gender: object = None, fallback_text: str = "",
) -> Utterance:
    """Validate one scores entry (release ``scores.json`` value or hub row) into a record."""
    if not isinstance(entry, dict):
        raise RecordError(f"scores entry is {type(entry).__name__}, not an object")
    scores: dict[str, float] = {}
    for key in SENTENCE_KEYS:
        if entry.get(key) is None:
            if key == "completeness":
                continue
            raise RecordError(f"sentence score {key!r} is missing")
        scores[key] = _num(entry[key], f"sentence {key}")
    words = [parse_word(w, f"word {i}") for i, w in enumerate(entry.get("words") or [])]
    text = " ".join(str(entry.get("text") or "").split()) or " ".join(fallback_text.split())
    if not text:
        raise RecordError("empty transcript (no sentence text)")
    try:
        age_i = None if age in (None, "") else int(age)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        age_i = None
    g = None if gender in (None, "") else str(gender).strip().lower()
    return Utterance(utt_id, speaker, split, text, scores, words, audio_path, age_i, g)


def _norm_speaker(value: object) -> str:
    s = str(value).strip()
    return s.zfill(4) if s.isdigit() else s


# ---------------------------------------------------------------- (a) release directory


def _read_table(path: Path) -> dict[str, str]:
    """A Kaldi ``key value...`` file as a dict (missing file: empty)."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for line in read_text(path, "Kaldi table").splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            out[parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return out


def is_release_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "resource" / "scores.json").is_file()
        or (path / "WAVE").is_dir()
        or any((d / "wav.scp").is_file() for d in path.iterdir() if d.is_dir())
    )


def read_release(root: Path) -> SourceData:
    """Read every split folder (one holding ``wav.scp``) of a release directory."""
    scores_path = root / "resource" / "scores.json"
    if not scores_path.is_file():
        raise UserError(
            f"{scores_path} not found: a Speechocean762 release needs resource/scores.json "
            "(download the full release, or point data.path at the folder that contains resource/)"
        )
    try:
        scores = json.loads(read_text(scores_path, "score table"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{scores_path} is not valid JSON ({exc}); re-download it") from None
    if not isinstance(scores, dict):
        raise UserError(f"{scores_path} must map utterance ids to score objects")
    split_dirs = sorted(d for d in root.iterdir() if d.is_dir() and (d / "wav.scp").is_file())
    if not split_dirs:
        raise UserError(f"{root} has no split folder with wav.scp (expected train/ and test/)")
    utts: list[Utterance] = []
    problems: list[tuple[str | None, Problem]] = []
    listed: set[str] = set()
    for sd in split_dirs:
        split = sd.name
        wav = _read_table(sd / "wav.scp")
        text = _read_table(sd / "text")
        u2s = _read_table(sd / "utt2spk")
        ages = _read_table(sd / "spk2age")
        genders = _read_table(sd / "spk2gender")
        for utt, rel in sorted(wav.items()):
            listed.add(utt)
            if utt not in scores:
                problems.append((split, Problem("no_scores", utt, "listed in wav.scp but not in scores.json")))
                continue
            if utt not in u2s:
                problems.append((split, Problem("metadata", utt, "not in utt2spk (speaker unknown)")))
                continue
            if rel.endswith("|"):
                problems.append((split, Problem("audio", utt, "wav.scp pipe commands are not supported")))
                continue
            p = Path(rel)
            if not p.is_absolute():
                p = root / p if (root / p).exists() or not (sd / p).exists() else sd / p
            audio = resolve_audio_path(p) or p
            spk = u2s[utt]
            try:
                utts.append(build_utterance(
                    utt, scores[utt], speaker=spk, split=split, audio_path=str(audio),
                    age=ages.get(spk), gender=genders.get(spk), fallback_text=text.get(utt, ""),
                ))
            except RecordError as exc:
                kind = "empty_text" if "empty transcript" in str(exc) else "scores"
                problems.append((split, Problem(kind, utt, str(exc))))
    for utt in sorted(set(scores) - listed):
        problems.append((None, Problem("no_audio", utt, "in scores.json but in no split's wav.scp")))
    return SourceData(utts, problems, "release")


# ---------------------------------------------------------------- (b) hub dataset on disk


def is_hub_dir(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".parquet"
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or (path / "state.json").is_file()
        or any(path.rglob("*.parquet"))
    )


def _iter_arrow_batches_disk(path: Path) -> Iterator[tuple[str, object]]:
    """(split, pyarrow RecordBatch) from a save_to_disk folder, never decoding audio.

    A single saved ``Dataset`` (no split dict) is ``train`` unless rows carry a ``split`` column.
    """
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a broken folder
        raise UserError(f"{path} is not a readable datasets save_to_disk folder ({exc})") from None
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [("train", ds)]
    for split, d in parts:
        yield from ((split, b) for b in d.data.table.to_batches(max_chunksize=256))


def parquet_splits(path: Path) -> dict[str, list[Path]]:
    """Parquet files per split, resolved by the datasets library's own layout conventions.

    ``datasets.data_files.get_data_patterns`` is what ``load_dataset`` uses for a hub repo
    or a local folder: ``data/<split>-00000-of-00001.parquet`` (the hub's layout), split
    names in folder names (``default/<split>/0000.parquet``, the hub's auto-converted
    parquet branch) or file names (``train.parquet``), and ``train`` when nothing names a
    split. A single parquet file is its name's split (``test.parquet``), else ``train``.
    """
    if path.is_file():
        stem = path.stem.split("-")[0].lower()
        return {stem if stem in ("train", "test", "validation") else "train": [path]}
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(path))
    except Exception as exc:  # EmptyDatasetError and friends: nothing datasets can read
        raise UserError(f"{path}: no parquet split files found ({exc})") from None
    files = DataFilesDict.from_patterns(patterns, base_path=str(path), allowed_extensions=[".parquet"])
    return {str(split): sorted(Path(f) for f in found) for split, found in files.items() if len(found)}


def _iter_arrow_batches_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    for split, files in parquet_splits(path).items():
        for f in files:
            try:
                pf = pq.ParquetFile(str(f))
            except Exception as exc:
                raise UserError(f"{f} is not a readable parquet file ({exc})") from None
            yield from ((split, b) for b in pf.iter_batches(batch_size=256))


def _iter_arrow_batches_hub_id(repo_id: str) -> Iterator[tuple[str, object]]:
    """(split, RecordBatch) of a hub dataset id through ``datasets.load_dataset``.

    Offline (``HF_HUB_OFFLINE=1`` or no network) datasets reads the copy in its local
    cache (``HF_DATASETS_CACHE``, by default ``~/.cache/huggingface/datasets``) that an
    earlier online ``load_dataset`` left there. Audio stays undecoded: only the Arrow table
    is read.
    """
    import datasets

    try:
        dd = datasets.load_dataset(repo_id)
    except Exception as exc:  # offline and not cached, unknown id, no access ...
        raise UserError(
            f"could not load the hub dataset {repo_id!r} ({type(exc).__name__}: {exc}); with no network it "
            f"must already be in the datasets cache ({datasets.config.HF_DATASETS_CACHE}): run "
            f"`python -c \"import datasets; datasets.load_dataset('{repo_id}')\"` once online, or set "
            "data.path to a local folder (release, save_to_disk or parquet)"
        ) from None
    parts = dd.items() if isinstance(dd, datasets.DatasetDict) else [("train", dd)]
    for split, d in parts:
        yield from ((split, b) for b in d.data.table.to_batches(max_chunksize=256))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(value: str) -> bool:
    """``owner/name`` that is not an existing local path: a dataset id on the hub."""
    return bool(_HUB_ID.match(value)) and not Path(value).expanduser().exists()


def default_extract_dir(source: Path | str) -> Path:
    """Where embedded hub audio bytes are written (once): per-user cache, keyed by source path or id."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi4mm_lora" / "extracted"
    name = f"hub:{source}" if isinstance(source, str) else str(source.resolve())
    return base / hashlib.sha1(name.encode()).hexdigest()[:16]


def resolve_source(data_path: str | None, default: Path) -> Path | str:
    """``data.path`` as a local path, or kept as a string when it is a hub dataset id."""
    if not data_path:
        return default
    return data_path if looks_like_hub_id(data_path) else Path(data_path).expanduser()


def _stable_id(row: dict, split: str, index: int) -> str:
    """The ``id`` column if present, else the audio file's stem, else ``<split>-<row>``."""
    if row.get("id") not in (None, ""):
        return str(row["id"])
    audio = row.get("audio") or {}
    name = audio.get("path") if isinstance(audio, dict) else None
    if name:
        stem = Path(str(name)).stem
        if stem:
            return stem
    return f"{split}-{index:06d}"


def read_hub(path: Path | str, extract_dir: Path | None = None) -> SourceData:
    """Read a hub dataset (local copy or ``owner/name`` id); audio bytes are written undecoded."""
    batches: Iterable[tuple[str, object]]
    if isinstance(path, str):  # a hub id, through datasets.load_dataset
        batches = _iter_arrow_batches_hub_id(path)
        out_dir = extract_dir or default_extract_dir(path)
        base_dir = Path.cwd()
    else:
        if path.is_dir() and not any(path.rglob("*.parquet")):
            batches = _iter_arrow_batches_disk(path)
        else:
            batches = _iter_arrow_batches_parquet(path)
        out_dir = extract_dir or default_extract_dir(path)
        base_dir = path if path.is_dir() else path.parent
    utts: list[Utterance] = []
    problems: list[tuple[str | None, Problem]] = []
    seen: set[str] = set()
    counters: dict[str, int] = {}
    for split, batch in batches:
        cols = batch.schema.names  # type: ignore[attr-defined]
        if "audio" not in cols or "words" not in cols:
            raise UserError(f"{path}: split {split} lacks the audio/words columns of mispeech/speechocean762")
        for row in batch.to_pylist():  # type: ignore[attr-defined]
            if row.get("split"):  # an explicit split column wins over the folder/file name
                split = str(row["split"])
            i = counters.get(split, 0)
            counters[split] = i + 1
            utt = _stable_id(row, split, i)
            if utt in seen:
                utt = f"{split}-{i:06d}"
            seen.add(utt)
            try:
                audio_path = _materialise_audio(row.get("audio"), utt, out_dir / split, base_dir)
            except RecordError as exc:
                problems.append((split, Problem("audio", utt, str(exc))))
                continue
            try:
                utts.append(build_utterance(
                    utt, row, speaker=_norm_speaker(row.get("speaker", "unknown")), split=split,
                    audio_path=audio_path, age=row.get("age"), gender=row.get("gender"),
                ))
            except RecordError as exc:
                kind = "empty_text" if "empty transcript" in str(exc) else "scores"
                problems.append((split, Problem(kind, utt, str(exc))))
    return SourceData(utts, problems, "hub id" if isinstance(path, str) else "hub")


def _materialise_audio(audio: object, utt: str, out_dir: Path, base_dir: Path) -> str:
    """A file path for a hub audio cell: its bytes written once, or its existing local path."""
    if not isinstance(audio, dict):
        raise RecordError("audio cell is empty")
    data = audio.get("bytes")
    name = str(audio.get("path") or "")
    if data:
        ext = Path(name).suffix.lower() or ".wav"
        target = out_dir / f"{utt}{ext}"
        if not (target.is_file() and target.stat().st_size == len(data)):
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return str(target)
    if name:
        p = Path(name)
        for cand in (p, base_dir / p):
            if cand.is_file():
                return str(cand)
        raise RecordError(f"audio path {name} does not exist and the cell holds no bytes")
    raise RecordError("audio cell has neither bytes nor a path")


# ---------------------------------------------------------------- entry points


def read_speechocean(path: str | Path, extract_dir: Path | None = None) -> SourceData:
    """Detect the layout of ``path`` and read it.

    Layouts: the release folder; a ``save_to_disk`` folder; the hub's parquet files
    (``data/train-*.parquet``) or its auto-converted ones (``default/<split>/*.parquet``);
    or, as a string ``owner/name`` that is no local path, a hub dataset id loaded with
    ``datasets.load_dataset`` (offline: from the local datasets cache).
    """
    if isinstance(path, str) and looks_like_hub_id(path):
        return read_hub(path, extract_dir)
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data path {p} does not exist; set data.path to a Speechocean762 folder "
                        "or a hub dataset id such as mispeech/speechocean762")
    if p.is_dir() and ((p / "resource").is_dir() or (p / "WAVE").is_dir()):
        return read_release(p)
    if is_hub_dir(p):
        return read_hub(p, extract_dir)
    if is_release_dir(p):
        return read_release(p)
    raise UserError(
        f"{p} is neither a Speechocean762 release folder (resource/scores.json, train/wav.scp) "
        "nor a datasets save_to_disk/parquet folder; for a JSONL manifest set data.source=manifest"
    )


def assign_validation(utts: list[Utterance], fraction: float, seed: int, train_split: str = "train") -> None:
    """Move a share of the train *speakers* (not utterances) to the ``validation`` split.

    Carving by speaker keeps validation honest (no voice is seen in training); the choice is
    a seeded shuffle of the sorted speaker list, so it is the same on every machine.
    """
    if fraction <= 0:
        return
    speakers = sorted({u.speaker for u in utts if u.split == train_split})
    if len(speakers) < 2:
        raise UserError(
            f"validation_fraction={fraction} needs at least 2 {train_split} speakers, found {len(speakers)}"
        )
    rng = random.Random(seed)
    rng.shuffle(speakers)
    k = min(len(speakers) - 1, max(1, round(fraction * len(speakers))))
    held = set(speakers[:k])
    for u in utts:
        if u.split == train_split and u.speaker in held:
            u.split = VALIDATION_SPLIT


def check_speaker_disjoint(utts: list[Utterance]) -> None:
    """Raise :class:`UserError` if a speaker appears in two splits (scores would leak)."""
    where: dict[str, set[str]] = {}
    for u in utts:
        where.setdefault(u.speaker, set()).add(u.split)
    shared = {s: sorted(v) for s, v in where.items() if len(v) > 1}
    if shared:
        shown = ", ".join(f"{s} ({'/'.join(v)})" for s, v in sorted(shared.items())[:10])
        raise UserError(
            f"{len(shared)} speaker(s) appear in more than one split: {shown}; splits must be "
            "speaker-disjoint or test scores are optimistic - fix utt2spk/the split lists"
        )
