"""The demo recipe: evaluate the untrained tiny model, train it, evaluate it again.

It exists to show that training does something, honestly labelled. The tiny model (toy width;
the demo config uses ``model.tiny=pretrained``, whose decoder was pretrained to copy a quote
and spell it as phones but never to write JSON) is scored on two groups of utterances, before
and after training:

* **trained-on utterances** (training speakers): the first utterances of the train split,
  ones the demo trains on. What improves here is the answer format plus memorisation of these
  recordings' labels (scores and transcripts) - proof that the recipe's labels, masking and
  audio path teach the model, not a measure of pronunciation assessment.
* **held-out speakers** (the test split, speakers never seen): the answers' *format* carries
  over (they parse), and so does copying the prompt's sentence into the word transcript and
  spelling it as phones (skills of the base); hearing does not - a toy model trained for
  minutes does not hear pronunciation, so the scores and mispronunciations stay near chance.

Outputs (run folder): ``eval-before``/``eval-after`` (held-out speakers) and
``eval-train-before``/``eval-train-after`` (trained-on utterances), each a full evaluation
folder (predictions, results.json, report.md), plus ``demo.md`` and ``demo.json`` with the
before/after table of both groups.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi4mm_lora.config import TINY_NAMES, RunConfig
from phi4mm_lora.evaluate.metrics import COLUMN_NAMES, SUMMARY_KEYS, json_safe
from phi4mm_lora.evaluate.report import LOWER_IS_BETTER, _fmt
from phi4mm_lora.evaluate.run import evaluate
from phi4mm_lora.model.run_folder import Run

#: (group key, data split, label, evaluation folder suffix)
GROUPS: tuple[tuple[str, str, str, str], ...] = (
    ("trained", "train", "trained-on utterances (training speakers)", "eval-train"),
    ("held_out", "test", "held-out speakers (test split)", "eval"),
)
ROWS: tuple[tuple[str, str], ...] = (
    ("parse:apa", "APA answers parsed"),
    ("parse:mdd", "MDD answers parsed"),
    *((k, COLUMN_NAMES[k]) for k in SUMMARY_KEYS),
)


@dataclass
class DemoResult:
    """Results per group (``trained``/``held_out``) before and after training, and the run."""

    before: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    train_summary: dict[str, Any]
    adapter_dir: Path
    run_dir: Path
    seconds: float


def _value(results: dict[str, Any], key: str) -> float | None:
    if key.startswith("parse:"):
        return (results.get("parse_rate") or {}).get(key.split(":", 1)[1])
    return (results.get("summary") or {}).get(key)


def learning_rows(before: dict[str, dict], after: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per metric: before/after/delta for each group (None where undefined)."""
    rows = []
    for key, label in ROWS:
        row: dict[str, Any] = {"key": key, "metric": label, "lower_is_better": key in LOWER_IS_BETTER}
        for group, *_ in GROUPS:
            b, a = _value(before[group], key), _value(after[group], key)
            row[group] = {"before": b, "after": a, "delta": None if a is None or b is None else a - b}
        rows.append(row)
    return rows


def learning_table_md(rows: list[dict[str, Any]]) -> list[str]:
    """The before/after table of both groups as markdown lines."""
    head = "| metric | " + " | ".join(f"{label}: before | after" for _, _, label, _ in GROUPS) + " |"
    lines = [head, "|---|" + "---|---|" * len(GROUPS)]
    for r in rows:
        cells = [f"{_fmt(r[g]['before'])} | {_fmt(r[g]['after'])}" for g, *_ in GROUPS]
        lines.append(f"| {r['metric']} | " + " | ".join(cells) + " |")
    return lines


def render_learning_table(rows: list[dict[str, Any]]) -> Any:
    """A rich Table: metric, then before/after for each group, improvements in green."""
    from rich.table import Table

    table = Table(title="Demo: before vs after training")
    table.add_column("metric")
    for _, _, label, _ in GROUPS:
        table.add_column(f"{label}\nbefore", justify="right")
        table.add_column("after", justify="right")
    for r in rows:
        cells = [r["metric"]]
        for g, *_ in GROUPS:
            cell = r[g]
            d = cell["delta"]
            better = d is not None and abs(d) > 1e-9 and ((d < 0) if r["lower_is_better"] else (d > 0))
            colour = "green" if better else ("red" if d is not None and abs(d) > 1e-9 else "white")
            cells += [_fmt(cell["before"]), f"[{colour}]{_fmt(cell['after'])}[/{colour}]"]
        table.add_row(*cells)
    table.caption = ("trained-on: utterances the demo trained on (format + memorisation); held-out: speakers never "
                     "seen (format and copying carry over, hearing cannot). Unparseable answers count as total failures.")
    return table


def evaluate_groups(cfg: RunConfig, out: Path, stage: str, limits: dict[str, int],
                    compare: dict[str, dict] | None = None, progress: bool = True,
                    run: Run | None = None) -> dict[str, dict]:
    """Evaluate both groups; folders ``<suffix>-<stage>`` (e.g. eval-train-before, eval-after).

    ``run``: the opened training run whose adapter is evaluated (None: the untrained model);
    :func:`evaluate` sets it up with :meth:`Run.configure` (adapter structure, base model and
    prompts from the run's own config.yaml), as ``phi4mm-lora evaluate --adapter RUN`` does.
    """
    results = {}
    for group, split, label, suffix in GROUPS:
        results[group] = evaluate(
            cfg, run=run, split=split, limit=limits[group], output_dir=out / f"{suffix}-{stage}",
            compare=(compare or {}).get(group), name=f"{stage} training: {label}",
            compare_name=f"before training: {label}", progress=progress)
    return results


def run_demo(cfg: RunConfig, out: Path, n_held_out: int, progress: bool = True,
             log: Any = print) -> DemoResult:
    """Evaluate untrained -> train -> evaluate trained; write demo.md / demo.json into ``out``."""
    from phi4mm_lora.train import train

    t0 = time.perf_counter()
    n_trained = cfg.data.limit if cfg.data.limit is not None else n_held_out
    limits = {"trained": min(n_trained, n_held_out), "held_out": n_held_out}
    log(f"demo: scoring the untrained model on {limits['trained']} trained-on and {limits['held_out']} "
        "held-out utterances")
    before = evaluate_groups(cfg, out, "before", limits, progress=progress)
    result = train(cfg, evaluate_fn=None, progress=progress)
    trained = Run.open(result.run_dir)  # the library's view of the run folder, as the CLI's
    after = evaluate_groups(cfg, out, "after", limits, compare=before, progress=progress, run=trained)
    seconds = time.perf_counter() - t0
    rows = learning_rows(before, after)
    (out / "demo.json").write_text(json.dumps(json_safe({
        "rows": rows, "limits": limits, "seconds": round(seconds, 1), "train": result.summary,
    }), indent=2, default=str) + "\n")
    model = f"The {TINY_NAMES[cfg.model.tiny]}" if cfg.model.path is None else f"Model {cfg.model.path}"
    md = ["# Demo: what training changed", "",
          f"{model}, bundled generated corpus; {result.summary.get('steps')} training steps; "
          f"{seconds:.0f} s in all.", "",
          *learning_table_md(rows), "",
          "- **trained-on utterances**: the first utterances of the train split, the ones the demo trained on. "
          "Improvement here shows that the recipe teaches the model its labels (memorisation).",
          "- **held-out speakers**: the test split. Parse rate shows the answer format was learned; WER/PER show "
          "the sentence copied from the prompt and spelt as phones (skills of the pretrained tiny base); the scores "
          "and mispronunciations stay near chance, because a toy model trained for minutes cannot hear "
          "pronunciation. The real model is needed for that (see README).",
          "- Headline figures count an unparseable answer as a total failure (docs/metrics.md).", ""]
    for _, _, label, suffix in GROUPS:
        md.append(f"- {label}: `{suffix}-before/report.md`, `{suffix}-after/report.md`")
    (out / "demo.md").write_text("\n".join(md) + "\n")
    return DemoResult(before, after, result.summary, result.adapter_dir, result.run_dir, seconds)


__all__ = ["DemoResult", "GROUPS", "evaluate_groups", "learning_rows", "learning_table_md",
           "render_learning_table", "run_demo"]
