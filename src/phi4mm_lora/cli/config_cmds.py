"""``config show [SECTION]`` and ``config schema [FILE]``: the run config's keys, from the code.

Both read the typed :class:`~phi4mm_lora.config.RunConfig` (field types, defaults, Literal
choices and the docstring under each field), so what they print cannot drift from what
``load_config`` accepts. Neither imports torch: both answer instantly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: The committed schema the shipped configs' ``# yaml-language-server`` lines point at.
SCHEMA_FILE = "configs/run-config.schema.json"


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def format_keys(rows: list[dict[str, Any]]) -> str:
    """One entry per key: ``key: type = default``, allowed values, then the description."""
    from phi4mm_lora.config import RunConfig

    lines: list[str] = []
    section = None
    for r in rows:
        head = r["key"].split(".")[0] if "." in r["key"] else ""
        if head != section:
            section = head
            doc = (RunConfig.model_fields[head].annotation.__doc__ or "").strip() if head else "top-level keys"
            lines.append(f"{'[' + head + ']' if head else '[top level]'}  {doc.splitlines()[0] if doc else ''}".rstrip())
        typ = " | ".join(_value(a) for a in r["allowed"]) if r["allowed"] else r["type"]
        for other in ("int", "null"):  # a choice or a number (train.micro_batch: auto | int), or empty
            if r["allowed"] and other in r["type"].split(" | "):
                typ += f" | {other}"
        lines.append(f"  {r['key']}: {typ} = {_value(r['default'])}")
        if r["description"]:
            lines.append(f"      {' '.join(r['description'].split())}")
    return "\n".join(lines)


def cmd_config_show(args: argparse.Namespace) -> int:
    from phi4mm_lora.config import describe_config

    print(format_keys(describe_config(args.section)))
    print("\nSet any key in a YAML run config or as key=value, e.g. "
          "phi4mm-lora validate configs/demo.yaml train.lr=1e-4")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from phi4mm_lora.config import config_schema

    text = json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.output is None:
        print(text, end="")
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}; point a YAML run config at it with a first line "
          f"'# yaml-language-server: $schema={out.name}' (path relative to the YAML file)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``config show`` and ``config schema``."""
    c = subparsers.add_parser(
        "config", help="list the run config's keys (types, defaults, choices) or write its JSON Schema",
        description="Every key a run config (YAML or key=value) accepts, read from the typed config itself.",
        epilog="examples:\n  phi4mm-lora config show\n  phi4mm-lora config show train\n"
        f"  phi4mm-lora config schema {SCHEMA_FILE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csub = c.add_subparsers(dest="config_command", metavar="{show,schema}", required=True)
    s = csub.add_parser("show", help="keys with type, default, allowed values and description")
    s.add_argument("section", nargs="?", help="one section (model, adapter, data, prompts, train, eval) or top-level key")
    s.set_defaults(handler=cmd_config_show, light=True)
    j = csub.add_parser("schema", help="write the JSON Schema of the run config (for YAML editors)")
    j.add_argument("output", nargs="?", metavar="FILE", help="where to write it (default: print to stdout)")
    j.set_defaults(handler=cmd_config_schema, light=True)
