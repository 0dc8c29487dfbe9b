"""The ``phi4mm-lora`` command: a thin argparse layer over the workflow modules.

Each ``cli/*_cmds.py`` module adds its subcommands with ``register(subparsers)``; handlers
return an exit code. A :class:`~phi4mm_lora.errors.UserError` becomes a one-line message and
exit code 2 (traceback only with ``--debug``), so bad input never looks like a crash.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    from phi4mm_lora.cli import (
        config_cmds,
        data_cmds,
        eval_cmds,
        export_cmd,
        inspect_cmd,
        model_cmds,
        service_cmds,
        train_cmds,
    )

    parser = argparse.ArgumentParser(
        prog="phi4mm-lora",
        description=(
            "LoRA fine-tuning of Phi-4-multimodal-instruct on current transformers/PEFT, "
            "with a pronunciation-assessment recipe (APA scores + MDD transcripts). "
            "Every command that takes --model uses a tiny test model when it is left out."
        ),
        epilog="Start with: phi4mm-lora doctor; phi4mm-lora verify; phi4mm-lora train configs/demo.yaml\n"
        "Config keys and what they do: phi4mm-lora config show [SECTION]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library warnings")
    # commands that never load a model set light=True, so they start without importing transformers
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (model_cmds, inspect_cmd, data_cmds, train_cmds, eval_cmds, export_cmd, service_cmds, config_cmds):
        module.register(sub)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (bnb kernels, rope notices, progress of tiny loads) hides our output.

    Only environment variables and warning filters here: importing transformers would cost
    a second on every command, even ``--help`` (see :func:`_quiet_transformers`).
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A warning is a note to the user, not a code location: print it as one line, once per
    # command. Python's own once-per-location registry is reset whenever any library touches the
    # warning filters (catch_warnings does), so a demo that loads the model twice said it twice.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    seen: set[str] = set()

    def show_once(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text not in seen:
            seen.add(text)
            print(f"warning: {text}", file=sys.stderr if file is None else file)

    warnings.showwarning = show_once
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _quiet_transformers() -> None:
    """transformers' own progress bars (weight loading) for commands that load a model."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from phi4mm_lora.errors import CheckFailed, UserError

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not debug and not getattr(args, "light", False):
        _quiet_transformers()
    from phi4mm_lora.versions import untested_warning

    if (line := untested_warning()) is not None:
        print(f"warning: {line}", file=sys.stderr)
    try:
        code = args.handler(args)
    except (UserError, CheckFailed) as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
