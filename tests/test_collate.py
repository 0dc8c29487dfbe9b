"""Collator: labels are exactly the answer + <|end|> tokens, for every task and padding side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phi4mm_lora.config import DataConfig, PromptConfig
from phi4mm_lora.data.collate import (
    IGNORE_INDEX,
    BadSampleError,
    Collator,
    batch_plan,
    estimate_length,
)
from phi4mm_lora.data.examples import Example, build_examples
from phi4mm_lora.data.prompts import training_text
from phi4mm_lora.model.load import load_processor
from phi4mm_lora.model.tiny import ensure_tiny


@pytest.fixture(scope="module")
def processor():
    return load_processor(ensure_tiny("native"))


@pytest.fixture(scope="module")
def mixed(processor, tmp_path_factory) -> list[Example]:
    """Two APA, two MDD and two manifest examples (different prompt and answer lengths)."""
    both, _ = build_examples(DataConfig(task="both", limit=4), PromptConfig(), "train",
                             audio_token=processor.audio_token)
    apa = [e for e in both if e.task == "apa"][:2]
    mdd = [e for e in both if e.task == "mdd"][2:4]
    root = tmp_path_factory.mktemp("manifest")
    lines = [
        {"audio": apa[0].audio_path, "prompt": "<|audio|>Transcribe.", "answer": "hello world", "id": "m1"},
        {"audio": mdd[0].audio_path, "prompt": "Say what you hear, word by word, please: <|audio|>",
         "answer": "a much longer answer with several words and punctuation, ok?", "id": "m2"},
    ]
    (root / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    man, _ = build_examples(DataConfig(source="manifest", path=str(root / "m.jsonl")), PromptConfig(), "train",
                            audio_token=processor.audio_token)
    assert [e.task for e in man] == ["manifest", "manifest"]
    return [apa[0], mdd[0], man[0], apa[1], man[1], mdd[1]]


def _expected_positions(tokenizer, ids: list[int], answer: str) -> list[int]:
    """Independently: everything after the (only) <|assistant|> token, up to padding."""
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    start = ids.index(assistant) + 1
    n = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1  # + <|end|>
    return list(range(start, start + n))


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_are_exactly_answer_and_end(processor, mixed, side):
    tok = processor.tokenizer
    batch = Collator(processor, padding_side=side)(mixed)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert batch["example_ids"] == [e.id for e in mixed]
    assert labels.shape == ids.shape
    end_id = tok.convert_tokens_to_ids("<|end|>")
    assert end_id == 200020
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # really padded
    for row, ex in enumerate(mixed):
        want = _expected_positions(tok, ids[row].tolist(), ex.answer)
        got = torch.nonzero(labels[row] != IGNORE_INDEX).flatten().tolist()
        assert got == want, ex.id
        answer_ids = tok(ex.answer, add_special_tokens=False)["input_ids"] + [end_id]
        assert labels[row, want].tolist() == answer_ids
        assert tok.decode(labels[row, want[:-1]]) == ex.answer
        pad = mask[row] == 0
        assert (labels[row][pad] == IGNORE_INDEX).all()
        if side == "left":
            assert mask[row, -1] == 1 and (lengths[row] == ids.shape[1] or mask[row, 0] == 0)
        else:
            assert mask[row, 0] == 1
    # position ids restart at 0 on the first real token of every row
    pos = batch["position_ids"]
    for row in range(len(mixed)):
        real = torch.nonzero(mask[row]).flatten()
        assert pos[row, real].tolist() == list(range(len(real)))


def test_audio_tokens_expanded_and_text_matches_chat_template(processor, mixed):
    tok = processor.tokenizer
    ex = mixed[0]
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}], tokenize=False)
    assert rendered == training_text(ex.prompt, ex.answer, tok)
    batch = Collator(processor)([ex])
    n_audio = int((batch["input_ids"] == processor.audio_token_id).sum())
    assert n_audio == int(batch["audio_embed_sizes"][0]) > 1


def test_bad_audio_names_example_and_file(processor, mixed, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all")
    broken = Example(**{**mixed[1].to_dict(), "id": "spk9:mdd", "audio_path": str(bad)})
    with pytest.raises(BadSampleError) as err:
        Collator(processor)([mixed[0], broken])
    assert "spk9:mdd" in str(err.value) and str(bad) in str(err.value)


def test_batch_plan_deterministic_complete_and_grouped():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(50, 900) for _ in range(203)]
    a = batch_plan(lengths, 8, seed=1, epoch=0)
    assert a == batch_plan(lengths, 8, seed=1, epoch=0)
    assert a != batch_plan(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(203))
    assert all(len(b) == 8 for b in a[:-1])

    def padding(plan):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plan)

    plain = batch_plan(lengths, 8, seed=1, epoch=0, group_by_length=False)
    assert sorted(i for b in plain for i in b) == list(range(203))
    assert padding(a) < 0.5 * padding(plain)


def test_estimate_length_close_to_real(processor, mixed):
    batch = Collator(processor)(mixed[:1])
    real = int(batch["attention_mask"].sum())
    est = estimate_length(mixed[0], processor.tokenizer)
    assert abs(est - real) <= 0.05 * real


def _processor_batch(processor, examples: list[Example], side: str) -> dict:
    """The same batch made the way transformers' processor makes it (all clips at once)."""
    from phi4mm_lora.data.audio import load_audio

    texts = [training_text(ex.prompt, ex.answer, processor.tokenizer) for ex in examples]
    return dict(processor(text=texts, audio=[load_audio(ex.audio_path) for ex in examples], return_tensors="pt",
                          padding=True, padding_side=side))


def test_audio_batch_equals_the_processors_and_the_feature_cache_changes_nothing(processor, mixed, tmp_path):
    from phi4mm_lora.data.cache import FeatureCache

    reference = _processor_batch(processor, mixed[:3], "left")
    plain = Collator(processor, padding_side="left")(mixed[:3])
    cached = Collator(processor, padding_side="left", feature_cache=FeatureCache(tmp_path))(mixed[:3])
    for batch in (plain, cached):
        for k in ("input_ids", "attention_mask", "audio_embed_sizes", "audio_attention_mask"):
            assert torch.equal(reference[k], batch[k]), k
        torch.testing.assert_close(reference["audio_input_features"], batch["audio_input_features"],
                                   rtol=1e-5, atol=1e-4)
    for k in ("labels", "position_ids"):
        assert torch.equal(plain[k], cached[k]), k


def test_clips_a_few_samples_apart_collate(processor, tmp_path):
    """transformers 5.24's batched feature extractor raises "The size of tensor a (87) must match
    the size of tensor b (88)" for clips of 38,295 and 38,306 samples (shorter than the longest
    by less than win_length - hop_length); length grouping makes such batches. The collator
    extracts clip by clip, so each row equals that clip collated alone."""
    import numpy as np
    import soundfile as sf

    lines = []
    for n, samples in enumerate((38306, 38295, 24320)):
        t = np.arange(samples) / 16000
        path = tmp_path / f"c{n}.wav"
        sf.write(path, (0.1 * np.sin(2 * np.pi * (200 + 50 * n) * t)).astype(np.float32), 16000)
        lines.append({"audio": str(path), "prompt": "<|audio|>Transcribe.", "answer": f"clip {n}", "id": f"c{n}"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    exs, _ = build_examples(DataConfig(source="manifest", path=str(tmp_path / "m.jsonl")), PromptConfig(), "train",
                            audio_token=processor.audio_token)
    batch = Collator(processor)(exs)
    assert batch["audio_input_features"].shape[0] == 3
    for i, ex in enumerate(exs):
        alone = Collator(processor)([ex])
        n = alone["audio_input_features"].shape[1]
        assert torch.equal(batch["audio_input_features"][i, :n], alone["audio_input_features"][0])
        assert not batch["audio_input_features"][i, n:].any() and int(batch["audio_attention_mask"][i].sum()) == n
        assert int(batch["audio_embed_sizes"][i]) == int(alone["audio_embed_sizes"][0])


def test_padding_side_checked(processor):
    from phi4mm_lora.errors import UserError

    with pytest.raises(UserError):
        Collator(processor, padding_side="middle")


def test_missing_bundled_file_is_path(processor):
    # the bundled corpus is what the demo trains on: its files must exist
    exs, _ = build_examples(DataConfig(task="mdd", limit=1), PromptConfig(), "train", audio_token=processor.audio_token)
    assert Path(exs[0].audio_path).is_file()
