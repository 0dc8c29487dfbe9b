"""Evaluate a model (+ adapter) on a data split and write the report; evaluate during training.

:func:`evaluate` is the whole pipeline behind ``phi4mm-lora evaluate``: examples from the
data layer -> batched greedy generation -> prediction records (the format documented in
:mod:`phi4mm_lora.evaluate.metrics`) -> :func:`compute_all` -> :func:`write_report`.
Predictions are saved before any metric is computed, so ``results.json`` can always be
recomputed from ``predictions.jsonl`` without the model (a test does exactly that).

Why records carry more than the answer: MDD precision/recall need the canonical phones
(what should have been said) and the annotated phones (what the annotators heard), which
only the data layer knows. The data layer reads them with the examples
(:class:`~phi4mm_lora.data.examples.PhoneReference` on each MDD example), so the dataset is
read once, and they are stored in each MDD record so the metrics never need the dataset again.

Failures are never dropped: an answer that does not parse, and an example whose audio or
generation failed (raw ``""`` with ``parse_error`` naming the cause), all stay in the
records, so they are counted per task by :func:`compute_all` and listed in the report.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phi4mm_lora.config import RunConfig, dump_config
from phi4mm_lora.data.examples import Example, build_examples, with_audio_token
from phi4mm_lora.errors import UserError
from phi4mm_lora.evaluate.batch_size import resolve_batch_size
from phi4mm_lora.evaluate.generate import Generation, generate_all, max_tokens_for
from phi4mm_lora.evaluate.metrics import compute_all
from phi4mm_lora.evaluate.parse import parse_for_task
from phi4mm_lora.evaluate.report import load_results, save_predictions, write_report
from phi4mm_lora.fileio import check_writable_dir
from phi4mm_lora.model.provenance import provenance
from phi4mm_lora.model.run_folder import Run

#: Keys of the flat dict the per-epoch evaluator returns (the trainer logs them as eval/<key>).
EPOCH_KEYS: tuple[str, ...] = ("acc_pcc", "flu_pcc", "pros_pcc", "total_pcc", "wer", "per", "f1", "precision", "recall")


def build_record(ex: Example, gen: Generation, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """One prediction record in :func:`compute_all`'s format.

    ``info`` (canonical_phones, annotated_at, accuracy) defaults to the example's own
    :class:`~phi4mm_lora.data.examples.PhoneReference`.
    """
    if info is None and ex.reference is not None:
        info = {"canonical_phones": ex.reference.canonical_phones, "annotated_at": list(ex.reference.annotated_at),
                "accuracy": ex.reference.accuracy}
    raw = gen.text
    res = parse_for_task(ex.task, raw)
    rec: dict[str, Any] = {"id": ex.utt_id, "task": ex.task, "raw": raw,
                           "parsed": res.value if res.ok else None}
    if gen.error is not None:
        rec["parsed"] = None
        rec["parse_error"] = f"no answer ({gen.error})"
        rec["error"] = gen.error
    elif not res.ok:
        rec["parse_error"] = res.error
    if ex.task in ("apa", "mdd"):
        try:
            ref = json.loads(ex.answer)
        except json.JSONDecodeError:
            ref = {}
        if ex.task == "mdd":
            info = info or {}
            if info.get("accuracy") is not None:
                ref["accuracy"] = info["accuracy"]
            rec["canonical_phones"] = info.get("canonical_phones")
            if info.get("annotated_at") is not None:
                rec["annotated_at"] = info["annotated_at"]
            rec["annotated_phones"] = ref.get("phoneme_transcript", "")
        rec["reference"] = ref
    else:
        rec["reference"] = {"text": ex.answer}
        if ex.language:
            rec["language"] = ex.language
    rec["n_tokens"] = gen.n_tokens
    rec["finished"] = gen.finished
    return rec


def _load(cfg: RunConfig, loaded: Any | None) -> Any:
    if loaded is not None:
        return loaded
    from phi4mm_lora.model.inference import load_for_inference

    return load_for_inference(cfg)  # adapter merged where eval.merge_adapter and the plan allow


def configure_and_load(cfg: RunConfig, run: Run | str | Path | None = None,
                       loaded: Any | None = None) -> tuple[RunConfig, Any]:
    """``cfg`` set up for ``run`` (its adapter on its base model, :meth:`Run.configure`) and the
    model it describes, loaded (or ``loaded`` when the caller already holds it).

    The one way ``score``, batch scoring and the service turn a run folder into a model, so
    the Python API and the CLI take the same ``run`` and get the same model.
    """
    if run is not None:
        cfg = Run.open(run).configure(cfg)
    return cfg, _load(cfg, loaded)


def predict(cfg: RunConfig, model: Any, processor: Any, examples: list[Example],
            progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate for ``examples`` and turn the answers into records; also timing figures."""
    size, how = resolve_batch_size(cfg.eval.batch_size, model, processor.tokenizer, examples, cfg.eval.max_new_tokens,
                                   cfg.eval.cache)
    t0 = time.perf_counter()
    gens = generate_all(model, processor, examples, batch_size=size,
                        max_new_tokens=cfg.eval.max_new_tokens, progress=progress,
                        cache=cfg.eval.cache, compile=cfg.eval.compile, encoder_batch=cfg.eval.encoder_batch)
    seconds = time.perf_counter() - t0
    records = [build_record(ex, g) for ex, g in zip(examples, gens, strict=True)]
    tasks = sorted({ex.task for ex in examples})
    timing = {
        "generation_seconds": round(seconds, 3),
        "examples": len(examples),
        "examples_per_second": round(len(examples) / seconds, 3) if seconds > 0 else None,
        "generated_tokens": sum(g.n_tokens for g in gens),
        "max_new_tokens": {t: max_tokens_for(t, cfg.eval.max_new_tokens) for t in tasks},
        "batch_size": size,
        **({"batch_size_auto": how} if how else {}),
    }
    return records, timing


def evaluate(
    cfg: RunConfig,
    loaded: Any | None = None,
    split: str | None = None,
    limit: int | None = None,
    output_dir: str | Path | None = None,
    compare: str | Path | dict[str, Any] | None = None,
    name: str = "this run",
    progress: bool = True,
    compare_name: str | None = None,
    run: Run | str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate on ``split`` (default ``cfg.data.eval_split``); write the report; return results.

    ``limit`` caps utterances (both tasks of an utterance are kept); ``compare`` is another
    run's results.json, its run folder, or the loaded dict, shown side by side with deltas.
    Output (``output_dir``, default a new ``<cfg.output_dir>/eval/<split>-<time>/``): predictions.jsonl, results.json
    (exactly ``compute_all(predictions)``), report.md, PNG plots, config.yaml and run.json
    (model, adapter, timing, failures). The returned dict is results.json plus ``meta``
    (run.json's content), whose ``provenance`` says which model, adapter and precision ran.
    ``run``: a training run folder (or :class:`~phi4mm_lora.model.run_folder.Run`) whose
    adapter is evaluated on its own base model (see :meth:`Run.configure`).
    """
    if run is not None:
        run = Run.open(run)
        cfg = run.configure(cfg)
        name = run.name if name == "this run" else name
    split = split or cfg.data.eval_split
    if limit is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"limit": limit})})
    out = Path(output_dir).expanduser() if output_dir else fresh_eval_dir(cfg.output_dir, split)
    baseline = compare if isinstance(compare, dict) or compare is None else load_results(Path(compare))
    # cheap checks first: the data and the output folder, before the model loads
    check_writable_dir(out, "output folder")
    examples, data_report = build_examples(cfg.data, cfg.prompts, split, seed=cfg.seed)
    if not examples:  # an empty table with exit 0 would read as "evaluated, all fine"
        first = f"; first: {data_report.problems[0]}" if data_report.problems else ""
        raise UserError(f"nothing to evaluate: no usable example in split {split!r} of {data_report.source} "
                        f"({data_report.n_problems} skipped{first}); fix the data or pick another split (data.eval_split)")
    loaded = _load(cfg, loaded)
    examples = with_audio_token(examples, loaded.processor.audio_token)  # the data was read before the model loaded
    records, timing = predict(cfg, loaded.model, loaded.processor, examples, progress)
    out.mkdir(parents=True, exist_ok=True)
    save_predictions(records, out / "predictions.jsonl")
    results = compute_all(records)
    meta = {
        "provenance": provenance(loaded, cfg),
        "model": str(getattr(loaded, "path", cfg.model.path)),
        "adapter": cfg.adapter.init_from,
        "adapter_mode": cfg.adapter.mode,
        "data": data_report.source,
        "split": split,
        "utterances": data_report.n_utterances,
        "skipped_by_data_layer": [{"kind": p.kind, "item": p.item, "detail": p.detail}
                                  for p in data_report.problems],
        "generation_failures": [{"id": r["id"], "task": r["task"], "error": r["error"]}
                                for r in records if r.get("error")],
        **timing,
    }
    dump_config(cfg, out / "config.yaml")
    (out / "run.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    write_report(results, records, out, compare=baseline, compare_name=compare_name or _compare_name(compare),
                 name=name, meta=meta)
    return {**results, "meta": meta}


def fresh_eval_dir(run_dir: str | Path, split: str) -> Path:
    """``RUN/eval/<split>-<time>/``, a folder no earlier evaluation used (suffix -2, -3 ... when
    two start in the same second), so evaluations of a run sit with it and never overwrite."""
    base = Path(run_dir).expanduser() / "eval" / f"{split}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 2
    while out.exists():
        out, n = base.with_name(f"{base.name}-{n}"), n + 1
    return out


def _compare_name(compare: Any) -> str:
    if isinstance(compare, (str, Path)):
        p = Path(compare)
        return (p.parent.name if p.name == "results.json" else p.name) or "baseline"
    return "baseline"


def flat_metrics(results: dict[str, Any]) -> dict[str, float | int | None]:
    """The main numbers as a flat dict (for training logs)."""
    summary = results.get("summary") or {}
    flat: dict[str, float | int | None] = {k: summary.get(k) for k in EPOCH_KEYS if k in summary}
    for task, n in (results.get("parse_failure_counts") or {}).items():
        flat[f"parse_failures_{task}"] = n
    flat["parse_failures"] = sum((results.get("parse_failure_counts") or {}).values())
    for task, rate in (results.get("parse_rate") or {}).items():
        flat[f"parse_rate_{task}"] = rate
    return flat


def subset_utterances(examples: list[Example], n: int, seed: int) -> list[Example]:
    """All examples of ``n`` utterances drawn with ``seed`` (same draw every epoch)."""
    ids = sorted({ex.utt_id for ex in examples})
    if n < len(ids):
        ids = sorted(random.Random(seed).sample(ids, n))
    keep = set(ids)
    return [ex for ex in examples if ex.utt_id in keep]


class EpochEvaluator:
    """Callable for the trainer's ``evaluate_fn(model, processor, epoch) -> dict``.

    Scores a fixed subset of ``cfg.eval.subset`` utterances of the eval split, writes
    ``<output_dir>/eval/epoch-<n>/`` (``eval/step-<n>/`` for a mid-epoch call with ``step=``;
    predictions, results, report, compared with the previous evaluation) and returns the main
    metrics flat (``total_pcc``, ``per``, ``wer``, ``f1``..., ``parse_failures``), which the
    trainer logs as ``eval/<key>``. ``evaluator(epoch)`` alone works when a loaded model
    was given.
    """

    def __init__(self, cfg: RunConfig, loaded: Any | None = None, progress: bool = False) -> None:
        self.cfg, self.loaded, self.progress = cfg, loaded, progress
        self._examples: list[Example] | None = None
        self.history: list[tuple[str, dict[str, Any]]] = []  # (label, results) per call

    def examples(self, audio_token: str) -> list[Example]:
        if self._examples is None:
            all_ex, _ = build_examples(self.cfg.data, self.cfg.prompts, self.cfg.data.eval_split,
                                       audio_token=audio_token, seed=self.cfg.seed)
            self._examples = subset_utterances(all_ex, self.cfg.eval.subset, self.cfg.seed)
        return self._examples

    def __call__(self, *args: Any, step: int | None = None) -> dict[str, Any]:
        if len(args) == 1:
            if self.loaded is None:
                raise TypeError("evaluator(epoch) needs a loaded model; call evaluator(model, processor, epoch)")
            model, processor, epoch = self.loaded.model, self.loaded.processor, args[0]
        else:
            model, processor, epoch = args
        examples = self.examples(processor.audio_token)
        records, timing = predict(self.cfg, model, processor, examples, self.progress)
        results = compute_all(records)
        label = f"step {step}" if step is not None else f"epoch {epoch}"
        out = Path(self.cfg.output_dir).expanduser() / "eval" / label.replace(" ", "-")
        save_predictions(records, out / "predictions.jsonl")
        previous = self.history[-1] if self.history else None
        write_report(results, records, out, compare=previous[1] if previous else None,
                     compare_name=previous[0] if previous else "previous", name=label)
        self.history.append((label, results))
        return flat_metrics(results)


def make_epoch_evaluator(cfg: RunConfig, loaded: Any | None = None) -> Callable[..., dict[str, Any]]:
    """The per-epoch evaluator for :func:`phi4mm_lora.train.finetune.train`'s ``evaluate_fn``."""
    return EpochEvaluator(cfg, loaded)
