"""Benchmark evaluation generation: examples/s and wall time on a model and data splits.

Default: the tiny model on the bundled corpus, train + test splits (all ~150 utterances),
both tasks, with the evaluate command's per-task token budgets (APA 40, MDD 120). A random
model never emits <|end|>, so every answer runs to its budget: the figure is a worst case
for those budgets. Model load time is reported separately from generation time.

Every run also splits the wall time (forward hooks on the causal LM, synchronised on CUDA):
model work per decoding step (the decoder forward), everything else per step (generate's
host work between two forwards: float32 logits copy, argmax, stopping criteria, cache and
input bookkeeping), and per batch the prefill forward and the preparation outside generate
(processor, audio encoder run clip by clip, decoding the answers).

``--compare`` runs, on the same examples and the same loaded model, the baseline (LoRA
unmerged, ``--batch-size``) and alongside it: unmerged at batch 1, then the adapter merged
(eval.merge_adapter, in place) at ``--batch-size`` and at batch 1, and prints every figure
as a ratio to the baseline.

``--cache-variants`` runs, on the same examples and the same loaded model (merged as evaluate
loads it), the baseline (``eval.cache=dynamic``) and alongside it ``eval.cache=static``,
``eval.cache=static eval.compile=true`` and ``eval.compile=cudagraphs`` (each compiled one's
compilation, recompilations included, timed apart in a warm-up pass over the same examples),
prints the same figures as ratios to the baseline and says whether each variant's answers are
identical to the baseline's, with the operators of one decoding step and of one prompt's
preparation (``eval.compile=true`` compiles the audio encoder's blocks too; ``cudagraphs`` does
not). It also times, alone on tensors of the run's shapes, the per-step host work inside
transformers' ``generate``
(float32 logits copy, argmax, stopping criteria) and reports the ``logits_to_keep`` the prefill
got.

    .venv/bin/python scripts/bench_eval.py [--model DIR] [--splits train test] [--batch-size 16]
        [--threads N] [--limit N] [--max-new-tokens 128] [--precision P] [--compare] [--cache-variants]
        [--profile]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the tiny test model)")
    ap.add_argument("--full-depth", action="store_true",
                    help="without --model: the tiny model at the published depth and head counts "
                         "(model.tiny.FULL_DEPTH), a CPU stand-in for a GPU step's host work")
    ap.add_argument("--data", default=None, help="data path (default: the bundled corpus)")
    ap.add_argument("--splits", nargs="+", default=["train", "test"])
    ap.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default=16,
                    help="prompts per batch, or auto (eval.batch_size=auto: the largest the GPU's free memory holds)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="cap on the per-task budgets")
    ap.add_argument("--precision", default="auto", help="precision plan (default auto: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--limit", type=int, default=None, help="utterances per split")
    ap.add_argument("--utterances", type=int, default=None,
                    help="repeat the chosen utterances, each copy a recording of its own (the audio encoder runs "
                         "for it), until there are N: batches as full as on Speechocean762's test set (2,500)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a run-config override, e.g. model.sdpa_cudnn=false (repeatable)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--full-examples", type=int, default=5000,
                    help="examples to extrapolate to (default: Speechocean762 test, 2,500 utterances x 2 tasks)")
    ap.add_argument("--compare", action="store_true",
                    help="baseline (unmerged, --batch-size) against batch 1 and the merged adapter, as ratios")
    ap.add_argument("--batch1-limit", type=int, default=None,
                    help="with --compare: the batch-1 runs take only the first N examples of each task (batch 1 "
                    "is slow; its per-step figures need few examples)")
    ap.add_argument("--cache-variants", action="store_true",
                    help="baseline (dynamic cache) against eval.cache=static, static + eval.compile=true and static + "
                         "eval.compile=cudagraphs, as ratios")
    ap.add_argument("--encoder-batches", type=int, nargs="+", default=None, metavar="N",
                    help="runs on the same examples with eval.encoder_batch=N each (the first is the baseline), as "
                         "ratios: preparation time and operators per example, and whether the answers agree")
    ap.add_argument("--profile", action="store_true",
                    help="also run the first batch under torch.profiler and print its top operators")
    args = ap.parse_args(argv)
    if sum(map(bool, (args.compare, args.cache_variants, args.encoder_batches))) > 1:
        ap.error("--compare, --cache-variants and --encoder-batches are separate runs; give one")
    return args


class Bench:
    """The loaded model and examples every run of one invocation measures, and their answers."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from phi4mm_lora.config import load_config
        from phi4mm_lora.data.examples import build_examples
        from phi4mm_lora.evaluate.generate import generate_all
        from phi4mm_lora.model.inference import merge_for_inference
        from phi4mm_lora.model.load import load_model

        self.args, self.cfg = args, load_config(None, config_overrides(args))
        t0 = time.perf_counter()
        self.loaded = load_model(self.cfg.model, self.cfg.precision, self.cfg.adapter)
        if not args.compare:  # what evaluate runs: merged where the plan allows
            self.loaded = merge_for_inference(self.loaded, self.cfg.eval.merge_adapter)
        self.load_s = time.perf_counter() - t0
        self.examples = repeat_utterances([ex for split in args.splits for ex in build_examples(
            self.cfg.data, self.cfg.prompts, split, audio_token=self.loaded.processor.audio_token, seed=self.cfg.seed)[0]],
            args.utterances)
        self.utts = len({(e.split, e.utt_id) for e in self.examples})
        self.max_new = self.cfg.eval.max_new_tokens
        if args.batch_size == "auto":
            from phi4mm_lora.evaluate.batch_size import resolve_batch_size

            # sized for the static cache when a run uses one (--cache-variants), as evaluate sizes it then
            cache = "static" if args.cache_variants else self.cfg.eval.cache
            args.batch_size, how = resolve_batch_size("auto", self.loaded.model, self.loaded.processor.tokenizer,
                                                      self.examples, self.max_new, cache)
            print(f"--batch-size {how}")
        # warm-up, not timed: one batch as large as the timed ones, 2 tokens. Otherwise the first timed run alone
        # pays the first-call costs (lazy imports and CUDA kernel loading, the allocator growing to a full
        # batch): on the third GPU lease the first of two runs doing the same encoder work took 1.8x its
        # preparation time (docs/benchmarks.md, "third lease")
        first = self.examples[:min(len(self.examples), int(args.batch_size))]
        generate_all(self.loaded.model, self.loaded.processor, first, batch_size=len(first), max_new_tokens=2,
                     progress=False, encoder_batch=self.cfg.eval.encoder_batch)
        self.answers: dict[str, list] = {}
        self.done: list[dict] = []  # each run as it finishes (written to --json at once: a GPU lease may end first)

    def measure(self, label: str, batch_size: int, exs: list | None = None, encoder_batch: int | None = None,
                **options) -> dict:
        """One run's figures (:func:`run`), plus operator counts for --compare and --cache-variants."""
        args, loaded = self.args, self.loaded
        fig = run(loaded, exs or self.examples, batch_size, self.max_new, args.full_examples,
                  encoder_batch=encoder_batch or self.cfg.eval.encoder_batch, **options)
        self.answers[label] = fig.pop("answers")
        merged = loaded.merge is not None and loaded.merge.merged
        ops = ops_per_step(loaded, self.examples[0], **options) if args.compare or args.cache_variants else {}
        figures = {"run": label, "adapter_merged": merged, **fig, **ops}
        self.done.append(figures)
        print_runs([figures], self.utts, args.full_examples)
        if args.json:  # replaced by the complete figures at the end
            with open(args.json, "w") as fh:
                json.dump({"partial": True, "runs": self.done}, fh, indent=2)
        return figures


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The run config the options describe (``--full-depth`` builds its model on first use)."""
    over = [f"eval.batch_size={args.batch_size}", f"eval.max_new_tokens={args.max_new_tokens}",
            f"precision={args.precision}"]
    if args.full_depth and not args.model:
        from phi4mm_lora.model.tiny import ensure_tiny

        args.model = str(ensure_tiny(full_depth=True))
    over += [f"{key}={value}" for key, value in (("model.path", args.model), ("data.path", args.data),
                                                 ("data.limit", args.limit)) if value]
    return over + args.set


def repeat_utterances(examples: list, n: int | None) -> list:
    """The examples of the first ``n`` utterances of the chosen ones repeated in order (all of them,
    once, when ``n`` is None). Copy ``k`` of an utterance gets ``#k`` on its ids, so it counts as a
    recording of its own: its audio goes through the encoder again, as a new recording's would."""
    from dataclasses import replace

    if n is None:
        return examples
    utts: dict[tuple, list] = {}
    for e in examples:
        utts.setdefault((e.split, e.utt_id), []).append(e)
    groups = list(utts.values())
    out = []
    for i in range(n):
        k = i // len(groups)
        out += [e if k == 0 else replace(e, id=f"{e.id}#{k}", utt_id=f"{e.utt_id}#{k}") for e in groups[i % len(groups)]]
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    bench = Bench(args)
    if args.cache_variants:
        return report_cache_variants(bench)
    if args.encoder_batches:
        return report_encoder_batches(bench)
    runs = [bench.measure("baseline" if args.compare else "run", args.batch_size)]
    if args.compare:
        runs += compare_runs(bench)
    loaded = bench.loaded
    figures = {
        **machine_figures(loaded),
        "splits": args.splits,
        "utterances": bench.utts,
        "examples": len(bench.examples),
        "model_load_s": round(bench.load_s, 2),
        "merge_note": loaded.merge.reason if loaded.merge is not None else None,
        "runs": runs,
    }
    print(f"model load {bench.load_s:.1f} s")
    if args.compare:
        print(ratio_table(runs))
    emit(figures, args.json)
    if args.profile:
        from phi4mm_lora.evaluate.generate import batches_for

        profile_batch(loaded, batches_for(loaded.model, bench.examples, args.batch_size)[0], bench.max_new)


def compare_runs(bench: Bench) -> list[dict]:
    """--compare after the baseline: unmerged at batch 1, then merged (in place) at both sizes."""
    from phi4mm_lora.model.inference import merge_for_inference

    args, examples = bench.args, bench.examples
    few = first_per_task(examples, args.batch1_limit)
    runs = [bench.measure("batch 1", 1, few)]
    before, base = last_logits(bench.loaded, examples[:4]), last_logits(bench.loaded, examples[:4], adapter=False)
    bench.loaded = loaded = merge_for_inference(bench.loaded, True)
    if not loaded.merge.merged:
        print(f"merged runs skipped: {loaded.merge.reason}")
        return runs
    runs.append(bench.measure("merged", args.batch_size))
    runs.append(bench.measure("merged, batch 1", 1, few))
    diff = (last_logits(loaded, examples[:4]) - before).abs().max().item()
    effect = (before - base).abs().max().item()
    print(f"merged vs unmerged, last-position logits of 4 prompts ({loaded.plan.name}): max |diff| {diff:.3g}; "
          f"the adapter itself moves them by up to {effect:.3g}; |logits| up to {before.abs().max().item():.3g}")
    runs[-1]["merge_logits_max_abs_diff"] = diff
    return runs


def report_encoder_batches(bench: Bench) -> None:
    """--encoder-batches: the same examples with each eval.encoder_batch, as ratios to the first."""
    args = bench.args
    runs = []
    for n in args.encoder_batches:
        r = bench.measure(f"encoder_batch={n}", args.batch_size, encoder_batch=n)
        r["aten_ops_per_prep"] = ops_per_prep(bench.loaded, bench.examples[:max(args.encoder_batches)], n)
        runs.append(r)
    print(ratio_table(runs, ENCODER_RATIO_KEYS))
    base = bench.answers[runs[0]["run"]]
    for r in runs[1:]:
        r["answers_differing"] = answers_differing(base, bench.answers[r["run"]])
        r["same_answers"] = r["answers_differing"]["differing"] == 0
        print(f"{r['run']}: {agreement_line(r['answers_differing'])}")
    emit({**machine_figures(bench.loaded), "splits": args.splits, "utterances": bench.utts, "runs": runs}, args.json)


def answers_differing(base: list, got: list) -> dict:
    """How many of a run's answers differ from the baseline's, and at which character the median
    one parts: in bf16 on random weights, rounding flips near-tied tokens, so a count and a late
    parting say rounding where one bare "different" says nothing (fp32 must give none)."""
    parted = sorted(len(os.path.commonprefix([a[1] or "", b[1] or ""])) for a, b in zip(base, got, strict=True)
                    if a != b)
    return {"differing": len(parted), "of": len(base),
            "median_parting_char": parted[len(parted) // 2] if parted else None}


def agreement_line(d: dict) -> str:
    if not d["differing"]:
        return f"answers identical to the baseline's ({d['of']} examples)"
    return (f"answers DIFFERENT from the baseline's in {d['differing']} of {d['of']} examples (the median one "
            f"parts at character {d['median_parting_char']})")


def report_cache_variants(bench: Bench) -> None:
    """--cache-variants: the four runs, their ratios, whether answers agree, and generate's host work."""
    args, loaded = bench.args, bench.loaded
    runs = cache_variants(bench.measure, loaded, bench.examples, args.batch_size, bench.max_new,
                          bench.cfg.eval.encoder_batch)
    for r in runs:
        r["answers_differing"] = answers_differing(bench.answers[runs[0]["run"]], bench.answers[r["run"]])
        r["same_answers_as_baseline"] = r["answers_differing"]["differing"] == 0
    print(ratio_table(runs, CACHE_RATIO_KEYS))
    for r in runs[1:]:
        print(f"{r['run']}: {agreement_line(r['answers_differing'])}")
    print(f"prefill logits_to_keep (set by transformers' generate): {runs[0]['prefill_logits_to_keep']}")
    host = host_work(loaded, args.batch_size)
    print(f"per-step host work inside generate, each timed alone at batch {args.batch_size} (median ms): "
          + ", ".join(f"{k} {v}" for k, v in host.items())
          + f"; measured gap between two decoder forwards (baseline): {runs[0]['other_ms_per_step']} ms")
    emit({**machine_figures(loaded), "examples": len(bench.examples), "runs": runs, "host_work_ms": host}, args.json)


def first_per_task(examples: list, n: int | None) -> list:
    """The first ``n`` examples of each task, in their order (all of them when ``n`` is None)."""
    if n is None:
        return examples
    seen: dict[str, int] = {}
    kept = []
    for e in examples:
        seen[e.task] = seen.get(e.task, 0) + 1
        if seen[e.task] <= n:
            kept.append(e)
    return kept


def machine_figures(loaded) -> dict:
    """Where the figures were measured: device, plan, CPU, threads and the load at the time."""
    import torch
    import transformers

    return {"device": str(loaded.plan.device), "precision": loaded.plan.name,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 2)}


def emit(figures: dict, path: str | None) -> None:
    """The figures as JSON on stdout, and into ``path`` (--json) when given."""
    print(json.dumps(figures, indent=2))
    if path:
        with open(path, "w") as fh:
            json.dump(figures, fh, indent=2)


def print_runs(runs: list[dict], utts: int, full_examples: int) -> None:
    for r in runs:
        print(f"[{r['run']}] {r['examples']} examples ({utts} utterances x tasks), batch {r['batch_size']}: "
              f"{r['generation_wall_s']} s generation wall time, {r['examples_per_s']} examples/s, "
              f"{r['tokens_per_s']} tokens/s; {r['decode_steps']} decoding steps in {r['batches']} batches: "
              f"{r['ms_per_decode_step']} ms/step (model {r['model_ms_per_step']} + other {r['other_ms_per_step']}); "
              f"{full_examples} examples would take {r['extrapolated_full_s'] / 60:.1f} min at this rate, "
              f"{r['full_by_batches_s'] / 60:.1f} min in full batches of {r['batch_size']} "
              f"(this run's held {r['rows_per_batch']} rows on average)")


def cache_variants(measure, loaded, examples, batch_size: int, max_new_tokens: int, encoder_batch: int = 1) -> list[dict]:
    """eval.cache=dynamic (the baseline), static, static + eval.compile=true (inductor) and static +
    eval.compile=cudagraphs on the same model.

    Each compiled variant first runs a warm-up pass over the same examples, which compiles every
    shape the timed pass meets (each new batch size or static-cache length is a recompilation);
    its time and the graphs compiled are reported apart, and the timed pass counts any further
    compilation.
    """
    runs = [measure("dynamic (baseline)", batch_size), measure("static", batch_size, cache="static")]
    for name, compile in (("static+compile", True), ("static+cudagraphs", "cudagraphs")):
        runs.append(compiled_variant(measure, loaded, examples, batch_size, max_new_tokens, encoder_batch, name,
                                     compile))
    return runs


def compiled_variant(measure, loaded, examples, batch_size: int, max_new_tokens: int, encoder_batch: int, name: str,
                     compile: bool | str) -> dict:
    """One compiled variant of :func:`cache_variants`: a warm-up pass, a pass without the timer's hooks, the timed one."""
    import torch

    from phi4mm_lora.evaluate.generate import generate_all

    counters = torch._dynamo.utils.counters

    def plain_pass() -> float:  # no timer hooks: what evaluate runs
        t = time.perf_counter()
        generate_all(loaded.model, loaded.processor, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     progress=False, cache="static", compile=compile, encoder_batch=encoder_batch)
        return time.perf_counter() - t

    before = counters["frames"]["ok"]
    warm_s = plain_pass()
    frames = counters["frames"]["ok"] - before
    plain_s = plain_pass()
    measure(f"{name}, warm-up", batch_size, cache="static", compile=compile)  # recompiles: hooks break the graph
    hooked = counters["frames"]["ok"]
    r = measure(name, batch_size, cache="static", compile=compile)
    r.update(compile_warmup_s=round(warm_s, 1), wall_s_without_timer_hooks=round(plain_s, 2),
             frames_compiled_in_warmup=frames, frames_compiled_in_timed_pass=counters["frames"]["ok"] - hooked)
    print(f"{name}: warm-up pass (compilation of {frames} frame(s) included) {warm_s:.1f} s; a second pass "
          f"{plain_s:.2f} s; the timed pass with the timer's hooks (warmed up too) compiled "
          f"{r['frames_compiled_in_timed_pass']} more")
    return r


def host_work(loaded, batch_size: int, reps: int = 30) -> dict[str, float]:
    """Median ms of each per-step host operation of transformers' greedy ``generate`` loop, run
    alone on tensors of one step's shapes: the float32 copy of the last position's logits
    (``outputs.logits[:, -1].to(copy=True, dtype=torch.float32)``), the argmax over the
    vocabulary, transformers' stopping criteria (max length + the two stop ids) and appending
    the new tokens to ``input_ids``. The logits take the lm_head's dtype (bf16 on a GPU plan)."""
    import statistics

    import torch
    from transformers.generation.stopping_criteria import (
        EosTokenCriteria,
        MaxLengthCriteria,
        StoppingCriteriaList,
    )

    from phi4mm_lora.evaluate.generate import _device_of, stop_ids

    model = loaded.model
    head = model.get_output_embeddings()
    vocab, dev = head.weight.shape[0], _device_of(model)
    logits = torch.randn(batch_size, 1, vocab, dtype=head.weight.dtype, device=dev)
    scores = logits[:, -1].float()
    ids = torch.randint(0, vocab, (batch_size, 800), device=dev)
    nxt = torch.argmax(scores, -1)
    crit = StoppingCriteriaList([MaxLengthCriteria(900), EosTokenCriteria(stop_ids(loaded.processor.tokenizer))])

    def ms(fn) -> float:
        times = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - t))
        return round(statistics.median(times), 3)

    return {
        "float32 logits copy": ms(lambda: logits[:, -1].to(copy=True, dtype=torch.float32)),
        "argmax": ms(lambda: torch.argmax(scores, dim=-1)),
        "stopping criteria": ms(lambda: crit(ids, None)),
        "input_ids append": ms(lambda: torch.cat([ids, nxt[:, None]], dim=-1)),
    }


def last_logits(loaded, examples, adapter: bool = True):
    """float32 logits at the last prompt position, rows embedded as generate does (adapter off: the base)."""
    import contextlib

    import torch

    from phi4mm_lora.data.audio import load_audio
    from phi4mm_lora.evaluate.embed import row_embeds
    from phi4mm_lora.evaluate.generate import _device_of

    audio = {e.id: load_audio(e.audio_path) for e in examples if e.audio_path}
    off = loaded.model.disable_adapter() if not adapter else contextlib.nullcontext()
    with torch.no_grad(), off:
        _, emb, mask = row_embeds(loaded.model, loaded.processor, examples, audio, _device_of(loaded.model))
        return loaded.model(inputs_embeds=emb, attention_mask=mask, logits_to_keep=1).logits[:, -1].float().cpu()


def ops_per_step(loaded, example, **options) -> dict:
    """torch operators (each one kernel launch on a GPU) and matrix products per decoding step.

    Counted with torch.profiler as the difference between generating 6 and 2 tokens for one
    example, divided by 4: exact and independent of the machine's load, unlike the timings.
    ``options``: ``cache``/``compile`` of ``generate_all``; an unprofiled call first compiles
    what needs compiling, so that tracing is not counted. Under ``reduce-overhead`` on a GPU the
    compiled step is replayed as one CUDA graph, so there the count is of what the host calls.
    """
    from torch.profiler import ProfilerActivity, profile

    from phi4mm_lora.evaluate.generate import generate_all

    generate_all(loaded.model, loaded.processor, [example], batch_size=1, max_new_tokens=6, progress=False, **options)

    def counts(n: int) -> tuple[int, int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate_all(loaded.model, loaded.processor, [example], batch_size=1, max_new_tokens=n, progress=False,
                         **options)
        ev = prof.key_averages()
        total = sum(e.count for e in ev if e.key.startswith("aten::"))
        mm = sum(e.count for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        return total, mm

    (t2, m2), (t6, m6) = counts(2), counts(6)
    return {"aten_ops_per_step": (t6 - t2) / 4, "matmuls_per_step": (m6 - m2) / 4,
            "aten_ops_per_prep": ops_per_prep(loaded, example)}


def ops_per_prep(loaded, examples, encoder_batch: int = 1) -> float:
    """torch operators of one prompt's preparation: the processor, the audio encoder, the embedding.

    Counted with torch.profiler on ``row_embeds`` for ``examples`` (one example, or several whose
    recordings are encoded ``encoder_batch`` at a time), per example, after :func:`ops_per_step`'s
    unprofiled call has compiled what ``compile`` compiles.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from phi4mm_lora.data.audio import load_audio
    from phi4mm_lora.evaluate.embed import AudioRows, row_embeds

    examples = examples if isinstance(examples, list) else [examples]
    audio = {ex.id: load_audio(ex.audio_path) for ex in examples}
    device = next(p.device for p in loaded.model.parameters())
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        row_embeds(loaded.model, loaded.processor, examples, audio, device, AudioRows(examples, encoder_batch))
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / len(examples)


class StepTimer:
    """Wall time of every forward of the causal LM, and of the host work between two forwards.

    A forward whose input is longer than one token (or given as embeddings) is a prefill: it
    starts a new ``generate`` call. The gap between a forward's end and the next decode
    forward's start is that step's host work inside ``generate``.
    """

    def __init__(self, model) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.handles = [base.register_forward_pre_hook(self._pre, with_kwargs=True),
                        base.register_forward_hook(self._post)]
        self.prefill_s = self.decode_s = self.gap_s = 0.0
        self.prefills = self.decodes = 0
        self._start = self._end = None
        self._is_prefill = False
        self.logits_to_keep = None  # what generate passed to the last prefill (1: only the last position's logits)

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args, kwargs):
        now = self._now()
        ids, emb = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        self._is_prefill = emb is not None or (ids is not None and ids.shape[1] > 1)
        if self._is_prefill:
            self.logits_to_keep = kwargs.get("logits_to_keep")
        if not self._is_prefill and self._end is not None:
            self.gap_s += now - self._end
        self._start = now

    def _post(self, module, args, output):
        now = self._now()
        if self._is_prefill:
            self.prefill_s += now - self._start
            self.prefills += 1
        else:
            self.decode_s += now - self._start
            self.decodes += 1
        self._end = now

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run(loaded, examples, batch_size: int, max_new_tokens: int, full_examples: int,
        cache: str = "dynamic", compile: bool | str = False, encoder_batch: int = 1) -> dict:
    """Generate for ``examples`` as evaluate does; wall time, throughput and its split."""
    from phi4mm_lora.evaluate.generate import batches_for, generate_all, max_tokens_for

    timer = StepTimer(loaded.model)
    t1 = time.perf_counter()
    try:
        gens = generate_all(loaded.model, loaded.processor, examples, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, progress=False, cache=cache, compile=compile,
                            encoder_batch=encoder_batch)
    finally:
        timer.remove()
    gen_s = time.perf_counter() - t1
    tokens = sum(g.n_tokens for g in gens)
    # A batch decodes until its longest answer stops: that many forward passes of the decoder.
    n_tok = {g.id: g.n_tokens for g in gens}
    batches = batches_for(loaded.model, examples, batch_size)
    decode_steps = sum(max(n_tok[e.id] for e in b) for b in batches)
    steps = max(timer.decodes, 1)
    outside = gen_s - timer.prefill_s - timer.decode_s - timer.gap_s
    return {
        "batch_size": batch_size,
        "examples": len(examples),
        "max_new_tokens": {t: max_tokens_for(t, max_new_tokens) for t in sorted({e.task for e in examples})},
        "generated_tokens": tokens,
        "stopped_at_end": sum(g.finished for g in gens),
        "failures": sum(g.error is not None for g in gens),
        "generation_wall_s": round(gen_s, 2),
        "examples_per_s": round(len(examples) / gen_s, 2),
        "tokens_per_s": round(tokens / gen_s, 1),
        "batches": len(batches),
        "decode_steps": decode_steps,
        # prefill (audio encoder + prompt) is included: this is wall time per decoder step
        "ms_per_decode_step": round(1000 * gen_s / max(decode_steps, 1), 2),
        # the split: decoder forward per step / generate's host work per step / per batch outside the loop
        "model_ms_per_step": round(1000 * timer.decode_s / steps, 3),
        "other_ms_per_step": round(1000 * timer.gap_s / steps, 3),
        "prefill_ms_per_batch": round(1000 * timer.prefill_s / max(timer.prefills, 1), 2),
        "prep_ms_per_example": round(1000 * outside / max(len(examples), 1), 2),
        "share_model": round(timer.decode_s / gen_s, 3),
        "share_other_per_step": round(timer.gap_s / gen_s, 3),
        "share_prefill": round(timer.prefill_s / gen_s, 3),
        "share_prep": round(outside / gen_s, 3),
        "full_examples": full_examples,
        "extrapolated_full_s": round(full_examples / (len(examples) / gen_s), 1),
        "rows_per_batch": round(len(examples) / max(len(batches), 1), 1),
        "full_by_batches_s": round(full_by_batches(
            full_examples, sorted({e.task for e in examples}), batch_size, max_new_tokens, per_example_s=outside
            / max(len(examples), 1), prefill_s=timer.prefill_s / max(timer.prefills, 1),
            step_s=(timer.decode_s + timer.gap_s) / steps), 1),
        "prefill_logits_to_keep": timer.logits_to_keep,
        "answers": [(g.id, g.text, g.n_tokens, g.error) for g in gens],
    }


def full_by_batches(full_examples: int, tasks: list[str], batch_size: int, cap: int, *, per_example_s: float,
                    prefill_s: float, step_s: float) -> float:
    """Seconds for ``full_examples`` split evenly over ``tasks``, counted batch by batch: each task
    in ceil(n / batch_size) batches, each one prefill and its task's budget of decoding steps, plus
    the preparation of every example. The step and prefill times are this run's, so the figure
    holds for batches as full as this run's (``rows_per_batch``); ``--utterances`` fills them."""
    from phi4mm_lora.evaluate.generate import max_tokens_for

    per_task = full_examples / max(len(tasks), 1)
    batches = math.ceil(per_task / batch_size)
    steps = sum(batches * max_tokens_for(t, cap) for t in tasks)
    return full_examples * per_example_s + len(tasks) * batches * prefill_s + steps * step_s


RATIO_KEYS = ("ms_per_decode_step", "model_ms_per_step", "other_ms_per_step", "prefill_ms_per_batch",
              "prep_ms_per_example", "examples_per_s", "aten_ops_per_step", "matmuls_per_step")


ENCODER_RATIO_KEYS = ("prep_ms_per_example", "aten_ops_per_prep", "examples_per_s", "ms_per_decode_step",
                      "full_by_batches_s")


CACHE_RATIO_KEYS = ("ms_per_decode_step", "model_ms_per_step", "other_ms_per_step", "prefill_ms_per_batch",
                    "prep_ms_per_example", "examples_per_s", "extrapolated_full_s", "aten_ops_per_step",
                    "aten_ops_per_prep")


def ratio_table(runs: list[dict], keys: tuple[str, ...] = RATIO_KEYS) -> str:
    """One line per run: each figure and its ratio to the first run (the baseline)."""
    base = runs[0]
    head = f"{'run':<18}" + "".join(f"{k:>24}" for k in keys)
    lines = [head]
    for r in runs:
        cells = []
        for k in keys:
            ratio = r[k] / base[k] if base[k] else float("nan")
            cells.append(f"{r[k]:>12} ({ratio:5.2f}x)")
        lines.append(f"{r['run']:<18}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def profile_batch(loaded, batch, max_new_tokens: int) -> None:
    """Top operators of one batch's generation (CPU, and CUDA when present), by self time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from phi4mm_lora.evaluate.generate import generate_all

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        generate_all(loaded.model, loaded.processor, batch, batch_size=len(batch),
                     max_new_tokens=max_new_tokens, progress=False)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    main()
