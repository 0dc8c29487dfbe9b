"""Scoring one recording with the model loaded, call after call: the figure of issue 11's "under 3 s".

    python scripts/bench_score.py                                  # tiny model, the bundled 5.0 s recording
    python scripts/bench_score.py --model DIR --precision bf16     # e.g. the random full-size checkpoint on a GPU
    python scripts/bench_score.py --variants dynamic static        # without the compiled variant (no C++ compiler)
    python scripts/bench_score.py --variants dynamic --recordings 6 # then 6 other recordings, one call each

The model is loaded once, as ``score`` loads it (adapter merged where the plan allows). Each
variant then scores the same recording (both tasks, through :func:`~phi4mm_lora.evaluate.score.score_batch`,
the code of ``score`` and of the service) ``--repeat`` times, and the figure is the time of each
call with the model loaded (``score_seconds``: audio decoding and generation). The first call
of a variant pays what is done once per process (for ``static+compile``: the compilation and,
on a GPU, the CUDA graph capture); the following calls are what a running service answers in
when a request repeats a recording. ``--recordings N`` then scores the N longest other bundled
test recordings (4.4-5.9 s for 6) once each with every variant: every one is a new audio
length, which is what a service meets (kernels that plan per shape, such as cuDNN's, plan again).
Variants: ``dynamic`` (the default, the baseline), ``static`` (``eval.cache=static``),
``static+compile`` (``eval.cache=static eval.compile=true``) and ``static+cudagraphs``
(``eval.compile=cudagraphs``: the eager kernels replayed as CUDA graphs, so ``static``'s answers
are expected). Ratios are against the baseline's
warm median in the same run, and each variant's answers must equal the baseline's.

Each variant then decodes the recording once more beside the baseline with the logits kept
(:mod:`~phi4mm_lora.evaluate.agreement`): per answer, the step where the tokens part, the
paths' numerical noise over the steps that read the same tokens, the baseline's gap between its
token and the variant's there, and a verdict (``same``, ``rounding`` or ``suspect``). So an
answer that differs says whether rounding flipped a near tie or the variant computes something
else. Only fp32 can tell a subtle fault from rounding (bf16's own rounding is as large as a little
padding read as text on the tiny model), so for a verdict on a bf16 parting run the same variants
with ``--precision fp32``; ``static`` is a yardstick in either: it differs from ``dynamic`` only
in kernel shapes. In fp32 the bench turns TF32 off for cuDNN's convolutions (PyTorch's default
is on), so that every path rounds as fp32 does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

VARIANTS = {"dynamic": [], "static": ["eval.cache=static"], "static+compile": ["eval.cache=static", "eval.compile=true"],
            "static+cudagraphs": ["eval.cache=static", "eval.compile=cudagraphs"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the tiny test model)")
    ap.add_argument("--precision", default="auto", help="precision plan (default auto: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--audio", default=None, help="recording to score (default: the bundled 5.0 s one)")
    ap.add_argument("--text", default=None, help="its sentence (default: the bundled recording's)")
    ap.add_argument("--repeat", type=int, default=3, help="calls per variant (default 3; the first is the cold one)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="the first is the baseline (default: all four)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a run-config override for every variant, e.g. model.sdpa_cudnn=false (repeatable)")
    ap.add_argument("--recordings", type=int, default=0, metavar="N",
                    help="then score the N longest other bundled test recordings, one call each, with each variant: a "
                         "service meets a new audio length with every request, which one recording scored again "
                         "does not show")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.recordings < 0:
        ap.error("--recordings must be >= 0")
    if args.repeat < 2:
        ap.error("--repeat must be >= 2: the first call is the cold one")
    if args.audio and not args.text:
        ap.error("--audio needs --text, the sentence that recording reads")
    return args


def time_variant(cfg, loaded, item, repeat: int) -> tuple[list[float], list[dict]]:
    """``score_seconds`` of each call, and the last call's results."""
    from phi4mm_lora.evaluate.score import score_batch

    seconds, results = [], []
    for _ in range(repeat):
        timing: dict[str, float] = {}
        results = score_batch(cfg, loaded, [item], timing=timing)
        seconds.append(timing["score_seconds"])
    return seconds, results


def other_recordings(n: int, skip: str) -> list[tuple]:
    """The ``n`` longest bundled test recordings other than ``skip`` (4.4-5.9 s for 6), longest first, each a
    (:class:`ScoreItem` with its sentence, seconds): each a new audio length for the process, as a service's
    requests are."""
    from phi4mm_lora.data.audio import probe_audio
    from phi4mm_lora.data.examples import bundled_corpus_path
    from phi4mm_lora.data.speechocean import read_release
    from phi4mm_lora.evaluate.score import ScoreItem

    utts = [u for u in read_release(bundled_corpus_path()).utterances
            if u.split == "test" and u.audio_path and os.path.abspath(u.audio_path) != os.path.abspath(skip)]
    if len(utts) < n:
        raise SystemExit(f"--recordings {n}: the bundled test split has {len(utts)} other recordings")
    timed = sorted(((probe_audio(u.audio_path, full=False).duration, u) for u in utts), key=lambda t: (-t[0], t[1].utt_id))
    return [(ScoreItem(u.audio_path, u.text), duration) for duration, u in timed[:n]]


def time_recordings(cfg, loaded, items: list[tuple]) -> list[dict]:
    """One call per (recording, seconds) of :func:`other_recordings`, the model already warm: each call's seconds."""
    rows = []
    for it, duration in items:
        (seconds,), results = time_variant(cfg, loaded, it, 1)
        rows.append({"audio": os.path.basename(it.audio), "duration_s": round(duration, 2),
                     "seconds": round(seconds, 3), "error": results[0].get("error")})
    return rows


def recordings_figures(variant: str, calls: list[dict]) -> dict:
    """One variant's ``--recordings`` calls, summed up and printed as a table."""
    secs = [c["seconds"] for c in calls]
    fig = {"variant": variant, "calls": calls, "median_s": round(statistics.median(secs), 3), "max_s": max(secs),
           "under_3_s": sum(s < 3.0 for s in secs)}
    print(f"{variant}: {len(calls)} other recordings, one call each, the process warm: median {fig['median_s']:.3f} s, "
          f"slowest {fig['max_s']:.3f} s, {fig['under_3_s']} of {len(calls)} under 3 s")
    print("| recording | length s | call s |\n|---|---|---|")
    for c in calls:
        print(f"| {c['audio']} | {c['duration_s']:.2f} | {c['seconds']:.3f} |")
    return fig


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from phi4mm_lora.config import load_config
    from phi4mm_lora.data.examples import bundled_recording
    from phi4mm_lora.evaluate.score import ScoreItem
    from phi4mm_lora.model.inference import load_for_inference

    base = [f"precision={args.precision}"] + ([f"model.path={args.model}"] if args.model else []) + args.set
    cfg = load_config(None, base)
    loaded = load_for_inference(cfg)
    if loaded.plan.name == "fp32":  # cuDNN convolutions (the audio encoder's) default to TF32, ~1e-3
        torch.backends.cudnn.allow_tf32 = False
    default_audio, default_text = bundled_recording()
    audio = args.audio or str(default_audio)
    item = ScoreItem(audio, args.text or default_text)
    runs = []
    for name in args.variants:
        seconds, results = time_variant(load_config(None, base + VARIANTS[name]), loaded, item, args.repeat)
        answers = [(r.get("apa_raw"), r.get("mdd_raw"), r.get("error")) for r in results]
        runs.append({"variant": name, "cold_s": round(seconds[0], 3), "warm_s": [round(s, 3) for s in seconds[1:]],
                     "warm_median_s": round(statistics.median(seconds[1:]), 3), "answers": answers})
    found = partings([load_config(None, base + VARIANTS[r["variant"]]) for r in runs], loaded, item) if runs[1:] else []
    for r, p in zip(runs[1:], found, strict=True):
        r["partings"] = p
    ref = runs[0]
    print(f"scoring one recording ({audio}), both tasks, model loaded; device {loaded.plan.device}, "
          f"plan {loaded.plan.name}; {args.repeat} calls per variant")
    print("| variant | first call s | warm median s | warm x (baseline = 1) | answers as the baseline's |")
    print("|---|---|---|---|---|")
    for r in runs:
        r["warm_ratio"] = round(r["warm_median_s"] / ref["warm_median_s"], 3) if ref["warm_median_s"] else None
        r["same_answers"] = r["answers"] == ref["answers"]
        r["first_difference"] = first_difference(ref["answers"], r["answers"])
        print(f"| {r['variant']} | {r['cold_s']:.3f} | {r['warm_median_s']:.3f} | {r['warm_ratio']} | "
              f"{'yes' if r['same_answers'] else 'NO'} |")
    figures = {"device": str(loaded.plan.device), "precision": loaded.plan.name, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "audio": audio,
               "runs": runs}
    if args.recordings:
        others = other_recordings(args.recordings, audio)
        figures["recordings"] = [recordings_figures(name, time_recordings(load_config(None, base + VARIANTS[name]),
                                                                          loaded, others))
                                 for name in args.variants]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    for r in runs[1:]:
        for task, p in zip(("apa", "mdd"), r["partings"], strict=True):
            where = "same tokens" if p["step"] is None else (
                f"parts at token {p['step']}, baseline's gap {p['gap']:.3g}, its runner-up rank {p['rank']}")
            print(f"  {r['variant']}: {task}: {where}; logit noise {p['noise']:.3g} of the logits' spread "
                  f"(first token, from the prefill: {p['first']:.3g}) -> {p['verdict']}")
    for r in runs:
        for task, where in (r["first_difference"] or {}).items():
            print(f"  {r['variant']}: {task} answer parts from the baseline's at character {where['at']}: "
                  f"...{where['baseline']!r} against ...{where['variant']!r}")
    return 0 if all(r["same_answers"] for r in runs) else 1


def partings(cfgs: list, loaded, item) -> list[list[dict]]:
    """For each variant after the baseline ``cfgs[0]``: both tasks' (apa, mdd)
    :class:`~phi4mm_lora.evaluate.agreement.Parting` against the baseline, every path decoding the
    recording's prompts in the batches scoring uses, with the logits kept (the baseline once)."""
    from phi4mm_lora.data.audio import load_audio
    from phi4mm_lora.evaluate.agreement import TOLERANCE, compare_paths
    from phi4mm_lora.evaluate.generate import batches_for, greedy_ids
    from phi4mm_lora.evaluate.score import task_examples

    examples = task_examples(cfgs[0], [item], loaded.processor.audio_token)
    samples = load_audio(item.audio)
    audio = {ex.id: samples for ex in examples}
    tolerance = TOLERANCE["fp32" if loaded.plan.name == "fp32" else "bf16"]
    found: list[dict] = [{} for _ in cfgs[1:]]
    for batch in batches_for(loaded.model, examples, len(examples)):
        ref, *variants = (greedy_ids(loaded.model, loaded.processor, batch, c.eval.max_new_tokens, audio, c.eval.cache,
                                     c.eval.compile, logits=True) for c in cfgs)
        for by_task, var in zip(found, variants, strict=True):
            for ex, p in zip(batch, compare_paths(*ref, *var, tolerance), strict=True):
                by_task[ex.task] = p.as_dict()
    return [[by_task["apa"], by_task["mdd"]] for by_task in found]


def first_difference(ref: list[tuple], got: list[tuple], context: int = 24) -> dict | None:
    """Where each task's answer first parts from the baseline's: the character index and the text
    around it (None when all agree). On a GPU in bf16, an answer that parts late from an equal
    prefix points at rounding flipping a near-tied arg max; one that parts at once, at a bug."""
    out = {}
    for (apa0, mdd0, _), (apa1, mdd1, _) in zip(ref, got, strict=True):
        for task, a, b in (("apa", apa0 or "", apa1 or ""), ("mdd", mdd0 or "", mdd1 or "")):
            if a == b:
                continue
            at = len(os.path.commonprefix([a, b]))
            lo = max(at - context // 2, 0)
            out[task] = {"at": at, "of": len(a), "baseline": a[lo:at + context], "variant": b[lo:at + context]}
    return out or None


if __name__ == "__main__":
    sys.exit(main())
