"""The service as a library: a run folder (or a config) in, a running HTTP service out.

``phi4mm-lora serve`` only parses its flags and calls :func:`serve`; from Python,
``serve(load_config(), run="runs/demo", port=8000)`` does the same, and
:func:`create_service` gives the app without listening (for an in-process client or another
ASGI server). The run is opened like everywhere else
(:func:`~phi4mm_lora.evaluate.run.configure_and_load`): its adapter on its own base model.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi4mm_lora.config import RunConfig
from phi4mm_lora.errors import UserError
from phi4mm_lora.model.run_folder import Run
from phi4mm_lora.serve.app import Limits


@dataclass
class Service:
    """A started service: the ASGI ``app``, the worker that owns the model, what answers."""

    app: Any
    worker: Any
    provenance: dict[str, Any]
    cfg: RunConfig
    warm_up_s: float | None = None
    """Seconds of the warm-up call, made on a GPU or under ``eval.compile`` (None: no warm-up, :func:`warms_up`)."""


def check_address(host: str, port: int) -> None:
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


def example_sentences(limit: int = 40) -> list[str]:
    """Sentences of the bundled corpus's test split, for the page's picker."""
    from phi4mm_lora.data.examples import bundled_corpus_path

    f = bundled_corpus_path() / "test" / "text"
    if not f.is_file():
        return []
    lines = [line.split(maxsplit=1)[1].lower() for line in f.read_text().splitlines() if " " in line.strip()]
    return sorted(set(lines))[:limit]


def warms_up(cfg: RunConfig, device: Any) -> bool:
    """Whether the service scores a bundled recording before it serves: under ``eval.compile``
    (the compilation: 47 s on an H200) and on a GPU, where a process's first call loads kernels
    (on an H200, 4.5 s against 3.2 s for the next ones; 10.0 s with ``model.sdpa_cudnn=true``, which
    also builds attention plans; docs/benchmarks.md, "third lease"). On a CPU the first call costs
    about what the next ones do."""
    import torch

    return bool(cfg.eval.compile) or torch.device(device).type == "cuda"


def create_service(cfg: RunConfig, run: Run | str | Path | None = None, *, limits: Limits | None = None,
                   max_batch: int = 8, max_queue: int = 64, loaded: Any | None = None,
                   sentences: list[str] | None = None) -> Service:
    """Load the model (``run``'s adapter on its base model, or ``loaded``), start the scoring
    worker and build the app; the worker stops when the app's lifespan ends. Where
    :func:`warms_up` says so, the worker first scores a bundled recording, so that what a
    process pays once happens here and not in the first request."""
    from phi4mm_lora.data.examples import bundled_recording
    from phi4mm_lora.evaluate.run import configure_and_load
    from phi4mm_lora.evaluate.score import ScoreItem
    from phi4mm_lora.model.provenance import provenance
    from phi4mm_lora.serve.app import create_app
    from phi4mm_lora.serve.worker import ScoringWorker

    cfg, loaded = configure_and_load(cfg, run, loaded)
    prov = provenance(loaded, cfg)
    worker = ScoringWorker(cfg, loaded, max_batch=max_batch, max_queue=max_queue)
    warm = None
    if warms_up(cfg, loaded.plan.device):
        audio, text = bundled_recording()
        warm = worker.warm_up(ScoreItem(str(audio), text))
    app = create_app(worker.start(), prov, limits, example_sentences() if sentences is None else sentences)
    return Service(app, worker, prov, cfg, warm)


def serve(cfg: RunConfig, run: Run | str | Path | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          limits: Limits | None = None, max_batch: int = 8, max_queue: int = 64,
          say: Callable[[str], None] | None = None) -> None:
    """Serve scoring over HTTP until interrupted (what ``phi4mm-lora serve`` runs).

    Problems with ``run`` or the address are raised before the model loads; ``say`` gets the
    progress lines (default: stderr).
    """
    import uvicorn

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    if run is not None:
        run = Run.open(run)
        cfg = run.configure(cfg)  # a missing base model is named before the address check
    check_address(host, port)
    say("loading the model" + (", then compiling the decoding step on a bundled recording (eval.compile) ..."
                               if cfg.eval.compile else " ..."))
    service = create_service(cfg, limits=limits, max_batch=max_batch, max_queue=max_queue)
    if service.warm_up_s is not None:
        say(f"warmed up: the bundled recording took {service.warm_up_s:.1f} s")
    prov = service.provenance
    shown = f"[{host}]" if ":" in host else host
    merged = " (merged)" if prov.get("adapter_merged") else ""
    say(f"serving http://{shown}:{port}/  (model {prov.get('model')}; adapter {prov.get('adapter') or 'none'}{merged}; "
        f"precision {prov.get('precision')}); Ctrl+C stops")
    uvicorn.run(service.app, host=host, port=port, log_level="warning", access_log=False)


__all__ = ["Service", "check_address", "create_service", "example_sentences", "serve"]
