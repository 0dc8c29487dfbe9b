"""``doctor``: versions, device, and every known problem this machine has, with its fix.

Most reports from people fine-tuning Phi-4-multimodal are environment problems (remote code
against a newer transformers, torchcodec without FFmpeg, bitsandbytes without a backend),
so the first thing a user should run names them before anything breaks mid-run.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
from dataclasses import dataclass, field

import torch

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "torchvision", "torchcodec", "soundfile", "datasets", "flash-attn")


@dataclass
class Diagnosis:
    versions: dict[str, str | None]
    device: str
    bf16: bool
    memory: dict[str, float]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (problem, fix): something to act on
    notes: list[str] = field(default_factory=list)  # facts about this machine: nothing to do
    tested: dict[str, dict] = field(default_factory=dict)  # package -> installed, tested range, ok


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _ram_gb() -> tuple[float, float]:
    try:
        pages, avail, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size / 1e9, avail * size / 1e9
    except (ValueError, OSError, AttributeError):
        return float("nan"), float("nan")


def diagnose() -> Diagnosis:
    from phi4mm_lora.model.load import torchvision_problem
    from phi4mm_lora.model.precision import bf16_supported, bitsandbytes_problem, pick_device, working_plans

    versions = {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}}
    device = pick_device("auto")
    total, avail = _ram_gb()
    memory = {"ram_total_gb": round(total, 1), "ram_available_gb": round(avail, 1)}
    if device.type == "cuda":
        free, tot = torch.cuda.mem_get_info()
        memory.update({"gpu_free_gb": round(free / 1e9, 1), "gpu_total_gb": round(tot / 1e9, 1)})
        desc = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        desc = device.type
    d = Diagnosis(versions, desc, bf16_supported(device), memory)
    from phi4mm_lora.versions import check_versions

    for pkg, got, spec, ok in check_versions():
        d.tested[pkg] = {"installed": got, "tested": spec, "ok": ok}
        if not ok:
            d.problems.append((
                f"{pkg} {got or 'is not installed'}: outside the tested range {spec}",
                f"pip install '{pkg}{spec}' (docs/compatibility.md lists what was tested)",
            ))
    d.notes.append(f"precision plans that work here: {', '.join(working_plans(device))}")

    tf = versions.get("transformers") or "0"
    major_minor = tuple(int(x) for x in tf.split(".")[:2] if x.isdigit())
    if major_minor >= (4, 50):
        # a fact, not a problem: nothing here runs remote code, so there is nothing to fix
        d.notes.append(
            f"transformers {tf}: Microsoft's remote code (trust_remote_code) fails with \"'Phi4MMModel' object has "
            "no attribute 'prepare_inputs_for_generation'\"; phi4mm-lora never runs it (native classes; the "
            "official layout is converted in memory, or once with `phi4mm-lora convert SRC DST`)"
        )
    peft_note = _transformers_peft_note(versions.get("peft"))
    if peft_note:
        d.notes.append(peft_note)
    if versions.get("torchcodec"):
        try:
            importlib.import_module("torchcodec.decoders")
        except Exception as exc:  # FFmpeg libraries missing is the usual cause
            d.problems.append((
                f"torchcodec is installed but cannot load ({type(exc).__name__}); datasets' Audio decoding will crash",
                "phi4mm-lora decodes audio with soundfile/soxr and never needs torchcodec; for other tools "
                "install FFmpeg (apt-get install ffmpeg) or `pip uninstall torchcodec`.",
            ))
    vision = torchvision_problem()
    if vision:
        d.problems.append(vision)
    bnb = bitsandbytes_problem(device)
    if bnb:
        d.problems.append((f"bitsandbytes cannot run: {bnb}", "use bf16/fp32 plans, or install bitsandbytes on Linux/CUDA or CPU"))
    if versions.get("flash-attn") is None:
        d.notes.append("flash-attention 2 not installed: sdpa attention is used (model.attn_implementation=sdpa)")
    if device.type == "cpu":
        d.notes.append("no GPU: training runs on CPU (fine for the tiny model and tests, far too slow for 5.6B)")
    return d


def _transformers_peft_note(peft_version: str | None) -> str | None:
    """transformers' own PEFT integration (``model.load_adapter``) asks for a minimum peft that
    rises with transformers (5.17: 0.19.1); phi4mm-lora uses PEFT directly and is not affected."""
    from packaging.version import InvalidVersion, Version

    try:
        from transformers.integrations import peft as tf_peft

        need = getattr(tf_peft, "MIN_PEFT_VERSION", None)
        if peft_version and need and Version(peft_version) < Version(need):
            return (f"peft {peft_version} is older than the {need} transformers' own model.load_adapter() asks for; "
                    "phi4mm-lora does not use it, but your own code calling it may fail")
    except (ImportError, InvalidVersion):
        pass
    return None
