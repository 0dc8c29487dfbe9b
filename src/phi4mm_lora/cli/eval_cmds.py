"""Evaluation subcommands: ``evaluate`` (a data split -> report) and ``score`` (your recordings).

``--adapter`` takes a training run folder (its final ``adapter/``) or an adapter folder
itself. The adapter's structure (mode, rank, targets) is read from the run's
``config.yaml`` when there is one, because loading weights into a differently shaped
adapter would fail; otherwise it is inferred from ``adapter_config.json`` as a fresh adapter.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from phi4mm_lora.cli.common import add_run_args, run_config
from phi4mm_lora.config import AdapterConfig, RunConfig
from phi4mm_lora.errors import UserError

console = Console()

#: Where a run folder keeps its adapter, most final first (train/finetune.py writes RUN/adapter).
RUN_ADAPTER_CANDIDATES = ("adapter", "final/adapter", "checkpoints/final/adapter", "checkpoints/final", "final")
_STRUCTURE_KEYS = ("mode", "base", "name", "r", "alpha", "dropout", "target_modules", "include_towers", "trainable")


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()


def resolve_adapter(path: str | Path) -> tuple[Path, Path | None]:
    """(adapter folder, the run's config.yaml or None) for a run folder or an adapter folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--adapter {p} does not exist; pass a training run folder or an adapter folder")
    if not p.is_dir():
        raise UserError(f"--adapter {p} is a file; pass the folder (a run folder or one holding adapter_config.json)")
    adapter = p if _is_adapter(p) else next((p / c for c in RUN_ADAPTER_CANDIDATES if _is_adapter(p / c)), None)
    if adapter is None:
        raise UserError(f"--adapter {p} is not an adapter: no adapter_config.json + adapter_model.safetensors "
                        f"in it or in {', '.join(c + '/' for c in RUN_ADAPTER_CANDIDATES[:2])}")
    run_cfg = next((d / "config.yaml" for d in (adapter, *adapter.parents[:3]) if (d / "config.yaml").is_file()), None)
    from phi4mm_lora.fileio import safetensors_header

    safetensors_header(adapter / "adapter_model.safetensors", "adapter weights")  # before the model loads
    return adapter, run_cfg


def _structure_from_peft(adapter: Path) -> dict[str, Any]:
    """A fresh adapter shaped like the saved one (when no run config says otherwise)."""
    try:
        pc = json.loads((adapter / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{adapter / 'adapter_config.json'} is not JSON ({exc.msg}); not a usable adapter") from None
    out: dict[str, Any] = {"mode": "fresh"}
    if pc.get("r"):
        out["r"] = int(pc["r"])
    if pc.get("lora_alpha"):
        out["alpha"] = float(pc["lora_alpha"])
    tm = pc.get("target_modules")
    if isinstance(tm, str):
        out["target_modules"] = tm
    elif isinstance(tm, list) and tm:
        out["target_modules"] = r".*\.(?:" + "|".join(re.escape(t) for t in sorted(tm)) + r")$"
    return out


def with_adapter(cfg: RunConfig, path: str | Path) -> RunConfig:
    """``cfg`` set up to evaluate the trained adapter at ``path`` (run or adapter folder)."""
    adapter, run_cfg = resolve_adapter(path)
    structure: dict[str, Any] = {}
    if run_cfg is not None:
        try:
            section = (yaml.safe_load(run_cfg.read_text()) or {}).get("adapter") or {}
        except yaml.YAMLError:
            section = {}
        structure = {k: section[k] for k in _STRUCTURE_KEYS if k in section}
    if not structure:
        structure = _structure_from_peft(adapter)
    try:
        new = AdapterConfig.model_validate({**cfg.adapter.model_dump(), **structure, "init_from": str(adapter)})
    except Exception as exc:
        raise UserError(f"--adapter {path}: its settings are not valid ({exc})") from None
    return cfg.model_copy(update={"adapter": new})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="generate answers for a data split and report the paper's metrics (Table 3 columns)",
        description="Greedy, batched generation for every utterance of a split, then PCC per APA aspect, "
        "WER/PER and MDD precision/recall/F1, parse failures per task. Writes predictions.jsonl, "
        "results.json, report.md and plots to --output. Example: phi4mm-lora evaluate --adapter runs/demo "
        "--split test --output runs/demo/eval --compare runs/untrained-eval",
    )
    add_run_args(p)
    p.add_argument("--adapter", metavar="RUN_OR_DIR", help="training run folder (uses RUN/adapter) or adapter folder")
    p.add_argument("--data", metavar="PATH", help="data source (default: config's data.path, else the bundled corpus)")
    p.add_argument("--split", default=None, help="split to evaluate (default: data.eval_split, i.e. test)")
    p.add_argument("--task", choices=("apa", "mdd", "both"), help="which task(s) (default: both)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate at most N utterances")
    p.add_argument("--output", metavar="DIR", help="output folder (default: output_dir of the config)")
    p.add_argument("--compare", metavar="RESULTS_OR_RUN", help="results.json (or its folder) to show side by side")
    p.add_argument("--json", action="store_true", help="print results.json to stdout instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_evaluate)

    s = sub.add_parser(
        "score",
        help="score your recordings of a sentence: APA scores, transcripts, mispronounced phones",
        description="Runs the APA and the MDD prompt on each recording (any sample rate, mono or stereo, "
        "WAV/FLAC) and aligns the heard phones with the sentence's CMUdict phones. "
        "Example: phi4mm-lora score me.wav --text \"we call it bear\" --adapter runs/demo",
    )
    from phi4mm_lora.config import PRECISIONS

    s.add_argument("--config", metavar="YAML", help="run config (see configs/); flags below override it")
    s.add_argument("--model", metavar="PATH_OR_ID", help="checkpoint folder or hub id (default: the tiny test model)")
    s.add_argument("--precision", choices=("auto", *PRECISIONS), help="precision plan (default: auto)")
    s.add_argument("audio", nargs="+", metavar="AUDIO",
                   help="recording(s) of the sentence, then optional key=value config overrides")
    s.add_argument("--text", help="the sentence that was read (required)")
    s.add_argument("--adapter", metavar="RUN_OR_DIR", help="training run folder or adapter folder")
    s.add_argument("--json", action="store_true", help="print JSON instead of tables")
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
    cfg = run_config(args)
    if args.adapter:
        cfg = with_adapter(cfg, args.adapter)
    compare = load_results(Path(args.compare)) if args.compare else None  # fail before loading the model
    out = Path(args.output or cfg.output_dir)
    results = evaluate(cfg, split=args.split, limit=args.limit, output_dir=out, compare=compare,
                       name=Path(args.adapter).name if args.adapter else "this run", progress=not args.no_progress,
                       compare_name=_name(args.compare))
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
    console.print(f"{meta['examples']} examples in {meta['generation_seconds']} s "
                  f"({meta['examples_per_second']} examples/s); report: {out / 'report.md'}")
    return 0


def _name(compare: str | None) -> str:
    if not compare:
        return "baseline"
    p = Path(compare)
    return (p.parent.name if p.name == "results.json" else p.name) or "baseline"


def cmd_score(args: argparse.Namespace) -> int:
    from phi4mm_lora.evaluate.score import check_inputs, render, score

    _positional_overrides(args)
    cfg = run_config(args)
    check_inputs(args.audio, args.text)  # before the adapter and model are loaded
    if args.adapter:
        cfg = with_adapter(cfg, args.adapter)
    results = score(cfg, args.audio, args.text)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    for r in results:
        for part in render(r):
            console.print(part)
    return 0
