"""Training and generation render the same prompt, token for token, up to the answer.

Checked on the project's tiny tokenizer and on the same vocabulary carrying the chat template
*published* with microsoft/Phi-4-multimodal-instruct (``chat_template`` in its
``tokenizer_config.json``, which transformers' ``convert_phi4_multimodal_weights_to_hf.py``
copies into the processor as is). :data:`PUBLISHED_TEMPLATE` is that text as shown in the
Hub metadata of microsoft/Phi-4-multimodal-instruct (mirrored at
https://ai-nexus-293.pages.dev/model/microsoft/phi-4-multimodal-instruct, ``tokenizer_config``)
and in a re-upload's ``chat_template.json``
(https://huggingface.co/bubblspace/Bubbl-P4-multimodal-instruct/blob/main/chat_template.json);
Phi-4-mini-instruct publishes the identical string. It differs from the tiny model's
``model/tokenizer.py`` ``CHAT_TEMPLATE`` in two ways: it has a tools branch for a system turn,
and a conversation rendered without a generation prompt ends with ``eos_token`` (the tiny
template writes nothing there); message content must be a string (no typed parts).

The comparisons go through the real code paths: the collator's ``input_ids`` (training) and
the generator's processor inputs (evaluation), audio placeholders expanded by the processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phi4mm_lora.config import DataConfig, PromptConfig, load_config
from phi4mm_lora.data.audio import load_audio
from phi4mm_lora.data.collate import IGNORE_INDEX, Collator
from phi4mm_lora.data.examples import Example, build_examples
from phi4mm_lora.data.prompts import END, generation_prompt, training_text
from phi4mm_lora.evaluate.embed import processor_inputs
from phi4mm_lora.evaluate.generate import generate_all
from phi4mm_lora.model.load import load_processor
from phi4mm_lora.model.tokenizer import CHAT_TEMPLATE

PUBLISHED_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.fixture(scope="module")
def processors(tiny_native: Path) -> dict:
    """The tiny processor as shipped, and one whose tokenizer carries the published template."""
    tiny = load_processor(tiny_native)
    published = load_processor(tiny_native)
    published.tokenizer.chat_template = PUBLISHED_TEMPLATE
    assert tiny.tokenizer.chat_template == CHAT_TEMPLATE
    return {"tiny": tiny, "published": published}


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> list[Example]:
    """An APA, an MDD and a manifest example (audio placeholder in the middle of the prompt)."""
    both, _ = build_examples(DataConfig(task="both", limit=1), PromptConfig(), "train")
    root = tmp_path_factory.mktemp("manifest")
    line = {"audio": both[0].audio_path, "prompt": "Say what you hear: <|audio|> word by word.",
            "answer": "we call it bear", "id": "m1"}
    (root / "m.jsonl").write_text(json.dumps(line) + "\n")
    man, _ = build_examples(DataConfig(source="manifest", path=str(root / "m.jsonl")), PromptConfig(), "train")
    return [*both, *man]


@pytest.mark.parametrize("which", ["tiny", "published"])
def test_training_ids_start_with_the_generation_prompt_ids(processors, examples, which) -> None:
    proc = processors[which]
    tok = proc.tokenizer
    for ex in examples:
        prompt = generation_prompt(ex.prompt, tok)
        # the chat format the published template defines, written out independently
        assert prompt == f"<|user|>{ex.prompt}<|end|><|assistant|>"
        audio = {ex.id: load_audio(ex.audio_path)}
        gen_ids = processor_inputs(proc, [ex], audio)["input_ids"][0].tolist()
        batch = Collator(proc, padding_side="right")([ex])
        train_ids = batch["input_ids"][0].tolist()
        n = len(gen_ids)
        assert train_ids[:n] == gen_ids, (which, ex.id)
        answer_ids = tok(ex.answer + END, add_special_tokens=False)["input_ids"]
        assert train_ids[n:] == answer_ids, (which, ex.id)  # and nothing but the answer after it
        supervised = [i for i, lab in enumerate(batch["labels"][0].tolist()) if lab != IGNORE_INDEX]
        assert supervised == list(range(n, len(train_ids)))  # the loss starts where generation starts
        assert gen_ids.count(proc.audio_token_id) == int(batch["audio_embed_sizes"][0]) > 1


def test_templates_differ_only_after_the_last_end(processors, examples) -> None:
    """Both turns through each template: the published one adds eos after the answer's <|end|>,
    which is why the training text is built on the generation prompt (see data/prompts.py)."""
    ex = examples[0]
    turns = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}]
    want = training_text(ex.prompt, ex.answer)
    assert processors["tiny"].tokenizer.apply_chat_template(turns, tokenize=False) == want
    pub = processors["published"].tokenizer
    assert pub.apply_chat_template(turns, tokenize=False) == want + pub.eos_token
    assert training_text(ex.prompt, ex.answer, pub) == want


class _Watched:
    """Records every assignment of ``padding_side`` on a real tokenizer (behaviour unchanged)."""

    def __init__(self, tok) -> None:
        self.tok, self.assigned = tok, []
        base = type(tok)
        watcher = self

        def __setattr__(obj, name, value):
            if name == "padding_side":
                watcher.assigned.append(value)
            base.__setattr__(obj, name, value)

        self.cls = type(f"Watched{base.__name__}", (base,), {"__setattr__": __setattr__})

    def __enter__(self):
        self.base = type(self.tok)
        self.tok.__class__ = self.cls
        return self

    def __exit__(self, *exc) -> None:
        self.tok.__class__ = self.base


def test_padding_side_is_passed_per_call_never_set(tiny_native: Path, examples) -> None:
    from phi4mm_lora.model.load import load_model

    cfg = load_config(None, [f"model.path={tiny_native}", "precision=fp32", "model.device=cpu"])
    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    proc, tok = loaded.processor, loaded.processor.tokenizer
    two = examples[:2]
    for start, side in (("left", "right"), ("right", "left")):
        tok.padding_side = start
        with _Watched(tok) as w:
            batch = Collator(proc, padding_side=side)(two)
            gens = generate_all(loaded.model, proc, two, batch_size=2, max_new_tokens=2, progress=False)
            left = processor_inputs(proc, two, {ex.id: load_audio(ex.audio_path) for ex in two})
        assert w.assigned == [] and tok.padding_side == start
        mask = batch["attention_mask"]
        assert not torch.equal(mask[0], mask[1])  # really padded
        first_real = 0 if side == "right" else -1
        assert bool(mask[:, first_real].all())
        assert bool(left["attention_mask"][:, -1].all()) and not bool(left["attention_mask"][:, 0].all())
        assert all(g.error is None for g in gens)
