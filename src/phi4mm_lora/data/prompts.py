"""Building the user-turn text: control marker + audio placeholder + instruction.

The instruction texts live in editable files (``prompts/apa.txt``, ``prompts/mdd.txt``) so a
user can change the wording without touching code; ``PromptConfig.apa``/``.mdd`` point at
their own files. ``{text}`` in a file is replaced by the reference sentence (it helps MDD,
where the model has to say what was said relative to what should have been said); drop the
placeholder to give the model only the audio, as the paper describes. Replacement is a plain
string substitution, so the JSON braces in the answer format need no escaping.

The chat markers (``<|user|>``, ``<|end|>``, ``<|assistant|>``) are NOT added here: the
collator adds them, so examples stay model-agnostic and the loss mask is computed in one place.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from phi4mm_lora.config import PromptConfig
from phi4mm_lora.errors import UserError
from phi4mm_lora.fileio import read_text

MARKERS = {"apa": "<|APA|>", "mdd": "<|MDD|>"}
TEXT_PLACEHOLDER = "{text}"


def default_prompt_path(task: str) -> Path:
    """The project's instruction file for ``apa`` or ``mdd``."""
    if task not in MARKERS:
        raise ValueError(f"unknown task {task!r}")
    return Path(str(resources.files("phi4mm_lora.data") / "prompts" / f"{task}.txt"))


#: Built-in alternatives to the default instruction, chosen by name (``prompts.apa: short``).
#: ``short``: two lines (the sentence and the JSON format), for the demo's toy model, whose two
#: random layers do not learn to read a 600-token rubric in a few minutes.
BUILTIN_VARIANTS = ("short",)


def load_instruction(task: str, prompt_cfg: PromptConfig | None = None) -> str:
    """The instruction text for a task: the user's file or a built-in variant, else the default."""
    user_file = getattr(prompt_cfg, task, None) if prompt_cfg is not None else None
    if user_file in BUILTIN_VARIANTS and not Path(user_file).exists():
        path = default_prompt_path(task).with_name(f"{task}-{user_file}.txt")
    else:
        path = Path(user_file).expanduser() if user_file else default_prompt_path(task)
    if not path.is_file():
        raise UserError(f"prompts.{task} file {path} not found; give an existing text file or leave it empty")
    text = read_text(path, "prompt file").strip()
    if not text:
        raise UserError(f"prompts.{task} file {path} is empty; write the instruction into it")
    return text


def user_prompt(task: str, instruction: str, audio_token: str, text: str = "") -> str:
    """``<|APA|>`` + audio token + instruction (with ``{text}`` filled in)."""
    body = instruction.replace(TEXT_PLACEHOLDER, text)
    return f"{MARKERS[task]}{audio_token}{body}"
