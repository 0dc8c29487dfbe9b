"""The scoring service: one loaded model behind an HTTP API and a web page.

Data flow: the HTTP layer (:mod:`.app`) checks and decodes each upload, then hands it to the
one :class:`~.worker.ScoringWorker` thread that owns the model; the worker batches whatever
is waiting and scores it with :func:`phi4mm_lora.evaluate.score.score_batch`, the same code
as the ``score`` command.
"""
