"""Do two decoding paths agree, and where their answers part, is it rounding or a fault?

Two paths that compute the same function in a different order or precision (eager against
compiled kernels, a dynamic against a static cache, bf16 against fp32) give logits that differ
by rounding, and greedy answers that can still part: where two tokens are almost tied, rounding
decides the arg max, and from then on each path reads a different text. A path with a fault (a
mask that lets padding in, a stale cache slot) differs by far more than rounding.

What tells them apart: up to and including the step where the answers part, both paths have read
the same tokens, so their logits at those steps are two computations of the same thing. Their
largest difference there, relative to the spread of the logits, is the paths' numerical
*noise*. Rounding gives a small noise (fp32: ~1e-6; bf16 at depth: a few percent); a fault
gives a noise of the order of the spread itself, so the noise alone decides the verdict. At
the parting step the reference's *gap* (its logit for its own token minus its logit for the
variant's token) says how close the tie was. It is reported, not judged: any flip has a gap of at
most twice the noise, since each path's arg max moved by no more than the noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

#: Noise (relative to the logits' spread) above which paths differ by more than rounding.
#: Measured on the tiny model, largest difference over 200,064 logits a step:
#: fp32, static vs dynamic cache: 2e-6 (two layers and at full depth). A fault, the attention mask
#: left out of a left-padded batch whose padding holds a word: 5.7-6.6 on a row with 64% padding,
#: 0.02-3.8 on rows with 6-12% (a row whose attention all but ignores its padding stays unchanged).
#: bf16 at full depth: static vs dynamic 0.05-0.06, compiled vs eager 0.06, bf16 vs fp32 0.11-0.13.
#: So only fp32 tells a subtle fault from rounding; in bf16 the bound catches gross faults alone
#: (docs/benchmarks.md, "Where answers part").
TOLERANCE = {"fp32": 1e-3, "bf16": 0.5}

@dataclass(frozen=True)
class Parting:
    """How one row's answers compare between a reference path and a variant.

    ``step``: the first new-token index where the tokens differ (None: identical). ``noise``:
    the largest |reference - variant| logit over the steps both paths read the same tokens
    (up to ``step``), divided by the reference logits' standard deviation at that step.
    ``first``: the same at the first new token alone, which comes from the prefill (transformers
    compiles only the decoding steps, so under ``eval.compile`` it isolates the audio encoder's
    compiled blocks and the static cache's prefill from the compiled step).
    ``gap``: at ``step``, the reference's logit of its token minus that of the variant's token,
    in the same unit; ``rank``: the variant's token's rank in the reference's logits (1: its
    runner-up). ``verdict``: ``same`` or ``rounding`` (tokens equal or not) when the noise is at
    most ``tolerance`` (:data:`TOLERANCE` of the precision), otherwise ``suspect``.
    """

    row: int
    step: int | None
    noise: float
    first: float = 0.0
    gap: float | None = None
    rank: int | None = None
    tolerance: float = TOLERANCE["fp32"]

    @property
    def verdict(self) -> str:
        if self.noise > self.tolerance:
            return "suspect"
        return "same" if self.step is None else "rounding"

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def compare_paths(ref_ids: Sequence[Sequence[int]], ref_logits: Sequence[torch.Tensor],
                  var_ids: Sequence[Sequence[int]], var_logits: Sequence[torch.Tensor],
                  tolerance: float = TOLERANCE["fp32"]) -> list[Parting]:
    """One :class:`Parting` per row of two greedy runs of the same batch: token ids ``[row][step]``
    and logits ``[step][row, vocab]`` (as :func:`~phi4mm_lora.evaluate.generate.greedy_ids` returns
    them); ``tolerance``: the noise rounding can explain (:data:`TOLERANCE`)."""
    out = []
    for row, (ref, var) in enumerate(zip(ref_ids, var_ids, strict=True)):
        steps = min(len(ref), len(var), len(ref_logits), len(var_logits))
        step = next((t for t in range(steps) if ref[t] != var[t]), None)
        last = steps - 1 if step is None else step
        noises = [_relative_difference(ref_logits[t][row], var_logits[t][row]) for t in range(last + 1)]
        noise, first = max(noises, default=0.0), (noises[0] if noises else 0.0)
        if step is None:
            out.append(Parting(row, None, noise, first, tolerance=tolerance))
            continue
        r = ref_logits[step][row].float()
        gap = ((r[ref[step]] - r[var[step]]) / r.std().clamp_min(1e-12)).item()
        rank = int((r > r[var[step]]).sum().item())
        out.append(Parting(row, step, noise, first, gap, rank, tolerance))
    return out


def _relative_difference(ref: torch.Tensor, var: torch.Tensor) -> float:
    """Largest |ref - var| over the vocabulary, in units of ``ref``'s standard deviation."""
    ref, var = ref.float(), var.float()
    return ((ref - var).abs().max() / ref.std().clamp_min(1e-12)).item()
