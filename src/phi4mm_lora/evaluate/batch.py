"""Batch scoring: many recordings, each with its sentence, to a JSONL or CSV file + a summary.

Inputs (:func:`read_rows`):

* a CSV file with a header row, or a JSONL file of objects, with an audio path and the
  sentence on each row (columns ``audio`` and ``text``; ``path``/``file``/``wav`` and
  ``sentence``/``transcript`` are accepted too). Relative paths are relative to the file;
* a folder of recordings (WAV, FLAC, MP3, OGG/Opus, WebM/Opus, M4A) plus either one sentence
  for all of them or a sentence list: lines ``NAME sentence...`` (Kaldi's ``text`` format,
  NAME is the file name without extension; a tab or spaces separate it from the sentence).

A row that cannot be scored (missing or unreadable audio, too long, no sentence, a failed
generation) is written to the results with its ``error`` and counted in the summary; the
run goes on. Results are written as each chunk finishes, so an interrupted run keeps what
was scored. Scoring itself is :func:`~phi4mm_lora.evaluate.score.score_batch`, the same code
as ``score`` and the HTTP service.
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi4mm_lora.config import RunConfig
from phi4mm_lora.data.audio import RECORDING_EXTS, AudioError, load_audio
from phi4mm_lora.errors import UserError
from phi4mm_lora.evaluate.align import split_words
from phi4mm_lora.evaluate.batch_size import AUTO_MAX
from phi4mm_lora.evaluate.parse import APA_KEYS
from phi4mm_lora.evaluate.score import ScoreItem, score_batch
from phi4mm_lora.model.run_folder import Run

AUDIO_COLUMNS = ("audio", "path", "file", "wav", "audio_path")
TEXT_COLUMNS = ("text", "sentence", "transcript")
#: Result columns of the CSV output (JSONL keeps every field of the score result).
CSV_COLUMNS = ("row", "audio", "text", *APA_KEYS, "word_transcript", "phoneme_transcript",
               "mispronunciations", "phone_error_rate", "oov", "error")


@dataclass
class Row:
    """One line of the input: where it came from, its audio and sentence, or why it is unusable."""

    row: int
    audio: str
    text: str
    error: str | None = None


def _pick(record: dict[str, Any], names: tuple[str, ...]) -> str:
    lower = {str(k).strip().lower(): v for k, v in record.items() if k is not None}
    return next((str(lower[n]).strip() for n in names if lower.get(n) not in (None, "")), "")


def _from_records(records: Iterator[tuple[int, dict[str, Any] | None, str | None]], base: Path) -> list[Row]:
    rows = []
    for n, rec, problem in records:
        if rec is None:
            rows.append(Row(n, "", "", problem))
            continue
        audio, text = _pick(rec, AUDIO_COLUMNS), _pick(rec, TEXT_COLUMNS)
        path = str(base / audio) if audio and not Path(audio).expanduser().is_absolute() else str(Path(audio).expanduser())
        err = None if audio else f"no audio path (columns {'/'.join(AUDIO_COLUMNS)})"
        rows.append(Row(n, path if audio else "", text, err))
    return rows


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = {str(c).strip().lower() for c in reader.fieldnames or []}
        if not fields & set(AUDIO_COLUMNS) or not fields & set(TEXT_COLUMNS):
            raise UserError(f"{path}: the header must name an audio column ({', '.join(AUDIO_COLUMNS)}) and a "
                            f"sentence column ({', '.join(TEXT_COLUMNS)}); found: {', '.join(sorted(fields)) or 'nothing'}")
        for rec in reader:
            yield reader.line_num, rec, None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, None, f"not JSON ({exc.msg})"
                continue
            yield (n, rec, None) if isinstance(rec, dict) else (n, None, "not a JSON object")


def _folder_rows(folder: Path, sentences: Path | None, text: str | None) -> list[Row]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in RECORDING_EXTS)
    if not files:
        raise UserError(f"{folder} holds no recordings ({', '.join(RECORDING_EXTS)})")
    if sentences is None and not (text and text.strip()):
        raise UserError(f"--batch {folder} is a folder: give the sentence with --text (same for every file) "
                        "or a list with --sentences FILE (lines: NAME sentence)")
    by_name: dict[str, str] = {}
    if sentences is not None:
        if not sentences.is_file():
            raise UserError(f"--sentences {sentences} not found")
        for line in sentences.read_text(encoding="utf-8").splitlines():
            name, _, sentence = line.strip().partition("\t") if "\t" in line else line.strip().partition(" ")
            if name:
                by_name[name.strip()] = sentence.strip()
    rows = []
    for n, p in enumerate(files, 1):
        s = by_name.get(p.stem, by_name.get(p.name)) if sentences is not None else (text or "").strip()
        rows.append(Row(n, str(p), s or "", None if s else f"no sentence for {p.stem} in {sentences}"))
    return rows


def read_rows(source: str | Path, sentences: str | Path | None = None, text: str | None = None) -> list[Row]:
    """The rows to score from a CSV/JSONL file or a folder (see the module docstring)."""
    src = Path(source).expanduser()
    if not src.exists():
        raise UserError(f"--batch {src} not found; pass a .csv or .jsonl file or a folder of recordings")
    if src.is_dir():
        return _folder_rows(src, Path(sentences).expanduser() if sentences else None, text)
    suffix = src.suffix.lower()
    if suffix == ".csv":
        rows = _from_records(_csv_records(src), src.parent)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _from_records(_jsonl_records(src), src.parent)
    else:
        raise UserError(f"--batch {src}: use a .csv or .jsonl file (audio path + sentence per line) or a folder")
    if not rows:
        raise UserError(f"--batch {src} has no rows")
    return rows


def prepare(row: Row, max_seconds: float) -> Any:
    """The row's decoded audio, or None with ``row.error`` set when it cannot be scored."""
    if row.error:
        return None
    if not row.text or not split_words(row.text):
        row.error = "empty sentence"
        return None
    try:
        return load_audio(row.audio, max_seconds=max_seconds)
    except AudioError as exc:
        row.error = str(exc)
        return None


def _csv_value(key: str, result: dict[str, Any]) -> Any:
    if key in APA_KEYS:
        return (result.get("scores") or {}).get(key)
    value = result.get(key)
    if key == "mispronunciations" and value is not None:
        return "; ".join(f"{i['word']}#{i['position'] + 1}:{i['expected'] or '-'}>{i['heard'] or '-'}" for i in value)
    if key == "oov" and value is not None:
        return " ".join(value)
    return value


def check_output(path: Path) -> Path:
    """The results file's name says its format; refused before any model loads."""
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise UserError(f"--output {path}: use a .jsonl or .csv file name")
    return path


class ResultWriter:
    """Append results to ``.jsonl`` (every field) or ``.csv`` (:data:`CSV_COLUMNS`)."""

    def __init__(self, path: Path) -> None:
        check_output(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.csv = path, path.suffix.lower() == ".csv"
        self._f = path.open("w", newline="" if self.csv else None, encoding="utf-8")
        self._w = csv.DictWriter(self._f, fieldnames=CSV_COLUMNS) if self.csv else None
        if self._w:
            self._w.writeheader()

    def write(self, result: dict[str, Any]) -> None:
        if self._w:
            self._w.writerow({k: _csv_value(k, result) for k in CSV_COLUMNS})
        else:
            self._f.write(json.dumps(result, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def summarise(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Counts, failed rows, mean scores and the most often mispronounced phones."""
    ok = [r for r in results if not r.get("error")]
    means = {}
    for k in APA_KEYS:
        vals = [r["scores"][k] for r in ok if (r.get("scores") or {}).get(k) is not None]
        means[k] = round(sum(vals) / len(vals), 3) if vals else None
    pers = [r["phone_error_rate"] for r in ok if r.get("phone_error_rate") is not None]
    phones = Counter(f"{i['expected'] or '-'}>{i['heard'] or '-'}" for r in ok for i in (r.get("mispronunciations") or []))
    return {
        "rows": len(results), "scored": len(ok), "failed": len(results) - len(ok),
        "failures": [{"row": r["row"], "audio": r["audio"], "error": r["error"]} for r in results if r.get("error")],
        "unparsed_apa": sum(1 for r in ok if r.get("apa_error")),
        "unparsed_mdd": sum(1 for r in ok if r.get("mdd_error")),
        "mean_scores": means,
        "mean_phone_error_rate": round(sum(pers) / len(pers), 4) if pers else None,
        "top_mispronunciations": phones.most_common(10),
        "oov_words": sorted({w for r in ok for w in r.get("oov") or []}),
        "seconds": round(seconds, 2),
        "rows_per_second": round(len(results) / seconds, 3) if seconds > 0 else None,
    }


def score_rows(cfg: RunConfig, loaded: Any | None, rows: list[Row], output: Path, chunk: int | None = None,
               progress: bool = True, extra: dict[str, Any] | None = None,
               run: Run | str | Path | None = None) -> dict[str, Any]:
    """Score ``rows`` into ``output`` and write ``<output>.summary.json``; returns the summary.

    ``run``: a training run folder (or :class:`~phi4mm_lora.model.run_folder.Run`) whose
    adapter scores on its own base model, as ``score --batch --adapter RUN``; ``loaded`` None
    loads the model here. Every result and the summary carry ``provenance`` (which model,
    adapter and precision scored), plus ``extra`` when given.
    """
    from tqdm.auto import tqdm

    from phi4mm_lora.evaluate.run import configure_and_load
    from phi4mm_lora.model.provenance import provenance

    cfg, loaded = configure_and_load(cfg, run, loaded)
    extra = {"provenance": provenance(loaded, cfg), **(extra or {})}
    chunk = chunk or (cfg.eval.batch_size if isinstance(cfg.eval.batch_size, int) else AUTO_MAX // 2)
    max_seconds = cfg.data.max_audio_seconds
    writer = ResultWriter(output)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        with tqdm(total=len(rows), desc="scoring", unit="rec", disable=not progress) as bar:
            for i in range(0, len(rows), chunk):
                part = rows[i: i + chunk]
                items = [ScoreItem(r.audio, r.text, x) for r in part if (x := prepare(r, max_seconds)) is not None]
                scored = iter(score_batch(cfg, loaded, items) if items else [])
                for r in part:
                    res = {"row": r.row, "audio": r.audio, "text": r.text, "error": r.error} if r.error else \
                        {"row": r.row, **next(scored)}
                    res.update(extra)
                    writer.write(res)
                    results.append(res)
                bar.update(len(part))
                bar.set_postfix(failed=sum(1 for r in results if r.get("error")))
    finally:
        writer.close()
    summary = {**summarise(results, time.perf_counter() - start), "output": str(output), **extra}
    summary_path = output.with_name(output.name + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    summary["summary_file"] = str(summary_path)
    return summary
