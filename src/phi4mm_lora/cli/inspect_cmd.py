"""``phi4mm-lora inspect``: what is loaded, what trains, what is quantised, and what it costs.

Without ``--architecture-only`` the model is loaded exactly as training would load it
(``load_model``) and described by :func:`phi4mm_lora.model.inventory.model_report`. With it, no
weights are read: the full-size 5.6B architecture is built on the meta device and the bytes
of weights, gradients and optimizer state are computed for the chosen plan, with a one-line
comparison of all six plans when no ``--precision`` is given.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from phi4mm_lora.cli.common import add_run_args, run_config
from phi4mm_lora.config import PRECISIONS
from phi4mm_lora.errors import UserError

console = Console()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="parameters, trainable set, dtypes, quantised modules and memory of a model or plan",
        description="Loads the model as training would and reports total/trainable parameters per component "
        "(decoder, audio encoder/projector, vision tower/projector, tied embeddings/lm_head), LoRA tensors per "
        "adapter, quantised modules, and warnings (LoRA frozen or quantised, nothing trainable, all-zero "
        "adapter, pretrained adapter discarded). --architecture-only builds the full-size 5.6B model on the "
        "meta device instead (no download, a few seconds) and prints weight, gradient and optimizer bytes for "
        "the plan (for all six plans when --precision is left out). Examples: phi4mm-lora inspect --precision nf4 adapter.mode=stacked; "
        "phi4mm-lora inspect --architecture-only --precision selective --json plan.json",
    )
    add_run_args(p)
    p.add_argument("--json", metavar="PATH", type=Path, help="also write the report as JSON")
    p.add_argument("--architecture-only", action="store_true",
                   help="full-size architecture on the meta device: exact counts and bytes, no weights loaded")
    p.set_defaults(handler=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = run_config(args)
    if not console.is_terminal:  # piped/logged: do not squeeze the tables into 80 columns
        console.width = max(console.width, 150)
    if args.json is not None and args.json.exists() and args.json.is_dir():
        raise UserError(f"--json {args.json} is a folder; pass a file path such as report.json")
    if args.architecture_only:
        report = architecture_with_plans(cfg.precision, cfg.adapter)
        print_architecture(report)
    else:
        from phi4mm_lora.model.inventory import model_report
        from phi4mm_lora.model.load import load_model

        with warnings.catch_warnings():  # the report repeats them (adapter notes, plan fallback)
            warnings.simplefilter("ignore")
            loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
        report = model_report(loaded)
        print_model(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        console.print(f"report written to {args.json}")
    return 0


def architecture_with_plans(precision: str, adapter_cfg) -> dict[str, Any]:
    """The chosen plan's full report; with ``auto`` (no --precision) also a summary of all six
    plans (bf16 details, as auto picks bf16 on a bf16 GPU)."""
    from phi4mm_lora.model.inventory import architecture_report

    chosen = "bf16" if precision == "auto" else precision
    report = architecture_report(chosen, adapter_cfg)
    if precision != "auto":
        return report
    plans = {}
    for name in PRECISIONS:
        r = report if name == chosen else architecture_report(name, adapter_cfg)
        plans[name] = {
            k: r[k]
            for k in ("weight_bytes", "gradient_bytes", "optimizer_bytes", "training_state_bytes", "trainable_params", "quantised_modules")
        }
    report["plans"] = plans
    return report


# ----------------------------------------------------------------------------- printing


def _n(x: int) -> str:
    return f"{x:,}"


def _gb(x: int) -> str:
    """Decimal units (GB = 10^9 bytes), switching to MB/kB for small models."""
    if x >= 1e9:
        return f"{x / 1e9:.2f} GB"
    if x >= 1e6:
        return f"{x / 1e6:.2f} MB"
    return f"{x / 1e3:.1f} kB"


def _dtypes(d: dict[str, int]) -> str:
    return ", ".join(f"{k}" if len(d) == 1 else f"{k} {v / max(1, sum(d.values())):.0%}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))


def _component_table(report: dict[str, Any], title: str) -> Table:
    t = Table(title=title)
    for col in ("component", "params", "trainable", "dtypes", "quantised modules", "bytes"):
        t.add_column(col, justify="right" if col in ("params", "trainable", "quantised modules", "bytes") else "left")
    for name, c in report["components"].items():
        label = name + (" (tied)" if name == "embeddings/lm_head" and report.get("tied_embeddings") else "")
        t.add_row(label, _n(c["params"]), _n(c["trainable"]), _dtypes(c["dtypes"]), str(c["quantised_modules"]), _gb(c["bytes"]))
    for name, a in report["adapters"].items():
        quant = str(a.get("quantised_modules", 0))
        t.add_row(f"LoRA {name}", _n(a["params"]), _n(a["trainable_params"]), _dtypes(a["dtypes"]), quant, _gb(a["bytes"]))
    return t


def _adapter_table(report: dict[str, Any]) -> Table:
    t = Table(title="LoRA adapters")
    for col in ("adapter", "tensors", "trainable tensors", "params", "trainable", "active", "note"):
        t.add_column(col)
    for name, a in report["adapters"].items():
        note = []
        if "r" in a:
            note.append(f"r={a['r']} alpha={a['alpha']:g}")
        if a.get("loaded") is False:
            note.append("in the checkpoint, not loaded (adapter.keep_unused=true loads it)")
        if a.get("lora_B_all_zero"):
            note.append("lora_B = 0")
        if a.get("quantised_modules"):
            note.append(f"{a['quantised_modules']} modules QUANTISED")
        t.add_row(name, str(a["tensors"]), str(a.get("trainable_tensors", "-")), _n(a["params"]), "yes" if a["trainable"] else "no",
                  {True: "yes", False: "no"}.get(a.get("active"), "-"), "; ".join(note))
    return t


def _print_warnings(report: dict[str, Any]) -> None:
    if not report["warnings"]:
        console.print("[green]no warnings[/green]")
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


def print_model(report: dict[str, Any]) -> None:
    plan = report.get("plan", {})
    console.print(f"model: {report.get('path', '?')} ({report.get('layout', '?')} layout), precision {plan.get('name', '?')} "
                  f"on {plan.get('device', '?')}", highlight=False)
    for note in plan.get("notes", []):
        console.print(f"note: {note}", highlight=False)
    console.print(_component_table(report, "parameters by component"))
    console.print(_adapter_table(report))
    console.print(
        f"total {_n(report['total_params'])} params, trainable {_n(report['trainable_params'])} "
        f"({report['trainable_pct']:.2f}%), LoRA tensors {report['lora_tensors']} "
        f"({report['lora_trainable_tensors']} trainable), quantised modules {report['quantised_modules']}"
        + (f" (planned {report['planned_quantised']})" if "planned_quantised" in report else "")
        + f", weights {_gb(report['weight_bytes'])}",
        highlight=False,
    )
    _print_warnings(report)


def print_architecture(report: dict[str, Any]) -> None:
    c = report["config"]
    console.print(
        f"full-size architecture on meta: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
        f"intermediate {c['intermediate_size']}, {c['num_attention_heads']} heads / {c['num_key_value_heads']} kv, "
        f"vocab {c['vocab_size']}, tied embeddings {c['tie_word_embeddings']}; plan {report['precision']} "
        f"as on a bf16 CUDA GPU (LoRA dtype {report['plan']['lora_dtype']})",
        highlight=False,
    )
    console.print(_component_table(report, f"parameters and weight bytes, plan {report['precision']}"))
    console.print(_adapter_table(report))
    console.print(
        f"total {_n(report['total_params'])} params ({_n(report['base_params'])} without adapters), trainable "
        f"{_n(report['trainable_params'])} ({report['trainable_pct']:.2f}%), LoRA tensors {report['lora_tensors']}, "
        f"quantised modules {report['quantised_modules']}",
        highlight=False,
    )
    console.print(
        f"weights {_gb(report['weight_bytes'])}, gradients {_gb(report['gradient_bytes'])}, optimizer "
        f"{_gb(report['optimizer_bytes'])}; weights+gradients+optimizer {_gb(report['training_state_bytes'])} "
        "(activations not included)",
        highlight=False,
    )
    for k, f in report["formulas"].items():
        console.print(f"  {k}: {f}", highlight=False)
    if "plans" in report:
        t = Table(title="all plans (same adapter settings; GB = 10^9 bytes)")
        for col in ("plan", "weights", "gradients", "optimizer", "weights+grads+optimizer", "trainable params", "quantised modules"):
            t.add_column(col, justify="left" if col == "plan" else "right")
        for name, p in report["plans"].items():
            t.add_row(name, _gb(p["weight_bytes"]), _gb(p["gradient_bytes"]), _gb(p["optimizer_bytes"]),
                      _gb(p["training_state_bytes"]), _n(p["trainable_params"]), str(p["quantised_modules"]))
        console.print(t)
    _print_warnings(report)
