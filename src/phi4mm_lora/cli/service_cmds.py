"""``serve`` (the HTTP service and web page) and ``score --batch`` (many recordings to a file).

Both load the model once and score through :func:`phi4mm_lora.evaluate.score.score_batch`;
the library code lives in :mod:`phi4mm_lora.serve` and :mod:`phi4mm_lora.evaluate.batch`.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from phi4mm_lora.cli.common import add_run_args, run_config
from phi4mm_lora.config import RunConfig
from phi4mm_lora.errors import UserError

console = Console(stderr=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve scoring over HTTP: POST /score, GET /health, and a web page to record and score",
        description="Loads the model once and serves POST /score (multipart 'audio' + 'text': four scores, "
        "transcripts, mispronounced phones), GET /health, and a web page at / (record in the browser or upload, "
        "type or pick a sentence). Requests are queued and batched onto the model. Accepts WAV, FLAC, MP3, "
        "OGG/Opus, WebM/Opus and M4A. With --adapter RUN the run's base model is used unless --model is "
        "given. Example: phi4mm-lora serve --adapter runs/demo --port 8000, then open http://127.0.0.1:8000/",
    )
    add_run_args(p)
    p.add_argument("--adapter", metavar="RUN_OR_DIR", help="training run folder or adapter folder to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 serves your network, without authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted (default 10 MiB)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longest recording accepted (default 30 s)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests scored together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting before 503 (default 64)")
    p.set_defaults(handler=cmd_serve)


def _configured(args: argparse.Namespace) -> RunConfig:
    """The run config; with ``--adapter RUN`` the run's adapter on the run's base model (``--model`` wins)."""
    cfg = run_config(args)
    if not getattr(args, "adapter", None):
        return cfg
    from phi4mm_lora.model.run_folder import Run

    return Run.open(args.adapter).configure(cfg)


def _check_port(host: str, port: int) -> None:
    """Fail before the (slow) model load when the address cannot be used."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number (0-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"--host {host} is not an address of this machine ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another with --port") from None


def _example_sentences(limit: int = 40) -> list[str]:
    """Sentences of the bundled corpus's test split, for the page's picker."""
    from phi4mm_lora.data.examples import bundled_corpus_path

    f = bundled_corpus_path() / "test" / "text"
    if not f.is_file():
        return []
    lines = [line.split(maxsplit=1)[1].lower() for line in f.read_text().splitlines() if " " in line.strip()]
    return sorted(set(lines))[:limit]


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from phi4mm_lora.model.inference import load_for_inference
    from phi4mm_lora.serve.app import Limits, create_app, response_provenance
    from phi4mm_lora.serve.worker import ScoringWorker

    if args.max_upload_mb <= 0 or args.max_seconds <= 0 or args.max_batch < 1 or args.max_queue < 1:
        raise UserError("--max-upload-mb and --max-seconds must be > 0, --max-batch and --max-queue >= 1")
    cfg = _configured(args)
    _check_port(args.host, args.port)
    console.print("loading the model ...")
    loaded = load_for_inference(cfg)
    prov = response_provenance(cfg, loaded)
    worker = ScoringWorker(cfg, loaded, max_batch=args.max_batch, max_queue=args.max_queue).start()
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_seconds=args.max_seconds)
    app = create_app(worker, prov, limits, _example_sentences())
    shown = f"[{args.host}]" if ":" in args.host else args.host
    console.print(f"serving http://{shown}:{args.port}/  (model {prov.get('model')}; adapter "
                  f"{prov.get('adapter') or 'none'}{' (merged)' if prov.get('adapter_merged') else ''}; "
                  f"precision {prov.get('precision')}); Ctrl+C stops")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def add_batch_args(s: argparse.ArgumentParser) -> None:
    """The ``score`` command's batch flags."""
    s.add_argument("--batch", metavar="CSV_JSONL_OR_DIR",
                   help="score many recordings: a .csv/.jsonl with an audio path and a sentence per row "
                   "(columns audio,text), or a folder of recordings with --sentences or --text")
    s.add_argument("--sentences", metavar="FILE", help="with a --batch folder: lines 'NAME sentence' (NAME = file stem)")
    s.add_argument("--output", metavar="FILE.jsonl|csv",
                   help="with --batch: results file (default: <batch name>-scores.jsonl here); "
                   "a summary goes to FILE.summary.json")
    s.add_argument("--no-progress", action="store_true", help="with --batch: no progress bar")


def cmd_score_batch(args: argparse.Namespace) -> int:
    """``score --batch``: every row scored, failures reported, nothing stops the run."""
    from phi4mm_lora.evaluate.batch import check_output, read_rows, score_rows
    from phi4mm_lora.model.inference import load_for_inference
    from phi4mm_lora.serve.app import response_provenance

    if args.audio:
        raise UserError(f"give recordings either as AUDIO arguments or with --batch, not both ({args.audio[0]} ...)")
    rows = read_rows(args.batch, args.sentences, args.text)  # input errors before the model loads
    src = Path(args.batch)
    output = check_output(Path(args.output) if args.output else Path(f"{src.stem if src.is_file() else src.name}-scores.jsonl"))
    cfg = _configured(args)
    loaded = load_for_inference(cfg)
    prov: dict[str, Any] = {"provenance": response_provenance(cfg, loaded)}
    summary = score_rows(cfg, loaded, rows, output, progress=not args.no_progress, extra=prov)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        _print_summary(summary)
    return 0


def _print_summary(s: dict[str, Any]) -> None:
    out = Console()
    means = ", ".join(f"{k} {v}" for k, v in s["mean_scores"].items() if v is not None) or "no parsed scores"
    out.print(f"scored {s['scored']}/{s['rows']} rows in {s['seconds']} s; failed {s['failed']}; "
              f"mean: {means}; unparsed answers: APA {s['unparsed_apa']}, MDD {s['unparsed_mdd']}")
    for f in s["failures"][:20]:
        out.print(f"[red]row {f['row']}[/]: {f['error']}", highlight=False)
    if len(s["failures"]) > 20:
        out.print(f"... and {len(s['failures']) - 20} more (see {s['summary_file']})")
    out.print(f"results: {s['output']}; summary: {s['summary_file']}")
    sys.stdout.flush()
