"""One thread owns the model; requests wait in a queue and are scored in batches.

Why a single worker: a model is not safe to call from several threads at once, and on a GPU
one batch of N is much faster than N single requests. The HTTP handlers only decode and
validate (cheap, concurrent); the worker takes the first waiting request, gathers whatever
else arrives within ``max_wait_s`` (up to ``max_batch``), and scores them together. Each
answer is the same as when scored alone, because generation embeds each row alone and decodes
a left-padded batch (:mod:`phi4mm_lora.evaluate.generate`).

A full queue is refused at once (the caller answers 503) instead of letting latency grow
without bound; a batch that raises fails only its own requests, and the worker goes on.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phi4mm_lora.config import RunConfig
from phi4mm_lora.evaluate.score import ScoreItem, score_batch


class QueueFull(Exception):
    """More requests are waiting than the service accepts."""


@dataclass
class _Job:
    item: ScoreItem
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class WorkerStats:
    """What /health reports about the batching."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    failed_batches: int = 0
    busy_s: float = 0.0


class ScoringWorker:
    """Owns ``loaded`` (a :class:`~phi4mm_lora.model.load.Loaded`); scores submitted items in batches."""

    def __init__(self, cfg: RunConfig, loaded: Any, max_batch: int = 8, max_wait_s: float = 0.02,
                 max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.cfg, self.loaded = cfg, loaded
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self.stats = WorkerStats()
        self._thread = threading.Thread(target=self._loop, name="phi4mm-lora-scorer", daemon=True)

    def start(self) -> ScoringWorker:
        self._thread.start()
        return self

    def warm_up(self, item: ScoreItem) -> float:
        """Score ``item`` once before the worker starts; its seconds. Under ``eval.compile`` this
        is where the decoding step compiles (tens of seconds), so no request waits for it."""
        start = time.monotonic()
        score_batch(self.cfg, self.loaded, [item])
        return time.monotonic() - start

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, audio: str, text: str, samples: np.ndarray) -> Future:
        """Queue one recording; the future resolves to its :func:`score_batch` dict."""
        job = _Job(ScoreItem(audio, text, samples))
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting") from None
        return job.future

    def _gather(self, first: _Job) -> list[_Job]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # stop after this batch
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [j for j in self._gather(first) if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            start = time.monotonic()
            try:
                results = score_batch(self.cfg, self.loaded, [j.item for j in batch])
            except Exception as exc:  # a broken batch fails its requests, not the service
                self.stats.failed_batches += 1
                for j in batch:
                    j.future.set_exception(exc)
                continue
            finally:
                self.stats.busy_s += time.monotonic() - start
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            for j, res in zip(batch, results, strict=True):
                res["batch"] = {"size": len(batch), "queued_s": round(start - j.queued_at, 3),
                                "compute_s": round(time.monotonic() - start, 3)}
                j.future.set_result(res)
