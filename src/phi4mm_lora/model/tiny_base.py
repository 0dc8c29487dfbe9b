"""A tiny base that can copy and spell: the demo's stand-in for a pretrained language model.

The real Phi-4-multimodal arrives knowing English, JSON and how to copy a quoted sentence;
fine-tuning only has to teach it the task. The tiny random model knows nothing, so in a
four-minute demo it can only memorise the few recordings it trains on, and a new speaker's
answer comes out as a broken blend of them. This module gives the tiny model's two decoder
layers, final norm and the embedding rows of the ~160 tokens its text uses (84k parameters;
the audio encoder, projectors and all other tokens stay as built) the two skills a pretrained
model brings to the MDD answer, learnt from generated text and speech, never from the demo's task:

* **copy**: ``Repeat "MAN RIVER PEN"`` -> ``MAN RIVER PEN``;
* **spell as phones**: ``Phones of "MAN RIVER"`` -> ``M AE N R IH V ER`` (CMUdict, the corpus
  generator's lexicon, stress stripped as the MDD targets are);
* both in one answer (``MAN RIVER / M AE N R IH V ER``, ``words: MAN phonemes: M AE N``).

The word lists are random draws from the corpus vocabulary (not the corpus's sentences); each
prompt is phrased at random from a few instructions (none of them the demo's) and, in most
examples, preceded by a recording from the bundled corpus's *train* split that has nothing to
do with the words, so the layers learn to read the quote past an audio prefix. The answers
are plain text: the base never sees a JSON answer, so before fine-tuning none of the demo's
answers parse, and after it the parse rate on held-out speakers measures what fine-tuning
taught (the JSON answer format) on top of what the base knew.

``scripts/pretrain_tiny_base.py`` runs :func:`pretrain` and writes :data:`ASSET`, which
:func:`~phi4mm_lora.model.tiny.build_tiny` applies (``base="pretrained"``) on top of the
seeded random tiny model. The loss is taken over the tokenizer's 4,000 BPE ids and ``<|end|>``
(the 196k filler ids of the tiny vocabulary are never targets, and a full softmax would cost
50x the compute). Only the used tokens' embedding rows move: the first try, which trained all
4,000 rows, pushed the JSON tokens' (tied) embeddings away as wrong answers, and the demo's
fine-tuning then could not write JSON at all (docs/benchmarks.md, "tiny base").
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from phi4mm_lora.model.tokenizer import END_TOKEN, END_TOKEN_ID

#: The shipped pretrained weights (safetensors), made by scripts/pretrain_tiny_base.py.
ASSET = Path(__file__).resolve().parents[1] / "assets" / "tiny-base" / "pretrained.safetensors"
#: What pretraining trains: the decoder layers, the final norm and the embedding rows of the
#: tokens its text uses (tied with the output head); the asset holds those rows and their ids.
TRAINED = re.compile(r"model\.layers\.\d+\..+|model\.norm\.weight|model\.embed_tokens\.weight")
EMBEDDINGS = "model.embed_tokens.weight"
ROWS = "embedding_rows"  # asset key: the token ids whose embedding rows EMBEDDINGS holds
#: how many random examples are tokenized to find the tokens pretraining uses
VOCAB_SAMPLE = 20000
#: The tiny BPE's ordinary tokens are ids 0..3999; everything above is filler or special.
BPE_IDS = 4000

COPY = ('Repeat "{q}".', 'Say "{q}" again, word for word.', 'Here is a sentence: "{q}". Write it out exactly.',
        'Copy this text: "{q}"')
PHONES = ('Phones of "{q}".', 'How is "{q}" pronounced? List its phonemes.', 'Spell "{q}" in ARPAbet phones.')
#: both skills in one answer, each instruction with its own plain-text layout (never JSON)
BOTH = (('Write "{q}", then its phones.', "{q} / {p}"),
        ('Read "{q}" and give the words and the phonemes.', "words: {q} phonemes: {p}"))
TAILS = ("", "", " Use capital letters.", " Answer on one line.", "\nKeep it short.")


@dataclass(frozen=True)
class PretrainConfig:
    """The schedule the shipped asset was made with (scripts/pretrain_tiny_base.py records it)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    audio_fraction: float = 0.8
    seed: int = 0


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters pretraining changes (decoder layers + final norm), by name."""
    return {n: p for n, p in model.named_parameters() if TRAINED.fullmatch(n)}


def base_state(model: torch.nn.Module, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the asset holds: the trained tensors, of the embeddings only ``rows`` (with their ids)."""
    out = {n: p.detach().clone().contiguous() for n, p in trained_parameters(model).items()}
    out[EMBEDDINGS] = out[EMBEDDINGS][rows].contiguous()
    out[ROWS] = rows.clone()
    return out


def apply_base(model: torch.nn.Module, path: Path = ASSET) -> None:
    """Load the pretrained weights into ``model``; the key sets and shapes must match exactly."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    rows = state.pop(ROWS, None)
    params = trained_parameters(model)
    if set(state) != set(params) or rows is None:
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"{path}: tiny base weights do not fit the model (missing {missing[:3]}, extra {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            shape = (len(rows), p.shape[1]) if name == EMBEDDINGS else p.shape
            if tuple(state[name].shape) != tuple(shape):
                raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, the model {tuple(shape)}")
            if name == EMBEDDINGS:
                p[rows] = state[name].to(p.dtype)
            else:
                p.copy_(state[name].to(p.dtype))


class TextTasks:
    """Random copy / phones / both prompts over the corpus vocabulary (plain-text answers)."""

    def __init__(self, seed: int, audio_paths: list[str], audio_fraction: float) -> None:
        from phi4mm_lora.data.corpus import _lexicon
        from phi4mm_lora.data.targets import strip_stress

        self.rng = random.Random(seed)
        self.lex = {w: [strip_stress(p) for p in ph] for w, ph in _lexicon().items()}
        self.vocab = sorted(self.lex)
        self.audio_paths, self.audio_fraction = audio_paths, audio_fraction

    def sample(self, audio_token: str) -> tuple[str, str, str | None]:
        """(user prompt without chat markers, answer, audio path or None)."""
        rng = self.rng
        words = [rng.choice(self.vocab) for _ in range(rng.randint(2, 8))]
        quote = " ".join(words).upper()
        phones = " ".join(p for w in words for p in self.lex[w])
        kind = rng.random()
        if kind < 0.3:
            template, answer = rng.choice(COPY), quote
        elif kind < 0.6:
            template, answer = rng.choice(PHONES), phones
        else:
            template, layout = rng.choice(BOTH)
            answer = layout.format(q=quote, p=phones)
        prompt = template.format(q=quote) + rng.choice(TAILS)
        audio = rng.choice(self.audio_paths) if rng.random() < self.audio_fraction else None
        return (audio_token + prompt if audio else prompt), answer, audio


def corpus_train_audio(corpus: Path) -> list[str]:
    """The bundled corpus's train-split recordings (never the test split the demo scores)."""
    lines = (corpus / "train" / "wav.scp").read_text().splitlines()
    return [str(corpus / line.split(maxsplit=1)[1]) for line in lines if line.strip()]


def _batch(tasks: TextTasks, collator, n: int) -> dict:
    from phi4mm_lora.data.examples import Example

    examples = []
    for i in range(n):
        prompt, answer, audio = tasks.sample(collator.processor.audio_token)
        examples.append(Example(id=f"pt{i}", utt_id=f"pt{i}", task="manifest", audio_path=audio, image_path=None,
                                prompt=prompt, answer=answer, split="pretrain", speaker=None, duration=None))
    return collator(examples)


def used_tokens(tokenizer, seed: int) -> torch.Tensor:
    """The ids pretraining's prompts and answers use (and ``<|end|>``), from a large sample.

    Only these tokens' embedding rows train. A token pretraining never writes (JSON punctuation,
    say) keeps the random tiny model's embedding; the decoder only learns not to predict it.
    """
    tasks = TextTasks(seed + 1, ["-"], 0.0)
    texts = [t for p, a, _ in (tasks.sample("") for _ in range(VOCAB_SAMPLE)) for t in (p, a)]
    used = {i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids}
    return torch.tensor(sorted(used | {END_TOKEN_ID}))


def _restricted_loss(model: torch.nn.Module, batch: dict, keep_ids: torch.Tensor, remap: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer tokens over the BPE ids and ``<|end|>`` (tied embeddings)."""
    labels = batch.pop("labels")
    batch.pop("example_ids")
    hidden = model.model(**batch).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = hidden[:, :-1][keep] @ model.get_input_embeddings().weight[keep_ids].T
    return F.cross_entropy(logits, remap[target[keep]])


def pretrain(model: torch.nn.Module, processor, corpus: Path, cfg: PretrainConfig = PretrainConfig(),
             log: Callable[[str], None] = print, log_every: int = 100) -> tuple[list[float], torch.Tensor]:
    """Train ``model`` in place; returns the logged losses and the embedding rows it trained."""
    from phi4mm_lora.data.collate import Collator

    torch.manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(trained_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    assert processor.tokenizer.convert_tokens_to_ids(END_TOKEN) == END_TOKEN_ID
    rows = used_tokens(processor.tokenizer, cfg.seed)
    emb = model.get_input_embeddings().weight
    row_mask = torch.zeros(emb.shape[0], 1)
    row_mask[rows] = 1.0
    emb.register_hook(lambda g: g * row_mask)  # only the used tokens' rows move (AdamW, no decay)
    keep_ids = torch.tensor(list(range(BPE_IDS)) + [END_TOKEN_ID])
    remap = torch.full((emb.shape[0],), -1, dtype=torch.long)
    remap[keep_ids] = torch.arange(len(keep_ids))
    tasks = TextTasks(cfg.seed, corpus_train_audio(corpus), cfg.audio_fraction)
    collator = Collator(processor)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    decay = lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        loss = _restricted_loss(model, _batch(tasks, collator, cfg.batch_size), keep_ids, remap)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            losses.append(round(loss.item(), 4))
            log(f"step {step}: loss {losses[-1]} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses, rows


__all__ = ["ASSET", "PretrainConfig", "TextTasks", "apply_base", "base_state", "corpus_train_audio", "pretrain",
           "trained_parameters", "used_tokens"]
