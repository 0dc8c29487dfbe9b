"""What each gradient-checkpointing mode keeps for backward, counted exactly, on any device.

    python scripts/bench_memory_plan.py                 # real widths (hidden 3072), 2 decoder layers, CPU
    python scripts/bench_memory_plan.py --dropout 0.05  # with LoRA dropout (the paper recipe's)
    python scripts/bench_memory_plan.py --json out.json

The memory plan (``phi4mm_lora.train.memory_plan``) estimates activations as
``tokens x layers x hidden x bytes x c[mode]``, with ``c`` fitted to two peaks measured on an
H200. This script measures the decoder's share of ``c`` directly, without a GPU: one forward pass
of a batch (the ``bench train`` model: Phi-4-MM's real hidden/intermediate sizes and vocabulary,
a fresh r=64 LoRA on the decoder linears, 8 APA examples of the bundled corpus) under
``torch.autograd.graph.saved_tensors_hooks``, counting the distinct storages each decoder layer
keeps for backward (parameters excluded: they exist anyway). A checkpointed layer keeps only its
input, which the checkpoint holds outside the hooks, so that is counted from the layer's input.
Everything outside the decoder layers (audio encoder, embeddings, the answer-only ``lm_head``)
is reported apart, per token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def saved_bytes(model: torch.nn.Module, batch: dict, mode: str) -> dict:
    """Bytes kept for backward by one forward pass: per decoder layer, and outside them."""
    from phi4mm_lora.model.blocks import decoder_layers
    from phi4mm_lora.train import memory_plan as mp
    from phi4mm_lora.train.loss import answer_loss_sum

    mp.apply_checkpointing(model, mode)
    layers = decoder_layers(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    where = ["other"]
    kept: dict[str, int] = {}

    def add(key: str, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr in params or ptr in seen:
            return
        seen.add(ptr)
        kept[key] = kept.get(key, 0) + t.untyped_storage().nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        add(where[0], t)
        return t

    def enter(i: int, layer: torch.nn.Module, args: tuple) -> None:
        where[0] = f"layer {i}"
        if layer.gradient_checkpointing:  # the checkpoint keeps the layer's input for the recompute
            add(where[0], args[0])

    hooks = []
    for i, layer in layers.items():
        hooks.append(layer.register_forward_pre_hook(lambda mod, args, i=i: enter(i, mod, args)))
        hooks.append(layer.register_forward_hook(lambda *_a: where.__setitem__(0, "other")))
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = answer_loss_sum(model, batch)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the bench model")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (the paper recipe uses 0.05)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)

    from phi4mm_lora.data.collate import Collator
    from phi4mm_lora.train import memory_plan as mp
    from phi4mm_lora.train.bench import bench_examples, bench_model

    torch.manual_seed(0)
    model, _state, processor = bench_model(args.layers)
    if args.dropout:
        for m in model.modules():
            if hasattr(m, "lora_dropout"):
                for k in m.lora_dropout:
                    m.lora_dropout[k] = torch.nn.Dropout(args.dropout)
    batch = Collator(processor)(bench_examples(processor))
    tokens = int(batch["input_ids"].numel())
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden, act = int(text.hidden_size), next(model.parameters()).element_size()
    rows = []
    for mode in mp.MODES:
        kept = saved_bytes(model, batch, mode)
        per_layer = {k: v for k, v in kept.items() if k.startswith("layer")}
        c = [v / (tokens * hidden * act) for _k, v in sorted(per_layer.items())]
        rows.append({"mode": mode, "tokens": tokens, "per_layer_values_per_token": c,
                     "mean_values_per_layer_token": sum(c) / len(c),
                     "other_bytes_per_token": kept.get("other", 0) / tokens,
                     "total_bytes": sum(kept.values()),
                     "calibrated_values_per_layer_token": mp.VALUES_PER_LAYER_TOKEN[mode]})
    print(f"{args.layers} decoder layers, hidden {hidden}, {tokens} padded tokens (batch {batch['input_ids'].shape[0]}), "
          f"{act}-byte activations, LoRA dropout {args.dropout}\n")
    print("| mode | per decoder layer: values per token (each layer) | mean | outside the decoder layers, bytes/token "
          "| all kept MB | plan's calibrated c |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {', '.join(f'{v:.1f}' for v in r['per_layer_values_per_token'])} | "
              f"{r['mean_values_per_layer_token']:.1f} | {r['other_bytes_per_token']:,.0f} | "
              f"{r['total_bytes'] / 1e6:,.0f} | {r['calibrated_values_per_layer_token']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "hidden": hidden, "dropout": args.dropout,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
