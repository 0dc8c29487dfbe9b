"""Operators a training step issues, a baseline against a variant: a GPU step's host work, counted on CPU.

    python scripts/bench_ops.py                    # the tiny model at the published depth, batch 1 and 8
    python scripts/bench_ops.py --json out.json precision=bf16
    python scripts/bench_ops.py train.fused_optimizer=false --variant train.fused_optimizer=true

On the H200 a batch-1 bf16 step took 0.32 s for about 13 ms of arithmetic, and a decoding step
was bound by the host (docs/benchmarks.md, "GPU measurements"): the time goes into issuing
operators. How many a step issues does not depend on the machine or on the width of the
model, only on its depth and on the code path, so a CPU can count them. This builds the
``train`` recipe twice on the tiny model at the published depth and head counts
(``model.tiny.FULL_DEPTH``: 32 decoder layers, 24 conformer blocks), once as configured (the
baseline) and once with ``--variant`` (default ``train.compile=true``), takes two warm-up steps
of each batch size (compilation happens there), then profiles one more with ``torch.profiler``.

Counted: top-level ATen operators, i.e. those not called by another ATen operator (a compiled
region counts the operators its generated code still calls, such as ``mm``), by part of the
step: **forward** (``loss.answer_loss_sum``), **backward** (autograd's threads and
``accelerator.backward``), **optimizer** (clipping, ``AdamW.step``, ``zero_grad``) and **other**
(collate excluded). Unfused (``train.fused_optimizer=false``), AdamW loops over its tensors one
by one on CPU, while on a GPU it takes its multi-tensor (foreach) path, which issues a few dozen
operators instead: that optimizer row is a CPU figure. Fused, it is one operator on both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_cpu import build  # noqa: E402

PARTS = ("forward", "backward", "optimizer", "other")


def _wrap(part: str, fn):
    def scoped(*a, **kw):
        with torch.profiler.record_function(f"part:{part}"):
            return fn(*a, **kw)
    return scoped


def count_step(recipe, examples: list) -> Counter:
    """Top-level ATen operators of one optimizer step on ``examples`` (one batch), by part."""
    import phi4mm_lora.train.finetune as finetune
    from phi4mm_lora.train.finetune import _to_device

    acc, opt = recipe.accelerator, recipe.optimizer
    saved = (finetune.loss_mod.answer_loss_sum, acc.backward, acc.clip_grad_norm_, opt.step, opt.zero_grad)
    finetune.loss_mod.answer_loss_sum = _wrap("forward", saved[0])
    acc.backward = _wrap("backward", saved[1])
    acc.clip_grad_norm_, opt.step, opt.zero_grad = (_wrap("optimizer", f) for f in saved[2:])
    try:
        batch = _to_device(recipe.collator(examples), acc.device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            recipe.train_step([batch], epoch=0)
    finally:
        finetune.loss_mod.answer_loss_sum = saved[0]
        acc.backward, acc.clip_grad_norm_, opt.step, opt.zero_grad = saved[1:]
    events = prof.events()
    main = next(e.thread for e in events if e.name == "part:forward")  # the profiler's id of this thread
    counts: Counter = Counter()
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        part, p = None, e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                break
            if p.name.startswith("part:"):
                part = p.name[5:]
            p = p.cpu_parent
        if p is None:  # top level
            counts[part or ("backward" if e.thread != main else "other")] += 1
    return counts


def measure(overrides: list[str], examples_by_batch: dict[int, list], tmp: Path) -> dict[int, Counter]:
    recipe = build(overrides, tmp)
    out = {}
    for n, exs in examples_by_batch.items():
        for _ in range(2):
            count_step(recipe, exs)  # warm-up: compilation, allocator, lazy init
        out[n] = count_step(recipe, exs)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value) for both recipes")
    ap.add_argument("--tiny-depth", action="store_true", help="the 2-layer tiny model instead of the published depth")
    ap.add_argument("--variant", nargs="+", default=["train.compile=true"], metavar="KEY=VALUE",
                    help="what the second recipe changes (default train.compile=true); the first, the baseline, "
                    "runs the overrides alone")
    ap.add_argument("--json", help="also write the counts to this file")
    args = ap.parse_args(argv)
    from phi4mm_lora.model.tiny import ensure_tiny

    model = ensure_tiny(full_depth=not args.tiny_depth)
    base = [f"model.path={model}", *args.overrides]
    with tempfile.TemporaryDirectory(prefix="bench-ops-") as tmp:
        examples = build(base, Path(tmp) / "probe").examples[:8]
    by_batch = {1: examples[:1], 8: examples}
    res = {}
    for label, extra in (("baseline", []), (" ".join(args.variant), args.variant)):
        with tempfile.TemporaryDirectory(prefix="bench-ops-") as tmp:
            res[label] = measure([*base, *extra], by_batch, Path(tmp) / "run")
    print(f"top-level ATen operators per training step; {model.name}; torch {torch.__version__}; "
          f"overrides: {' '.join(args.overrides) or '-'}")
    print("| batch | run | " + " | ".join(PARTS) + " | step | step x (baseline = 1) | without optimizer x |")
    print("|---|---|" + "---|" * (len(PARTS) + 3))
    for n in by_batch:
        e = res["baseline"][n]
        for label in res:
            c = res[label][n]
            step, step_e = sum(c.values()), sum(e.values())
            no_opt = (step - c["optimizer"]) / (step_e - e["optimizer"])
            print(f"| {n} | {label} | " + " | ".join(f"{c[p]:,}" for p in PARTS)
                  + f" | {step:,} | {step / step_e:.2f} | {no_opt:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({k: {n: dict(c) for n, c in v.items()} for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
