"""Benchmark the data layer: corpus generation, example preparation, feature cache.

Usage: .venv/bin/python scripts/bench_data.py [--n 5000] [--out /tmp/bench_corpus] [--keep]

1. generates an N-utterance corpus with espeak-ng (real synthesis for every utterance);
2. times ``build_examples`` for train and test with task=both, including the audio checks
   (header + full decode of every file);
3. times one epoch of audio loading over the train utterances: decode + resample + feature
   extraction for every clip, versus reading the same features from :class:`FeatureCache`
   (the cache is filled in a separate, also timed, pass).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from phi4mm_lora.config import DataConfig, PromptConfig
from phi4mm_lora.data import build_examples, load_audio
from phi4mm_lora.data.cache import FeatureCache, default_extractor, extract_features
from phi4mm_lora.data.corpus import make_corpus


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the corpus and cache folders")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for feature extraction (1 = what a DataLoader worker uses)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    corpus = args.out or work / "corpus"

    print(f"machine: {os.cpu_count()} CPU cores, {cpu_model()}; torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    reuse = (corpus / "resource" / "scores.json").is_file()
    if not reuse:
        make_corpus(corpus, args.n, seed=1)
    t_gen = time.perf_counter() - t0
    os.sync()  # flush the freshly written corpus so write-back does not distort the timings
    size_mb = sum(f.stat().st_size for f in corpus.rglob("*") if f.is_file()) / 1e6
    if reuse:
        print(f"reusing the corpus in {corpus} ({size_mb:.0f} MB)")
    else:
        print(f"generate {args.n} utterances with espeak-ng: {t_gen:.1f} s ({size_mb:.0f} MB)")

    cfg = DataConfig(path=str(corpus), task="both")
    t0 = time.perf_counter()
    train, rep_tr = build_examples(cfg, PromptConfig(), "train")
    test, rep_te = build_examples(cfg, PromptConfig(), "test")
    t_prep = time.perf_counter() - t0
    hours = sum(e.duration or 0 for e in train + test) / 2 / 3600
    print(f"build_examples train+test (both tasks, audio checked): {t_prep:.1f} s -> "
          f"{len(train)} + {len(test)} examples, {hours:.2f} h audio, "
          f"{rep_tr.n_problems + rep_te.n_problems} problems")

    paths = sorted({e.audio_path for e in train if e.audio_path})
    fe = default_extractor()
    extract_features(load_audio(paths[0]), fe)  # warm-up
    cache = FeatureCache(work / "cache", fe)
    t0 = time.perf_counter()
    for p in paths:
        cache.get(p)
    t_fill = time.perf_counter() - t0
    os.sync()
    t0 = time.perf_counter()
    for p in paths:
        extract_features(load_audio(p), fe)
    t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in paths:
        cache.get(p)
    t_hit = time.perf_counter() - t0
    cache_mb = sum(f.stat().st_size for f in (work / "cache").rglob("*") if f.is_file()) / 1e6
    print(f"epoch over {len(paths)} train clips: decode+features {t_decode:.1f} s, "
          f"cache fill {t_fill:.1f} s, cache read {t_hit:.2f} s ({cache_mb:.0f} MB) -> "
          f"speed-up {t_decode / t_hit:.1f}x")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


if __name__ == "__main__":
    main()
