"""Benchmark the service's batching: N requests through the scoring worker, batched vs one at a time.

Both runs use the same loaded model and the same :class:`~phi4mm_lora.serve.worker.ScoringWorker`
the server uses (no HTTP, so the figure is the model side): the baseline with ``max_batch=1``
(requests scored one after another), then ``max_batch=B``. All N requests are submitted at
once, as N concurrent clients would. Prints wall time, requests/s and the ratio, and checks
that every batched answer equals the one-at-a-time answer.

    .venv/bin/python scripts/bench_serve.py [--model DIR] [--requests 16] [--max-batch 8]
        [--max-new-tokens 40] [--threads N] [--json FILE]
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
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=40, help="cap on the per-task answer budgets")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from phi4mm_lora.config import load_config
    from phi4mm_lora.data.audio import load_audio
    from phi4mm_lora.data.examples import bundled_corpus_path
    from phi4mm_lora.model.load import load_model
    from phi4mm_lora.serve.worker import ScoringWorker

    overrides = [f"eval.max_new_tokens={args.max_new_tokens}", f"eval.batch_size={args.max_batch}"]
    if args.model:
        overrides.append(f"model.path={args.model}")
    cfg = load_config(None, overrides)
    t = time.perf_counter()
    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    load_s = time.perf_counter() - t
    corpus = bundled_corpus_path()
    lines = (corpus / "test" / "text").read_text().split("\n")
    scp = dict(line.split(maxsplit=1) for line in (corpus / "test" / "wav.scp").read_text().splitlines() if line)
    items = []
    for line in lines[: args.requests]:
        utt, text = line.split(maxsplit=1)
        items.append((utt, text.lower(), load_audio(corpus / scp[utt])))
    while len(items) < args.requests:
        items.append(items[len(items) % max(1, len(lines))])

    def run(max_batch: int) -> tuple[float, list[dict]]:
        worker = ScoringWorker(cfg, loaded, max_batch=max_batch, max_queue=len(items) + 1).start()
        start = time.perf_counter()
        futures = [worker.submit(u, t, x) for u, t, x in items]
        results = [f.result() for f in futures]
        wall = time.perf_counter() - start
        worker.stop()
        return wall, results

    run(1)  # warm-up (first-call allocations)
    base_s, base = run(1)
    batched_s, batched = run(args.max_batch)
    strip = [{k: v for k, v in r.items() if k != "batch"} for r in base]
    same = strip == [{k: v for k, v in r.items() if k != "batch"} for r in batched]
    figures = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "device": str(loaded.plan.device), "precision": loaded.plan.name, "model": str(loaded.path),
        "requests": len(items), "max_new_tokens": args.max_new_tokens, "load_s": round(load_s, 2),
        "one_at_a_time_s": round(base_s, 2), "one_at_a_time_req_per_s": round(len(items) / base_s, 3),
        f"batched_{args.max_batch}_s": round(batched_s, 2),
        f"batched_{args.max_batch}_req_per_s": round(len(items) / batched_s, 3),
        "speedup": round(base_s / batched_s, 2), "answers_equal": same,
        "largest_batch": max(r["batch"]["size"] for r in batched),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
