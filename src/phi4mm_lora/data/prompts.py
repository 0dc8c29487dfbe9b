"""Every prompt the model sees: the user turn, the training text and the generation prompt.

Three layers, one home:

* :func:`user_prompt`: the user-turn text, control marker + audio placeholder + instruction;
* :func:`generation_prompt`: the user turn wrapped in the chat format up to where the model
  answers (``<|user|>...<|end|><|assistant|>``), rendered by the tokenizer's chat template;
* :func:`training_text`: the generation prompt followed by the answer and ``<|end|>``, so the
  text trained on starts with exactly the text evaluation feeds the model (a test checks the
  token ids for the tiny tokenizer and for the published Phi-4-multimodal template).

The instruction texts live in editable files (``prompts/apa.txt``, ``prompts/mdd.txt``) so a
user can change the wording without touching code; ``PromptConfig.apa``/``.mdd`` point at
their own files. ``{text}`` in a file is replaced by the reference sentence (it helps MDD,
where the model has to say what was said relative to what should have been said); drop the
placeholder to give the model only the audio, as the paper describes. Replacement is a plain
string substitution, so the JSON braces in the answer format need no escaping.

:class:`~phi4mm_lora.data.examples.Example` holds only the user turn, so examples stay
model-agnostic; the collator and the generator wrap it with the functions below. Padding
side is an argument of each tokenizer call (``padding_side=``), never a change to the shared
tokenizer: training pads one way and generation the other, on the same tokenizer.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from phi4mm_lora.config import PromptConfig
from phi4mm_lora.errors import UserError
from phi4mm_lora.fileio import read_text

MARKERS = {"apa": "<|APA|>", "mdd": "<|MDD|>"}
TEXT_PLACEHOLDER = "{text}"
#: Phi-4's chat markers, written directly when a tokenizer has no chat template.
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"


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


def generation_prompt(user_text: str, tokenizer: Any | None = None) -> str:
    """The text before the model's answer: the user turn, then ``<|assistant|>``.

    Rendered by the tokenizer's chat template (``add_generation_prompt=True``), which is how
    the checkpoint's authors format a turn; a tokenizer without a template (or none) gets
    Phi-4's markers written directly, ``<|user|>{user_text}<|end|><|assistant|>``, which is
    what the published template renders too.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return f"{USER}{user_text}{END}{ASSISTANT}"


def training_text(user_text: str, answer: str, tokenizer: Any | None = None) -> str:
    """The training sequence: :func:`generation_prompt` + answer + ``<|end|>``.

    Built on the generation prompt rather than by rendering both turns through the chat
    template, because the published Phi-4-multimodal template ends a conversation that has no
    generation prompt with ``eos_token``: the rendered text would end in ``<|endoftext|>``
    after ``<|end|>``, a token the model never has to produce (generation stops at
    ``<|end|>``). The loss covers the answer and its ``<|end|>`` (see data/collate.py).
    """
    return f"{generation_prompt(user_text, tokenizer)}{answer}{END}"
