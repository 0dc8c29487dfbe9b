"""Where a training step's time goes, on CPU: the recipe's own step, split into its parts.

    python scripts/bench_train_cpu.py                        # tiny model, fp32, batch 1 vs batch 8
    python scripts/bench_train_cpu.py --steps 8 train.gradient_checkpointing=true
    python scripts/bench_train_cpu.py --json out.json model.path=DIR   # another native checkpoint
    python scripts/bench_train_cpu.py --count-casts precision=bf16     # LoRA input casts, before/after
    python scripts/bench_train_cpu.py --full-depth                     # 32 layers at toy width: host work

Issue 10 asks where the fixed per-step cost of a GPU step comes from. Without a GPU this
measures what a CPU shows, on the same code path the ``train`` command runs:

* the recipe is built by :class:`~phi4mm_lora.train.finetune.FinetuneRecipe` (``setup()``: model,
  adapters, optimizer, accelerator), and every step is its unchanged
  :meth:`~phi4mm_lora.train.finetune.FinetuneRecipe.train_step`;
* the parts are timed by wrapping the functions the step calls: **collate** (the collator and
  the copy to the device), **forward** (``loss.answer_loss_sum``), **backward**
  (``accelerator.backward``), **optimizer** (gradient clipping, ``AdamW.step``, ``zero_grad``);
  **other** is the rest of the step (label counting, reductions, bookkeeping);
* **host syncs**: the operators of one step that hand a device value to Python or need it to
  size their output (``aten._local_scalar_dense`` behind ``int()``/``float()``/``.item()``,
  ``nonzero``, ``masked_select``, ``is_nonzero``, ``equal``, boolean indexing), counted with a
  ``TorchDispatchMode``. On CPU they cost nothing; on a GPU each one waits for the queue to drain;
* **batch 1 vs batch 8**: the same 8 examples, as one batch of 8 and one at a time, the two
  alternating step by step (the baseline is the batch-8 step; issue 10 wants a batch-1 step to
  cost at most 1/4 of it).

* **casts** (``--count-casts``, bf16/fp16 plans): the copies of one batch-8 step
  (``aten._to_copy``, ``aten.copy_``: calls and bytes written, dtype changes by direction),
  counted with a ``TorchDispatchMode``, with LoRA inputs left in the autocast dtype (as the
  recipe ships, :meth:`~phi4mm_lora.train.finetune.FinetuneRecipe.lora_inputs_as_is`) and with
  PEFT's default cast to the fp32 adapter dtype (before), plus the mean step time of each.

The first ``--warmup`` steps of each batch size are left out; means of the rest are printed
(so the parts add up to the step).
Timings on a shared VM are noisy: compare the ratios printed by one run, not absolute times
across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Operators that need a device value on the host (a GPU stream sync when the tensor is on the GPU).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2",
            "unique_consecutive", "unique_dim", "repeat_interleave"}
BASE = ["precision=fp32", "model.device=cpu", "data.limit=4", "train.batch_size=8", "train.grad_accum=1",
        "train.gradient_checkpointing=false", "eval.during_training=false", "train.report_to=[]"]


class SyncCounter(TorchDispatchMode):
    """Counts the operators of :data:`SYNC_OPS` (and indexing with a boolean mask) by name, and
    by the innermost Python line outside torch that caused them (backward: ``<autograd>``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for i in (args[1] if len(args) > 1 else ())):
            name = "index(bool mask)"
        if name in SYNC_OPS or name == "index(bool mask)":
            self.counts[name] += 1
            self.sites[f"{_caller()}: {name}"] += 1
        return func(*args, **(kwargs or {}))


class CastCounter(TorchDispatchMode):
    """Calls and bytes written of the copy operators (``_to_copy``, ``copy_``), those that
    change the dtype counted again by direction (``bf16->fp32``), and all operator calls."""

    COPIES = ("_to_copy", "copy_")

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.calls["all operators"] += 1
        if name in self.COPIES and isinstance(out, torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            keys = [f"aten.{name}"]
            if isinstance(src, torch.Tensor) and src.dtype != out.dtype:
                keys.append(f"of which {_short(src.dtype)}->{_short(out.dtype)}")
            for key in keys:
                self.calls[key] += 1
                self.bytes[key] += out.numel() * out.element_size()
        return out


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))


def _caller() -> str:
    """``package/file.py:line function`` of the innermost frame that is not torch's own."""
    torch_dir = str(Path(torch.__file__).parent)
    for frame in reversed(traceback.extract_stack()[:-3]):
        if not frame.filename.startswith(torch_dir) and frame.filename != __file__:
            parts = Path(frame.filename).parts
            short = "/".join(parts[-2:]) if "site-packages" not in parts else "/".join(parts[parts.index("site-packages") + 1:])
            return f"{short}:{frame.lineno} {frame.name}"
    return "<autograd>"


def _sync() -> None:
    """Wait for the GPU's queue (no-op on CPU): a part's wall time then holds its kernels too."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Timers:
    """Wall time per part within the current step (wrapped callables add to it). On a GPU each
    part starts and ends with a device sync, so the parts hold their kernels' time; the syncs
    themselves add a few microseconds each to the step."""

    def __init__(self) -> None:
        self.now: Counter[str] = Counter()

    def wrap(self, part: str, fn):
        def timed(*a, **kw):
            _sync()
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                _sync()
                self.now[part] += time.perf_counter() - t
        return timed


def build(overrides: list[str], out: Path):
    from phi4mm_lora.config import load_config
    from phi4mm_lora.train.finetune import FinetuneRecipe
    from phi4mm_lora.train.preflight import Preflight

    cfg = load_config(None, [*BASE, f"output_dir={out}", *overrides])
    recipe = FinetuneRecipe(cfg, Preflight(run_dir=out), progress=False, log=lambda _m: None)
    recipe.setup()
    recipe.model.train()
    recipe.t_loop = time.perf_counter()
    return recipe


def timed_step(recipe, exs: list, timers: Timers) -> dict:
    """One optimizer step of the recipe on the examples ``exs`` (one batch), timed by part."""
    from phi4mm_lora.train.finetune import _to_device

    timers.now.clear()
    _sync()
    t0 = time.perf_counter()
    batch = _to_device(recipe.collator(exs), recipe.accelerator.device)
    _sync()
    t1 = time.perf_counter()
    out = recipe.train_step([batch], epoch=0)
    _sync()
    t2 = time.perf_counter()
    parts = {"collate": t1 - t0, **{k: timers.now[k] for k in ("forward", "backward", "optimizer")}}
    parts["other"] = (t2 - t1) - sum(timers.now.values())
    return {**parts, "step": t2 - t0, "tokens": out.tokens, "examples": out.examples}


def measure(recipe, examples: list, steps: int, warmup: int, timers: Timers) -> dict[str, dict]:
    """``steps`` batch-8 steps, each followed by one batch-1 step (cycling over the same 8
    examples): alternating, so both batch sizes see the same load of a shared machine."""
    rows: dict[str, list[dict]] = {"batch8": [], "batch1": []}
    for i in range(steps):
        rows["batch8"].append(timed_step(recipe, examples, timers))
        rows["batch1"].append(timed_step(recipe, [examples[i % len(examples)]], timers))
    out = {}
    for key, rs in rows.items():
        kept = rs[warmup:] or rs
        # means, not medians: the parts of a mean step add up to the mean step
        mean = {k: statistics.mean(r[k] for r in kept) for k in ("collate", "forward", "backward", "optimizer", "other", "step")}
        out[key] = {**mean, "examples": kept[0]["examples"], "tokens": statistics.mean(r["tokens"] for r in kept),
                    "steps_timed": len(kept), "step_min": min(r["step"] for r in kept),
                    "step_median": statistics.median(r["step"] for r in kept), "step_max": max(r["step"] for r in kept)}
    return out


def count_syncs(recipe, exs: list) -> SyncCounter:
    from phi4mm_lora.train.finetune import _to_device

    batch = _to_device(recipe.collator(exs), recipe.accelerator.device)
    with SyncCounter() as c:
        recipe.train_step([batch], epoch=0)
    return c


def count_casts(recipe, exs: list, steps: int) -> dict[str, dict]:
    """One batch-8 step's copies (:class:`CastCounter`) and ``steps`` timed steps (the two
    settings alternating), with LoRA inputs as they come ("as-is", shipped) and with PEFT's cast."""
    from phi4mm_lora.train.finetune import _to_device

    settings, shipped = {"as-is": True, "PEFT cast": False}, recipe.uncast_lora_inputs
    out: dict[str, dict] = {k: {"step_s": []} for k in settings}
    try:
        for key, uncast in settings.items():
            recipe.uncast_lora_inputs = uncast
            with CastCounter() as c:
                recipe.train_step([_to_device(recipe.collator(exs), recipe.accelerator.device)], epoch=0)
            out[key].update(calls=dict(c.calls), bytes=dict(c.bytes))
        for _ in range(steps):
            for key, uncast in settings.items():
                recipe.uncast_lora_inputs = uncast
                batch = _to_device(recipe.collator(exs), recipe.accelerator.device)
                _sync()
                t = time.perf_counter()
                recipe.train_step([batch], epoch=0)
                _sync()
                out[key]["step_s"].append(time.perf_counter() - t)
    finally:
        recipe.uncast_lora_inputs = shipped
    return out


def cast_table(c: dict[str, dict]) -> str:
    a, b = c["as-is"], c["PEFT cast"]
    lines = ["| one batch-8 step | LoRA inputs as-is (shipped) | PEFT's cast (before) |", "|---|---|---|"]
    for key in sorted(set(a["calls"]) | set(b["calls"]), key=lambda k: (k == "all operators", k.startswith("of which"), k)):
        cell = [f"{x['calls'].get(key, 0)}" + ("" if key == "all operators" else
                                                 f" calls, {x['bytes'].get(key, 0) / 2**20:.1f} MiB") for x in (a, b)]
        lines.append(f"| {key} | {cell[0]} | {cell[1]} |")
    ms = [f"{1000 * statistics.mean(x['step_s']):.0f} (median {1000 * statistics.median(x['step_s']):.0f})" for x in (a, b)]
    lines.append(f"| step ms, mean of {len(a['step_s'])} | {ms[0]} | {ms[1]} |")
    return "\n".join(lines)


def profile_step(recipe, exs: list, rows: int = 15) -> dict[str, str]:
    """torch.profiler's tables of one step (batch ``exs``): by self CPU time, and on a GPU also by self
    CUDA time. The CPU table is where host work shows that keeps a GPU waiting (per-shape kernel plans,
    launches, syncs); the CUDA one is the kernels' own time."""
    from torch.profiler import ProfilerActivity, profile

    from phi4mm_lora.train.finetune import _to_device

    cuda = recipe.accelerator.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        recipe.train_step([_to_device(recipe.collator(exs), recipe.accelerator.device)], epoch=0)
        _sync()
    stats = prof.key_averages()
    keys = {"CUDA": "self_cuda_time_total"} if cuda else {}
    keys["CPU"] = "self_cpu_time_total"
    return {name: stats.table(sort_by=key, row_limit=rows) for name, key in keys.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value), after the bench's own")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per batch size (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians (default 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steadier on a shared machine; 0 = torch's default)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--full-depth", action="store_true",
                    help="the tiny model at the published depth and head counts (model.tiny.FULL_DEPTH): the real "
                         "number of operators per step on toy tensors, a CPU stand-in for a GPU step's host work")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's top operators of a batch-8 and a batch-1 step (on a GPU by self "
                         "CUDA time and by self CPU time)")
    ap.add_argument("--count-casts", action="store_true",
                    help="also count one batch-8 step's copies/casts and time --steps steps, LoRA inputs as-is vs "
                         "PEFT's cast to fp32 (needs an autocasting plan: precision=bf16)")
    args = ap.parse_args(argv)

    import phi4mm_lora.train.finetune as finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.full_depth:
        from phi4mm_lora.model.tiny import ensure_tiny

        args.overrides = [f"model.path={ensure_tiny(full_depth=True)}", *args.overrides]

    with tempfile.TemporaryDirectory(prefix="bench-train-cpu-") as tmp:
        t = time.perf_counter()
        recipe = build(args.overrides, Path(tmp) / "run")
        setup_s = time.perf_counter() - t
        if args.count_casts and not recipe.accelerator.native_amp:
            sys.exit(f"--count-casts: precision {recipe.loaded.plan.name} does not autocast, so PEFT's cast is "
                     "never skipped; add precision=bf16")
        examples = recipe.examples[:8]
        if len(examples) < 8:
            sys.exit(f"need 8 training examples, the config gives {len(examples)}; raise data.limit")
        timers = Timers()
        acc, opt = recipe.accelerator, recipe.optimizer
        saved = (finetune.loss_mod.answer_loss_sum, acc.backward, acc.clip_grad_norm_, opt.step, opt.zero_grad)
        finetune.loss_mod.answer_loss_sum = timers.wrap("forward", saved[0])
        acc.backward = timers.wrap("backward", saved[1])
        acc.clip_grad_norm_ = timers.wrap("optimizer", saved[2])
        opt.step, opt.zero_grad = timers.wrap("optimizer", saved[3]), timers.wrap("optimizer", saved[4])
        try:
            measured = measure(recipe, examples, args.steps, args.warmup, timers)
            b8, b1 = measured["batch8"], measured["batch1"]
        finally:
            finetune.loss_mod.answer_loss_sum = saved[0]
            acc.backward, acc.clip_grad_norm_, opt.step, opt.zero_grad = saved[1:]
        syncs8, syncs1 = count_syncs(recipe, examples), count_syncs(recipe, examples[:1])
        prof = {8: profile_step(recipe, examples), 1: profile_step(recipe, examples[:1])} if args.profile else None
        casts = count_casts(recipe, examples, args.steps) if args.count_casts else None

    report = {
        "machine": _machine(), "threads": torch.get_num_threads(), "setup_s": setup_s,
        "trainable_params": recipe.n_trainable, "precision": recipe.loaded.plan.name,
        "gradient_checkpointing": recipe.plan.gradient_checkpointing,
        "batch8": b8, "batch1": b1, "syncs_batch8": dict(syncs8.counts), "syncs_batch1": dict(syncs1.counts),
        "sync_sites_batch8": dict(syncs8.sites.most_common()),
        "batch1_over_batch8_step": b1["step"] / b8["step"],
        "batch1_over_batch8_step_median": b1["step_median"] / b8["step_median"],
        "batch1_over_batch8_step_min": b1["step_min"] / b8["step_min"],
    }
    print(table(report))
    for batch, tables in (prof or {}).items():
        for by, text in tables.items():
            print(f"\ntorch.profiler, one batch-{batch} step, top operators by self {by} time:\n" + text)
    if casts:
        report["casts_batch8"] = casts
        print("\ncopies of one batch-8 step (aten ops below autograd, bytes written), LoRA inputs left in the "
              "autocast dtype vs cast to the fp32 adapter dtype:\n" + cast_table(casts))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _machine() -> str:
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return f"{gpu}{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def table(r: dict) -> str:
    b8 = r["batch8"]
    lines = [f"machine: {r['machine']}; {r['precision']}, gradient checkpointing "
             f"{r['gradient_checkpointing']}, {r['trainable_params']:,} trainable params; "
             f"setup {r['setup_s']:.1f} s; means of {b8['steps_timed']} steps (batch-8 step {1000 * b8['step_min']:.0f}-"
             f"{1000 * b8['step_max']:.0f} ms)",
             "",
             "| batch | collate ms | forward ms | backward ms | optimizer ms | other ms | step ms | tokens | "
             "examples/s | step x (batch 8 = 1) | per-example cost x |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, n in (("batch8", 8), ("batch1", 1)):
        m = r[key]
        ms = [f"{1000 * m[k]:.0f}" for k in ("collate", "forward", "backward", "optimizer", "other", "step")]
        lines.append(f"| {n} | " + " | ".join(ms) + f" | {m['tokens']:.0f} | {n / m['step']:.2f} | "
                     f"{m['step'] / b8['step']:.2f} | {(m['step'] / n) / (b8['step'] / 8):.2f} |")
    lines += ["", "share of the batch-8 step: " + ", ".join(f"{k} {b8[k] / b8['step']:.0%}" for k in
                                                         ("collate", "forward", "backward", "optimizer", "other")),
              f"batch-1 step / batch-8 step: mean {r['batch1_over_batch8_step']:.2f}, median "
              f"{r['batch1_over_batch8_step_median']:.2f}, fastest {r['batch1_over_batch8_step_min']:.2f} "
              "(issue 10 target on GPU: <= 0.25)",
              "host syncs per step (operators): batch 8 " + _syncs(r["syncs_batch8"]) + "; batch 1 " + _syncs(r["syncs_batch1"]),
              "where (batch 8):"] + [f"  {n:3d} x {site}" for site, n in r["sync_sites_batch8"].items()]
    return "\n".join(lines)


def _syncs(c: dict) -> str:
    return f"{sum(c.values())} (" + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) + ")"


if __name__ == "__main__":
    sys.exit(main())
