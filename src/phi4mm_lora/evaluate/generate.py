"""Batched greedy generation for evaluation and scoring.

Why it is shaped like this:

* Prompts are :func:`~phi4mm_lora.data.prompts.generation_prompt` (the tokenizer's own chat
  template, ``add_generation_prompt``), the same function training's text starts with, so
  evaluation sees exactly the ``<|user|>...<|end|><|assistant|>`` string the model was
  trained on; the processor expands the audio placeholder and extracts features.
* Batches are LEFT padded (``padding_side="left"`` in the call; the shared tokenizer is
  never changed): every row's last prompt token sits at the same column, so all
  rows start generating together with the KV cache; ``generate`` derives position ids from
  the attention mask, so padding does not shift positions (a test checks batched output
  equals one-at-a-time output).
* Greedy decoding stops at ``<|end|>`` (the assistant turn's end) or ``<|endoftext|>``;
  each task has its own token budget (an APA answer is ~30 tokens, an MDD answer ~80), so
  an untrained model that never stops costs only what the task can need.
* Examples are grouped by task and sorted by audio length, which keeps padding (and the
  quadratic attention cost of padded rows) low. The tasks' batches alternate, so a
  recording's second task comes right after its first and reuses its audio rows
  (:mod:`~phi4mm_lora.evaluate.embed`: each recording goes through the encoder once).
* A bad audio file, or a batch that fails inside the model, never stops the run: the
  example becomes a :class:`Generation` with ``error`` set, named by its id. A failing
  batch is retried one example at a time so only the culprit is marked; one that runs out
  of GPU memory (``eval.batch_size=auto`` estimates, :mod:`~phi4mm_lora.evaluate.batch_size`)
  is retried in halves.
* ``eval.cache`` / ``eval.compile`` choose transformers' own KV cache and compile path
  (:func:`cache_options`); the answers are the same token ids with either cache (tested on the
  tiny model, batched and one at a time). ``eval.compile=true`` also compiles the audio encoder's
  conformer blocks one by one (:mod:`phi4mm_lora.model.blocks`): at the published depth they
  issue half of a recording's preparation operators. ``eval.compile=cudagraphs`` only replays the
  decoding step's eager kernels as CUDA graphs: no code generation, a short first call.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from phi4mm_lora.data.audio import AudioError, load_audio
from phi4mm_lora.data.examples import Example
from phi4mm_lora.errors import UserError
from phi4mm_lora.evaluate.embed import EOS_ID, AudioRows, inner_model, processor_inputs, row_embeds
from phi4mm_lora.model.blocks import compile_each, conformer_blocks

END_TOKEN = "<|end|>"
#: Fallback id of <|end|> when the tokenizer does not know it (Phi-4's value; eos: ``EOS_ID``).
END_ID = 200020
#: Per-task budgets; ``eval.max_new_tokens`` caps them (and is the budget of other tasks).
TASK_MAX_NEW_TOKENS: dict[str, int] = {"apa": 40, "mdd": 120}


@dataclass
class Generation:
    """The model's answer to one example (or why there is none)."""

    id: str
    task: str
    text: str = ""
    n_tokens: int = 0
    finished: bool = False  # stopped at <|end|>/eos rather than at the token budget
    error: str | None = None


def max_tokens_for(task: str, cap: int) -> int:
    """Token budget of a task: its default budget, never above ``cap``."""
    return min(TASK_MAX_NEW_TOKENS.get(task, cap), cap)


def stop_ids(tokenizer: Any) -> list[int]:
    """``[<|end|>, eos]`` ids from the tokenizer (Phi-4's known ids if it lacks them)."""
    ids: list[int] = []
    end = tokenizer.convert_tokens_to_ids(END_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    ids.append(end if isinstance(end, int) and end != unk else END_ID)
    eos = tokenizer.eos_token_id
    for e in eos if isinstance(eos, list) else [eos if eos is not None else EOS_ID]:
        if e not in ids:
            ids.append(int(e))
    return ids


#: Static caches are sized up to a multiple of this many positions, so that a compiled step
#: sees a handful of cache shapes over a run instead of one per batch (each new shape is a
#: recompilation, or a CUDA-graph recording); masked slots change no answer.
STATIC_CACHE_ROUND = 256


def static_cache_length(length: int) -> int:
    """The positions a static cache for ``length`` is allocated with: rounded up to :data:`STATIC_CACHE_ROUND`."""
    return -(-length // STATIC_CACHE_ROUND) * STATIC_CACHE_ROUND


def compile_backend(compile: bool | str) -> str | None:
    """The ``torch.compile`` backend ``eval.compile`` names: None (false), ``inductor`` (true) or ``cudagraphs``."""
    if compile is True or compile == "inductor":
        return "inductor"
    if compile == "cudagraphs":
        return "cudagraphs"
    if compile is False or compile is None:
        return None
    raise ValueError(f"unknown eval.compile {compile!r}: false, true (inductor) or cudagraphs")


def cache_options(cache: str = "dynamic", compile: bool | str = False, length: int | None = None) -> dict[str, Any]:
    """``generate`` keyword arguments for ``eval.cache`` / ``eval.compile``.

    dynamic: transformers' default ``DynamicCache`` (nothing to pass). static: a ``StaticCache``
    (``cache_implementation="static"``) of ``length`` (prompt + budget) rounded up to
    :data:`STATIC_CACHE_ROUND`. transformers compiles the decoding step by itself whenever the
    cache is static and the device is a GPU, so a static cache without ``compile`` passes
    ``disable_compile``; with ``compile`` it passes a ``CompileConfig`` marked to compile on a CPU
    too: transformers' defaults (inductor, ``reduce-overhead`` i.e. CUDA graphs on a GPU), or for
    ``cudagraphs`` torch's backend of that name, which traces the step and replays its eager
    kernels as CUDA graphs (no code generation, hence no C++ compiler; on a CPU it replays nothing
    and runs the traced step).
    """
    if cache == "dynamic":
        if compile:
            raise ValueError("compile needs the static cache (eval.cache=static)")
        return {}
    if cache != "static":
        raise ValueError(f"unknown cache {cache!r}: dynamic or static")
    from transformers import CompileConfig, GenerationConfig

    opts: dict[str, Any] = {"cache_implementation": "static"}
    if length is not None and hasattr(GenerationConfig(), "max_cache_len"):  # transformers >= 5
        opts["max_cache_len"] = static_cache_length(length)
    backend = compile_backend(compile)
    if backend == "inductor" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("c++", "g++", "clang++"))):
        raise UserError("eval.compile=true needs a C++ compiler for torch.compile (inductor), and none is on "
                        "PATH; install one (e.g. apt-get install g++), or set eval.compile=cudagraphs or false")
    if backend is not None:
        cc = CompileConfig() if backend == "inductor" else CompileConfig(backend=backend, mode="default")
        cc._compile_all_devices = True  # transformers' own switch for compiling off-GPU (the CPU tests, the bench)
        opts["compile_config"] = cc
    else:
        opts["disable_compile"] = True
    return opts


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


@torch.no_grad()
def greedy_ids(
    model: torch.nn.Module,
    processor: Any,
    examples: Sequence[Example],
    max_new_tokens: int,
    audio: dict[str, np.ndarray] | None = None,
    cache: str = "dynamic",
    compile: bool | str = False,
    rows: AudioRows | None = None,
    logits: bool = False,
) -> tuple[list[list[int]], tuple[torch.Tensor, ...] | None]:
    """One batch's greedy new token ids, one list per row (pad tokens after a row's stop, up to the
    batch's largest budget); with ``logits``, each step's ``[rows, vocab]`` float32 logits as
    transformers' ``generate`` returns them (``output_logits``), else None."""
    if audio is None:
        audio = {ex.id: load_audio(ex.audio_path) for ex in examples if ex.audio_path}
    tok = processor.tokenizer
    device = _device_of(model)
    if inner_model(model) is not None:
        ids, emb, mask = row_embeds(model, processor, examples, audio, device, rows)
        batch: dict[str, Any] = {"input_ids": ids, "inputs_embeds": emb, "attention_mask": mask}
    else:  # not a Phi-4-multimodal: let the processor batch everything
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in processor_inputs(processor, examples, audio).items()}
    stops = stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[-1]
    prompt_len = batch["input_ids"].shape[1]
    budget = max(max_tokens_for(ex.task, max_new_tokens) for ex in examples)
    extra = {"return_dict_in_generate": True, "output_logits": True} if logits else {}
    out = model.generate(
        **batch, max_new_tokens=budget, do_sample=False, num_beams=1,
        eos_token_id=stops, pad_token_id=pad, use_cache=True,
        **cache_options(cache, compile, prompt_len + budget), **extra,
    )
    seq = out.sequences if logits else out
    new = (seq[:, prompt_len:] if seq.shape[1] > prompt_len else seq).tolist()
    return new, (tuple(out.logits) if logits else None)


def generate_batch(model: torch.nn.Module, processor: Any, examples: Sequence[Example], max_new_tokens: int,
                   *args: Any, **kwargs: Any) -> list[Generation]:
    """Greedy answers for one batch: :func:`greedy_ids`'s arguments (``audio`` maps example id ->
    16 kHz samples; ``cache`` and ``compile`` as :func:`cache_options`; ``rows`` shares audio rows
    across batches, :class:`AudioRows`), its tokens decoded.

    ``max_new_tokens`` caps each row's own task budget (:func:`max_tokens_for`). A batch that
    mixes tasks decodes for the largest budget and cuts every row at its own, which gives the
    answer that row would get alone: greedy rows do not depend on each other.
    """
    new, _ = greedy_ids(model, processor, examples, max_new_tokens, *args, **kwargs)
    tok = processor.tokenizer
    stop_set = set(stop_ids(tok))
    gens = []
    for ex, row in zip(examples, new, strict=True):
        row = row[:max_tokens_for(ex.task, max_new_tokens)]
        cut = next((i for i, t in enumerate(row) if t in stop_set), None)
        kept = row if cut is None else row[:cut]
        gens.append(Generation(ex.id, ex.task, tok.decode(kept, skip_special_tokens=False),
                               len(kept) + (cut is not None), cut is not None))
    return gens


def plan_batches(examples: Sequence[Example], batch_size: int, share_small: bool = False) -> list[list[Example]]:
    """Batches of one task each, similar audio lengths together, the tasks taking turns
    (APA 1, MDD 1, APA 2, ...: one recording's tasks run close together); deterministic.

    ``share_small``: when everything fits in one batch (scoring a recording: its APA and MDD
    prompts), the tasks share it, so decoding takes the longer budget's steps instead of both
    budgets' (120 instead of 160 for a model that never stops). That pays where a decoding step
    costs the same for 1 row as for 2: on a GPU, where it is bound by the host (docs/benchmarks.md,
    "GPU measurements"). On a CPU a step's cost grows with its rows, and scoring one recording on
    the real depth took 7.0 s shared against 5.5 s apart, so generation shares only on a GPU.
    """
    if share_small and len(examples) <= batch_size:
        return [sorted(examples, key=lambda e: (e.task, e.duration or 0.0, e.id))] if examples else []
    by_task: dict[str, list[Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    per_task = []
    for task in sorted(by_task):
        items = sorted(by_task[task], key=lambda e: (e.duration or 0.0, len(e.prompt), e.id))
        per_task.append([items[i: i + batch_size] for i in range(0, len(items), batch_size)])
    return [b for turn in itertools.zip_longest(*per_task) for b in turn if b is not None]


def batches_for(model: torch.nn.Module, examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
    """The batches :func:`generate_all` runs for ``model``: :func:`plan_batches`, sharing small sets on a GPU."""
    return plan_batches(examples, batch_size, share_small=_device_of(model).type == "cuda")


def _progress(enabled: bool, total: int) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=True)
    return prog, prog.add_task("generate", total=total)


def generate_all(
    model: torch.nn.Module,
    processor: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    progress: bool = True,
    on_batch: Callable[[list[Generation]], None] | None = None,
    audio: dict[str, np.ndarray] | None = None,
    cache: str = "dynamic",
    compile: bool | str = False,
    encoder_batch: int = 1,
) -> list[Generation]:
    """One :class:`Generation` per example, in input order; failures carry ``error``.

    ``max_new_tokens`` caps the per-task budgets of :data:`TASK_MAX_NEW_TOKENS`. ``audio``
    holds already decoded 16 kHz samples by example id (the server decodes uploads in
    memory); other examples are read from their ``audio_path``. ``cache``/``compile``:
    ``eval.cache``/``eval.compile`` (:func:`cache_options`); ``compile=True`` (inductor) also compiles
    the audio encoder's conformer blocks, which run once per recording outside the decoding step;
    ``encoder_batch``: ``eval.encoder_batch``, recordings per audio-encoder call (:class:`AudioRows`).
    """
    cache_options(cache, compile)  # a bad combination fails here, before any work
    if compile_backend(compile) == "inductor":  # cudagraphs: a graph per recording length would pile up
        compile_each(conformer_blocks(model))
    decoded = audio or {}
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    was_training = model.training
    model.eval()
    results: dict[str, Generation] = {}
    rows = AudioRows(examples, encoder_batch)
    prog, bar = _progress(progress, len(examples))
    try:
        with prog:
            for batch in batches_for(model, examples, batch_size):
                batch_audio: dict[str, np.ndarray] = {}
                ok: list[Example] = []
                for ex in batch:
                    try:
                        if ex.id in decoded:
                            batch_audio[ex.id] = decoded[ex.id]
                        elif ex.audio_path:
                            batch_audio[ex.id] = load_audio(ex.audio_path)
                        ok.append(ex)
                    except AudioError as exc:
                        results[ex.id] = Generation(ex.id, ex.task, error=f"audio: {exc}")
                gens = _run_batch(model, processor, ok, max_new_tokens, batch_audio, cache, compile, rows)
                for g in gens:
                    results[g.id] = g
                if on_batch is not None:
                    on_batch(gens)
                prog.advance(bar, len(batch))
    finally:
        model.train(was_training)
    return [results[ex.id] for ex in examples]


def _run_batch(model: torch.nn.Module, processor: Any, batch: list[Example], cap: int,
               audio: dict[str, np.ndarray], cache: str = "dynamic", compile: bool | str = False,
               rows: AudioRows | None = None) -> list[Generation]:
    """The batch at once; if the model fails on it, each example alone (culprits marked). A batch
    that runs out of GPU memory is split in halves instead: its rows were fine, the batch too big."""
    if not batch:
        return []
    try:
        return generate_batch(model, processor, batch, cap, audio, cache, compile, rows)
    except (KeyboardInterrupt, MemoryError):
        raise
    except torch.OutOfMemoryError as exc:
        if len(batch) == 1:
            return [Generation(batch[0].id, batch[0].task, error=f"generation: out of memory: {exc}")]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        parts = [batch[: len(batch) // 2], batch[len(batch) // 2:]]
    except Exception as exc:
        if len(batch) == 1:
            return [Generation(batch[0].id, batch[0].task, error=f"generation: {type(exc).__name__}: {exc}")]
        parts = [[ex] for ex in batch]
    return [g for part in parts for g in _run_batch(model, processor, part, cap, audio, cache, compile, rows)]


def throughput(n: int, seconds: float) -> str:
    """``"12.3 examples/s"``: for progress messages and the benchmark script."""
    return f"{n / seconds:.1f} examples/s" if seconds > 0 else "-"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` and return (result, wall seconds)."""
    t = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t
