"""Make the tiny base's pretrained weights (src/phi4mm_lora/assets/tiny-base/).

    .venv/bin/python scripts/pretrain_tiny_base.py                 # the shipped schedule (~15 min, 2 CPU cores)
    .venv/bin/python scripts/pretrain_tiny_base.py --steps 50 --asset /tmp/x.safetensors --model-dir /tmp/base

What it learns and why: phi4mm_lora/model/tiny_base.py. It starts from the seeded random tiny
model (the same one ``phi4mm-lora tiny`` writes), trains only the decoder layers, final norm and the used tokens' embedding rows,
greedy-decodes a few unseen prompts to show the skills, and writes the weights (safetensors) with
a JSON record of the schedule and losses beside them. ``--model-dir`` also writes a whole model
folder, usable as ``model.path=`` for experiments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Phi4MultimodalForCausalLM, Phi4MultimodalProcessor

from phi4mm_lora.data.examples import bundled_corpus_path
from phi4mm_lora.data.prompts import generation_prompt
from phi4mm_lora.model.tiny import ensure_tiny
from phi4mm_lora.model.tiny_base import ASSET, PretrainConfig, TextTasks, base_state, pretrain
from phi4mm_lora.model.tokenizer import END_TOKEN_ID


def show(model, processor, n: int = 4) -> list[dict]:
    """Greedy answers (full vocabulary) to unseen text-only prompts."""
    tasks = TextTasks(seed=12345, audio_paths=[], audio_fraction=0.0)
    out = []
    for _ in range(n):
        prompt, want, _ = tasks.sample(processor.audio_token)
        ids = processor.tokenizer(generation_prompt(prompt, processor.tokenizer), return_tensors="pt",
                                  add_special_tokens=False).input_ids
        with torch.no_grad():
            gen = model.generate(input_ids=ids, max_new_tokens=60, do_sample=False, eos_token_id=END_TOKEN_ID,
                                 pad_token_id=END_TOKEN_ID)
        got = processor.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        out.append({"prompt": prompt, "want": want, "got": got})
        print(f"{prompt!r}\n  -> {got!r}\n  want {want!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = PretrainConfig()
    ap.add_argument("--steps", type=int, default=defaults.steps)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--asset", type=Path, default=ASSET, help="where to write the weights (default: the shipped asset)")
    ap.add_argument("--model-dir", type=Path, default=None, help="also write a whole model folder here")
    args = ap.parse_args()
    cfg = dataclasses.replace(defaults, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    src = ensure_tiny("native", seed=0)
    model = Phi4MultimodalForCausalLM.from_pretrained(src, dtype=torch.float32)
    processor = Phi4MultimodalProcessor.from_pretrained(src)
    t0 = time.perf_counter()
    losses, rows = pretrain(model, processor, bundled_corpus_path(), cfg)
    seconds = time.perf_counter() - t0
    samples = show(model, processor)
    args.asset.parent.mkdir(parents=True, exist_ok=True)
    state = base_state(model, rows)
    save_file(state, str(args.asset), metadata={"made_by": "scripts/pretrain_tiny_base.py"})
    record = {"config": dataclasses.asdict(cfg), "seconds": round(seconds), "losses": losses,
              "parameters": sum(t.numel() for k, t in state.items() if t.is_floating_point()),
              "embedding_rows": len(rows), "samples": samples,
              "torch": torch.__version__}
    args.asset.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.asset} ({args.asset.stat().st_size // 1024} KiB) in {seconds:.0f} s of training")
    if args.model_dir:
        shutil.copytree(src, args.model_dir)
        model.save_pretrained(args.model_dir)
        print(f"wrote {args.model_dir}")


if __name__ == "__main__":
    main()
