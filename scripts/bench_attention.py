"""One decoding step's attention at Phi-4-mini's shapes: repeat_kv (the baseline) vs kv heads.

    python scripts/bench_attention.py                       # batch 32, 900 keys, bf16 on CUDA / fp32 on CPU
    python scripts/bench_attention.py --keys 500 --batch 8 --json out.json

Issue 11's H200 profile put ~29% of a decoding step's GPU time in one copy whose size is the
batch's KV cache expanded from 8 to 24 heads: transformers' ``repeat_kv``, which runs before
SDPA whenever there is a padding mask (always, for batched generation) on 5.17, and under
``torch.compile`` on every release. ``phi4mm_lora.model.attention.sdpa_kv_heads`` attends on
the 8 kv heads instead. This times both on the same random tensors, per layer call, as the
decoder calls them (query (batch, 24, 1, 128), kv cache (batch, 8, keys, 128), a left-padding
mask), and prints the ratio and the largest difference between their outputs. The baseline
is exactly transformers' ``repeat_kv`` followed by SDPA with the mask.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from phi4mm_lora.model.attention import sdpa_kv_heads


class _Layer(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def baseline(layer, q, k, v, mask, scaling):
    """What transformers does with a mask: expand the kv heads, then SDPA."""
    k, v = repeat_kv(k, layer.num_key_value_groups), repeat_kv(v, layer.num_key_value_groups)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _time(fn, iters: int, device: torch.device) -> float:
    """Mean ms per call after 3 warm-up calls, the device drained before and after."""
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=24, help="query heads (Phi-4-mini: 24)")
    ap.add_argument("--kv-heads", type=int, default=8, help="key/value heads (Phi-4-mini: 8)")
    ap.add_argument("--keys", type=int, default=900, help="cached positions (prompt + answer so far)")
    ap.add_argument("--dim", type=int, default=128, help="head dimension")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    if a.heads % a.kv_heads:
        ap.error("--heads must be a multiple of --kv-heads")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(a.dtype,
                                                                 torch.bfloat16 if device.type == "cuda" else torch.float32)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(a.batch, a.heads, 1, a.dim, generator=g).to(device, dtype)
    k = torch.randn(a.batch, a.kv_heads, a.keys, a.dim, generator=g).to(device, dtype)
    v = torch.randn(a.batch, a.kv_heads, a.keys, a.dim, generator=g).to(device, dtype)
    mask = torch.ones(a.batch, 1, 1, a.keys, dtype=torch.bool, device=device)
    for row in range(a.batch):  # left padding of 0 .. keys/4 slots
        mask[row, ..., : row * a.keys // (4 * a.batch)] = False
    layer, scaling = _Layer(a.heads // a.kv_heads), a.dim ** -0.5
    with torch.no_grad():
        diff = (baseline(layer, q, k, v, mask, scaling).float()
                - sdpa_kv_heads(layer, q, k, v, mask, scaling=scaling)[0].float()).abs().max().item()
        base_ms = _time(lambda: baseline(layer, q, k, v, mask, scaling), a.iters, device)
        ours_ms = _time(lambda: sdpa_kv_heads(layer, q, k, v, mask, scaling=scaling), a.iters, device)
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    res = {"device": machine, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
           "shape": {"batch": a.batch, "heads": a.heads, "kv_heads": a.kv_heads, "keys": a.keys, "dim": a.dim},
           "repeat_kv_ms": round(base_ms, 4), "kv_heads_ms": round(ours_ms, 4),
           "speedup": round(base_ms / ours_ms, 2), "max_abs_diff": diff}
    print(f"{machine}, torch {torch.__version__}, {res['dtype']}: batch {a.batch}, {a.heads} query / {a.kv_heads} kv heads, "
          f"{a.keys} keys, dim {a.dim}")
    print(f"  repeat_kv + SDPA (baseline): {base_ms:.3f} ms per layer call")
    print(f"  kv heads (sdpa_kv_heads):    {ours_ms:.3f} ms per layer call   {res['speedup']:.2f}x   max |diff| {diff:.2e}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
