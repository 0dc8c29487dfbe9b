"""Argument helpers shared by subcommands: every command builds the same RunConfig."""

from __future__ import annotations

import argparse

from phi4mm_lora.config import PRECISIONS, RunConfig, load_config


def add_run_args(p: argparse.ArgumentParser, model: bool = True, precision: bool = True) -> None:
    """``--config``, ``key=value`` overrides, and the common ``--model`` / ``--precision``."""
    p.add_argument("--config", metavar="YAML", help="run config (see configs/); flags below override it")
    if model:
        p.add_argument("--model", metavar="PATH_OR_ID", help="checkpoint folder or hub id (default: the tiny test model)")
    if precision:
        p.add_argument("--precision", choices=("auto", *PRECISIONS), help="precision plan (default: auto)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. adapter.mode=fresh adapter.r=16")


def run_config(args: argparse.Namespace) -> RunConfig:
    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "model", None):
        overrides.append(f"model.path={args.model}")
    if getattr(args, "precision", None):
        overrides.append(f"precision={args.precision}")
    return load_config(getattr(args, "config", None), overrides)
