"""CLI: ``export RUN --to DIR --format merged|adapter|official [--push REPO_ID]``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="ship a trained run: merged checkpoint, hub-ready PEFT adapter, or the official layout (+ model card)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a training run in a form others can load, with a filled model card (README.md):\n"
        "  merged    native checkpoint, adapter and unfrozen modules merged in; loads with plain\n"
        "            Phi4MultimodalForCausalLM.from_pretrained (processor files included)\n"
        "  adapter   PEFT adapter folder (unfrozen modules as modules_to_save) naming its base model\n"
        "  official  Microsoft's published layout (for vLLM and other tools), without remote-code files\n"
        "The run's base model (its config.yaml model.path) is loaded; --model overrides it.",
        epilog="examples:\n"
        "  phi4mm-lora export runs/paper --to exports/paper-merged\n"
        "  phi4mm-lora export runs/paper --to exports/paper-adapter --format adapter --push me/phi4mm-apa-lora\n"
        "  phi4mm-lora export runs/paper/checkpoints/step-00000300 --to exports/step300 --format official",
    )
    p.add_argument("run", metavar="RUN", help="training run folder, RUN/checkpoints/step-N, or an adapter folder")
    p.add_argument("--to", required=True, metavar="DIR", help="new (or empty) output folder")
    p.add_argument("--format", default="merged", choices=("merged", "adapter", "official"), help="default: merged")
    p.add_argument("--model", metavar="PATH_OR_ID", help="base model (default: the one the run was trained on)")
    p.add_argument("--push", metavar="REPO_ID", help="also upload the folder to this Hugging Face Hub repo")
    p.add_argument("--private", action="store_true", help="with --push: create the repo private")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from phi4mm_lora.config import load_config
    from phi4mm_lora.export import export_run

    cfg = load_config(None, [f"model.path={args.model}"] if args.model else [])
    out = export_run(args.run, args.to, args.format, cfg=cfg, push=args.push, private=args.private)
    print(f"exported {args.run} as {args.format} to {out} (model card: {out / 'README.md'})")
    if args.push:
        print(f"uploaded to https://huggingface.co/{args.push}")
    return 0


__all__ = ["cmd_export", "register"]
