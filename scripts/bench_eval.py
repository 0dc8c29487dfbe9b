"""Benchmark evaluation generation: examples/s and wall time on a model and data splits.

Default: the tiny model on the bundled corpus, train + test splits (all ~150 utterances),
both tasks, with the evaluate command's per-task token budgets (APA 40, MDD 120). A random
model never emits <|end|>, so every answer runs to its budget: the figure is a worst case
for those budgets. Model load time is reported separately from generation time.

    .venv/bin/python scripts/bench_eval.py [--model DIR] [--splits train test] [--batch-size 16]
        [--threads N] [--limit N] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the tiny test model)")
    ap.add_argument("--data", default=None, help="data path (default: the bundled corpus)")
    ap.add_argument("--splits", nargs="+", default=["train", "test"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128, help="cap on the per-task budgets")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--limit", type=int, default=None, help="utterances per split")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--full-examples", type=int, default=5000,
                    help="examples to extrapolate to (default: Speechocean762 test, 2,500 utterances x 2 tasks)")
    ap.add_argument("--profile", action="store_true",
                    help="also run the first batch under torch.profiler and print its top operators")
    args = ap.parse_args()

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from phi4mm_lora.config import load_config
    from phi4mm_lora.data.examples import build_examples
    from phi4mm_lora.evaluate.generate import generate_all, max_tokens_for, plan_batches
    from phi4mm_lora.model.load import load_model

    over = [f"eval.batch_size={args.batch_size}", f"eval.max_new_tokens={args.max_new_tokens}"]
    if args.model:
        over.append(f"model.path={args.model}")
    if args.data:
        over.append(f"data.path={args.data}")
    if args.limit:
        over.append(f"data.limit={args.limit}")
    cfg = load_config(None, over)
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    load_s = time.perf_counter() - t0
    examples = []
    for split in args.splits:
        exs, _ = build_examples(cfg.data, cfg.prompts, split, audio_token=loaded.processor.audio_token, seed=cfg.seed)
        examples += exs
    utts = len({(e.split, e.utt_id) for e in examples})
    t1 = time.perf_counter()
    gens = generate_all(loaded.model, loaded.processor, examples, batch_size=cfg.eval.batch_size,
                        max_new_tokens=cfg.eval.max_new_tokens, progress=False)
    gen_s = time.perf_counter() - t1
    tokens = sum(g.n_tokens for g in gens)
    # A batch decodes until its longest answer stops: that many forward passes of the decoder.
    n_tok = {g.id: g.n_tokens for g in gens}
    batches = plan_batches(examples, cfg.eval.batch_size)
    decode_steps = sum(max(n_tok[e.id] for e in b) for b in batches)
    figures = {
        "device": str(loaded.plan.device),
        "precision": loaded.plan.name,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "splits": args.splits,
        "utterances": utts,
        "examples": len(examples),
        "batch_size": cfg.eval.batch_size,
        "max_new_tokens": {t: max_tokens_for(t, cfg.eval.max_new_tokens) for t in sorted({e.task for e in examples})},
        "generated_tokens": tokens,
        "stopped_at_end": sum(g.finished for g in gens),
        "failures": sum(g.error is not None for g in gens),
        "model_load_s": round(load_s, 2),
        "generation_wall_s": round(gen_s, 2),
        "examples_per_s": round(len(examples) / gen_s, 2),
        "tokens_per_s": round(tokens / gen_s, 1),
        "total_wall_s": round(time.perf_counter() - t0, 2),
        "batches": len(batches),
        "decode_steps": decode_steps,
        # prefill (audio encoder + prompt) is included: this is wall time per decoder step
        "ms_per_decode_step": round(1000 * gen_s / max(decode_steps, 1), 2),
        "full_examples": args.full_examples,
        "extrapolated_full_s": round(args.full_examples / (len(examples) / gen_s), 1),
    }
    print(f"{len(examples)} examples ({utts} utterances x tasks) in {gen_s:.1f} s generation wall time: "
          f"{figures['examples_per_s']} examples/s, {figures['tokens_per_s']} tokens/s "
          f"(+{load_s:.1f} s model load; total {figures['total_wall_s']} s)")
    print(f"{decode_steps} decoding steps in {len(batches)} batches: {figures['ms_per_decode_step']} ms/step; "
          f"{args.full_examples} examples would take {figures['extrapolated_full_s'] / 60:.1f} min")
    print(json.dumps(figures, indent=2))
    if args.profile:
        profile_batch(loaded, batches[0], cfg.eval.max_new_tokens)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


def profile_batch(loaded, batch, max_new_tokens: int) -> None:
    """Top operators of one batch's generation (CPU, and CUDA when present), by self time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from phi4mm_lora.evaluate.generate import generate_all

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        generate_all(loaded.model, loaded.processor, batch, batch_size=len(batch),
                     max_new_tokens=max_new_tokens, progress=False)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    main()
