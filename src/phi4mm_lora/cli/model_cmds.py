"""Model subcommands: ``tiny``, ``convert``, ``verify``, ``doctor``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from phi4mm_lora.cli.common import add_run_args, run_config
from phi4mm_lora.errors import CheckFailed, UserError

console = Console()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tiny",
        help="write a tiny random Phi-4-multimodal (real architecture) for tests and demos",
        description="Write a randomly initialised Phi-4-multimodal with the real native architecture at toy "
        "width, a real processor and BPE tokenizer with Phi-4's special tokens, and non-zero speech/vision "
        "adapters. Same seed, same bytes. Example: phi4mm-lora tiny /tmp/tiny --layout official",
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument("--layout", choices=("native", "official"), default="native",
                   help="native: transformers layout + PEFT adapter folders; official: the published download's layout "
                   "(bf16 shards + index, published config/tokenizer/processor files, remote-code .py files that "
                   "fail if anything imports them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", choices=("random", "pretrained"), default="random",
                   help="random: tests' model; pretrained: the demo's base, whose decoder was pretrained to copy a "
                   "quote and spell it as phones (seed 0 only; scripts/pretrain_tiny_base.py made it)")
    p.set_defaults(handler=cmd_tiny)

    p = sub.add_parser(
        "convert",
        help="convert an official (remote-code) checkpoint to the native layout, without running remote code",
        description="Reads the official checkpoint's tensors and config as data, renames them to the native "
        "transformers layout and writes the built-in LoRA as speech-lora/ and vision-lora/ PEFT adapters. "
        "Example: phi4mm-lora convert ./Phi-4-multimodal-instruct ./phi4mm-native",
    )
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser(
        "verify",
        help="load, run two training steps on a real example, check every tensor, then generate",
        description="Proves the adapter setup trains: each trainable LoRA tensor must get a finite non-zero "
        "gradient and change; each frozen tensor must stay equal. Exit code 1 names the failing tensors. "
        "Example: phi4mm-lora verify --precision nf4 adapter.mode=stacked",
    )
    add_run_args(p)
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("doctor", help="versions, device, and known problems with their fixes",
                       description="Prints library versions, the device and bf16 support, free memory, the precision "
                       "plans that work here, and each known problem detected with its fix.")
    p.add_argument("--json", metavar="PATH", type=Path, help="also write the diagnosis as JSON")
    p.set_defaults(handler=cmd_doctor)


def cmd_tiny(args: argparse.Namespace) -> int:
    from phi4mm_lora.model.tiny import build_tiny

    out = build_tiny(args.out_dir, layout=args.layout, seed=args.seed, base=args.base)
    console.print(f"wrote tiny Phi-4-multimodal ({args.layout} layout, seed {args.seed}, {args.base} base) to {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from phi4mm_lora.model.convert import convert_official_to_native
    from phi4mm_lora.model.load import detect_layout

    if not args.src.is_dir():
        raise UserError(f"{args.src} is not a folder; pass the official checkpoint folder")
    layout = detect_layout(args.src)
    if layout != "official":
        raise UserError(f"{args.src} is already in the native layout; nothing to convert")
    out = convert_official_to_native(args.src, args.dst)
    console.print(f"converted {args.src} -> {out} (adapters: speech-lora/, vision-lora/)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from phi4mm_lora.model.load import load_model
    from phi4mm_lora.model.verify import verify_loaded

    cfg = run_config(args)
    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    st = loaded.adapters
    console.print(f"loaded {loaded.path} ({loaded.layout} layout) on {loaded.plan.device} with plan {loaded.plan.name}")
    console.print(f"adapters: {', '.join(st.names)}; active: {', '.join(st.active)}; training: {st.trainable_adapter}"
                  + (f" + {', '.join(st.unfrozen_prefixes)}" if st.unfrozen_prefixes else ""))
    for w in st.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    res = verify_loaded(loaded)
    console.print(f"trainable tensors: {res.trainable}, frozen tensors: {res.frozen}, losses: "
                  + ", ".join(f"{x:.4f}" for x in res.losses))
    console.print(f"generated: {res.generated!r}")
    if not res.ok:
        for f in res.failures[:50]:
            console.print(f"[red]FAIL[/] {f}")
        raise CheckFailed(f"verify failed: {len(res.failures)} check(s); first: {res.failures[0]}")
    console.print("[green]verify passed[/]: every trainable tensor got a gradient and changed; frozen tensors unchanged")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from phi4mm_lora.model.doctor import diagnose

    d = diagnose()
    t = Table(title="phi4mm-lora doctor", show_header=False)
    for k, v in d.versions.items():
        rng = d.tested.get(k)
        mark = "" if rng is None else f"  (tested {rng['tested']}: {'ok' if rng['ok'] else '[red]outside[/]'})"
        t.add_row(k, (v or "[dim]not installed[/]") + mark)
    t.add_row("device", d.device)
    t.add_row("bf16", "yes" if d.bf16 else "no")
    for k, v in d.memory.items():
        t.add_row(k, str(v))
    console.print(t)
    console.print("[bold]facts[/] (nothing to do):")
    for n in d.notes:
        console.print(f"  - {n}")
    if d.problems:
        console.print(f"[bold]problems[/] ({len(d.problems)}), each with its fix:")
    for problem, fix in d.problems:
        console.print(f"[yellow]problem:[/] {problem}\n  [green]fix:[/] {fix}")
    if not d.problems:
        console.print("[green]no problems found[/]: nothing to fix")
    if args.json:
        args.json.write_text(json.dumps({"versions": d.versions, "device": d.device, "bf16": d.bf16, "memory": d.memory,
                                         "tested": d.tested, "problems": [{"problem": p, "fix": f} for p, f in d.problems], "facts": d.notes,
                                         "notes": d.notes}, indent=2))
    return 0
