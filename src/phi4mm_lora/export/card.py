"""The model card (README.md) of an exported run, filled from the run folder.

Everything a reader needs to trust and reuse the weights: the base model and revision, the
data, the exact task prompts and control markers, the run config, the training figures
(``summary.json``), the evaluation table when the run has one, and how to load the folder.
Written with ``huggingface_hub.ModelCard`` so the Hub reads its metadata block.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from phi4mm_lora.config import TINY_NAMES, RunConfig
from phi4mm_lora.model.provenance import project_version
from phi4mm_lora.model.run_folder import Run

#: summary.json figures shown in the card, in this order.
TRAINING_FIGURES = ("steps", "epochs", "train_examples", "trainable_params", "precision", "processes",
                    "first_loss", "final_loss", "min_loss", "examples_per_s", "tokens_per_s", "wall_s")
_FORMAT_TEXT = {
    "merged": "a native transformers checkpoint with the LoRA adapter(s) and any unfrozen modules merged into "
              "the weights (PEFT `merge_and_unload`); no PEFT needed to use it",
    "adapter": "a PEFT LoRA adapter; unfrozen modules, if any, are PEFT `modules_to_save` inside the adapter, so "
               "plain `PeftModel.from_pretrained` applies them",
    "official": "Microsoft's published Phi-4-multimodal layout (`model_type: phi4mm`, LoRA stored in the weights as "
                "`base_layer` + `lora_A/B.speech|vision`, plus `speech-lora/` and `vision-lora/`), for tools that "
                "serve that layout such as vLLM. The remote-code `*.py` files are not included",
}


def fmt(x: Any) -> str:
    """How a number appears in the card (tests look for exactly this)."""
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def _prompts(cfg: RunConfig) -> list[str]:
    from phi4mm_lora.data.prompts import MARKERS, load_instruction

    lines = []
    for task, marker in MARKERS.items():
        lines += [f"**{task.upper()}** (marker `{marker}`, then the audio placeholder, then):", "", "```text",
                  load_instruction(task, cfg.prompts), "```", ""]
    return lines


def _training(summary: dict[str, Any] | None) -> list[str]:
    if not summary:
        return ["The run folder has no summary.json (training did not finish, or this is a bare adapter).", ""]
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(summary.get(k))} |" for k in TRAINING_FIGURES if k in summary]
    return lines + [""]


def _evaluation(run: Run) -> list[str]:
    from phi4mm_lora.evaluate.metrics import COLUMN_NAMES, SUMMARY_KEYS

    found = run.eval_results()
    if not found:
        return ["No evaluation in the run folder. Evaluate it with "
                f"`phi4mm-lora evaluate --adapter {run.name} --split test`.", ""]
    latest = found[-1]
    try:
        results = json.loads(latest.read_text())
    except json.JSONDecodeError:
        return [f"{latest} is not readable JSON.", ""]
    summary = results.get("summary") or {}
    where = latest.parent.relative_to(run.root) if run.root else latest.parent
    lines = [f"From `{where}/results.json` (the newest evaluation of the run):", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {COLUMN_NAMES.get(k, k)} | {fmt(summary.get(k))} |" for k in SUMMARY_KEYS if k in summary]
    for task, n in (results.get("parse_failure_counts") or {}).items():
        lines.append(f"| unparseable {task} answers | {n} |")
    return lines + [""]


def _how_to_load(fmt_name: str, base: str, revision: str | None, details: dict[str, Any]) -> list[str]:
    rev = f', revision="{revision}"' if revision else ""
    if fmt_name == "merged":
        code = ["from transformers import Phi4MultimodalForCausalLM, Phi4MultimodalProcessor",
                'model = Phi4MultimodalForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")',
                'processor = Phi4MultimodalProcessor.from_pretrained("THIS_FOLDER_OR_REPO")']
    elif fmt_name == "adapter":
        code = ["from peft import PeftModel",
                "from transformers import Phi4MultimodalForCausalLM, Phi4MultimodalProcessor",
                f'base = Phi4MultimodalForCausalLM.from_pretrained("{base}"{rev})',
                'model = PeftModel.from_pretrained(base, "THIS_FOLDER_OR_REPO")',
                f'processor = Phi4MultimodalProcessor.from_pretrained("{base}"{rev})']
    else:
        code = ["# vLLM (reads this layout; copy the remote-code *.py files of microsoft/Phi-4-multimodal-instruct",
                "# next to the weights if your tool asks for them):",
                'from vllm import LLM',
                'llm = LLM(model="THIS_FOLDER", enable_lora=True, max_lora_rank=' + str(
                    max((s.get("r", 0) for s in (details.get("specs") or {}).values()), default=320)) + ")",
                "# or with this project, which reads the layout without remote code:",
                "#   phi4mm-lora score me.wav --text \"...\" --model THIS_FOLDER"]
    lines = ["```python", *code, "```", ""]
    if fmt_name != "official":
        lines += ["Or score recordings with this project:", "", "```bash",
                  "phi4mm-lora score me.wav --text \"we call it bear\" "
                  + ("--model THIS_FOLDER adapter.mode=fresh" if fmt_name == "merged" else "--adapter THIS_FOLDER"),
                  "```", ""]
    return lines


def build_card(run: Run, cfg: RunConfig, fmt_name: str, details: dict[str, Any]) -> Any:
    """The :class:`huggingface_hub.ModelCard` for an export of ``run`` in ``fmt_name``."""
    from huggingface_hub import ModelCard, ModelCardData

    from phi4mm_lora.model.load import resolve_path

    base_name = cfg.model.path or str(resolve_path(cfg.model))
    base = f"`{base_name}`" + ("" if cfg.model.path else f" (the {TINY_NAMES[cfg.model.tiny]} of phi4mm-lora)")
    revision = cfg.model.revision
    trained = run.config or cfg  # what the run trained with (cfg: how it was loaded for export)
    data_name = trained.data.path or "the bundled generated corpus (Speechocean762 layout)"
    meta = ModelCardData(
        base_model=cfg.model.path if cfg.model.path and "/" in cfg.model.path and not cfg.model.path.startswith("/")
        else None,
        library_name="peft" if fmt_name == "adapter" else "transformers",
        tags=["phi4mm-lora", "phi-4-multimodal", "lora", "pronunciation-assessment", "speech"],
        pipeline_tag="automatic-speech-recognition" if trained.data.task == "mdd" else None,
    )
    a = cfg.adapter
    pc = run.peft_config  # the saved adapter's real shape (pretrained mode keeps the checkpoint's rank)
    unfrozen = details.get("modules_to_save") or details.get("unfrozen") or []
    notes = []
    if a.mode == "stacked" and fmt_name == "adapter":
        notes.append(f"- This adapter (`{a.name}`) was trained *stacked on top of* the base model's `{a.base}` "
                     "adapter: load the base with that adapter merged first (or use `--format merged`).")
    if details.get("untied_lm_head"):
        notes.append("- The run trained LoRA on `lm_head`; the merged checkpoint unties `lm_head` from the input "
                     "embeddings (`tie_word_embeddings: false`) so the embeddings stay unchanged.")
    if fmt_name == "merged" and a.base == "speech":
        notes.append("- Merged for speech: the base model's vision adapter is not included (image tasks need the "
                     "original model).")
    body = [
        f"# {run.name}: Phi-4-multimodal LoRA for pronunciation assessment", "",
        f"Exported by phi4mm-lora {project_version()} as **{fmt_name}**: {_FORMAT_TEXT[fmt_name]}.", "",
        "## Base model", "",
        f"- model: {base}" + (f" (revision `{revision}`)" if revision else ""),
        f"- adapter: mode `{a.mode}` on the `{a.base}` adapter, r={pc.get('r', a.r)}, "
        f"alpha={pc.get('lora_alpha', a.alpha)}, targets `{pc.get('target_modules', a.target_modules)}`; "
        f"trainable set `{a.trainable}`" + (f"; unfrozen: {', '.join(f'`{m}`' for m in unfrozen)}" if unfrozen else ""),
        *notes, "",
        "## Data", "",
        f"- source: {trained.data.source}, `{data_name}`; task(s): {trained.data.task}; "
        f"train split `{trained.data.train_split}`, eval split `{trained.data.eval_split}`"
        + (f"; at most {trained.data.limit} utterances per split" if trained.data.limit else ""),
        "",
        "## Task prompts and markers", "",
        "Each user turn is `<|user|>` + marker + the audio token + instruction + `<|end|><|assistant|>`; the "
        "audio token is the native processor's `<|endoftext11|>` (id 200011; the official remote-code processor "
        "writes `<|audio_1|>`), and `{text}` is the sentence that was read. Answers are one JSON object.", "",
        *_prompts(trained),
        "## Training figures", "",
        *_training(run.summary),
        "## Evaluation", "",
        *_evaluation(run),
        "## How to load", "",
        *_how_to_load(fmt_name, base_name, revision, details),
        "## Training config", "",
        "```yaml", yaml.safe_dump(run.raw_config or trained.model_dump(mode="json"), sort_keys=False).rstrip(), "```", "",
    ]
    content = f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body)
    return ModelCard(content)


def write_card(folder: Path, run: Run, cfg: RunConfig, fmt_name: str, details: dict[str, Any]) -> Path:
    card = build_card(run, cfg, fmt_name, details)
    path = folder / "README.md"
    card.save(str(path))
    return path


__all__ = ["TRAINING_FIGURES", "build_card", "fmt", "write_card"]
