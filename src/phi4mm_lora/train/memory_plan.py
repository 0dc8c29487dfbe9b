"""The memory plan: which gradient checkpointing and which micro-batch a run uses.

``train.gradient_checkpointing`` (``auto | none | selective | full``) and ``train.micro_batch``
(``auto | N``) are resolved here, once, before the optimizer is built. ``auto`` picks the
fastest setting whose estimated peak fits the device; a value set in the config always wins.

The estimate (:func:`estimate_peak`) is the training state, which is exact (the bytes of the
loaded weights, one gradient per trainable parameter, AdamW's two moments in the parameter's
dtype), plus the larger of two transients: the activations of one micro-batch (calibrated, see
:data:`VALUES_PER_LAYER_TOKEN`) and the temporary that AdamW's multi-tensor step allocates (one
copy of the trainable parameters). They never coexist: activations are freed by the backward
pass before the optimizer steps.

What the modes do (:func:`apply_checkpointing`), all through transformers' own per-layer
switches (``GradientCheckpointingLayer.gradient_checkpointing``, set by
``activation_checkpointing_enable``, ``gradient_checkpointing_enable`` before 5.2x; tested on
4.57.6 and 5.24):

* ``none``: every activation is kept; fastest, most memory;
* ``full``: every decoder layer keeps only its input and recomputes the rest in backward
  (one extra forward pass through the decoder);
* ``selective``: every other decoder layer (indices 0, 2, 4, ...) is recomputed, the others keep
  their activations: about half the memory saving of ``full`` for half its recompute.

Phi-4-MM's audio conformer has no checkpointing switch (transformers 4.57-5.24), so it keeps its
activations in every mode (they are small: ~80 ms per audio token, 1024 wide); the vision
tower's layers follow ``full`` in ``full`` and ``selective`` (unused by audio tasks).

A pure function (:func:`choose_plan`) does the choosing, so tests can give it any GPU size;
this module imports only torch and :mod:`phi4mm_lora.errors`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from phi4mm_lora.errors import UserError
from phi4mm_lora.model.blocks import decoder_layers

#: Fastest first. Recomputation costs time (measured on one H200, bf16, batch 8: 0.84 s/step
#: with full checkpointing against 0.49 s without, shared/docs/gpu-measurements.md).
MODES: tuple[str, ...] = ("none", "selective", "full")

#: Calibration point: one H200, bf16 plan, pretrained speech LoRA (r=320, 461,373,440 fp32
#: trainable parameters), batch 8 of the bundled corpus, transformers 5.24: peak allocated
#: 46.5 GB without checkpointing and 18.9 GB with it (issue 10's table;
#: shared/docs/gpu-measurements.md). The training state of that run is 16.87 GB (weights 11.33 +
#: gradients 1.85 + AdamW 3.69, exact, docs/benchmarks.md "Full-size memory per plan"), so its
#: activations were 29.6 GB and 2.03 GB. A peak is reached by the largest batch: the bundled
#: corpus averages ~525 tokens per example but its longest (APA) example has 752, and this
#: code's batch plan for that run (seed 42, grouped by length) has a batch of 8 such examples at
#: step 4, padded to 6,016 tokens (the measured run, at dbc0889, had the same corpus and seed;
#: the prompt rendering was reworked since, so its lengths may differ by a few tokens). The
#: figures are per padded token of that batch - what :func:`choose_plan` costs a micro-batch at
#: (micro-batch x the longest example).
CALIBRATION = {"state_bytes": 16.87e9, "peak_none": 46.5e9, "peak_full": 18.9e9, "tokens": 8 * 752,
               "layers": 32, "hidden": 3072, "act_bytes": 2}


def _values_per_layer_token(peak: float) -> float:
    c = CALIBRATION
    return (peak - c["state_bytes"]) / (c["tokens"] * c["layers"] * c["hidden"] * c["act_bytes"])


#: Activation bytes per token = layers x hidden x bytes per value x this. Fitted to the two
#: measured peaks above (~25.0 for ``none``, ~1.7 for ``full``); ``selective`` keeps half the
#: layers like ``none`` and half like ``full``, so it is their mean: derived, not measured.
#: Saved tensors counted on CPU agree (scripts/bench_memory_plan.py: 24.7 values per layer and
#: token kept without checkpointing with LoRA dropout; 1.0 with it, plus one layer recomputed
#: during backward, ~0.8 spread over 32 layers).
#: The figures include everything that grows with the tokens (the audio encoder, the
#: answer-only lm_head), so they are scaled to other models by their decoder size: right for
#: the full-size model, rough for much smaller ones. Checked against the other rows measured
#: there, not used to fit: nf4 with full checkpointing at batch 8, 14.1 GB (estimate 14.1); the
#: selective precision plan, 8.4 GB at batch 1 (estimate 8.2) and 8.9 GB at batch 8 (9.3).
#: Re-measured on an H200 with transformers 5.17 (docs/benchmarks.md, "GPU measurements,
#: 2026-11-27"): all five peaks again to 0.1 GB, and bf16 without checkpointing at batch 1,
#: 19.7 GB (estimate 20.6).
VALUES_PER_LAYER_TOKEN: dict[str, float] = {
    "none": _values_per_layer_token(CALIBRATION["peak_none"]),
    "full": _values_per_layer_token(CALIBRATION["peak_full"]),
}
VALUES_PER_LAYER_TOKEN["selective"] = (VALUES_PER_LAYER_TOKEN["none"] + VALUES_PER_LAYER_TOKEN["full"]) / 2

#: A plan fits when estimate x (1 + MARGIN) + RESERVE <= available. The margin covers the
#: estimate's error and allocator fragmentation (the H200 runs reserved 6-50% more than they
#: allocated at peak; the caching allocator gives cached blocks back before it fails), the
#: reserve cuBLAS/cuDNN workspaces.
MARGIN = 0.15
RESERVE = 0.5e9

GB = 1e9


@dataclass(frozen=True)
class Footprint:
    """What the loaded model costs before any activation, and how its activations scale."""

    weights: int
    """Bytes of every parameter and buffer as loaded (quantised ones as stored)."""
    trainable: int
    """Bytes of the trainable parameters: one gradient each, and AdamW's step temporary."""
    layers: int
    hidden: int
    act_bytes: int
    """Bytes per activation value: 2 under bf16/fp16 autocast, 4 in fp32."""

    @property
    def state(self) -> int:
        """Weights + gradients + AdamW's two moments (torch keeps them in the parameter's dtype)."""
        return self.weights + self.trainable + 2 * self.trainable


def footprint(model: torch.nn.Module, act_dtype: torch.dtype) -> Footprint:
    """The :class:`Footprint` of a loaded (PEFT) model, from its tensors and its text config."""
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return Footprint(weights, trainable, int(text.num_hidden_layers), int(text.hidden_size),
                     torch.empty((), dtype=act_dtype).element_size())


def activation_bytes(fp: Footprint, mode: str, tokens: int) -> float:
    """Activations one micro-batch of ``tokens`` (padded) tokens keeps for backward."""
    return tokens * fp.layers * fp.hidden * fp.act_bytes * VALUES_PER_LAYER_TOKEN[mode]


def estimate_peak(fp: Footprint, mode: str, tokens: int) -> float:
    """Peak device memory of a step: the state plus the larger transient (see the module doc)."""
    return fp.state + max(activation_bytes(fp, mode, tokens), fp.trainable)


def fits(need: float, available: float) -> bool:
    return need * (1 + MARGIN) + RESERVE <= available


def micro_batch_sizes(batch_size: int) -> list[int]:
    """Micro-batch sizes worth trying, largest first: ``ceil(batch / k)`` for k = 1, 2, ...
    passes (8 -> 8, 4, 3, 2, 1: 5 would need the same 2 passes as 4)."""
    return sorted({math.ceil(batch_size / k) for k in range(1, batch_size + 1)}, reverse=True)


def passes_per_step(batch_size: int, grad_accum: int, micro_batch: int) -> int:
    """Forward/backward passes of one optimizer step (per process): each batch cut into passes,
    or, for a micro-batch larger than the batch, the step's batches pooled (:func:`pool_step`)."""
    if micro_batch > batch_size:
        return math.ceil(batch_size * grad_accum / micro_batch)
    return math.ceil(batch_size / micro_batch) * grad_accum


def split_batch(indices: list[int], micro_batch: int) -> list[list[int]]:
    """One batch of the epoch's plan cut into consecutive micro-batches of at most ``micro_batch``."""
    return [indices[i : i + micro_batch] for i in range(0, len(indices), micro_batch)]


def pool_step(batches: list[list[int]], lengths: list[int], micro_batch: int) -> list[list[int]]:
    """An optimizer step's batches pooled into passes of at most ``micro_batch`` examples.

    The step's gradient is the sum over its examples divided by its label tokens
    (:mod:`~phi4mm_lora.train.loss`), whatever passes they go through, so the examples can be
    regrouped: longest first, into as few passes as fit, of sizes that differ by at most one,
    so that each pass pads little.
    """
    pooled = sorted((i for b in batches for i in b), key=lambda i: (-lengths[i], i))
    n = math.ceil(len(pooled) / micro_batch) if pooled else 0
    size, extra = divmod(len(pooled), n) if n else (0, 0)
    out, start = [], 0
    for k in range(n):
        end = start + size + (k < extra)
        out.append(pooled[start:end])
        start = end
    return out


@dataclass(frozen=True)
class MemoryPlan:
    """The resolved settings and why (``summary.json`` keeps :meth:`as_dict`)."""

    gradient_checkpointing: str
    micro_batch: int
    batch_size: int
    grad_accum: int
    mode_source: str
    """``auto`` or ``config``."""
    micro_source: str
    estimate: float | None = None
    """Estimated peak bytes; None where no limit is known."""
    available: float | None = None
    """Bytes this process may use on the device; None: no limit is known (CPU, MPS)."""
    device: str = "cpu"
    longest_tokens: int = 0
    """Tokens of the longest example, what each micro-batch was costed at."""

    @property
    def passes(self) -> int:
        """Forward/backward passes per batch (1 when batches are pooled)."""
        return math.ceil(self.batch_size / min(self.micro_batch, self.batch_size))

    @property
    def pooled(self) -> bool:
        """A micro-batch larger than the batch: each pass takes examples of several batches of the step."""
        return self.micro_batch > self.batch_size

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passes_per_step": passes_per_step(self.batch_size, self.grad_accum, self.micro_batch)}

    def lines(self) -> list[str]:
        """What the recipe prints at setup: one line per choice."""
        need = None
        if self.available is not None:
            need = f"needs ~{self.estimate / GB:.1f} GB of {self.available / GB:.1f} GB free on {self.device}"
            if not fits(self.estimate, self.available):
                need += ", more than fits: expect an out-of-memory error"

        def why(source: str) -> str:
            if source == "auto":
                return f"auto: {need or f'{self.device} has no memory limit to plan for'}"
            return "set in config" + (f"; {need}" if need else "")

        mode_why, micro_why = why(self.mode_source), why(self.micro_source)
        examples = self.batch_size * self.grad_accum
        if self.pooled:
            micro = (f"memory plan: micro-batch {self.micro_batch}: the {self.grad_accum} batches of "
                     f"{self.batch_size} of each optimizer step pooled into "
                     f"{passes_per_step(self.batch_size, self.grad_accum, self.micro_batch)} pass(es), longest "
                     f"first = {examples} examples per optimizer step per process ({micro_why})")
        else:
            micro = (f"memory plan: micro-batch {self.micro_batch} x {self.passes} pass(es) per batch, x grad_accum "
                     f"{self.grad_accum} = {examples} examples per optimizer step per process ({micro_why})")
        return [f"memory plan: gradient checkpointing {self.gradient_checkpointing} ({mode_why})", micro]


def choose_plan(fp: Footprint, *, batch_size: int, grad_accum: int, longest_tokens: int,
                available: float | None, mode: str = "auto", micro_batch: int | str = "auto",
                device: str = "cpu") -> MemoryPlan:
    """The fastest (checkpointing, micro-batch) whose estimated peak fits ``available`` bytes.

    Order: the largest micro-batch first, and within it ``none`` > ``selective`` > ``full``.
    Micro-batch before mode because on the measured H200 a pass has a large fixed cost (a
    batch-1 pass took 0.32 s, a batch-8 pass 0.45 s: docs/benchmarks.md, "GPU measurements"), so
    splitting a batch in two costs more than recomputing it (full checkpointing: 0.65 against
    0.45 s at batch 8). A value given in the config is kept; one larger than the batch pools the
    batches of each optimizer step (:func:`pool_step`, same gradient), up to the step's examples.
    ``auto`` first tries such pooled passes without checkpointing, on a device whose memory is
    known, where the step has several batches: the paper's 8 x 8 step ran at 22.1 examples/s in
    passes of 16 on an H200, against 15-17.7 one batch of 8 at a time and 17.7 in one pass of 64
    with full checkpointing (docs/benchmarks.md, "second lease"); so pooling never comes with
    recomputation. Each micro-batch is costed at ``longest_tokens`` per example (padding to the
    longest, the worst case). ``available`` None (CPU, MPS: no limit known) gives the fastest
    unpooled setting. Raises :class:`UserError` (one line, what to change) when no candidate fits.
    """
    modes = MODES if mode == "auto" else (mode,)
    micros = micro_batch_sizes(batch_size) if micro_batch == "auto" else [min(int(micro_batch), batch_size * grad_accum)]
    base = {"batch_size": batch_size, "grad_accum": grad_accum, "available": available, "device": device,
            "longest_tokens": longest_tokens,
            "mode_source": "auto" if mode == "auto" else "config",
            "micro_source": "auto" if micro_batch == "auto" else "config"}
    if available is None:
        return MemoryPlan(modes[0], micros[0], estimate=None, **base)
    pooled = [(m, "none") for m in micro_batch_sizes(batch_size * grad_accum)
              if m > batch_size and micro_batch == "auto" and "none" in modes]
    for m, g in [*pooled, *((m, g) for m in micros for g in modes)]:
        need = estimate_peak(fp, g, m * longest_tokens)
        if fits(need, available):
            return MemoryPlan(g, m, estimate=need, **base)
    need = estimate_peak(fp, modes[-1], micros[-1] * longest_tokens)
    if mode != "auto" and micro_batch != "auto":  # the user's explicit choice wins; training may still fit
        return MemoryPlan(mode, micros[0], estimate=need, **base)
    raise UserError(_no_fit_message(fp, need, available, device, mode, micro_batch, longest_tokens))


def _no_fit_message(fp: Footprint, need: float, available: float, device: str, mode: str,
                    micro_batch: int | str, longest_tokens: int) -> str:
    """One line: what the smallest candidate needs, what there is, and what to change."""
    tried = (f"gradient checkpointing {'full' if mode == 'auto' else mode} at micro-batch "
             f"{1 if micro_batch == 'auto' else micro_batch}")
    fixes = []
    if mode not in ("auto", "full"):
        fixes.append("train.gradient_checkpointing=auto")
    if micro_batch not in ("auto", 1):
        fixes.append("train.micro_batch=auto")
    if fp.state * (1 + MARGIN) + RESERVE > available:
        fixes.append("a smaller precision plan (precision=nf4 or selective) or fewer trainable parameters "
                     "(adapter.mode=fresh with a smaller adapter.r)")
    fixes.append(f"shorter examples (data.max_audio_seconds; the longest is ~{longest_tokens} tokens)")
    fixes.append("a GPU with more free memory")
    return (f"memory plan: {tried} needs ~{need / GB:.1f} GB (training state {fp.state / GB:.1f} GB) but "
            f"{device} has {available / GB:.1f} GB free; use " + ", or ".join(fixes))


def device_memory(device: torch.device) -> float | None:
    """Bytes this process may use on ``device``: what is free plus what it already holds
    (the loaded weights count in the estimate). None where no limit is known (CPU, MPS)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return float(free + torch.cuda.memory_allocated(device))


def apply_checkpointing(model: torch.nn.Module, mode: str) -> int:
    """Switch ``mode`` on with transformers' own machinery; returns how many decoder layers recompute.

    ``activation_checkpointing_enable`` (transformers 5.2x; ``gradient_checkpointing_enable``
    before, which 5.2x warns about) sets every layer's switch and the non-reentrant checkpoint
    function (frozen inputs work with LoRA). ``selective`` then turns the switch off again on
    the odd decoder layers. (5.24's ``every_n_layers`` would count the vision tower's layers
    too, so which decoder layers it picks would depend on the module order.)
    """
    if mode == "none":
        on = getattr(model, "is_activation_checkpointing", None)  # transformers 5.2x name; older: the next
        if on if on is not None else getattr(model, "is_gradient_checkpointing", False):  # switched on before
            off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            off()
        return 0
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = decoder_layers(model)
    if not layers:
        raise RuntimeError(f"{type(model).__name__}: no decoder layer with a gradient_checkpointing switch")
    if mode == "selective":
        for i, layer in layers.items():
            layer.gradient_checkpointing = i % 2 == 0
    return sum(bool(layer.gradient_checkpointing) for layer in layers.values())


__all__ = ["CALIBRATION", "Footprint", "MARGIN", "MODES", "MemoryPlan", "RESERVE", "VALUES_PER_LAYER_TOKEN",
           "activation_bytes", "apply_checkpointing", "choose_plan", "device_memory",
           "estimate_peak", "fits", "footprint", "micro_batch_sizes", "passes_per_step", "pool_step", "split_batch"]
