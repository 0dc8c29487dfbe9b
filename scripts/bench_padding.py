"""Padding in the training batches: how much of a batch is padding, with and without length grouping.

    python scripts/bench_padding.py                         # bundled corpus, task both, batch 8, 3 epochs
    python scripts/bench_padding.py data.path=/data/speechocean762 model.path=DIR

Issue 10 lists padding waste among the candidates for a slow GPU step. This builds the
``train`` recipe's data as the recipe does (its examples, its length estimates, its
``batch_plan`` for each epoch, its collator) and counts, over every batch of ``--epochs``
epochs, the positions the model computes (batch x longest row) against the real tokens
(the attention mask). The baseline is the same batches without grouping
(``train.group_by_length=false``), computed in the same run.

It also counts the distinct input shapes the grouped batches give the decoder and the audio
encoder, for each ``train.pad_to_multiple_of`` in ``--multiples`` and each
``train.pad_audio_to_multiple_of`` in ``--audio-multiples``: on a GPU each new shape costs a cuDNN
plan; the lease's ``cudnn`` step timed ``train.pad_to_multiple_of=64``, its ``convs`` step times
``train.pad_audio_to_multiple_of=80``.

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
    """Computed positions and real tokens over ``epochs`` epochs of the recipe's batches, and the
    distinct input shapes the decoder (rows x token length) and the audio encoder (rows x
    feature frames) meet: on a GPU, cuDNN builds an execution plan for each new shape (item 16 of
    docs/benchmarks.md's "After the lease"), so a shape first met in a later epoch costs again."""
    tc = recipe.tc
    computed = real = 0
    seen: dict[str, set] = {"decoder": set(), "audio": set()}
    new_later = {"decoder": 0, "audio": 0}
    for epoch in range(epochs):
        for idx in batch_plan(recipe.lengths, tc.batch_size, recipe.cfg.seed, epoch, group):
            batch = recipe.collator([recipe.examples[i] for i in idx])
            mask = batch["attention_mask"]
            computed += mask.numel()
            real += int(mask.sum())
            audio = batch.get("audio_input_features")
            shapes = {"decoder": tuple(mask.shape), "audio": None if audio is None else tuple(audio.shape[:2])}
            for part, shape in shapes.items():
                if shape is None:  # a batch without audio: no encoder shape
                    continue
                if shape not in seen[part]:
                    seen[part].add(shape)
                    new_later[part] += epoch > 0
    return {"computed": computed, "real": real, "padding_share": 1 - real / computed,
            "decoder_shapes": len(seen["decoder"]), "audio_shapes": len(seen["audio"]),
            "decoder_shapes_new_after_epoch_1": new_later["decoder"],
            "audio_shapes_new_after_epoch_1": new_later["audio"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value), after the bench's own")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--multiples", type=int, nargs="+", default=[1, 64], metavar="N",
                    help="train.pad_to_multiple_of values to count shapes for, grouped batches (default: 1 64)")
    ap.add_argument("--audio-multiples", type=int, nargs="+", default=[80], metavar="N",
                    help="train.pad_audio_to_multiple_of values to count shapes for, the token length unrounded "
                         "(default: 80)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-padding-") as tmp:
        recipe = build([*PAPER, *args.overrides], Path(tmp) / "run")
        res = {g: padding(recipe, g, args.epochs) for g in (False, True)}
        rounded = {}
        for m, a in [(m, 1) for m in args.multiples] + [(1, a) for a in args.audio_multiples if a != 1]:
            recipe.collator.pad_to_multiple_of, recipe.collator.audio_frames_multiple = m, a
            rounded[m, a] = padding(recipe, True, args.epochs)
    base = res[False]
    steps = args.epochs * -(-len(recipe.examples) // recipe.tc.batch_size)
    print(f"{len(recipe.examples)} training examples, batch {recipe.tc.batch_size}, {args.epochs} epochs, {steps} batches")
    print("| batches | positions computed | real tokens | padding share | positions x (ungrouped = 1) |")
    print("|---|---|---|---|---|")
    for g, label in ((False, "ungrouped (baseline)"), (True, "grouped by length (the recipe's default)")):
        r = res[g]
        print(f"| {label} | {r['computed']:,} | {r['real']:,} | {r['padding_share']:.1%} | "
              f"{r['computed'] / base['computed']:.2f} |")
    print(f"\ndistinct input shapes over the {steps} grouped batches (each new one is a new cuDNN plan on a GPU):")
    print("| token length rounded to | audio frames rounded to | decoder shapes | of them new after epoch 1 | "
          "audio encoder shapes | of them new after epoch 1 | padding share |")
    print("|---|---|---|---|---|---|---|")
    for (m, a), r in rounded.items():
        print(f"| {m} | {a} | {r['decoder_shapes']} | {r['decoder_shapes_new_after_epoch_1']} | {r['audio_shapes']} | "
              f"{r['audio_shapes_new_after_epoch_1']} | {r['padding_share']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
