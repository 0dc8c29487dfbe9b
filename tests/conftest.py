"""Shared test setup: one tiny-model cache per test session, CPU only, no network.

The tiny model is built once into a fresh session folder (never reused from an earlier run,
so a broken builder cannot hide behind a stale cache); subprocesses inherit the folder via
PHI4MM_LORA_CACHE.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_CACHE = Path(tempfile.mkdtemp(prefix="phi4mm-lora-test-cache-"))
os.environ["PHI4MM_LORA_CACHE"] = str(_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tiny_native() -> Path:
    from phi4mm_lora.model.tiny import ensure_tiny

    return ensure_tiny("native", seed=0)


@pytest.fixture(scope="session")
def tiny_official() -> Path:
    from phi4mm_lora.model.tiny import ensure_tiny

    return ensure_tiny("official", seed=0)
