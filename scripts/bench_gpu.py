"""Training throughput of the real ``train`` recipe on one GPU: s/step, examples/s, tokens/s, MFU, memory.

    python scripts/bench_gpu.py                      # random full-size checkpoint, the 5 rows measured before + auto
    python scripts/bench_gpu.py --checkpoint DIR     # an existing native checkpoint (skips writing one)
    python scripts/bench_gpu.py --dry-run            # tiny model on CPU: checks the harness (CI runs it)

Each row is one subprocess that runs the project's own ``train`` (configs/pronunciation-paper.yaml,
bundled corpus, grad_accum 1 unless ``--accum``, no checkpoints, no evaluation) for ``--steps`` optimizer steps, so
nothing is special-cased for the benchmark. Steady state excludes the first ``--warmup`` steps:
from ``metrics.jsonl``, whose cumulative ``examples_per_s`` gives the wall time at every step.

MFU counts model FLOPs only (recomputation by gradient checkpointing is not work):
per token ``4 * N_frozen_decoder + 6 * N_trainable + 12 * L * d * T + 6 * V * d * answer_share``
- forward and activation-gradient passes through the frozen decoder linears, forward + both
gradients through the trainable tensors, attention over ``T`` tokens per example, and the
answer-only ``lm_head``. The frozen audio encoder's forward is left out (a few percent), so the
figure errs low. Peak FLOP/s: H100/H200 989e12 bf16 dense, A100 312e12, or ``--peak-tflops``.

Gradient checkpointing per row: ``full``/``none`` (the earlier table's on/off), ``selective`` or
``auto``; the micro-batch is always ``auto`` (``train.micro_batch``): each row reports the memory
plan the recipe chose (mode, micro-batch x passes, its estimate) from ``summary.json``.

With ``--set eval.during_training=true --set eval.every_steps=N`` (N = ``--steps``, so that it
runs after the timed steps) a row also reports what the evaluation during training took, and its
share of a paper epoch (5,000 examples) at the row's rate: issue 11's target is at most 10%.
Output: a JSON file and a markdown table (``--out DIR``), and the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pronunciation-paper.yaml"
#: One epoch of the paper recipe: Speechocean762's 2,500 training utterances x 2 tasks.
EPOCH_EXAMPLES = 5000
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}

CHILD = r"""
import json, sys, time
import torch
from phi4mm_lora.config import load_config
from phi4mm_lora.evaluate.run import make_epoch_evaluator
from phi4mm_lora.train.finetune import train
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
torch.backends.cudnn.enabled = sys.argv[3] == "on"  # --no-cudnn: native convolutions, no per-shape cuDNN plans
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
evaluate_fn = make_epoch_evaluator(cfg) if cfg.eval.during_training else None  # as the train command does
result = train(cfg, evaluate_fn=evaluate_fn, progress=False, log=lambda m: None)
out = {"summary": result.summary, "wall_s": time.perf_counter() - t0, "cudnn": torch.backends.cudnn.enabled}
if torch.cuda.is_available():
    out["peak_alloc"] = torch.cuda.max_memory_allocated()
    out["peak_reserved"] = torch.cuda.max_memory_reserved()
print("BENCH " + json.dumps(out, default=str))
"""


def decoder_flops_per_token(config: dict, n_trainable: int, tokens_per_example: float, answer_share: float) -> float:
    """Model FLOPs per token of one training step (see the module docstring)."""
    d, L, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = d // heads
    per_layer = d * (d + 2 * kv * head_dim) + d * d + d * 2 * inter + inter * d  # qkv, o, gate_up, down
    n_frozen = L * per_layer
    vocab = config["vocab_size"]
    return 4 * n_frozen + 6 * n_trainable + 12 * L * d * tokens_per_example + 6 * vocab * d * answer_share


def steady_state(rows: list[dict], batch: int, warmup: int) -> dict:
    """Per-step wall times from the cumulative rates in ``metrics.jsonl`` rows (one per step)."""
    train_rows = [r for r in rows if r.get("type") == "train"]
    if len(train_rows) <= warmup:
        raise SystemExit(f"only {len(train_rows)} steps logged; need more than --warmup {warmup}")
    elapsed, tokens = [], []
    n_ex = 0
    for r in train_rows:
        n_ex += batch  # the recipe's batches are full except possibly an epoch's last one
        t = n_ex / r["examples_per_s"]
        elapsed.append(t)
        tokens.append(r["tokens_per_s"] * t)
    n = len(train_rows) - warmup
    dt = elapsed[-1] - elapsed[warmup - 1] if warmup else elapsed[-1]
    dtok = tokens[-1] - (tokens[warmup - 1] if warmup else 0.0)
    label = sum(r["label_tokens"] for r in train_rows[warmup:])
    return {"steps": n, "s_per_step": dt / n, "examples_per_s": batch * n / dt, "tokens_per_s": dtok / dt,
            "tokens_per_example": dtok / (batch * n), "answer_share": label / dtok if dtok else 0.0,
            "first_step_s": elapsed[0]}


def run_row(model_path: str | None, plan: str, batch: int, gc: str, steps: int, device: str, out: Path,
            extra: list[str] = (), accum: int = 1, cudnn: bool = True) -> dict:
    from phi4mm_lora.data.examples import bundled_corpus_path

    run_dir = out / f"{plan}-b{batch}-gc-{gc}"
    overrides = [f"precision={plan}", f"train.batch_size={batch}", f"train.grad_accum={accum}", f"train.max_steps={steps}",
                 "train.save_every_steps=null", "train.keep_checkpoints=null", "train.log_every_steps=1",
                 f"train.gradient_checkpointing={gc}", "train.micro_batch=auto", "eval.during_training=false",
                 f"data.path={bundled_corpus_path()}", f"output_dir={run_dir}", f"model.device={device}",
                 "train.num_workers=2"]
    overrides.append(f"model.path={model_path}" if model_path else "model.path=null")
    overrides += list(extra)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(CONFIG), json.dumps(overrides), "on" if cudnn else "off"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines() or ["?"]
        print("\n".join(f"    {ln}" for ln in tail[-12:]), file=sys.stderr, flush=True)  # the traceback's end
        return {"error": tail[-1][:200]}
    child = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH "))[6:])
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    # The run's final adapter is 1.8 GB at r=320 in fp32: seven rows would fill a small disk, and
    # anything that archives the output folder afterwards would spend minutes compressing it.
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)
    return {**child, "rows": rows}


def measure(args: argparse.Namespace, model_path: str | None, device: str, out: Path,
            on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Each row of ``args.rows``, measured; ``on_row`` gets the rows so far after each one."""
    from phi4mm_lora.config import ModelConfig
    from phi4mm_lora.model.load import resolve_path

    config = json.loads((Path(resolve_path(ModelConfig(path=model_path))) / "config.json").read_text())
    peak = args.peak_tflops * 1e12 if args.peak_tflops else gpu_peak_flops()
    results = []
    for plan, batch, gc in args.rows:
        r = run_row(model_path, plan, batch, gc, args.steps, device, out, args.extra, args.accum, args.cudnn)
        row = {"plan": plan, "batch": batch, "grad_ckpt": gc}
        if "error" in r:
            row["error"] = r["error"]
        else:
            st = steady_state(r["rows"], batch * args.accum, args.warmup)
            fpt = decoder_flops_per_token(config, r["summary"]["trainable_params"], st["tokens_per_example"],
                                          st["answer_share"])
            row.update(st, flops_per_token=fpt, mfu=fpt * st["tokens_per_s"] / peak if peak else None,
                       peak_alloc_gb=r.get("peak_alloc", 0) / 1e9 or None,
                       peak_reserved_gb=r.get("peak_reserved", 0) / 1e9 or None,
                       trainable_params=r["summary"]["trainable_params"], wall_s=r["wall_s"], cudnn=r["cudnn"],
                       memory_plan=r["summary"].get("memory_plan"))
            if r["summary"].get("eval_s"):  # --set eval.during_training=true (issue 11: at most 10% of an epoch)
                row.update(eval_s=r["summary"]["eval_s"],
                           eval_share_of_epoch=r["summary"]["eval_s"] * st["examples_per_s"] / EPOCH_EXAMPLES)
        results.append(row)
        if on_row is not None:
            on_row(results)
        print(table_line(row), flush=True)
        if row.get("eval_s"):
            print(f"  evaluation during training: {row['eval_s']:.1f} s, {row['eval_share_of_epoch']:.1%} of a "
                  f"{EPOCH_EXAMPLES:,}-example epoch at this row's rate", flush=True)
    return results


def gpu_peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


# The rows measured before the speed work (gpu-measurements.md), so before/after compare 1:1,
# and the memory plan's own choice for the paper recipe (issue 10: an H100 should not checkpoint).
DEFAULT_ROWS = (("bf16", 8, "full"), ("bf16", 8, "none"), ("nf4", 8, "full"), ("selective", 8, "full"),
                ("selective", 1, "full"), ("bf16", 8, "auto"))
GC_ALIASES = {"on": "full", "off": "none"}

HEADER = ("| plan | grad ckpt | batch | steady s/step | examples/s | tokens/s | MFU | peak alloc GB | peak reserved GB "
          "| micro-batch x passes | plan's estimate GB |\n|---|---|---|---|---|---|---|---|---|---|---|")


def parse_rows(text: str) -> list[tuple[str, int, str]]:
    """``bf16:8:full,selective:1:full`` -> [("bf16", 8, "full"), ("selective", 1, "full")]."""
    rows = []
    for item in text.split(","):
        plan, batch, gc = item.split(":")
        rows.append((plan, int(batch), GC_ALIASES.get(gc, gc)))
    return rows


def grad_ckpt_cell(r: dict) -> str:
    """The mode that ran; ``auto -> full`` when the memory plan chose it."""
    chosen = (r.get("memory_plan") or {}).get("gradient_checkpointing")
    return f"auto -> {chosen}" if r["grad_ckpt"] == "auto" and chosen else r["grad_ckpt"]


def table_line(r: dict) -> str:
    if "error" in r:
        return f"| {r['plan']} | {r['grad_ckpt']} | {r['batch']} | failed: {r['error']} | | | | | | | |"

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    mp = r.get("memory_plan") or {}
    micro = f"{mp['micro_batch']} x {mp['passes_per_step']}" if mp else "-"
    estimate = mp.get("estimate")
    return (f"| {r['plan']} | {grad_ckpt_cell(r)} | {r['batch']} | {r['s_per_step']:.3f} | "
            f"{r['examples_per_s']:.2f} | {r['tokens_per_s']:,.0f} | {f(r['mfu'], '.1%')} | "
            f"{f(r['peak_alloc_gb'], '.1f')} | {f(r['peak_reserved_gb'], '.1f')} | {micro} | "
            f"{f(estimate / 1e9 if estimate else None, '.1f')} |")


def machine() -> str:
    import platform

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    import transformers

    return (f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"{platform.processor() or platform.machine()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="native checkpoint folder; default: write a random full-size one (GPU)")
    p.add_argument("--plans", type=lambda s: s.split(","), help="precision plans, e.g. bf16,nf4 (with --batches, --gc: "
                   "every combination; default: the five rows of shared/docs/gpu-measurements.md)")
    p.add_argument("--rows", type=parse_rows, help="explicit rows in this order, PLAN:BATCH:GC comma-separated, "
                   "e.g. bf16:8:full,bf16:8:none (instead of --plans/--batches/--gc)")
    p.add_argument("--accum", type=int, default=1,
                   help="train.grad_accum of every row (default 1): with N > 1 an optimizer step is N batches, and "
                   "--set train.micro_batch=M > the batch pools them into fewer passes")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra config override for every row, e.g. --set train.compile=true (repeatable)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[8])
    p.add_argument("--gc", type=lambda s: [GC_ALIASES.get(x, x) for x in s.split(",")], default=["full"],
                   help="gradient checkpointing settings to try: none, selective, full, auto (on/off = full/none), "
                   "e.g. none,auto")
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per row")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the steady state")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s (default: known from the GPU name)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-gpu"), help="folder for bench.json and bench.md")
    p.add_argument("--no-cudnn", dest="cudnn", action="store_false",
                   help="torch.backends.cudnn.enabled=False in every row: the audio encoder's ~100 convolutions a step "
                        "run PyTorch's native kernels, so a step builds no cuDNN plan for a new audio length (a "
                        "diagnostic for the fixed cost of a step)")
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU, fp32, 2 short rows: checks the harness")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.rows:
        args.rows = ([(p_, b, g) for p_ in args.plans for b in args.batches for g in args.gc] if args.plans
                     else list(DEFAULT_ROWS))
    if args.dry_run:
        args.rows = [("fp32", 2, "auto"), ("fp32", 1, "none")]
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        model_path, device = None, "cpu"
        write_s = 0.0
    else:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU is visible; use --dry-run to check the harness on CPU", file=sys.stderr)
            return 2
        device = "cuda"
        model_path = args.checkpoint
        write_s = 0.0
        if model_path is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_precision import write_full_size

            model_path = str(Path(tempfile.mkdtemp(prefix="bench-gpu-")) / "full")
            t_w = time.perf_counter()
            write_full_size(Path(model_path))
            write_s = time.perf_counter() - t_w
            print(f"wrote a random full-size checkpoint in {write_s:.0f} s", flush=True)
    print(HEADER, flush=True)

    def write(rows: list[dict]) -> None:  # after every row: a run cut short by a time limit keeps what finished
        report = {"machine": machine(), "checkpoint": args.checkpoint or ("tiny" if args.dry_run else "random full-size"),
                  "overrides": args.extra, "cudnn": args.cudnn, "grad_accum": args.accum, "steps": args.steps, "warmup": args.warmup,
                  "checkpoint_write_s": write_s, "total_s": time.perf_counter() - t0,
                  "rows_planned": len(args.rows), "rows": rows}
        (args.out / "bench.json").write_text(json.dumps(report, indent=1))
        extra = f" Overrides: {' '.join(args.extra)}." if args.extra else ""
        extra += "" if args.cudnn else " cuDNN disabled (torch.backends.cudnn.enabled=False)."
        extra += f" grad_accum {args.accum}: a step is {args.accum} batches." if args.accum > 1 else ""
        md = f"Machine: {report['machine']}. {args.steps} steps per row, first {args.warmup} excluded.{extra}\n\n{HEADER}\n"
        (args.out / "bench.md").write_text(md + "\n".join(table_line(r) for r in rows) + "\n")

    rows = measure(args, model_path, device, args.out, on_row=write)
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
