"""The ``phi4mm-lora`` command: a thin argparse layer over the workflow modules.

Each ``cli/*_cmds.py`` module adds its subcommands with ``register(subparsers)``; handlers
return an exit code. A :class:`~phi4mm_lora.errors.UserError` becomes a one-line message and
exit code 2 (traceback only with ``--debug``), so bad input never looks like a crash.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path


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


class Terminated(BaseException):
    """SIGTERM (a scheduler's or ``kill``'s polite stop), raised in the main thread like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Flags and ``key=value`` overrides in any order: ``train CFG --resume k=v`` and
    ``train CFG --no-progress k=v`` mean what they say (argparse alone reads ``k=v`` as the
    resume folder, or rejects it after a flag)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    resume = getattr(args, "resume", None)
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists() and hasattr(args, "overrides"):
        args.overrides = [*(args.overrides or []), resume]
        args.resume = True
    return args


def resume_hint(args: argparse.Namespace) -> str:
    """The exact command that continues an interrupted ``train`` (or starts it again)."""
    if getattr(args, "command", None) != "train":
        return ""
    from phi4mm_lora.config import load_config
    from phi4mm_lora.train.checkpoint import latest_checkpoint

    words = ["phi4mm-lora", "train", args.config, *(args.overrides or [])]
    try:
        run_dir = Path(load_config(args.config, args.overrides).output_dir).expanduser()
    except Exception:  # the config was fine a moment ago; never hide the interrupt behind this
        return ""
    if latest_checkpoint(run_dir) is None:
        return f"; no checkpoint was saved yet, start again with: {shlex.join(words)}"
    resume = ["--resume"] if args.resume in (None, True) else ["--resume", str(args.resume)]
    return f"; continue with: {shlex.join(words + resume)}"


def _report_bug(exc: BaseException) -> None:
    import traceback

    traceback.print_exc()
    print(f"error: unexpected {type(exc).__name__}: {exc}. This is a bug in phi4mm-lora; please report it "
          "with the traceback above (exit code 1)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 ok, 1 bug (traceback, please report) or a failed ``verify`` check,
    2 bad input or environment (one line), 3 training diverged, 130 Ctrl-C, 143 SIGTERM."""
    from phi4mm_lora.errors import CheckFailed, UserError
    from phi4mm_lora.fileio import os_error_message

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = (["--debug"] if debug else []) + [a for a in argv if a != "--debug"]  # wherever it was typed
    if not debug:
        _quiet_libraries()
    parser = build_parser()
    args = _parse(parser, argv)
    if not debug and not getattr(args, "light", False):
        _quiet_transformers()
    from phi4mm_lora.versions import untested_warning

    if (line := untested_warning()) is not None:
        print(f"warning: {line}", file=sys.stderr)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        code = args.handler(args)
    except (UserError, CheckFailed) as exc:
        if exc.exit_code == 0:  # nothing to do: said, not an error
            print(str(exc))
            return 0
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl-C){resume_hint(args)}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"terminated (SIGTERM){resume_hint(args)}", file=sys.stderr)
        return 143
    except OSError as exc:
        message = os_error_message(exc)
        if debug or message is None:
            if debug:
                raise
            _report_bug(exc)
            return 1
        print(f"error: {message}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:  # a reader that does not name its file yet
        if debug:
            raise
        print(f"error: a file is not UTF-8 text ({exc}); re-save it as UTF-8", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            raise
        _report_bug(exc)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
