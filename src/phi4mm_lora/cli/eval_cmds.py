"""Evaluation subcommands: ``evaluate`` (a data split -> report) and ``score`` (your recordings).

``--adapter`` takes a training run folder (its final ``adapter/``), a checkpoint of it, or an
adapter folder; :class:`~phi4mm_lora.model.run_folder.Run` opens it and sets up the run's base
model, adapter structure and prompts (``--model`` overrides the base model).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from phi4mm_lora.cli.common import add_run_args, run_config
from phi4mm_lora.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from phi4mm_lora.config import RunConfig
    from phi4mm_lora.model.run_folder import Run

console = Console()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="generate answers for a data split and report the paper's metrics (Table 3 columns)",
        description="Greedy, batched generation for every utterance of a split, then PCC per APA aspect, "
        "WER/PER and MDD precision/recall/F1, parse failures per task. Writes predictions.jsonl, "
        "results.json, report.md and plots into the run: RUN/eval/<split>-<time>/ (or --output). "
        "Example: phi4mm-lora evaluate --adapter runs/demo --split test --compare runs/untrained-eval",
    )
    add_run_args(p)
    p.add_argument("--adapter", metavar="RUN_OR_DIR", help="training run folder (uses RUN/adapter and the run's base model), "
                   "RUN/checkpoints/step-N, or an adapter folder")
    p.add_argument("--data", metavar="PATH", help="data source (default: config's data.path, else the bundled corpus)")
    p.add_argument("--split", default=None, help="split to evaluate (default: data.eval_split, i.e. test)")
    p.add_argument("--task", choices=("apa", "mdd", "both"), help="which task(s) (default: both)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate at most N utterances")
    p.add_argument("--output", metavar="DIR", help="output folder, which must not hold an evaluation yet "
                   "(default: RUN/eval/<split>-<time>/ of the --adapter's run, else of the config's output_dir)")
    p.add_argument("--compare", metavar="RESULTS_OR_RUN", help="results.json (or its folder) to show side by side")
    p.add_argument("--json", action="store_true", help="print results.json to stdout instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_evaluate)

    s = sub.add_parser(
        "score",
        help="score your recordings of a sentence: APA scores, transcripts, mispronounced phones",
        description="Runs the APA and the MDD prompt on each recording (any sample rate, mono or stereo, "
        "WAV, FLAC, MP3, OGG/Opus, WebM/Opus, M4A) and aligns the heard phones with the sentence's CMUdict "
        "phones. Example: phi4mm-lora score me.wav --text \"we call it bear\" --adapter runs/demo. "
        "Many recordings: phi4mm-lora score --batch list.csv --adapter runs/demo --output scores.jsonl",
    )
    from phi4mm_lora.config import PRECISIONS

    s.add_argument("--config", metavar="YAML", help="run config (see configs/); flags below override it")
    s.add_argument("--model", metavar="PATH_OR_ID", help="checkpoint folder or hub id (default: the tiny test model)")
    s.add_argument("--precision", choices=("auto", *PRECISIONS), help="precision plan (default: auto)")
    s.add_argument("audio", nargs="*", metavar="AUDIO",
                   help="recording(s) of the sentence (WAV, FLAC, MP3, OGG/Opus, WebM/Opus, M4A), "
                   "then optional key=value config overrides")
    s.add_argument("--text", help="the sentence that was read (required)")
    s.add_argument("--adapter", metavar="RUN_OR_DIR", help="training run folder (scores with the run's base model "
                   "unless --model is given), RUN/checkpoints/step-N, or an adapter folder")
    s.add_argument("--json", action="store_true", help="print JSON instead of tables")
    from phi4mm_lora.cli.service_cmds import add_batch_args

    add_batch_args(s)
    s.set_defaults(handler=cmd_score)


def _positional_overrides(args: argparse.Namespace) -> None:
    """``score`` takes AUDIO... and key=value in one positional list; split them."""
    items = list(getattr(args, "audio", None) or []) + list(getattr(args, "overrides", None) or [])
    over = [a for a in items if re.match(r"^[A-Za-z_][\w.]*=", a) and not Path(a).exists()]
    args.audio = [a for a in items if a not in over]
    args.overrides = over


def cmd_evaluate(args: argparse.Namespace) -> int:
    from phi4mm_lora.evaluate.report import load_results, render_table
    from phi4mm_lora.evaluate.run import evaluate

    overrides = list(args.overrides or [])
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.task:
        overrides.append(f"data.task={args.task}")
    args.overrides = overrides
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    base_cfg = cfg = run_config(args)
    run = None
    if args.adapter:
        from phi4mm_lora.model.run_folder import Run

        run = Run.open(args.adapter)
        cfg = run.configure(base_cfg)  # a missing base model is named before anything else runs
    compare = load_results(Path(args.compare)) if args.compare else None  # fail before loading the model
    out = eval_output_dir(cfg, run, args.output, args.split or cfg.data.eval_split)
    # stderr under --json, so stdout stays one JSON document
    (Console(stderr=True) if args.json else console).print(f"evaluation of split {args.split or cfg.data.eval_split!r} "
                                                           f"goes to {out}")
    results = evaluate(base_cfg, split=args.split, limit=args.limit, output_dir=out, compare=compare,
                       progress=not args.no_progress, compare_name=_name(args.compare), run=run)
    if args.compare:
        results["meta"]["compare"] = str(args.compare)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    console.print(render_table(results, compare, compare_name=_name(args.compare)))
    for task, n in (results.get("parse_failure_counts") or {}).items():
        total = (results.get("parse_failures") or {}).get(task, {}).get("total")
        console.print(f"parse failures {task}: {n}/{total}")
    meta = results["meta"]
    from phi4mm_lora.model.provenance import provenance_line

    console.print(f"produced by: {provenance_line(meta['provenance'])}", soft_wrap=True, highlight=False)
    auto = f", {meta['batch_size_auto']}" if meta.get("batch_size_auto") else ""
    console.print(f"{meta['examples']} examples in {meta['generation_seconds']} s "
                  f"({meta['examples_per_second']} examples/s; batch {meta['batch_size']}{auto}); "
                  f"report: {out / 'report.md'}", soft_wrap=True, highlight=False)
    return 0


def eval_output_dir(cfg: RunConfig, run: Run | None, output: str | None, split: str) -> Path:
    """Where an evaluation goes; never a folder that already holds one.

    ``--output`` when given; otherwise ``RUN/eval/<split>-<time>/`` inside the run the adapter
    came from (an adapter folder outside a run keeps its evaluations itself), or inside the
    config's ``output_dir`` without ``--adapter``.
    """
    from phi4mm_lora.evaluate.run import fresh_eval_dir

    if output:
        out = Path(output).expanduser()
        if (out / "results.json").exists():
            raise UserError(f"--output {out} already holds an evaluation (results.json); pass a new folder, "
                            "or leave --output out to get a fresh RUN/eval/<split>-<time>/ folder")
        return out
    if run is not None:
        return fresh_eval_dir(run.root or run.adapter_dir, split)
    return fresh_eval_dir(cfg.output_dir, split)


def _name(compare: str | None) -> str:
    if not compare:
        return "baseline"
    p = Path(compare)
    return (p.parent.name if p.name == "results.json" else p.name) or "baseline"


def cmd_score(args: argparse.Namespace) -> int:
    from phi4mm_lora.evaluate.score import render, score

    _positional_overrides(args)
    if not args.batch and (args.sentences or args.output):
        raise UserError("--sentences and --output go with --batch (score --batch LIST_OR_FOLDER ...)")
    if args.batch:
        from phi4mm_lora.cli.service_cmds import cmd_score_batch

        return cmd_score_batch(args)
    timing: dict[str, float] = {}
    results = score(run_config(args), args.audio, args.text, run=args.adapter, timing=timing)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    for r in results:
        for part in render(r):
            console.print(part)
    if results:
        from phi4mm_lora.model.provenance import provenance_line

        console.print(f"scored by: {provenance_line(results[0]['provenance'])}", soft_wrap=True, highlight=False)
        console.print(f"time: {len(results)} recording(s) x 2 tasks scored in {timing['score_seconds']:.2f} s with "
                      f"the model loaded (loading took {timing['load_seconds']:.1f} s)", soft_wrap=True, highlight=False)
    return 0
