"""Padding in the training batches: how much of a batch is padding, with and without length grouping.

    python scripts/bench_padding.py                         # bundled corpus, task both, batch 8, 3 epochs
    python scripts/bench_padding.py data.path=/data/speechocean762 model.path=DIR

Issue 10 lists padding waste among the candidates for a slow GPU step. This builds the
``train`` recipe's data as the recipe does (its examples, its length estimates, its
``batch_plan`` for each epoch, its collator) and counts, over every batch of ``--epochs``
epochs, the positions the model computes (batch x longest row) against the real tokens
(the attention mask). The baseline is the same batches without grouping
(``train.group_by_length=false``), computed in the same run.

Token counts come from the model's tokenizer, so use the real checkpoint (``model.path``) for
the real figure: the tiny model's tokenizer splits text differently, while the audio tokens
(one per 80 ms) are the same.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_cpu import build  # noqa: E402

from phi4mm_lora.data.collate import batch_plan  # noqa: E402

PAPER = ["data.task=both", "train.batch_size=8", "data.limit=null"]


def padding(recipe, group: bool, epochs: int) -> dict:
    """Computed positions and real tokens over ``epochs`` epochs of the recipe's batches."""
    tc = recipe.tc
    computed = real = 0
    for epoch in range(epochs):
        for idx in batch_plan(recipe.lengths, tc.batch_size, recipe.cfg.seed, epoch, group):
            mask = recipe.collator([recipe.examples[i] for i in idx])["attention_mask"]
            computed += mask.numel()
            real += int(mask.sum())
    return {"computed": computed, "real": real, "padding_share": 1 - real / computed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value), after the bench's own")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-padding-") as tmp:
        recipe = build([*PAPER, *args.overrides], Path(tmp) / "run")
        res = {g: padding(recipe, g, args.epochs) for g in (False, True)}
    base = res[False]
    print(f"{len(recipe.examples)} training examples, batch {recipe.tc.batch_size}, {args.epochs} epochs")
    print("| batches | positions computed | real tokens | padding share | positions x (ungrouped = 1) |")
    print("|---|---|---|---|---|")
    for g, label in ((False, "ungrouped (baseline)"), (True, "grouped by length (the recipe's default)")):
        r = res[g]
        print(f"| {label} | {r['computed']:,} | {r['real']:,} | {r['padding_share']:.1%} | "
              f"{r['computed'] / base['computed']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
