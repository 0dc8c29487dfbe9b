"""Load a model for inference: the LoRA adapter merged into the weights where that is exact.

Why merge: an unmerged LoRA runs two extra small products (``x @ A``, then ``@ B``) beside every
adapted linear, for every generated token; the published speech adapter (r=320 on the four
decoder linears of 32 layers, 128 linears) adds 256 of them per token, plus PEFT's dispatch
around each (30-41 extra torch operator calls per adapted linear and step, measured by
``scripts/bench_eval.py --compare``). Merged (``W + scale * B @ A``, done once by PEFT's ``merge_and_unload``), the adapter costs
nothing at inference and the model is a plain ``Phi4MultimodalForCausalLM``.

``eval.merge_adapter`` (on by default) merges for the commands that only run inference
(evaluate, score, score --batch, serve) when the precision plan allows it:

========== ====== =========================================================================
plan       merged why
========== ====== =========================================================================
fp32       yes    the same numbers up to float32 rounding (tiny model: logits within 1e-4,
                  identical greedy text; tests/test_inference_merge.py)
bf16, fp16 yes    ``W + scale * B @ A`` is rounded once to the storage dtype: an error of the
                  size of that dtype's rounding, which the unmerged bf16/fp16 product already
                  has (tiny model: logits differ by one bf16 step, 0.0078; docs/benchmarks.md)
int8       no     the base weights are LLM.int8: merging de-quantises, adds, re-quantises, so
                  every adapted weight moves by up to a quantisation step
nf4,       no     4-bit base weights: the same, with 16 levels per block
selective
========== ====== =========================================================================

A LoRA on a weight that another module shares (Phi-4 ties ``lm_head`` to the input embeddings;
the demo config adapts ``lm_head``) is left unmerged: the merge would change the embeddings
too. Every other adapted layer is still merged (PEFT's per-layer ``merge``), so such a model
keeps only the tied layer's two small products per token. What was merged, and why not, is in
:attr:`Loaded.merge <phi4mm_lora.model.load.Loaded>` and in every output's provenance.

Evaluation during training gets the training model, which must not change: PEFT's unmerge
gives the weights back only up to rounding. :func:`merged_for_a_while` merges it for the
evaluation and then copies the exact base weights back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from phi4mm_lora.model.adapter_io import strip_prefix
from phi4mm_lora.model.load import Loaded, load_model


@dataclasses.dataclass(frozen=True)
class MergeState:
    """Whether the adapter was merged for inference, and if not, why (one line)."""

    merged: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"adapter_merged": self.merged, "merge_note": self.reason}


def _shared_lora_weights(model: torch.nn.Module) -> list[str]:
    """Names of LoRA-adapted modules whose base weight another module uses too (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    shared = []
    for name, m in model.named_modules():
        base = getattr(m, "base_layer", None)
        w = getattr(base, "weight", None)
        if hasattr(m, "lora_A") and w is not None and seen.get(id(w), 0) > 1:
            shared.append(name)
    return shared


def merge_refusal(loaded: Loaded) -> str | None:
    """Why the adapter of ``loaded`` must stay unmerged for inference, or None when merging is exact."""
    plan = loaded.plan
    if plan.quantised:  # int8, nf4, selective: the plan's own record, so a new quantised plan is covered
        kind = {"nf4": "4-bit (nf4)"}.get(plan.quant, plan.quant)
        return f"precision {plan.name}: {kind} base weights would be re-quantised after the merge"
    if not hasattr(loaded.model, "merge_and_unload"):
        return "the model carries no PEFT adapter"
    return None


def merge_for_inference(loaded: Loaded, enabled: bool = True) -> Loaded:
    """``loaded`` with its active adapter(s) merged into the weights by PEFT.

    Nothing shared: ``merge_and_unload`` (the returned :class:`Loaded` holds the plain
    transformers model and the LoRA tensors are freed). A tied adapted weight (``lm_head``):
    PEFT's per-layer ``merge`` on every other adapted layer, the tied one keeps its LoRA.
    Merges in place: the old :class:`Loaded` must not be used afterwards, and never pass the
    training model. When the plan does not allow it, ``loaded`` comes back unmerged, with the
    reason in ``.merge`` and a warning.
    """
    if not enabled:
        return dataclasses.replace(loaded, merge=MergeState(False, "eval.merge_adapter is off"))
    why = merge_refusal(loaded)
    if why is not None:
        warnings.warn(f"adapter not merged for inference ({why}); generation runs the LoRA unmerged", stacklevel=2)
        return dataclasses.replace(loaded, merge=MergeState(False, why))
    active = list(loaded.adapters.active)
    shared = _shared_lora_weights(loaded.model)
    if not shared:
        model = loaded.model.merge_and_unload(adapter_names=active)
        note = f"merged {'+'.join(active)} into the weights"
    else:
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = loaded.model
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and name not in shared:
                module.merge(adapter_names=active)
        note = (f"merged {'+'.join(active)} into the weights except {', '.join(strip_prefix(n) for n in shared)} "
                "(weight tied to another module, e.g. the input embeddings; its LoRA runs unmerged)")
    model.eval()
    return dataclasses.replace(loaded, model=model, merge=MergeState(True, note))


def load_for_inference(cfg: Any) -> Loaded:
    """The model, processor and adapter of ``cfg`` ready for generation: :func:`load_model`, then
    :func:`merge_for_inference` as ``cfg.eval.merge_adapter`` says. The one loading path of
    evaluate, score, score --batch and serve."""
    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    return merge_for_inference(loaded, cfg.eval.merge_adapter)




@contextlib.contextmanager
def merged_for_a_while(model: torch.nn.Module, plan: Any, active: list[str], enabled: bool = True) -> Iterator[str]:
    """The training model's active LoRA merged into its base weights for the ``with`` block (a
    note on what was done), then the base weights put back **exactly**.

    Why: evaluation during training generates with the training model, and an unmerged LoRA
    costs every decoding step its extra products and PEFT's dispatch around each of the 128
    adapted linears (docs/benchmarks.md: merging lowers the operators per step). Why exactly:
    PEFT's ``unmerge`` subtracts the delta again, which rounds (bf16 base weights would drift a
    little at every evaluation), so a copy of each merged base weight is kept on the CPU and
    copied back. Quantised plans stay unmerged (a merge would re-quantise), and so does a base
    weight tied to another module, as in :func:`merge_for_inference`.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    why = None if enabled else "eval.merge_adapter is off"
    if why is None and plan.quantised:
        why = f"precision {plan.name}: quantised base weights"
    if why is None and not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        why = "the model carries no PEFT adapter"
    if why is not None:
        yield f"unmerged ({why})"
        return
    shared = set(_shared_lora_weights(model))
    layers = [m for name, m in model.named_modules()
              if isinstance(m, BaseTunerLayer) and name not in shared and not m.merged]
    saved = [m.get_base_layer().weight.detach().to("cpu", copy=True) for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.merge(adapter_names=active)
        yield f"merged {'+'.join(active)} for the evaluation ({len(layers)} layers), weights restored after"
    finally:
        with torch.no_grad():
            for m, weight in zip(layers, saved, strict=True):
                m.unmerge()  # PEFT's own bookkeeping; its subtraction rounds, so the copy goes back
                m.get_base_layer().weight.copy_(weight)


__all__ = ["MergeState", "load_for_inference", "merge_for_inference", "merge_refusal", "merged_for_a_while"]
