"""Prove that what should train does train: the ``verify`` workflow.

Loading "successfully" is not evidence: the classic failures (quantised LoRA, a frozen
adapter, a key mismatch that zeroes lora_B, an adapter that is not active) all load without
complaint. So verify runs two real optimisation steps on a real audio+text example and
checks, tensor by tensor, that every trainable LoRA tensor got a finite non-zero gradient and
changed, and that every frozen tensor stayed bit-for-bit the same; then it generates.
Two steps, because a fresh adapter starts with lora_B = 0, which makes lora_A's first
gradient exactly zero by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from phi4mm_lora.data.prompts import generation_prompt, training_text, user_prompt
from phi4mm_lora.model.adapter_io import lora_adapter
from phi4mm_lora.model.load import Loaded


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_loaded`; ``failures`` name the tensors."""

    trainable: int = 0
    frozen: int = 0
    losses: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    generated: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures


def _fingerprint(t: torch.Tensor) -> tuple[float, float]:
    x = t.detach()
    if not x.is_floating_point():
        x = x.view(torch.uint8) if x.element_size() == 1 else x
    x = x.to(torch.float64)
    return float(x.sum()), float((x * x).sum())


def example_batch(loaded: Loaded, audio: np.ndarray, answer: str = '{"accuracy": 7, "fluency": 8, "prosodic": 7, "total": 7}') -> dict:
    """One supervised chat example: labels only on the answer and its end marker."""
    proc = loaded.processor
    tok = proc.tokenizer
    user = user_prompt("apa", "Rate the pronunciation.", proc.audio_token)
    prompt = generation_prompt(user, tok)
    batch = proc(text=[training_text(user, answer, tok)], audio=[audio], return_tensors="pt")
    n_prompt = len(proc(text=[prompt], audio=[audio], return_tensors="pt")["input_ids"][0])
    labels = batch["input_ids"].clone()
    labels[:, :n_prompt] = -100
    batch["labels"] = labels
    return batch


def default_audio() -> np.ndarray:
    """A real recording from the bundled corpus (falls back to a tone if the corpus is absent)."""
    try:
        from phi4mm_lora.data.audio import load_audio
        from phi4mm_lora.data.examples import bundled_corpus_path

        wav = sorted((bundled_corpus_path() / "WAVE").rglob("*.*"))
        if wav:
            return load_audio(wav[0])[: 16000 * 4]
    except Exception:
        pass
    t = np.arange(16000 * 2) / 16000
    return (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def verify_loaded(loaded: Loaded, audio: np.ndarray | None = None, steps: int = 2, gen_tokens: int = 8) -> VerifyResult:
    """Run the checks; never raises for a failed check, it lists them in the result."""
    model = loaded.model
    res = VerifyResult()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    res.trainable = len(trainable)
    trainable_adapter = loaded.adapters.trainable_adapter
    for n, p in model.named_parameters():
        if lora_adapter(n) == trainable_adapter and not p.requires_grad:
            res.failures.append(f"LoRA frozen: {n} belongs to the trainable adapter but has requires_grad=False")
    if not trainable:
        res.failures.append("nothing is trainable")
        return res
    for n, p in trainable.items():
        if not p.is_floating_point():
            res.failures.append(f"trainable tensor is not floating point ({p.dtype}): {n}")
    frozen_before = {n: _fingerprint(p) for n, p in model.named_parameters() if not p.requires_grad}
    res.frozen = len(frozen_before)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    got_grad = dict.fromkeys(trainable, False)
    bad_grad: set[str] = set()

    device = loaded.plan.device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in example_batch(loaded, audio if audio is not None else default_audio()).items()}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = model(**batch)
        loss = out.loss
        res.losses.append(loss.item())
        if not torch.isfinite(loss):
            res.failures.append(f"loss is not finite ({float(loss)})")
            return res
        loss.backward()
        for n, p in trainable.items():
            if p.grad is None:
                continue
            if not torch.isfinite(p.grad).all():
                bad_grad.add(n)
            elif float(p.grad.abs().max()) > 0:
                got_grad[n] = True
        opt.step()
    model.eval()
    for n in sorted(bad_grad):
        res.failures.append(f"non-finite gradient: {n}")
    for n, ok in got_grad.items():
        if not ok:
            res.failures.append(f"no gradient reached: {n}")
        elif torch.equal(start[n], trainable[n].detach()):
            res.failures.append(f"did not change after {steps} optimizer steps: {n}")
    for n, p in model.named_parameters():
        if n in frozen_before and _fingerprint(p) != frozen_before[n]:
            res.failures.append(f"frozen tensor changed: {n}")

    gen_inputs = {k: v for k, v in batch.items() if k != "labels"}
    n_prompt = int((batch["labels"][0] == -100).sum())
    gen_inputs["input_ids"] = gen_inputs["input_ids"][:, :n_prompt]
    gen_inputs["attention_mask"] = gen_inputs["attention_mask"][:, :n_prompt]
    with torch.no_grad():
        out_ids = model.generate(**gen_inputs, max_new_tokens=gen_tokens, do_sample=False)
    new = out_ids[0, n_prompt:]
    if len(new) == 0:
        res.failures.append("generation produced no tokens")
    res.generated = loaded.processor.tokenizer.decode(new, skip_special_tokens=False)
    return res
