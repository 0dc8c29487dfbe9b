"""Write what an evaluation found: results.json, report.md with plots, a terminal table.

The markdown report is meant to be read next to the paper: it uses Table 3's columns in
Table 3's order and shows the paper's LoRA epoch-3 row as a reference column, and it lists
the answers that could not be parsed (so a low score caused by format failures is visible).
Given a second run (e.g. before training) it puts both side by side with deltas.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phi4mm_lora.errors import UserError
from phi4mm_lora.evaluate.metrics import (
    COLUMN_NAMES,
    SUMMARY_KEYS,
    json_safe,
    parsed_value,
    pcc,
    utterance_per,
    validate_records,
)
from phi4mm_lora.evaluate.parse import APA_KEYS

#: Ahn & Nam 2025 (arXiv 2509.02915), Table 3, "LoRA, epoch 3" on the Speechocean762 test set.
PAPER_REFERENCE: dict[str, float] = {
    "acc_pcc": 0.656,
    "flu_pcc": 0.727,
    "pros_pcc": 0.711,
    "total_pcc": 0.675,
    "wer": 0.140,
    "per": 0.114,
    "f1": 0.724,
    "precision": 0.728,
    "recall": 0.721,
}
PAPER_REFERENCE_NAME = "paper (LoRA ep. 3)"

#: Metrics where a smaller value is better (for the direction of deltas).
LOWER_IS_BETTER: frozenset[str] = frozenset({"wer", "per", "cer"})

_MAX_LISTED_FAILURES = 20


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _fmt_p(p: Any) -> str:
    if p is None:
        return "-"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def delta(key: str, new: float | None, old: float | None) -> tuple[float | None, str]:
    """``new - old`` and a mark: '+' better, '-' worse, '=' same, '' when undefined."""
    if new is None or old is None:
        return None, ""
    d = new - old
    if abs(d) < 1e-12:
        return 0.0, "="
    better = d < 0 if key in LOWER_IS_BETTER else d > 0
    return d, "+" if better else "-"


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    return results.get("summary") or {}


def _n_by_key(results: dict[str, Any]) -> dict[str, Any]:
    return {c["key"]: c for c in results.get("columns") or []}


def _n_text(c: dict[str, Any]) -> str:
    """``n`` of a column, with how many utterances it left out (PCC: unparseable answers)."""
    n = c.get("n", "-")
    left = c.get("n_left_out")
    return f"{n} ({left} left out)" if left else str(n)


def parse_rate_rows(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """(row label, parse rate) per task, for the same table as the headline metrics."""
    return [(f"{task.upper() if task in ('apa', 'mdd') else task} answers parsed", rate)
            for task, rate in (results.get("parse_rate") or {}).items()]


# ----------------------------------------------------------------------------- files


def save_predictions(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write prediction records as JSONL (one record a line, UTF-8, NaN as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(json_safe(rec), ensure_ascii=False) + "\n")
    return path


def load_predictions(path: Path) -> list[dict[str, Any]]:
    """Read predictions.jsonl; every unreadable line or bad record is reported at once."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"predictions file {path} not found; run `evaluate` first or pass its predictions.jsonl"
        )
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{n}: not JSON ({exc.msg})")
    problems += validate_records(records, source=str(path))
    if problems:
        raise UserError(f"{len(problems)} problem(s) in the predictions:\n  " + "\n  ".join(problems[:20]))
    return records


def load_results(path: Path) -> dict[str, Any]:
    """Read a results.json (e.g. the run to compare against) with a clear error if unusable."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"results file {path} not found; pass a run folder or its results.json") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"results file {path} is not JSON ({exc.msg})") from None
    if not isinstance(data, dict) or "summary" not in data:
        raise UserError(f"{path} has no 'summary': not a results.json written by this project")
    return data


# ----------------------------------------------------------------------------- plots


def _plot_apa(predictions: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """2x2 scatter of predicted vs human score per aspect; integer points jittered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = [(parsed_value(r), r.get("reference") or {}) for r in predictions if r.get("task") == "apa"]
    pairs = [(p, h) for p, h in pairs if p is not None]
    if not pairs:
        return False
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(2, 2, figsize=(9, 8.5), constrained_layout=True)
    for ax, key in zip(axes.flat, APA_KEYS, strict=True):
        pts = [(h[key], p[key]) for p, h in pairs if h.get(key) is not None and key in p]
        human = np.array([x for x, _ in pts], dtype=float)
        pred = np.array([y for _, y in pts], dtype=float)
        jx = human + rng.uniform(-0.2, 0.2, len(human))
        jy = pred + rng.uniform(-0.2, 0.2, len(pred))
        ax.scatter(jx, jy, s=12, alpha=0.45, color="tab:blue", edgecolors="none")
        ax.plot([0, 10], [0, 10], color="grey", lw=1, ls="--", label="y = x")
        r = pcc(list(pred), list(human))
        r_txt = "undefined" if math.isnan(r["pcc"]) else f"{r['pcc']:.3f}"
        ax.set_title(f"{key.capitalize()}: r = {r_txt}, n = {r['n']}")
        ax.set_xlabel("human score")
        ax.set_ylabel("predicted score")
        ax.set_xlim(-0.7, 10.7)
        ax.set_ylim(-0.7, 10.7)
        ax.set_xticks(range(0, 11))
        ax.set_yticks(range(0, 11))
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{title}: predicted vs human sentence scores (points jittered ±0.2)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _accuracy_by_id(predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
    acc: dict[str, float] = {}
    for r in predictions:
        ref = r.get("reference") or {}
        if ref.get("accuracy") is not None:
            acc.setdefault(str(r.get("id")), float(ref["accuracy"]))
    return acc


def per_vs_accuracy(predictions: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(human accuracy, utterance PER) for MDD records whose utterance has an accuracy score.

    The accuracy comes from the MDD record's reference or from the APA record of the same id.
    Unparseable MDD answers are included as empty transcripts (PER 1.0), as in the metrics.
    """
    acc = _accuracy_by_id(predictions)
    points = []
    for r in predictions:
        if r.get("task") != "mdd" or str(r.get("id")) not in acc:
            continue
        value = parsed_value(r)
        hyp = value.get("phoneme_transcript", "") if value else ""
        e = utterance_per((r.get("reference") or {}).get("phoneme_transcript", ""), hyp)
        if not math.isnan(e):
            points.append((acc[str(r.get("id"))], e))
    return points


def _plot_per_accuracy(predictions: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """The paper's Figure 5: utterance PER against the human accuracy score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = per_vs_accuracy(predictions)
    if not points:
        return False
    acc = np.array([a for a, _ in points])
    err = np.array([e for _, e in points])
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
    ax.scatter(acc + rng.uniform(-0.2, 0.2, len(acc)), err, s=12, alpha=0.45, edgecolors="none")
    levels = sorted(set(acc.tolist()))
    means = [float(err[acc == lv].mean()) for lv in levels]
    ax.plot(levels, means, color="tab:red", marker="o", lw=1.5, label="mean PER per score")
    r = pcc(list(err), list(acc))
    r_txt = "undefined" if math.isnan(r["pcc"]) else f"{r['pcc']:.3f}"
    ax.set_title(f"{title}: PER vs human accuracy (r = {r_txt}, n = {r['n']})")
    ax.set_xlabel("human accuracy score (jittered ±0.2)")
    ax.set_ylabel("utterance PER")
    ax.set_xlim(-0.7, 10.7)
    ax.set_xticks(range(0, 11))
    ax.set_ylim(bottom=-0.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- markdown


def _md_escape(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("`", "'")


def _main_table(results: dict[str, Any], name: str) -> list[str]:
    cols = _n_by_key(results)
    summary = _summary(results)
    lines = [
        f"| metric | {name} | p-value | n | {PAPER_REFERENCE_NAME} |",
        "|---|---|---|---|---|",
    ]
    for key in SUMMARY_KEYS:
        c = cols.get(key, {})
        lines.append(
            f"| {COLUMN_NAMES[key]} | {_fmt(summary.get(key))} | {_fmt_p(c.get('p_value'))} "
            f"| {_n_text(c)} | {_fmt(PAPER_REFERENCE[key])} |"
        )
    fails = results.get("parse_failures") or {}
    for label, rate in parse_rate_rows(results):
        task = label.split(" ")[0].lower()
        lines.append(f"| {label} | {_fmt(rate)} | - | {(fails.get(task) or {}).get('total', '-')} | - |")
    return lines


def compare_table(
    results: dict[str, Any], compare: dict[str, Any], name: str = "this run", compare_name: str = "baseline"
) -> list[str]:
    """Markdown rows: metric | baseline | this run | delta (+ better / - worse) | paper."""
    new, old = _summary(results), _summary(compare)
    lines = [
        f"| metric | {compare_name} | {name} | delta | {PAPER_REFERENCE_NAME} |",
        "|---|---|---|---|---|",
    ]
    for key in SUMMARY_KEYS:
        d, mark = delta(key, new.get(key), old.get(key))
        d_txt = "-" if d is None else f"{d:+.3f} ({mark})"
        lines.append(
            f"| {COLUMN_NAMES[key]} | {_fmt(old.get(key))} | {_fmt(new.get(key))} | {d_txt} "
            f"| {_fmt(PAPER_REFERENCE[key])} |"
        )
    rates_old = dict(parse_rate_rows(compare))
    for label, rate in parse_rate_rows(results):
        old_rate = rates_old.get(label)
        d_txt = "-" if rate is None or old_rate is None else f"{rate - old_rate:+.3f}"
        lines.append(f"| {label} | {_fmt(old_rate)} | {_fmt(rate)} | {d_txt} | - |")
    fails_new = results.get("parse_failure_counts") or {}
    fails_old = compare.get("parse_failure_counts") or {}
    for task in sorted(set(fails_new) | set(fails_old)):
        a, b = fails_old.get(task), fails_new.get(task)
        d_txt = "-" if a is None or b is None else f"{b - a:+d}"
        lines.append(f"| unparseable {task} | {_fmt(a)} | {_fmt(b)} | {d_txt} | - |")
    return lines


def _failures_section(results: dict[str, Any]) -> list[str]:
    fails = results.get("parse_failures") or {}
    lines = ["## Unparseable answers", ""]
    if not fails:
        return lines + ["No predictions.", ""]
    lines += ["| task | unparseable | of |", "|---|---|---|"]
    for task, f in fails.items():
        lines.append(f"| {task} | {f['count']} | {f['total']} |")
    lines.append("")
    lines.append(
        "APA: left out of PCC (see n). MDD: a total failure in the headline (every word and phone wrong, "
        "every mispronunciation missed); see the parsed-only figures for the rest. Free-text tasks: "
        "scored as an empty answer."
    )
    lines.append("")
    for task, f in fails.items():
        if not f["items"]:
            continue
        shown = f["items"][:_MAX_LISTED_FAILURES]
        lines += [
            f"### {task}: first {len(shown)} of {f['count']}",
            "",
            "| id | error | raw answer |",
            "|---|---|---|",
        ]
        for it in shown:
            lines.append(
                f"| {_md_escape(it.get('id'))} | {_md_escape(it.get('error') or '-')} "
                f"| `{_md_escape(it.get('raw') or '')}` |"
            )
        lines.append("")
    lines.append("All failures are listed in results.json (`parse_failures`).")
    lines.append("")
    return lines


def _mdd_counts_rows(mdd: dict[str, Any]) -> list[str]:
    rows = []
    for key, label in (("mdd", "standard (headline)"), ("mdd_insertion_aware", "insertion-aware")):
        m = mdd.get(key)
        if not m:
            continue
        c = m["counts"]
        rows.append(f"| {label} | {c['ta']} | {c['fr']} | {c['fa']} | {c['tr']} | {c['cd']} | {c['de']} "
                    f"| {_fmt(m.get('precision'))} | {_fmt(m.get('recall'))} | {_fmt(m.get('f1'))} "
                    f"| {_fmt(m.get('diagnosis_accuracy'))} |")
    return rows


def _parsed_only_section(mdd: dict[str, Any]) -> list[str]:
    po = mdd.get("parsed_only")
    if not po:
        return []
    m = po.get("mdd") or {}
    return [
        "## MDD over parsed answers only (not the headline)",
        "",
        f"{po['n']} of {mdd['n_total']} MDD answers parsed. These figures leave the unparseable answers out, "
        "so they are not comparable with the headline or the paper.",
        "",
        "| | WER | PER | F1 | P | R | F1 insertion-aware |",
        "|---|---|---|---|---|---|---|",
        f"| parsed only | {_fmt(po['wer'].get('wer'))} | {_fmt(po['per'].get('per'))} | {_fmt(m.get('f1'))} "
        f"| {_fmt(m.get('precision'))} | {_fmt(m.get('recall'))} "
        f"| {_fmt((po.get('mdd_insertion_aware') or {}).get('f1'))} |",
        "",
    ]


def _details(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    mdd = results.get("mdd")
    if mdd and "mdd" in mdd:
        lines += [
            "## MDD detail",
            "",
            "Standard: per canonical phone (the paper's and the MDD literature's definition; the headline). "
            "Insertion-aware: also one unit per gap where the annotation or the model inserted phones. "
            f"Canonical-to-annotated correspondence: {mdd.get('annotation', 'aligned')}. See docs/metrics.md.",
            "",
            "| definition | TA | FR | FA | TR | CD | DE | P | R | F1 | diagnosis accuracy (CD/TR) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *_mdd_counts_rows(mdd),
            "",
        ]
        if mdd["mdd"].get("note"):
            lines += [f"Note: {mdd['mdd']['note']}", ""]
    if mdd:
        w, p = mdd["wer"], mdd["per"]
        lines += [
            "| | rate | S | D | I | reference tokens |",
            "|---|---|---|---|---|---|",
            f"| WER | {_fmt(w.get('wer'))} | {w.get('substitutions', '-')} | {w.get('deletions', '-')} "
            f"| {w.get('insertions', '-')} | {w.get('n_ref_tokens', '-')} |",
            f"| PER | {_fmt(p.get('per'))} | {p.get('substitutions', '-')} | {p.get('deletions', '-')} "
            f"| {p.get('insertions', '-')} | {p.get('n_ref_tokens', '-')} |",
            "",
        ]
        lines += _parsed_only_section(mdd)
    for task, block in results.items():
        if task in ("summary", "columns", "parse_rate", "parse_failure_counts", "parse_failures", "apa", "mdd"):
            continue
        if not isinstance(block, dict):
            continue
        rate = block.get("cer") or block.get("wer") or {}
        rate_name = "CER" if "cer" in block else "WER"
        lines += [
            f"## Task `{task}` (language {block.get('language') or '-'})",
            "",
            f"| {rate_name} | BLEU | tokenizer | exact match | n |",
            "|---|---|---|---|---|",
            f"| {_fmt(rate.get(rate_name.lower()))} | {_fmt(block['bleu'].get('bleu'), 2)} "
            f"| {block['bleu'].get('tokenizer')} | {_fmt(block['exact_match'].get('exact_match'))} "
            f"| {block.get('n_total')} |",
            "",
        ]
    return lines


def write_report(
    results: dict[str, Any],
    predictions: list[dict[str, Any]],
    out_dir: Path,
    compare: dict[str, Any] | None = None,
    compare_name: str = "baseline",
    name: str = "this run",
    meta: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write results.json, report.md and the PNG plots into ``out_dir``; return their paths.

    ``results`` is :func:`compute_all`'s output for ``predictions``; ``compare`` another
    run's results (e.g. before training), shown side by side with deltas; ``meta`` (run.json's
    content) adds the :func:`run_section`. report.md is written once, here.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"results": out_dir / "results.json", "report": out_dir / "report.md"}
    paths["results"].write_text(json.dumps(json_safe(results), indent=2, ensure_ascii=False) + "\n")

    md = [f"# Evaluation report: {name}", ""]
    if compare is not None:
        md += (
            [f"## {compare_name} vs {name}", ""] + compare_table(results, compare, name, compare_name) + [""]
        )
        md += ["delta = this run - baseline; (+) better, (-) worse (lower WER/PER is better).", ""]
    md += ["## Results (Table 3 columns)", ""] + _main_table(results, name) + [""]
    md += [
        "PCC: Pearson r between predicted and human sentence scores over the parsed answers "
        "(n; unparseable ones left out and counted).",
        "WER/PER: (S+D+I)/N over all utterances; F1/P/R: MDD per canonical phone (standard definition) "
        "over all utterances. An unparseable MDD answer counts as a total failure in all of them.",
        f"The reference column is {PAPER_REFERENCE_NAME}: Ahn & Nam 2025, Table 3, Speechocean762 test.",
        "",
    ]
    apa_png = out_dir / "apa_scatter.png"
    if _plot_apa(predictions, apa_png, name):
        paths["apa_scatter"] = apa_png
        md += ["## Predicted vs human scores", "", f"![APA scatter]({apa_png.name})", ""]
    per_png = out_dir / "per_vs_accuracy.png"
    if _plot_per_accuracy(predictions, per_png, name):
        paths["per_vs_accuracy"] = per_png
        md += [
            "## PER against human accuracy (cf. paper Figure 5)",
            "",
            f"![PER vs accuracy]({per_png.name})",
            "",
        ]
    md += _details(results)
    md += _failures_section(results)
    if meta is not None:
        md += run_section(meta)
    paths["report"].write_text("\n".join(md) + ("\n" if meta is not None else ""))
    return paths


def run_section(meta: dict[str, Any]) -> list[str]:
    """report.md's last section: what ran, how fast, and what could not be evaluated.

    ``meta`` is run.json's content (see :func:`phi4mm_lora.evaluate.run.evaluate`).
    """
    from phi4mm_lora.model.provenance import provenance_line

    budgets = ", ".join(f"{t} {n}" for t, n in meta["max_new_tokens"].items())
    lines = [
        "## Run",
        "",
        f"- model: `{meta['model']}`; adapter: `{meta['adapter'] or 'the checkpoint'}` ({meta['adapter_mode']} mode)",
        *([f"- produced by: {provenance_line(meta['provenance'])}"] if meta.get("provenance") else []),
        f"- data: `{meta['data']}` split `{meta['split']}`: {meta['utterances']} utterances, "
        f"{meta['examples']} examples",
        f"- generation: {meta['generation_seconds']} s, {meta['examples_per_second']} examples/s, "
        f"{meta['generated_tokens']} tokens; max_new_tokens {budgets}; batch size {meta['batch_size']}",
    ]
    skipped = meta["skipped_by_data_layer"]
    if skipped:
        lines.append(f"- skipped by the data layer: {len(skipped)} (" + "; ".join(
            f"{s['item']}: {s['kind']}" for s in skipped[:10]) + ")")
    failed = meta["generation_failures"]
    if failed:
        lines.append(f"- no answer (audio or generation failed, counted as unparseable): {len(failed)}")
        lines += [f"  - `{f['id']}` {f['task']}: {f['error']}" for f in failed[:20]]
    return lines


def render_table(
    results: dict[str, Any], compare: dict[str, Any] | None = None, compare_name: str = "baseline"
) -> Any:
    """A rich Table of the Table 3 columns (with the baseline and deltas when given)."""
    from rich.table import Table

    table = Table(title="Evaluation (Table 3 columns)")
    table.add_column("metric")
    if compare is not None:
        table.add_column(compare_name, justify="right")
    table.add_column("value", justify="right")
    if compare is not None:
        table.add_column("delta", justify="right")
    table.add_column("p-value", justify="right")
    table.add_column("n", justify="right")
    table.add_column(PAPER_REFERENCE_NAME, justify="right", style="dim")
    cols, summary = _n_by_key(results), _summary(results)
    for key in SUMMARY_KEYS:
        c = cols.get(key, {})
        row = [COLUMN_NAMES[key]]
        if compare is not None:
            row.append(_fmt(_summary(compare).get(key)))
        row.append(_fmt(summary.get(key)))
        if compare is not None:
            d, mark = delta(key, summary.get(key), _summary(compare).get(key))
            colour = {"+": "green", "-": "red"}.get(mark, "white")
            row.append("-" if d is None else f"[{colour}]{d:+.3f}[/{colour}]")
        row += [_fmt_p(c.get("p_value")), _n_text(c), _fmt(PAPER_REFERENCE[key])]
        table.add_row(*row)
    old_rates = dict(parse_rate_rows(compare)) if compare is not None else {}
    for label, rate in parse_rate_rows(results):
        row = [label]
        if compare is not None:
            row.append(_fmt(old_rates.get(label)))
        row.append(_fmt(rate))
        if compare is not None:
            o = old_rates.get(label)
            row.append("-" if rate is None or o is None else f"{rate - o:+.3f}")
        row += ["-", "-", "-"]
        table.add_row(*row)
    fails = results.get("parse_failure_counts") or {}
    if fails:
        totals = {t: f.get("total") for t, f in (results.get("parse_failures") or {}).items()}
        table.caption = "unparseable: " + ", ".join(f"{t} {n}/{totals.get(t, '?')}" for t, n in fails.items())
    return table
