"""Ship a trained run: a merged checkpoint, a hub-ready PEFT adapter, or the published layout.

``phi4mm-lora export RUN --to DIR --format merged|adapter|official [--push REPO_ID]``:

* ``merged``: the run's adapter(s) and unfrozen modules merged into the base weights with
  PEFT's ``merge_and_unload``; a native checkpoint that plain
  ``Phi4MultimodalForCausalLM.from_pretrained(DIR)`` loads, with the processor/tokenizer files.
  A LoRA on ``lm_head`` (tied to the input embeddings) is merged into an untied copy, so the
  embeddings stay the ones the run trained with.
* ``adapter``: the PEFT folder (unfrozen modules as ``modules_to_save``, see
  :func:`~phi4mm_lora.model.adapters.save_trained`) with ``base_model_name_or_path`` and
  ``revision`` pointing at the run's base model, plus the run's ``config.yaml`` so the folder is
  itself a run folder for ``score``/``evaluate --adapter``.
* ``official``: Microsoft's published layout (``model_type: phi4mm``; the LoRA inside the
  weights as ``base_layer`` + ``lora_A/B.speech|vision``), written by
  :func:`phi4mm_lora.model.convert.write_official`, without the remote-code ``*.py`` files.

Each carries a filled model card (:mod:`phi4mm_lora.export.card`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from phi4mm_lora.config import RunConfig, load_config
from phi4mm_lora.errors import UserError
from phi4mm_lora.model.adapter_io import ADAPTER_CONFIG, ADAPTER_FILES, EXTRA_FILE, lora_weights_by_adapter
from phi4mm_lora.model.run_folder import Run

FORMATS = ("merged", "adapter", "official")
#: Decoder linears the official layout (and vLLM's speech/vision LoRA) carry LoRA on.
_OFFICIAL_TARGET = re.compile(r"^model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)$")


def export_run(run: Run | str | Path, to: str | Path, fmt: str = "merged", *, cfg: RunConfig | None = None,
               push: str | None = None, private: bool = False) -> Path:
    """Write ``run`` to ``to`` in format ``fmt`` with a model card; upload it when ``push`` names a repo."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    run = Run.open(run)
    out = Path(to).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--to {out} exists and is not an empty folder; choose a new folder")
    cfg = run.configure(cfg or load_config())
    tmp = out.parent / f".tmp-export-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        writer = {"merged": _merged, "adapter": _adapter, "official": _official}[fmt]
        details = writer(run, cfg, tmp)
        from phi4mm_lora.export.card import write_card

        write_card(tmp, run, cfg, fmt, details)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if push:
        push_folder(out, push, private=private)
    return out


def _load(cfg: RunConfig, keep_unused: bool = False) -> Any:
    """The run's model in fp32 (exact merges; saved in the base checkpoint's dtype)."""
    from phi4mm_lora.model.load import load_model

    adapter = cfg.adapter.model_copy(update={"keep_unused": keep_unused})
    return load_model(cfg.model, "fp32", adapter)


def _base_dtype(folder: Path) -> torch.dtype:
    try:
        c = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    name = c.get("dtype") or c.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


def _untie_lm_head(peft: torch.nn.Module) -> bool:
    """Give a LoRA-wrapped, tied ``lm_head`` its own weight before merging (merging into a tied
    weight would change the input embeddings too). Returns whether it was untied."""
    inner = peft.base_model.model
    head = getattr(inner, "lm_head", None)
    base_layer = getattr(head, "base_layer", None)
    emb = inner.get_input_embeddings()
    if base_layer is None or base_layer.weight is not emb.weight:
        return False
    base_layer.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    inner.config.tie_word_embeddings = False
    text_cfg = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else None
    if text_cfg is not None and text_cfg is not inner.config:
        text_cfg.tie_word_embeddings = False
    return True


def _merged(run: Run, cfg: RunConfig, out: Path) -> dict[str, Any]:
    loaded = _load(cfg)
    peft, state = loaded.model, loaded.adapters
    untied = _untie_lm_head(peft)
    merged = peft.merge_and_unload(adapter_names=state.active)
    merged.to(_base_dtype(loaded.path))
    merged.save_pretrained(str(out))
    loaded.processor.save_pretrained(str(out))
    return {"base_folder": str(loaded.path), "merged_adapters": state.active, "untied_lm_head": untied,
            "unfrozen": state.unfrozen_prefixes, "dtype": str(_base_dtype(loaded.path)).replace("torch.", "")}


def _adapter(run: Run, cfg: RunConfig, out: Path) -> dict[str, Any]:
    from phi4mm_lora.model.adapters import save_trained

    if (run.adapter_dir / EXTRA_FILE).is_file():  # saved before unfrozen modules were PEFT modules_to_save
        loaded = _load(cfg)
        save_trained(loaded.model, loaded.adapters, out)
    else:
        for name in ADAPTER_FILES:
            shutil.copy2(run.adapter_dir / name, out / name)
    pc = json.loads((out / ADAPTER_CONFIG).read_text())
    from phi4mm_lora.model.load import resolve_path

    # a hub id stays a hub id; the tiny test model (model.path empty) is named by its folder
    pc["base_model_name_or_path"] = cfg.model.path or str(resolve_path(cfg.model))
    pc["revision"] = cfg.model.revision
    (out / ADAPTER_CONFIG).write_text(json.dumps(pc, indent=2, sort_keys=True))
    # the exported folder is itself a run folder: the run's config, pointing at the base model used here
    raw = dict(run.raw_config) or cfg.model_dump(mode="json")
    raw["model"] = {**(raw.get("model") or {}), "path": cfg.model.path, "revision": cfg.model.revision}
    (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if EXTRA_FILE in {p.name for p in out.iterdir()}:
        raise UserError(f"{run.adapter_dir}: the unfrozen tensors are not whole modules, so a PEFT folder cannot "
                        "carry them; use --format merged")
    return {"modules_to_save": pc.get("modules_to_save") or [], "mode": cfg.adapter.mode}


def _spec(lc: Any, modules: list[str], every: list[str]) -> dict[str, Any]:
    """The official ``speech_lora``/``vision_lora`` entry for one adapter (``lc``: its LoraConfig).

    Written in the convention the project's writer is given for its own tiny official model
    (a regex over full module names); the writer owns the published spelling.
    """
    from phi4mm_lora.config import DECODER_LORA_REGEX

    layer = DECODER_LORA_REGEX if sorted(modules) == every else "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")"
    return {"r": int(lc.r), "lora_alpha": float(lc.lora_alpha), "dp": float(lc.lora_dropout), "layer": layer}


def _official(run: Run, cfg: RunConfig, out: Path) -> dict[str, Any]:
    from phi4mm_lora.model import convert

    loaded = _load(cfg, keep_unused=True)
    peft, state = loaded.model, loaded.adapters
    slots = ("speech", "vision")
    weights = lora_weights_by_adapter(peft)
    extra = [n for n in state.names if n not in slots]  # stacked: the task adapter goes into the base weights
    for name in slots:
        if name in weights:
            odd = sorted(m for m in weights[name] if not _OFFICIAL_TARGET.match(m))
            if odd:
                raise UserError(f"the {name} adapter of {run.name} has LoRA on {odd[0]} (and {len(odd) - 1} more), which "
                                "the official layout cannot hold (decoder qkv/o/gate_up/down only); use --format merged")
    if any(name not in weights for name in slots):
        missing = [n for n in slots if n not in weights]
        raise UserError(f"the official layout needs both a speech and a vision adapter; {', '.join(missing)} is "
                        f"missing (the base model {loaded.path} has no {missing[0]}-lora/); use --format merged")
    if extra and _untie_lm_head(peft):
        raise UserError("the run's LoRA on lm_head cannot be written to the official layout (its lm_head is tied to "
                        "the embeddings); use --format merged")
    configs = {n: peft.peft_config[n] for n in slots}
    plain = peft.merge_and_unload(adapter_names=extra) if extra else peft.unload()
    dtype = _base_dtype(loaded.path)
    plain.to(dtype)
    weights = {n: {m: {k: t.to(dtype) for k, t in ab.items()} for m, ab in w.items()} for n, w in weights.items()}
    every = sorted(n for n, _ in plain.named_modules() if _OFFICIAL_TARGET.match(n))
    lora = {n: weights[n] for n in slots}
    specs = {n: _spec(configs[n], list(weights[n]), every) for n in slots}
    convert.write_official(out, plain, lora, specs, processor=loaded.processor)  # published tokenizer/processor files
    for name in slots:  # serving tools pass these folders as LoRA adapters
        if not (out / f"{name}-lora").is_dir():
            convert.write_peft_adapter(out / f"{name}-lora", lora[name], specs[name])
    stray = sorted(p.name for p in out.glob("*.py"))
    for p in stray:  # never ship remote code: tools must read this layout as data
        (out / p).unlink()
    return {"base_folder": str(loaded.path), "merged_adapters": extra, "specs": specs,
            "unfrozen": state.unfrozen_prefixes}


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder to the Hub (``huggingface_hub``); returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                          commit_message=f"Upload {folder.name} exported by phi4mm-lora")
    except Exception as exc:  # network, auth, name
        raise UserError(f"--push {repo_id} failed ({type(exc).__name__}: {str(exc)[:200]}); the export is complete in "
                        f"{folder}: log in with `hf auth login` and upload it with `hf upload {repo_id} {folder}`") from None
    return f"https://huggingface.co/{repo_id}"


__all__ = ["FORMATS", "export_run", "push_folder"]
