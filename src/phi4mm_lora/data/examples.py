"""From a configured data source to the flat list of training/eval examples.

:func:`build_examples` is what training and evaluation call. It reads the source (bundled
corpus, Speechocean762 in either layout, or a JSONL manifest), applies the speaker-disjoint
validation carve-out, checks every audio file once (header + full decode: a few ms each, in
threads) so a long run never dies on a bad sample, and returns the examples plus a
:class:`DataReport` that names everything skipped.

Collator contract: for an :class:`Example` ``ex`` the training text is
:func:`~phi4mm_lora.data.prompts.training_text` of ``ex.prompt`` and ``ex.answer``
(``<|user|>{prompt}<|end|><|assistant|>{answer}<|end|>`` for Phi-4) with the loss on the
answer part only; ``ex.prompt`` already holds exactly one audio token where the audio
goes (and one image token for image examples); decode ``ex.audio_path`` with
:func:`phi4mm_lora.data.audio.load_audio` or read cached features from
:class:`phi4mm_lora.data.cache.FeatureCache`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

from phi4mm_lora.config import DataConfig, PromptConfig
from phi4mm_lora.data.audio import AudioError, probe_audio
from phi4mm_lora.data.manifest import insert_media_tokens, read_manifest
from phi4mm_lora.data.problems import DataReport, Problem
from phi4mm_lora.data.prompts import load_instruction, user_prompt
from phi4mm_lora.data.speechocean import (
    Utterance,
    assign_validation,
    check_speaker_disjoint,
    default_extract_dir,
    read_speechocean,
    resolve_source,
)
from phi4mm_lora.data.targets import annotated_by_position, apa_answer, canonical_phones, mdd_answer
from phi4mm_lora.errors import UserError

DEFAULT_AUDIO_TOKEN = "<|endoftext11|>"
DEFAULT_IMAGE_TOKEN = "<|endoftext10|>"


@dataclass(frozen=True)
class PhoneReference:
    """What MDD evaluation needs beyond the answer, read with the example (never re-read).

    ``canonical_phones``: what should have been said (dictionary phones, no stress);
    ``annotated_at``: what the annotators heard for each canonical phone (one entry each, from
    the dataset's mispronunciation indices, see :func:`~phi4mm_lora.data.targets.annotated_by_position`);
    ``accuracy``: the human sentence accuracy score (for PER against accuracy).
    """

    canonical_phones: str | None
    annotated_at: tuple[str, ...]
    accuracy: float | None = None


def phone_reference(u: Utterance) -> PhoneReference:
    """The :class:`PhoneReference` of a Speechocean762 utterance."""
    canon = [p for w in u.words for p in canonical_phones(w)]
    return PhoneReference(" ".join(canon) if canon else None,
                          tuple(a for w in u.words for a in annotated_by_position(w)), u.scores.get("accuracy"))


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; ``prompt`` is the user turn WITHOUT chat markers."""

    id: str
    utt_id: str
    task: str  # "apa" | "mdd" | "manifest"
    audio_path: str | None
    image_path: str | None
    prompt: str
    answer: str
    split: str
    speaker: str | None
    duration: float | None
    language: str | None = None  # manifest tasks: language of the answer, for CER / BLEU
    reference: PhoneReference | None = None  # Speechocean MDD examples: for the MDD metrics

    def to_dict(self) -> dict:
        return asdict(self)


def bundled_corpus_path() -> Path:
    """The generated Speechocean762-layout corpus shipped with the package (tests, demos)."""
    return Path(str(resources.files("phi4mm_lora") / "assets" / "corpus"))


def bundled_recording() -> tuple[Path, str]:
    """One 5.0 s recording of the bundled corpus's test split and its sentence: what a service
    warms up on and what ``scripts/bench_score.py`` times (issue 11: one 5-second recording)."""
    return bundled_corpus_path() / "WAVE" / "SPEAKER0003" / "000300001.flac", "COW WATCH WEEK SING CLOSE TODAY HOME"


def _check_audio(
    paths: list[str | None], max_seconds: float, workers: int | None
) -> list[tuple[float | None, str | None, str | None]]:
    """(duration, problem kind, detail) for each path, decoded in a thread pool."""

    def one(p: str | None) -> tuple[float | None, str | None, str | None]:
        if p is None:
            return None, None, None
        try:
            info = probe_audio(p, full=True)
        except AudioError as exc:
            return None, "audio", str(exc)
        if info.duration > max_seconds:
            return info.duration, "too_long", f"{info.duration:.1f} s > max_audio_seconds={max_seconds:g}"
        return info.duration, None, None

    n = workers or min(8, 2 * (os.cpu_count() or 1))
    if n <= 1 or len(paths) < 8:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, paths, chunksize=16))


def _problems_for(split: str, problems: list[tuple[str | None, Problem]], report: DataReport) -> None:
    """Attach read-time problems of this split (and split-less ones, e.g. scores without audio).

    Records of this split that failed to parse count as records seen, so the summary's
    "N examples used from M records" adds up.
    """
    for s, p in problems:
        if s == split:
            report.n_utterances += 1
        if s is None or s == split:
            report.problems.append(p)


def build_examples(
    data_cfg: DataConfig,
    prompt_cfg: PromptConfig,
    split: str,
    audio_token: str = DEFAULT_AUDIO_TOKEN,
    image_token: str = DEFAULT_IMAGE_TOKEN,
    *,
    seed: int = 42,
    extract_dir: Path | None = None,
    workers: int | None = None,
) -> tuple[list[Example], DataReport]:
    """Examples of one split (``train``, ``test``, ``validation``...) and what was skipped.

    ``task=both`` gives two examples per utterance (``<utt>:apa``, ``<utt>:mdd``). ``seed``
    drives the speaker-level validation carve-out. ``extract_dir``: where embedded hub audio
    bytes are written (default ``<feature_cache>/extracted/`` or ``~/.cache/phi4mm_lora``). Bad records are skipped and reported;
    ``data_cfg.strict`` turns any of them into a :class:`UserError`.
    """
    if data_cfg.source == "manifest":
        if not data_cfg.path:
            raise UserError("data.source=manifest needs data.path pointing at a .jsonl manifest")
        return _build_manifest(data_cfg, split, audio_token, image_token, workers)
    path = resolve_source(data_cfg.path, bundled_corpus_path())
    if extract_dir is None and data_cfg.feature_cache:
        # hub audio bytes go next to the features the user already set aside disk for
        extract_dir = Path(data_cfg.feature_cache).expanduser() / "extracted" / default_extract_dir(path).name
    src = read_speechocean(path, extract_dir)
    assign_validation(src.utterances, data_cfg.validation_fraction, seed, data_cfg.train_split)
    check_speaker_disjoint(src.utterances)
    available = src.splits()
    if split not in available:
        raise UserError(f"split {split!r} not found in {path}; available: {', '.join(available) or 'none'}")
    utts: list[Utterance] = sorted((u for u in src.utterances if u.split == split), key=lambda u: u.utt_id)
    if data_cfg.limit is not None:
        utts = utts[: data_cfg.limit]
    report = DataReport(source=str(path), split=split, n_utterances=len(utts))
    _problems_for(split, src.problems, report)
    tasks = ["apa", "mdd"] if data_cfg.task == "both" else [data_cfg.task]
    instructions = {t: load_instruction(t, prompt_cfg) for t in tasks}
    checks = _check_audio([u.audio_path for u in utts], data_cfg.max_audio_seconds, workers)
    examples: list[Example] = []
    for u, (duration, kind, detail) in zip(utts, checks, strict=True):
        if kind is not None:
            report.add(kind, u.utt_id, detail or "")
            continue
        for t in tasks:
            if t == "apa":
                s = u.scores
                answer = apa_answer(s["accuracy"], s["fluency"], s["prosodic"], s["total"])
            else:
                answer = mdd_answer(u.words, u.text)
            examples.append(Example(
                id=f"{u.utt_id}:{t}", utt_id=u.utt_id, task=t, audio_path=u.audio_path, image_path=None,
                prompt=user_prompt(t, instructions[t], audio_token, u.text), answer=answer,
                split=split, speaker=u.speaker, duration=duration,
                reference=phone_reference(u) if t == "mdd" else None,
            ))
    report.n_examples = len(examples)
    report.raise_if_strict(data_cfg.strict)
    return examples, report


def with_audio_token(examples: list[Example], audio_token: str) -> list[Example]:
    """The examples with the model's own audio placeholder in their prompts.

    Examples are built before the model loads (the checks before a run need them), with
    :data:`DEFAULT_AUDIO_TOKEN`; a processor with another placeholder gets the same examples
    with the token swapped, instead of the data being read a second time.
    """
    if audio_token == DEFAULT_AUDIO_TOKEN:
        return examples
    return [replace(ex, prompt=ex.prompt.replace(DEFAULT_AUDIO_TOKEN, audio_token)) for ex in examples]


def _build_manifest(
    data_cfg: DataConfig, split: str, audio_token: str, image_token: str, workers: int | None
) -> tuple[list[Example], DataReport]:
    items, problems = read_manifest(data_cfg.path or "")
    items = [it for it in items if it.split == split]
    if data_cfg.limit is not None:
        items = items[: data_cfg.limit]
    report = DataReport(source=str(data_cfg.path), split=split, n_utterances=len(items))
    _problems_for(split, problems, report)
    checks = _check_audio([it.audio_path for it in items], data_cfg.max_audio_seconds, workers)
    examples: list[Example] = []
    for it, (duration, kind, detail) in zip(items, checks, strict=True):
        if kind is not None:
            report.add(kind, it.id, detail or "")
            continue
        prompt = insert_media_tokens(it.prompt, it.audio_path is not None, it.image_path is not None,
                               audio_token, image_token)
        examples.append(Example(
            id=it.id, utt_id=it.id, task="manifest", audio_path=it.audio_path, image_path=it.image_path,
            prompt=prompt, answer=it.answer, split=split, speaker=None, duration=duration,
            language=it.language,
        ))
    report.n_examples = len(examples)
    report.raise_if_strict(data_cfg.strict)
    return examples, report
