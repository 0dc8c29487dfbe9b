"""Precision-plan benchmark: what each plan costs for the full-size model, and what loading costs.

Three parts:

1. (always, any machine, seconds) The full-size 5.6B architecture built on the meta device for
   each of the six plans, for two adapter settings (the pretrained speech adapter r=320 trains;
   a fresh r=64 adapter trains): bytes of weights, gradients and AdamW state, and trainable
   parameters. Exact figures, no weights involved (``phi4mm_lora.model.inventory``).
2. ``--load-rss`` (CPU, a minute or two): writes a mid-size random-weight native checkpoint
   (the real architecture with a wider/deeper decoder, about 1.2 GB in bf16) and measures, in
   a fresh subprocess per plan, the peak RSS of ``load_model`` above the RSS after imports,
   as a ratio of the loaded weights' bytes. Target: at most about 1.3x the weights.
3. ``--gpu`` (needs CUDA; not run where no GPU is lent): for each plan, loads a full-size
   checkpoint (``--checkpoint``; without it a random-weight full-size one is written first, about
   11 GB of disk) with ``load_model`` and runs one training step at ``--batch`` (default 8)
   with and without gradient checkpointing, reporting ``torch.cuda.max_memory_allocated``.
   Targets: selective + gradient checkpointing <= 12 GB at batch 1 and <= 24 GB at batch 8.

``--write-docs`` replaces the "## Precision plans" section of docs/benchmarks.md with the
results (other sections are left alone).

Usage: python scripts/bench_precision.py [--load-rss] [--gpu] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
PLANS = ("bf16", "fp16", "fp32", "int8", "nf4", "selective")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
        mem = f", {kb / 1024**2:.0f} GiB RAM"
    except (OSError, TypeError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import bitsandbytes
    import peft
    import transformers

    return (
        f"{os.cpu_count()} x {cpu}{mem}, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}"
    )


# ----------------------------------------------------------------------------- 1. architecture


def architecture_tables() -> tuple[str, dict]:
    from phi4mm_lora.config import AdapterConfig
    from phi4mm_lora.model.inventory import INT8_FORMULA, NF4_FORMULA, OPTIMIZER_FORMULA, architecture_report

    settings = {
        "pretrained speech adapter trains (r=320; vision adapter not loaded)": AdapterConfig(),
        "fresh r=64 speech adapter trains (vision adapter not loaded)": AdapterConfig(mode="fresh", r=64, alpha=128),
    }
    lines, data = [], {}
    t0 = time.time()
    first = None
    for title, cfg in settings.items():
        lines += [f"**{title}**", "", "| plan | weights GB | gradients GB | AdamW state GB | weights+grads+AdamW GB | trainable params | quantised modules |", "|---|---|---|---|---|---|---|"]
        data[title] = {}
        for plan in PLANS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = architecture_report(plan, cfg)
            first = first or r
            data[title][plan] = {k: r[k] for k in ("weight_bytes", "gradient_bytes", "optimizer_bytes", "training_state_bytes", "trainable_params", "quantised_modules")}
            lines.append(
                f"| {plan} | {gb(r['weight_bytes'])} | {gb(r['gradient_bytes'])} | {gb(r['optimizer_bytes'])} | "
                f"{gb(r['training_state_bytes'])} | {r['trainable_params']:,} | {r['quantised_modules']} |"
            )
        lines.append("")
    elapsed = time.time() - t0
    head = [
        f"Full-size architecture on the meta device: {first['total_params']:,} parameters "
        f"({first['base_params']:,} without adapters; speech adapter {first['adapters']['speech']['params']:,}, "
        f"vision adapter {first['adapters']['vision']['params']:,}, {first['lora_tensors']} LoRA tensors). "
        f"All twelve reports took {elapsed:.1f} s in one process. Dtypes as on a bf16 CUDA GPU: bf16/fp16 keep LoRA "
        "in fp32 (PEFT's autocast_adapter_dtype), int8/nf4 keep non-quantised tensors in bf16 and LoRA in fp32, "
        "selective quantises the decoder base linears and the frozen towers' linears to NF4 and keeps everything "
        "else in bf16, LoRA included. Byte counts cover what the default config loads: the checkpoint's vision "
        "adapter is counted in the parameters but not loaded (adapter.keep_unused=false).",
        "",
        f"- {NF4_FORMULA}.",
        f"- {INT8_FORMULA}.",
        f"- {OPTIMIZER_FORMULA}. Gradients: one per trainable parameter in its dtype. Activations are not included.",
        "",
    ]
    return "\n".join(head + lines), data


# ----------------------------------------------------------------------------- 2. load RSS


def midsize_config():
    from transformers import Phi4MultimodalConfig

    from phi4mm_lora.model.tiny import _rope, tiny_config
    from phi4mm_lora.model.tokenizer import EOS_IDS, VOCAB_SIZE

    tiny = tiny_config()
    hidden, heads = 1536, 12
    return Phi4MultimodalConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=6144, num_hidden_layers=8,
        num_attention_heads=heads, num_key_value_heads=4, tie_word_embeddings=True,
        max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_parameters=_rope(hidden // heads), eos_token_id=EOS_IDS,
        audio_config=tiny.audio_config.to_dict(), vision_config=tiny.vision_config.to_dict(),
    )


def write_midsize(out: Path) -> int:
    """A random-weight native checkpoint in bf16 with the tiny processor; returns weight bytes."""
    import torch
    from transformers import Phi4MultimodalForCausalLM

    from phi4mm_lora.model.tiny import tiny_processor

    torch.manual_seed(0)
    model = Phi4MultimodalForCausalLM(midsize_config()).to(torch.bfloat16)
    model.save_pretrained(out)
    tiny_processor().save_pretrained(out)
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return n


CHILD = r"""
import json, re, sys, threading, time, warnings
warnings.filterwarnings("ignore")
import torch, transformers, peft, bitsandbytes  # imports are not the loader's memory
from phi4mm_lora.config import AdapterConfig, ModelConfig
from phi4mm_lora.model.load import load_model
from phi4mm_lora.model.inventory import stored_bytes

def status(key):  # kB -> bytes; VmHWM is this process's own peak (ru_maxrss is inherited over exec)
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024

peak_anon = [0]
done = threading.Event()
def sample():  # anonymous (non-file) RSS has no kernel high-water mark: sample it every 2 ms
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.002)

base, base_anon = status("VmRSS"), status("RssAnon")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
th = threading.Thread(target=sample, daemon=True)
th.start()
loaded = load_model(ModelConfig(path=sys.argv[1], device="cpu"), sys.argv[2], AdapterConfig(mode="fresh", r=8, alpha=16))
done.set()
th.join()
peak = status("VmHWM")
w = sum(stored_bytes(p) for p in loaded.model.parameters())
print(json.dumps({"base": base, "peak": peak, "base_anon": base_anon, "peak_anon": peak_anon[0],
                  "after_anon": status("RssAnon"), "after_file": status("RssFile"), "weights": w}))
"""


def load_rss(plans: tuple[str, ...]) -> tuple[str, dict]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        ckpt = Path(tmp) / "midsize"
        t = time.time()
        file_bytes = write_midsize(ckpt)
        build_s = time.time() - t
        for plan in plans:
            t = time.time()
            proc = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), plan], capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
            if proc.returncode != 0:
                results[plan] = {"error": proc.stderr.strip().splitlines()[-1][:200]}
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["seconds"] = time.time() - t
            r["ratio"] = (r["peak"] - r["base"]) / r["weights"]
            r["ratio_anon"] = (r["peak_anon"] - r["base_anon"]) / r["weights"]
            results[plan] = r
    lines = [
        f"Mid-size random-weight native checkpoint (real architecture; decoder 8 layers, hidden 1536, "
        f"intermediate 6144, vocabulary 200064; tiny towers), stored in bf16: {gb(file_bytes)} GB of weights "
        f"(written in {build_s:.0f} s). Each plan loaded with `load_model` (fresh r=8 adapter) in a fresh "
        "subprocess. *Anonymous* = peak of RssAnon (process-private memory, sampled every 2 ms) minus RssAnon "
        "after importing torch/transformers/peft/bitsandbytes: the copies the loader makes. *Total* = peak RSS "
        "(VmHWM, reset through /proc/self/clear_refs after the imports) minus RSS after imports: it also counts "
        "the pages of the memory-mapped safetensors file that were read (clean page cache, shared and "
        "reclaimable, at most the file size). Ratios are against the bytes of the loaded weights in the plan's "
        "dtypes and packing.",
        "",
        "| plan | loaded weights GB | peak anonymous above imports GB | ratio | peak total above imports GB | ratio | file-backed RSS after load (libraries + read checkpoint pages) GB | load wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for plan, r in results.items():
        if "error" in r:
            lines.append(f"| {plan} | - | - | failed: {r['error']} | - | - | - | - |")
        else:
            lines.append(
                f"| {plan} | {gb(r['weights'])} | {gb(r['peak_anon'] - r['base_anon'])} | {r['ratio_anon']:.2f}x | "
                f"{gb(r['peak'] - r['base'])} | {r['ratio']:.2f}x | {gb(r['after_file'])} | {r['seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n", {"file_bytes": file_bytes, "plans": results}


def findings(arch: dict, rss: dict | None) -> str:
    """What the numbers say against the issue's expectations (computed, not typed in)."""
    pre = arch["pretrained speech adapter trains (r=320; vision adapter not loaded)"]
    fresh = arch["fresh r=64 speech adapter trains (vision adapter not loaded)"]
    vision = 369_098_752
    bf16 = pre["bf16"]["weight_bytes"]
    sel = pre["selective"]["weight_bytes"]
    from phi4mm_lora.config import AdapterConfig
    from phi4mm_lora.model.inventory import architecture_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = architecture_report("selective", AdapterConfig())["components"]
    towers = sum(c[k]["bytes"] for k in ("audio encoder", "audio projector", "vision tower", "vision projector"))
    out = [
        "Reading the numbers:",
        "",
        f"- bf16: the 5.57B parameters at 2 bytes are {gb(5_574_476_224 * 2)} GB; the loader loads only the "
        f"adapter in use (the frozen vision adapter, {vision:,} parameters, is skipped unless "
        "adapter.keep_unused) and keeps the training speech adapter in fp32 (PEFT's autocast_adapter_dtype, so "
        f"it trains with fp32 updates): {gb(bf16)} GB, the 'about 11 GB' the issue expects.",
        f"- selective is {gb(sel)} GB (target: under 5 GB): NF4 decoder {gb(c['decoder']['bytes'])} GB + bf16 tied "
        f"embeddings/lm_head {gb(c['embeddings/lm_head']['bytes'])} GB + frozen towers in NF4 with bf16 projectors "
        f"{gb(towers)} GB + the bf16 speech adapter. With a fresh r=64 adapter it is "
        f"{gb(fresh['selective']['weight_bytes'])} GB; nf4 (decoder only, QLoRA) is "
        f"{gb(pre['nf4']['weight_bytes'])} GB.",
        f"- Training state without activations, pretrained speech adapter (461M trainable): selective "
        f"{gb(pre['selective']['training_state_bytes'])} GB, nf4 {gb(pre['nf4']['training_state_bytes'])} GB. "
        "The 12 GB batch-1 target leaves about 1 GB for activations when the whole 461M-parameter pretrained "
        "adapter trains with AdamW; with a fresh r=64 adapter: selective "
        f"{gb(fresh['selective']['training_state_bytes'])} GB, nf4 {gb(fresh['nf4']['training_state_bytes'])} GB.",
    ]
    if rss:
        plans = rss["plans"]
        ok = [k for k, r in plans.items() if "ratio_anon" in r and r["ratio_anon"] <= 1.3]
        over = [f"{k} {r['ratio_anon']:.2f}x" for k, r in plans.items() if "ratio_anon" in r and r["ratio_anon"] > 1.3]
        out.append(
            "- Loading: the loader's own (anonymous) memory peaked at <= 1.3x the loaded weights for "
            f"{', '.join(ok) or 'no plan'}" + (f"; above it: {', '.join(over)}" if over else "") + ". bf16 from a bf16 "
            "checkpoint is zero-copy (tensors stay memory-mapped from the file; its pages count only once read). "
            "The transient above 1x is one tensor converted (bf16 -> fp32 or -> quantised) while the others are "
            "already loaded; in this mid-size model the largest tensor, the 200064 x 1536 tied embedding, is about "
            "half of all weights, so the transient is large relative to the weights. In the full-size model the "
            "embedding is 13% of the parameters, so the ratio should be lower there (not measured). Counting the "
            "read pages of the memory-mapped checkpoint (page cache) too, the totals are the second ratio column. "
            "RssAnon is sampled every 2 ms, so a shorter spike can be missed: read the anonymous ratios as lower "
            "bounds, and compare runs (they vary by about 0.1x on a shared machine)."
        )
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- 3. GPU


def write_full_size(out: Path) -> None:
    """Random-weight full-size native checkpoint in bf16 (about 11 GB) with random non-zero
    speech (r=320) and vision (r=256) PEFT adapters, like the published one; built on the GPU."""
    import re as _re

    import torch
    from transformers import Phi4MultimodalForCausalLM

    from phi4mm_lora.config import DECODER_LORA_REGEX
    from phi4mm_lora.model.convert import write_peft_adapter
    from phi4mm_lora.model.inventory import FULL_SIZE_ADAPTERS, full_size_config
    from phi4mm_lora.model.tiny import tiny_processor

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Phi4MultimodalForCausalLM(full_size_config()).to(torch.bfloat16)
    model.save_pretrained(out)
    tiny_processor().save_pretrained(out)
    for name, spec in FULL_SIZE_ADAPTERS.items():
        spec = {**spec, "layer": DECODER_LORA_REGEX}
        weights = {}
        for mod_name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and _re.fullmatch(DECODER_LORA_REGEX, mod_name):
                a = torch.randn(spec["r"], m.in_features, device="cuda") / m.in_features**0.5
                b = torch.randn(m.out_features, spec["r"], device="cuda") * 0.02
                weights[mod_name] = {"A": a.to(torch.bfloat16).cpu(), "B": b.to(torch.bfloat16).cpu()}
        write_peft_adapter(out / f"{name}-lora", weights, spec)
    del model
    torch.cuda.empty_cache()


GPU_CHILD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, torch
from phi4mm_lora.config import AdapterConfig, ModelConfig
from phi4mm_lora.model.load import load_model
path, plan, batch, gc = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
adapter = AdapterConfig(**json.loads(sys.argv[5]))
torch.cuda.reset_peak_memory_stats()
loaded = load_model(ModelConfig(path=path, device="cuda"), plan, adapter)
after_load = torch.cuda.max_memory_allocated()
model, proc = loaded.model, loaded.processor
if gc:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model.train()
rng = np.random.default_rng(0)
audio = [(0.1 * rng.standard_normal(16000 * 8)).astype(np.float32) for _ in range(batch)]
text = [f"<|user|>{proc.audio_token}Rate the pronunciation of this sentence.<|end|><|assistant|>" + "accuracy 7 " * 20 + "<|end|>"] * batch
b = proc(text=text, audio=audio, sampling_rate=16000, return_tensors="pt").to("cuda")
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-5)
ctx = torch.autocast("cuda", dtype=torch.bfloat16) if plan != "fp32" else torch.autocast("cuda", enabled=False)
with ctx:
    loss = model(**b, labels=b["input_ids"]).loss
loss.backward()
opt.step()
torch.cuda.synchronize()
print(json.dumps({"after_load": after_load, "peak": torch.cuda.max_memory_allocated(), "loss": float(loss)}))
"""


def gpu_bench(checkpoint: str | None, batches: tuple[int, ...], plans: tuple[str, ...], adapters: dict[str, dict]) -> tuple[str, dict]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU; none is visible here")
    tmp = None
    if checkpoint is None:
        tmp = tempfile.mkdtemp(prefix="bench-fullsize-")
        checkpoint = str(Path(tmp) / "full")
        write_full_size(Path(checkpoint))
    results: dict = {}
    lines = [
        f"Checkpoint: {checkpoint if tmp is None else 'random-weight full-size (bf16) with random speech/vision adapters'}. "
        "One subprocess per row: load_model, then one AdamW step on a batch of 8 s audio clips with a ~50-token "
        "answer (bf16/fp16 autocast except fp32); peak = torch.cuda.max_memory_allocated (GiB = 2^30 bytes).",
        "",
        "| adapter | plan | batch | grad. checkpointing | after load GiB | peak (load + 1 step) GiB |",
        "|---|---|---|---|---|---|",
    ]
    for label, adapter in adapters.items():
        for plan in plans:
            for batch in batches:
                for gc in (False, True):
                    cmd = [sys.executable, "-c", GPU_CHILD, checkpoint, plan, str(batch), "1" if gc else "0", json.dumps(adapter)]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    key = f"{label}/{plan}/b{batch}/gc{int(gc)}"
                    if proc.returncode != 0:
                        err = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
                        results[key] = {"error": err}
                        lines.append(f"| {label} | {plan} | {batch} | {gc} | - | failed: {err} |")
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    results[key] = r
                    lines.append(f"| {label} | {plan} | {batch} | {gc} | {r['after_load'] / 2**30:.2f} | {r['peak'] / 2**30:.2f} |")
                    print(lines[-1], flush=True)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return "\n".join(lines) + "\n", results


# ----------------------------------------------------------------------------- docs


def write_section(body: str) -> None:
    text = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    section = "## Precision plans\n\n" + body.strip() + "\n"
    m = re.search(r"^## Precision plans\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if m:
        text = text[: m.start()] + section + ("\n" if text[m.end():] else "") + text[m.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load-rss", action="store_true", help="measure peak RSS of load_model on a mid-size checkpoint")
    ap.add_argument("--rss-plans", default="bf16,fp32,int8,nf4,selective")
    ap.add_argument("--gpu", action="store_true", help="peak GPU memory of load + one training step per plan (CUDA)")
    ap.add_argument("--checkpoint", help="full-size native checkpoint for --gpu (default: write a random one)")
    ap.add_argument("--batch", default="1,8", help="batch sizes for --gpu (default 1,8)")
    ap.add_argument("--gpu-plans", default=",".join(PLANS), help="plans for --gpu (default: all six)")
    ap.add_argument("--gpu-adapters", default="pretrained,fresh64",
                    help="adapter settings for --gpu: pretrained (speech r=320 trains), fresh64 (fresh r=64)")
    ap.add_argument("--write-docs", action="store_true", help="replace the '## Precision plans' section of docs/benchmarks.md")
    ap.add_argument("--json", help="also write all numbers as JSON")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    info = machine()
    print(f"machine: {info}\n")
    arch_md, arch = architecture_tables()
    print(arch_md)
    parts = [f"`scripts/bench_precision.py` (issue 3). Machine: {info}.", "", "### Full-size memory per plan (exact, meta device)", "", arch_md]
    out: dict = {"machine": info, "architecture": arch}
    if args.load_rss:
        rss_md, rss = load_rss(tuple(args.rss_plans.split(",")))
        print(rss_md)
        parts += ["### Peak RAM while loading", "", rss_md]
        out["load_rss"] = rss
    parts += ["### Findings", "", findings(arch, out.get("load_rss"))]
    if args.gpu:
        known = {"pretrained": {}, "fresh64": {"mode": "fresh", "r": 64, "alpha": 128}}
        adapters = {k: known[k] for k in args.gpu_adapters.split(",")}
        gpu_md, gpu = gpu_bench(args.checkpoint, tuple(int(b) for b in args.batch.split(",")), tuple(args.gpu_plans.split(",")), adapters)
        print(gpu_md)
        parts += ["### GPU peak memory, load + one training step", "", gpu_md]
        out["gpu"] = gpu
    else:
        parts += [
            "### GPU peak memory",
            "",
            "Not measured: no GPU was lent to this session, so the peak GPU memory of load + one training step per "
            "plan at batch 8 (with and without gradient checkpointing) and the targets (selective + gradient "
            "checkpointing <= 12 GB at batch 1, <= 24 GB at batch 8) are unverified. On a CUDA machine run "
            "`python scripts/bench_precision.py --gpu --write-docs` (writes a random-weight full-size checkpoint, "
            "about 11 GB of disk, unless `--checkpoint` names a native one).",
            "",
        ]
    if args.write_docs:
        write_section("\n".join(parts))
        print(f"wrote the '## Precision plans' section of {DOCS}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
