"""``phi4mm-lora bench train``: this pipeline's training step against a full-logits baseline.

Both variants train the same model on the same batch, each in its own subprocess so the
peak-memory figures (``ru_maxrss``, the kernel's high-water mark of resident memory) never
mix:

* ``baseline``: plain processor output + ``model(**inputs, labels=labels)`` - transformers
  computes logits for every position (``[B, T, 200064]``) and the loss over them, as the
  official fine-tuning script and ``transformers.Trainer`` do;
* ``pipeline``: this project's collator + :func:`~phi4mm_lora.train.loss.answer_loss_sum`
  (logits only at the answer positions);
* ``pipeline+gc``: the same with gradient checkpointing (the recipe's default).

The model has Phi-4-multimodal's real vocabulary (200,064) and hidden size (3,072) but only a
few decoder layers and a small audio encoder, with random weights; the batch is 8
Speechocean762-length APA examples (4-6 s of audio, the full APA prompt) from the bundled
corpus. One step per variant after building the model; the step time includes collation.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("baseline", "pipeline", "pipeline+gc")


def _rss_mb() -> float:
    """Current resident memory (Linux /proc; falls back to the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_model(layers: int, seed: int = 0) -> tuple[torch.nn.Module, Any, Any]:
    """Real vocabulary and hidden size, ``layers`` decoder layers, fresh r=64 LoRA; random weights."""
    from transformers import Phi4MultimodalForCausalLM

    from phi4mm_lora.config import AdapterConfig
    from phi4mm_lora.model.adapters import attach_adapters
    from phi4mm_lora.model.tiny import _rope, tiny_config, tiny_processor

    cfg = tiny_config()  # audio/vision towers stay tiny: the loss path is what is compared
    cfg.hidden_size, cfg.intermediate_size = 3072, 8192
    cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads = layers, 24, 8
    cfg.rope_parameters = _rope(3072 // 24, factor=0.75)
    torch.manual_seed(seed)
    model = Phi4MultimodalForCausalLM(cfg).eval()
    peft, state = attach_adapters(model, AdapterConfig(mode="fresh", r=64, alpha=128, dropout=0.0), {})
    return peft, state, tiny_processor(seed)


def bench_examples(processor: Any, n: int = 8) -> list:
    """``n`` APA examples with 4-6 s of audio from the bundled corpus (longest first if short)."""
    from phi4mm_lora.config import DataConfig, PromptConfig
    from phi4mm_lora.data.examples import build_examples

    exs, _ = build_examples(DataConfig(task="apa"), PromptConfig(), "train", audio_token=processor.audio_token)
    good = [e for e in exs if e.duration and 4.0 <= e.duration <= 6.0]
    if len(good) < n:
        good += sorted((e for e in exs if e not in good), key=lambda e: -(e.duration or 0))
    return good[:n]


def run_variant(variant: str, layers: int, steps: int) -> dict[str, Any]:
    """One variant in this process: build, then time ``steps`` optimizer steps."""
    from phi4mm_lora.data.audio import load_audio
    from phi4mm_lora.data.collate import Collator
    from phi4mm_lora.data.prompts import training_text
    from phi4mm_lora.train.loss import answer_loss_sum, count_label_tokens
    from phi4mm_lora.train.memory_plan import apply_checkpointing

    torch.manual_seed(0)
    model, _state, processor = bench_model(layers)
    examples = bench_examples(processor)
    if variant == "pipeline+gc":
        apply_checkpointing(model, "full")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    collator = Collator(processor)
    rss_built = _rss_mb()
    times, tokens, losses = [], 0, []
    for _ in range(steps):
        t0 = time.perf_counter()
        if variant == "baseline":
            inputs = dict(processor(text=[training_text(e.prompt, e.answer, processor.tokenizer) for e in examples],
                                    audio=[load_audio(e.audio_path) for e in examples],
                                    return_tensors="pt", padding=True))
            labels = collator.labels_for(examples, inputs["input_ids"], inputs["attention_mask"])
            loss = model(**inputs, labels=labels, use_cache=False).loss
        else:
            batch = collator(examples)
            inputs = batch
            s, n = answer_loss_sum(model, batch)
            loss = s / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        tokens += int(inputs["attention_mask"].sum())
        losses.append(float(loss))
    step_s = sum(times) / len(times)
    return {
        "variant": variant, "layers": layers, "steps": steps, "batch": len(examples),
        "seq_len": int(inputs["input_ids"].shape[1]),
        "label_tokens": count_label_tokens(collator(examples)["labels"]) if variant == "baseline" else n,
        "step_s": step_s, "examples_per_s": len(examples) / step_s, "tokens_per_s": tokens / sum(times),
        "rss_after_build_mb": rss_built, "peak_rss_mb": _peak_mb(), "peak_delta_mb": _peak_mb() - rss_built,
        "loss": losses[-1], "trainable_params": sum(p.numel() for p in params),
    }


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import os

    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, CPU"


def compare(layers: int = 2, steps: int = 1, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Each variant in a fresh subprocess; ratios are against the baseline of this same run."""
    results = {}
    for v in variants:
        cmd = [sys.executable, "-m", "phi4mm_lora.train.bench", "--variant", v, "--layers", str(layers),
               "--steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench variant {v} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        results[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results.get("baseline")
    if base:
        for r in results.values():
            r["throughput_x"] = r["examples_per_s"] / base["examples_per_s"]
            r["peak_memory_x"] = r["peak_rss_mb"] / base["peak_rss_mb"]
            r["peak_delta_x"] = r["peak_delta_mb"] / base["peak_delta_mb"]
    return {"machine": _machine(), "results": results}


def format_table(report: dict[str, Any]) -> str:
    rows = ["| variant | step s | examples/s | tokens/s | peak RSS MB | step peak over weights MB | "
            "throughput x | peak RSS x | step peak x |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"].values():
        rows.append(f"| {r['variant']} | {r['step_s']:.1f} | {r['examples_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
                    f"{r['peak_rss_mb']:.0f} | {r['peak_delta_mb']:.0f} | {r.get('throughput_x', float('nan')):.2f} | "
                    f"{r.get('peak_memory_x', float('nan')):.2f} | {r.get('peak_delta_x', float('nan')):.2f} |")
    return "\n".join(rows)


def run_cli(args: argparse.Namespace) -> int:
    from phi4mm_lora.errors import UserError

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UserError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    report = compare(args.layers, args.steps, variants)
    print(f"machine: {report['machine']}")
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _child() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    a = ap.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(json.dumps(run_variant(a.variant, a.layers, a.steps)))


if __name__ == "__main__":
    _child()
