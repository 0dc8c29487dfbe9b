"""CLI subcommands of the data layer: ``make-corpus`` and ``data stats``.

The main CLI calls :func:`register` with its subparsers object; each subcommand stores its
handler as ``handler`` (``args.handler(args) -> int`` is the exit code). Bad input raises
:class:`UserError`, which the main CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from phi4mm_lora.errors import UserError


def cmd_make_corpus(args: argparse.Namespace) -> int:
    """Generate an espeak-ng corpus in the Speechocean762 release layout."""
    from phi4mm_lora.data.corpus import make_corpus

    if args.n < 2:
        raise UserError("--n must be at least 2")
    out = make_corpus(Path(args.out), args.n, args.seed)
    print(f"wrote {args.n} utterances to {out}")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    """Counts, durations, score distributions and problems of a data folder or manifest."""
    from phi4mm_lora.data.stats import collect_stats, format_stats, plot_stats

    stats = collect_stats(args.data, strict=args.strict)
    print(format_stats(stats))
    if args.plot:
        print(f"plot written to {plot_stats(stats, args.plot, title=f'data stats {args.data}')}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``make-corpus`` and ``data stats`` to the main parser's subcommands."""
    p = subparsers.add_parser("make-corpus", help="generate a small espeak-ng corpus (Speechocean762 layout)")
    p.add_argument("out", help="output folder (must not exist or be empty)")
    p.add_argument("--n", type=int, default=150, help="number of utterances (default 150)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(handler=cmd_make_corpus)

    d = subparsers.add_parser("data", help="inspect training data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("stats", help="counts per split/task, durations, score distributions, problems")
    s.add_argument("data", help="Speechocean762 release dir, saved hub dataset, or JSONL manifest")
    s.add_argument("--plot", metavar="PNG", help="also write a figure with the distributions")
    s.add_argument("--strict", action="store_true", help="fail on any bad record instead of reporting it")
    s.set_defaults(handler=cmd_data_stats)
