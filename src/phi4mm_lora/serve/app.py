"""The HTTP API and web page of ``phi4mm-lora serve`` (Starlette on uvicorn).

Endpoints: ``POST /score`` (multipart: ``audio`` file + ``text``), ``GET /health``,
``GET /sentences`` (example sentences for the page), ``GET /`` (the page).

Every refusal is a JSON ``{"error": code, "message": ...}`` with a 4xx status, decided in
the handler before the model is involved: 413 for an upload over the size limit (checked
while the body is read, so a huge upload is never held in memory) or audio over the duration
limit; 415 for a container outside WAV, FLAC, MP3, OGG/Opus, WebM/Opus, M4A (judged by the
content, not the file name); 422 for empty or wordless text and unreadable audio; 400 for a
request that is not the expected form; 503 when the queue is full. Words CMUdict lacks are
not an error: they are listed in ``oov`` and ``warnings`` and left out of the phone check.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict, dataclass
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from phi4mm_lora.data.audio import (
    ACCEPTED_FORMATS,
    TARGET_SR,
    AudioError,
    AudioTooLong,
    UnsupportedFormat,
    container_format,
    decode_bytes,
)
from phi4mm_lora.evaluate.align import split_words
from phi4mm_lora.serve.worker import QueueFull, ScoringWorker

#: What each score means (0-10, higher is better; Speechocean762's sentence-level rubric).
SCORE_LABELS: dict[str, str] = {
    "accuracy": "Accuracy: how correctly the sounds are pronounced",
    "fluency": "Fluency: pauses, hesitations and repetitions",
    "prosodic": "Prosody: intonation, rhythm and speaking rate",
    "total": "Total: the overall impression",
}


@dataclass(frozen=True)
class Limits:
    """What one request may send."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_seconds: float = 30.0
    max_text_chars: int = 500


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.response = error(status, code, message)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    too_big = f"upload is larger than the {limit / 2**20:g} MiB limit; send a shorter or compressed recording"
    if declared and declared.isdigit() and int(declared) > limit:
        raise _Refused(413, "too_large", too_big)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _Refused(413, "too_large", too_big)
    return bytes(body)


async def _form(request: Request, body: bytes) -> Any:
    """Parse the already read multipart body with Starlette's parser."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise _Refused(400, "bad_request", "send multipart/form-data with an 'audio' file and a 'text' field")
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except MultiPartException as exc:
        raise _Refused(400, "bad_request", f"the form could not be read ({exc})") from None


def _text(form: Any, limits: Limits) -> str:
    text = form.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _Refused(422, "empty_text", "'text' is empty: send the sentence the speaker read")
    text = " ".join(text.split())
    if len(text) > limits.max_text_chars:
        raise _Refused(422, "text_too_long", f"'text' has {len(text)} characters; the limit is {limits.max_text_chars}")
    if not split_words(text):
        raise _Refused(422, "empty_text", "'text' has no words: send the sentence the speaker read")
    return text


async def _audio(form: Any, limits: Limits) -> tuple[str, str, Any]:
    """(file name, container name, 16 kHz samples) of the upload."""
    upload = form.get("audio")
    if not isinstance(upload, UploadFile):
        raise _Refused(400, "missing_audio", "no 'audio' file in the form: attach the recording as 'audio'")
    name = upload.filename or "upload"
    data = await upload.read()
    if not data:
        raise _Refused(422, "empty_audio", f"audio {name} is empty (0 bytes)")

    def decode() -> tuple[str, Any]:
        return container_format(data, name), decode_bytes(data, name, TARGET_SR, limits.max_seconds)

    try:
        fmt, samples = await run_in_threadpool(decode)
    except UnsupportedFormat as exc:
        raise _Refused(415, "unsupported_format", str(exc)) from None
    except AudioTooLong as exc:
        raise _Refused(413, "too_long", str(exc)) from None
    except AudioError as exc:
        raise _Refused(422, "unreadable_audio", str(exc)) from None
    return name, fmt, samples


def create_app(worker: ScoringWorker, provenance: dict[str, Any], limits: Limits | None = None,
               sentences: list[str] | None = None) -> Starlette:
    """The Starlette app around a started :class:`ScoringWorker`."""
    limits = limits or Limits()
    page = files("phi4mm_lora.serve").joinpath("page.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def health(request: Request) -> Response:
        return JSONResponse({
            "status": "ok", "provenance": provenance, "waiting": worker.waiting, **asdict(worker.stats),
            "limits": asdict(limits), "accepted_formats": list(ACCEPTED_FORMATS.values()),
        })

    async def list_sentences(request: Request) -> Response:
        return JSONResponse({"sentences": sentences or []})

    async def score(request: Request) -> Response:
        form = None
        try:
            form = await _form(request, await _read_body(request, limits.max_upload_bytes))
            text = _text(form, limits)
            name, fmt, samples = await _audio(form, limits)
            future = worker.submit(name, text, samples)
        except _Refused as exc:
            return exc.response
        except QueueFull as exc:
            return JSONResponse({"error": "busy", "message": f"the service is busy ({exc}); retry shortly"},
                                status_code=503, headers={"Retry-After": "2"})
        finally:
            if form is not None:
                await form.close()  # the upload's spooled temporary file
        try:
            result = await asyncio.wrap_future(future)
        except Exception as exc:  # the model failed on this batch; the service goes on
            return error(500, "scoring_failed", f"scoring failed: {type(exc).__name__}: {exc}")
        if result.get("error"):  # the model failed on this recording alone
            return error(500, "scoring_failed", f"scoring failed: {result['error']}")
        result.update({
            "score_scale": [0, 10], "score_labels": SCORE_LABELS,
            "audio_info": {"format": fmt, "duration_s": round(len(samples) / TARGET_SR, 3)},
            "warnings": [f"not in CMUdict, so not checked: {w}" for w in result.get("oov") or []],
            "provenance": provenance,
        })
        return JSONResponse(result)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, "http_error", f"{exc.detail}: {request.method} {request.url.path}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await run_in_threadpool(worker.stop)

    return Starlette(
        routes=[Route("/", index), Route("/health", health), Route("/sentences", list_sentences),
                Route("/score", score, methods=["POST"])],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
