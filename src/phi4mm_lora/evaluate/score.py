"""Score recordings of a known sentence: the four APA scores plus phone-level feedback.

Both tasks run on each recording (the APA prompt and the MDD prompt, from the same
instruction files training used), in one batched generation. The MDD phone transcript is
aligned against the sentence's CMUdict phones (:func:`~phi4mm_lora.evaluate.align.find_mispronunciations`)
to list mispronounced phones per word. Words CMUdict lacks are reported even when the model's
answer does not parse, because the user needs to know those words were never checked.

Every input problem (missing or undecodable audio, empty sentence) is a
:class:`~phi4mm_lora.errors.UserError` raised *before* the model is loaded, so a typo
costs nothing; each recording is decoded once, by that check, and the samples are what the
model hears. :func:`score`, :func:`score_batch`, batch scoring and the service all take a run
folder the same way (``run=``, see :func:`~phi4mm_lora.evaluate.run.configure_and_load`). A model answer that does not parse is not an error: its fields are ``None``
and the parse error is reported next to the raw answer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phi4mm_lora.config import RunConfig
from phi4mm_lora.data.audio import TARGET_SR, load_audio
from phi4mm_lora.data.examples import Example
from phi4mm_lora.data.prompts import load_instruction, user_prompt
from phi4mm_lora.errors import UserError
from phi4mm_lora.evaluate.align import canonical_words, feedback_from_answer
from phi4mm_lora.evaluate.batch_size import resolve_batch_size
from phi4mm_lora.evaluate.generate import generate_all
from phi4mm_lora.evaluate.parse import APA_KEYS, parse_apa
from phi4mm_lora.model.run_folder import Run

TASKS = ("apa", "mdd")


@dataclass
class ScoreItem:
    """One recording to score in a batch: a name for the output, its sentence, its audio.

    ``samples`` are already decoded 16 kHz mono samples (an upload); when None, ``audio`` is a
    file path read by the generator.
    """

    audio: str
    text: str
    samples: np.ndarray | None = None


def check_inputs(audio_paths: Sequence[str | Path], text: str | None) -> list[ScoreItem]:
    """Every problem with the inputs at once, as one UserError; otherwise one decoded
    :class:`ScoreItem` per recording (the only time the files are read)."""
    problems = []
    if not text or not text.strip():
        problems.append("--text is required: the sentence the speaker read (e.g. --text \"we call it bear\")")
    if not audio_paths:
        problems.append("no audio file given")
    items = []
    for p in (Path(a).expanduser() for a in audio_paths):
        try:
            items.append(ScoreItem(str(p), (text or "").strip(), load_audio(p)))
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError("; ".join(problems))
    return items


def task_examples(cfg: RunConfig, items: Sequence[ScoreItem], audio_token: str) -> list[Example]:
    """An APA and an MDD example per item (ids ``<n>:apa``, ``<n>:mdd``), with its own sentence."""
    instructions = {task: load_instruction(task, cfg.prompts) for task in TASKS}
    examples = []
    for n, it in enumerate(items):
        duration = len(it.samples) / TARGET_SR if it.samples is not None else None
        for task in TASKS:
            examples.append(Example(id=f"{n}:{task}", utt_id=str(n), task=task, audio_path=it.audio, image_path=None,
                                    prompt=user_prompt(task, instructions[task], audio_token, it.text), answer="",
                                    split="score", speaker=None, duration=duration))
    return examples


def rubric_bands(instruction: str) -> dict[str, list[tuple[int, int, str]]]:
    """Score bands per aspect from an APA instruction's rubric: ``{"accuracy": [(9, 10, "..."), ...]}``.

    The rubric is the text the model was trained with (``prompts/apa.txt`` or the user's
    ``prompts.apa``), so a score is explained in the words that defined it. An aspect is a line
    ``Accuracy ...:``; its bands are the lines ``  9-10: meaning`` that follow. An aspect with a
    one-line definition (``Total: ...``) gets that line for every score.
    """
    bands: dict[str, list[tuple[int, int, str]]] = {}
    aspect = None
    for line in instruction.splitlines():
        head = re.match(r"^(accuracy|fluency|prosodic|total)\b[^:]*:\s*(.*)$", line.strip(), re.IGNORECASE)
        band = re.match(r"^\s+(\d+)\s*(?:-\s*(\d+))?\s*:\s*(.+)$", line)
        if head and not line.startswith((" ", "\t")):
            aspect = head[1].lower()
            bands[aspect] = [(0, 10, head[2].strip())] if head[2].strip() else []
        elif band and aspect is not None:
            lo = int(band[1])
            bands[aspect].append((lo, int(band[2] or lo), band[3].strip()))
    return bands


def score_meaning(bands: dict[str, list[tuple[int, int, str]]], aspect: str, value: int | None) -> str | None:
    """The rubric's line for ``value`` of ``aspect`` (the narrowest band that holds it)."""
    if value is None:
        return None
    fits = [b for b in bands.get(aspect, []) if b[0] <= value <= b[1]]
    return min(fits, key=lambda b: b[1] - b[0])[2] if fits else None


def feedback(audio: str, text: str, apa_raw: str, mdd_raw: str,
             errors: dict[str, str | None] | None = None, rubric: str | None = None) -> dict[str, Any]:
    """The score command's result for one recording, from the two raw answers.

    ``rubric``: the APA instruction text whose score bands explain each score (default: the
    project's ``prompts/apa.txt``). Kept separate from generation so the formatting can be
    tested with given answers.
    """
    errors = errors or {}
    apa = parse_apa(apa_raw)
    scores = {k: (apa.value or {}).get(k) if apa.ok else None for k in APA_KEYS}
    mdd_res, report = feedback_from_answer(text, mdd_raw)
    words = canonical_words(text)
    out: dict[str, Any] = {
        "audio": audio,
        "text": text,
        "scores": scores,
        "apa_raw": apa_raw,
        "apa_error": errors.get("apa") or (None if apa.ok else apa.error),
        "word_transcript": mdd_res.value.get("word_transcript") if mdd_res.ok and mdd_res.value else None,
        "phoneme_transcript": mdd_res.value.get("phoneme_transcript") if mdd_res.ok and mdd_res.value else None,
        "mdd_raw": mdd_raw,
        "mdd_error": errors.get("mdd") or (None if mdd_res.ok else mdd_res.error),
        "expected": [{"word": w.word, "phones": w.phones} for w in words],
        "oov": [w.word for w in words if w.phones is None],
        "mispronunciations": None,
        "phone_error_rate": None,
    }
    bands = rubric_bands(rubric if rubric is not None else load_instruction("apa"))
    out["meaning"] = {k: score_meaning(bands, k, scores[k]) for k in APA_KEYS}
    if report is not None:
        d = report.to_dict()
        out["mispronunciations"] = d["issues"]
        out["phone_error_rate"] = d["phone_error_rate"]
        out["expected"] = d["expected"]
        out["oov"] = d["oov"]
    return out


def score(cfg: RunConfig, audio_paths: Sequence[str | Path], text: str | None, loaded: Any | None = None,
          progress: bool = False, run: Run | str | Path | None = None,
          timing: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Score each recording against ``text``; one :func:`feedback` dict per recording.

    ``run``: a training run folder, a checkpoint or adapter folder, or a
    :class:`~phi4mm_lora.model.run_folder.Run`: its adapter on its own base model, exactly as
    ``phi4mm-lora score --adapter RUN``. Each dict carries ``provenance`` (model, adapter,
    precision, version). Input problems are raised before the run is opened or a model loads.
    ``timing``, when given, receives the seconds (see :func:`score_batch`).
    """
    items = check_inputs(audio_paths, text)
    results = score_batch(cfg, loaded, items, progress=progress, run=run, timing=timing)
    for r in results:
        r.pop("error", None)  # reported per task in apa_error / mdd_error
    return results


def _marked_words(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Per word of the sentence: (word, its phones with the wrong ones marked, what went wrong).

    ``EH->IH``: expected EH, heard IH; ``-EH``: EH not said; ``+IH``: IH said in addition.
    """
    issues: dict[int, list[dict[str, Any]]] = {}
    for it in result["mispronunciations"] or []:
        issues.setdefault(it["word_index"], []).append(it)
    rows = []
    for wi, e in enumerate(result["expected"]):
        if e["phones"] is None:
            rows.append((e["word"], "(not in CMUdict)", "not checked"))
            continue
        marked = list(e["phones"])
        notes, inserted = [], {}
        for it in issues.get(wi, []):
            pos = it["position"]
            if it["kind"] == "insertion":
                inserted.setdefault(pos, []).append(f"[red]+{it['heard']}[/]")
                notes.append(f"extra {it['heard']}")
            elif it["kind"] == "deletion":
                marked[pos] = f"[red]-{it['expected']}[/]"
                notes.append(f"{it['expected']} missing")
            else:
                marked[pos] = f"[red]{it['expected']}->{it['heard']}[/]"
                notes.append(f"{it['expected']} heard as {it['heard']}")
        phones = []
        for pos, ph in enumerate(marked):
            phones += inserted.get(pos, []) + [ph]
        phones += inserted.get(len(marked), [])
        rows.append((e["word"], " ".join(phones), "; ".join(notes) or "ok"))
    return rows


def render(result: dict[str, Any]) -> list[Any]:
    """Rich renderables for one recording, as a teacher reads them: each score out of 10 with
    the rubric's meaning, then the sentence word by word with the wrong phones marked."""
    from rich.markup import escape
    from rich.table import Table

    parts: list[Any] = [f"[bold]{escape(result['audio'])}[/]: \"{escape(result['text'])}\""]
    head = Table(show_header=True, box=None, pad_edge=False)
    for col in ("aspect", "score", "meaning (from the rubric)"):
        head.add_column(col, justify="right" if col == "score" else "left")
    meaning = result.get("meaning") or {}
    for k in APA_KEYS:
        v = result["scores"][k]
        head.add_row(k, "-" if v is None else f"{v}/10", escape(meaning.get(k) or ("no score" if v is None else "")))
    parts.append(head)
    if result["apa_error"]:
        parts.append(f"[yellow]scores not parsed:[/] {escape(result['apa_error'])} "
                     f"(raw: {escape(repr(result['apa_raw'][:80]))})")
    issues = result["mispronunciations"]
    if result["mdd_error"]:
        parts.append(f"[yellow]phones not parsed:[/] {escape(result['mdd_error'])} "
                     f"(raw: {escape(repr(result['mdd_raw'][:80]))})")
        expected = " | ".join(f"{e['word']}: {' '.join(e['phones']) if e['phones'] else '(not in CMUdict)'}"
                              for e in result["expected"])
        parts.append(f"phones expected: {escape(expected)}")
    elif issues is not None:
        parts.append(f"words heard: {escape(result['word_transcript'] or '-')}")
        if not issues:
            checked = "" if not result["oov"] else " (in the words that could be checked)"
            parts.append(f"[green]no mispronunciations detected[/]{checked}")
        else:
            t = Table(show_header=True, box=None, pad_edge=False,
                      title=f"{len(issues)} mispronounced phone(s)"
                      + (f", phone error rate {result['phone_error_rate']:.0%}" if result["phone_error_rate"] is not None
                         else ""))
            for col in ("word", "phones (expected->heard)", "what went wrong"):
                t.add_column(col)
            for word, phones, note in _marked_words(result):
                t.add_row(escape(word), phones, note)
            parts.append(t)
    if result["oov"]:
        parts.append(f"[yellow]not in CMUdict (not checked):[/] {escape(', '.join(result['oov']))}")
    return parts


def score_batch(cfg: RunConfig, loaded: Any | None, items: Sequence[ScoreItem],
                progress: bool = False, run: Run | str | Path | None = None,
                timing: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Score recordings that each read their own sentence, in one batched generation.

    The entry point of the HTTP service and of batch scoring: the same prompts and
    :func:`feedback` as :func:`score`, one dict per item in order. An item whose audio or
    generation failed is not an exception: its dict names the failure in ``error``. Each row's
    answer does not depend on what else is in the batch (see :mod:`~phi4mm_lora.evaluate.generate`).
    ``loaded`` None: the model is loaded from ``cfg`` (set up for ``run`` when given).
    ``timing``, when given, receives ``load_seconds`` (0 when ``loaded`` was passed) and
    ``score_seconds``: both tasks of every item with the model loaded, audio decoding included
    (issue 11's figure: one 5-second recording in under 3 s on a GPU). They stay out of the
    results, which are the same for the same input.
    """
    from phi4mm_lora.evaluate.run import configure_and_load
    from phi4mm_lora.model.provenance import provenance

    t0 = time.perf_counter()
    cfg, loaded = configure_and_load(cfg, run, loaded)
    t1 = time.perf_counter()
    examples = task_examples(cfg, items, loaded.processor.audio_token)
    decoded = {ex.id: items[int(ex.utt_id)].samples for ex in examples if items[int(ex.utt_id)].samples is not None}
    size, _how = resolve_batch_size(cfg.eval.batch_size, loaded.model, loaded.processor.tokenizer, examples,
                                    cfg.eval.max_new_tokens, cfg.eval.cache)
    gens = {g.id: g for g in generate_all(loaded.model, loaded.processor, examples, batch_size=size,
                                          max_new_tokens=cfg.eval.max_new_tokens, progress=progress, audio=decoded,
                                          cache=cfg.eval.cache, compile=cfg.eval.compile,
                                          encoder_batch=cfg.eval.encoder_batch)}
    prov = provenance(loaded, cfg)
    rubric = load_instruction("apa", cfg.prompts)
    out = []
    for n, it in enumerate(items):
        apa, mdd = gens[f"{n}:apa"], gens[f"{n}:mdd"]
        res = feedback(it.audio, it.text.strip(), apa.text, mdd.text, {"apa": apa.error, "mdd": mdd.error}, rubric)
        res.update(error=apa.error or mdd.error, provenance=prov)
        out.append(res)
    if timing is not None:
        timing.update(load_seconds=t1 - t0, score_seconds=time.perf_counter() - t1)
    return out
