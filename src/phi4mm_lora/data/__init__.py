"""The data layer: Speechocean762 (release or hub layout), JSONL manifests, the bundled
generated corpus, targets and prompts as in the paper, and an optional feature cache.

The entry point for training and evaluation is :func:`build_examples`; the collator decodes
audio with :func:`load_audio` (or reads :class:`FeatureCache`).
"""

from phi4mm_lora.data.audio import AudioError, load_audio, probe_audio
from phi4mm_lora.data.cache import CachedAudio, FeatureCache
from phi4mm_lora.data.corpus import make_corpus
from phi4mm_lora.data.examples import Example, build_examples, bundled_corpus_path
from phi4mm_lora.data.problems import DataReport, Problem

__all__ = [
    "AudioError",
    "CachedAudio",
    "FeatureCache",
    "DataReport",
    "Example",
    "Problem",
    "build_examples",
    "bundled_corpus_path",
    "load_audio",
    "make_corpus",
    "probe_audio",
]
