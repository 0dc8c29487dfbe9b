"""End to end evaluation on the tiny model and the bundled corpus.

The tiny model is random, so its answers do not parse: that is the point here. Every
unparseable answer must be counted and listed (never dropped), results.json must be exactly
what the saved predictions give, and a second run must be shown side by side with deltas.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from picks import three_lengths_both_tasks

from phi4mm_lora.cli import main
from phi4mm_lora.config import dump_config, load_config
from phi4mm_lora.data.examples import Example, build_examples
from phi4mm_lora.evaluate.embed import row_embeds
from phi4mm_lora.evaluate.generate import generate_all, max_tokens_for, stop_ids
from phi4mm_lora.evaluate.metrics import compute_all
from phi4mm_lora.evaluate.parse import parse_for_task
from phi4mm_lora.evaluate.report import load_predictions
from phi4mm_lora.evaluate.run import build_record, make_epoch_evaluator, subset_utterances

SMALL = ["eval.max_new_tokens=6", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def loaded(tiny_native: Path):
    from phi4mm_lora.model.load import load_model

    cfg = load_config(None, [f"model.path={tiny_native}"])
    return load_model(cfg.model, cfg.precision, cfg.adapter)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_native: Path) -> Path:
    """A run folder like train() writes (RUN/adapter + RUN/config.yaml) with a non-zero fresh adapter."""
    from phi4mm_lora.model.adapters import save_trained
    from phi4mm_lora.model.load import load_model

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"model.path={tiny_native}", "adapter.mode=fresh", "adapter.r=4"])
    lm = load_model(cfg.model, cfg.precision, cfg.adapter)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if ".lora_B." in n and p.requires_grad:
                p.normal_(0, 0.5)  # a fresh lora_B is zero: make the adapter change the output
    save_trained(lm.model, lm.adapters, run / "adapter")
    dump_config(cfg, run / "config.yaml")
    return run


def _unparseable(records: list[dict], task: str) -> int:
    return sum(1 for r in records if r["task"] == task and not parse_for_task(task, r["raw"]).ok)


def test_evaluate_twice_with_comparison(tmp_path: Path, tiny_native: Path, trained_adapter: Path, capsys) -> None:
    base_out, new_out = tmp_path / "base", tmp_path / "new"
    rc = main(["evaluate", "--model", str(tiny_native), "--limit", "3", "--output", str(base_out),
               "--no-progress", *SMALL])
    assert rc == 0
    for f in ("results.json", "report.md", "predictions.jsonl", "per_vs_accuracy.png", "run.json", "config.yaml"):
        assert (base_out / f).is_file(), f
    records = load_predictions(base_out / "predictions.jsonl")
    assert len(records) == 6 and {r["task"] for r in records} == {"apa", "mdd"}
    assert all(r["canonical_phones"] and "annotated_phones" in r for r in records if r["task"] == "mdd")
    saved = json.loads((base_out / "results.json").read_text())
    assert json.loads(json.dumps(compute_all(records))) == saved
    for task in ("apa", "mdd"):
        assert saved["parse_failure_counts"][task] == _unparseable(records, task)
        assert len(saved["parse_failures"][task]["items"]) == saved["parse_failure_counts"][task]
    out = capsys.readouterr().out
    assert "Acc PCC" in out and "parse failures apa" in out

    rc = main(["evaluate", "--model", str(tiny_native), "--adapter", str(trained_adapter), "--limit", "3",
               "--output", str(new_out), "--compare", str(base_out), "--no-progress", *SMALL, "eval.batch_size=auto"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "delta" in out
    assert "batch 8, auto: 8 (no GPU" in out  # the choice is printed
    report = (new_out / "report.md").read_text()
    assert "## base vs" in report and "| delta |" in report and "unparseable apa" in report
    meta = json.loads((new_out / "run.json").read_text())
    assert meta["adapter"] == str(trained_adapter / "adapter") and meta["adapter_mode"] == "fresh"
    assert meta["batch_size"] == 8 and meta["batch_size_auto"].startswith("auto: 8")
    new_records = load_predictions(new_out / "predictions.jsonl")
    assert json.loads(json.dumps(compute_all(new_records))) == json.loads((new_out / "results.json").read_text())
    assert [r["raw"] for r in new_records] != [r["raw"] for r in records], "the adapter had no effect"


def test_left_padded_batch_equals_one_at_a_time(loaded) -> None:
    """Batched scores at every step equal unbatched ones (the production path: rows embedded
    alone, decoder batched on left-padded embeddings): padding changes nothing."""
    from phi4mm_lora.data.audio import load_audio

    cfg = load_config(None, ["data.task=apa"])
    examples, _ = build_examples(cfg.data, cfg.prompts, "test", audio_token=loaded.processor.audio_token)
    picked = sorted(examples, key=lambda e: e.duration)[:: max(1, len(examples) // 3)][:3]
    assert len({e.duration for e in picked}) == 3
    audio = {e.id: load_audio(e.audio_path) for e in picked}
    tok = loaded.processor.tokenizer

    def scores(exs: list[Example]) -> torch.Tensor:
        ids, emb, mask = row_embeds(loaded.model, loaded.processor, exs, audio, torch.device("cpu"))
        with torch.no_grad():
            out = loaded.model.generate(input_ids=ids, inputs_embeds=emb, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=stop_ids(tok),
                                        pad_token_id=tok.pad_token_id, output_scores=True,
                                        return_dict_in_generate=True)
        return torch.stack(out.scores, 1)  # [batch, steps, vocab]

    together = scores(picked)
    for i, ex in enumerate(picked):
        alone = scores([ex])[0]
        torch.testing.assert_close(together[i], alone, atol=1e-5, rtol=1e-4)


def test_generate_all_batched_equals_one_at_a_time(tiny_native: Path, trained_adapter: Path) -> None:
    """The answers evaluate records (text, token count, stopped or not) do not depend on the batch
    size: recordings of different lengths, both tasks, batch 8 against batch 1, on the model as
    evaluate loads it (a trained adapter, merged), whose answers differ between recordings."""
    from phi4mm_lora.model.inference import load_for_inference
    from phi4mm_lora.model.run_folder import Run

    cfg = Run.open(trained_adapter).configure(load_config(None, [f"model.path={tiny_native}", "data.task=both"]))
    loaded = load_for_inference(cfg)
    assert loaded.merge.merged
    examples, _ = build_examples(cfg.data, cfg.prompts, "test", audio_token=loaded.processor.audio_token)
    picked = three_lengths_both_tasks(examples)

    def answers(batch_size: int) -> list[tuple[str, int, bool]]:
        gens = generate_all(loaded.model, loaded.processor, picked, batch_size=batch_size, max_new_tokens=8,
                            progress=False)
        return [(g.text, g.n_tokens, g.finished) for g in gens]

    together = answers(8)
    assert len(set(together)) >= 3, "answers must differ for the comparison to mean anything"
    assert together == answers(1)


def test_bad_audio_is_a_recorded_failure(loaded, tmp_path: Path) -> None:
    cfg = load_config(None, ["data.task=both"])
    examples, _ = build_examples(cfg.data, cfg.prompts, "test", audio_token=loaded.processor.audio_token)
    good = examples[:2]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    bad = Example(**{**good[0].to_dict(), "id": "bad:apa", "utt_id": "bad", "audio_path": str(broken)})
    gens = generate_all(loaded.model, loaded.processor, [good[0], bad, good[1]], batch_size=4,
                        max_new_tokens=4, progress=False)
    assert [g.id for g in gens] == [good[0].id, "bad:apa", good[1].id]
    assert gens[1].error and "broken.wav" in gens[1].error
    assert gens[0].error is None and gens[0].n_tokens > 0
    rec = build_record(bad, gens[1])
    assert rec["parsed"] is None and "broken.wav" in rec["parse_error"]
    assert compute_all([rec])["parse_failure_counts"] == {"apa": 1}


def test_task_budgets() -> None:
    assert max_tokens_for("apa", 128) == 40 and max_tokens_for("mdd", 128) == 120
    assert max_tokens_for("mdd", 16) == 16 and max_tokens_for("manifest", 64) == 64


def test_epoch_evaluator(loaded, tmp_path: Path) -> None:
    cfg = load_config(None, [f"output_dir={tmp_path}", "eval.subset=2", *SMALL])
    evaluator = make_epoch_evaluator(cfg)
    first = evaluator(loaded.model, loaded.processor, 1)
    for key in ("total_pcc", "per", "wer", "f1", "parse_failures", "parse_failures_apa", "parse_failures_mdd"):
        assert key in first
    assert first["parse_failures"] == first["parse_failures_apa"] + first["parse_failures_mdd"]
    assert (tmp_path / "eval" / "epoch-1" / "results.json").is_file()
    second = evaluator(loaded.model, loaded.processor, 2)
    assert second == first  # same model, same fixed subset, greedy
    assert "epoch 1 vs epoch 2" in (tmp_path / "eval" / "epoch-2" / "report.md").read_text()
    ids = {json.loads(line)["id"] for line in (tmp_path / "eval" / "epoch-1" / "predictions.jsonl").open()}
    assert len(ids) == 2
    exs = evaluator.examples(loaded.processor.audio_token)
    assert subset_utterances(exs, 2, cfg.seed) == exs


def test_evaluate_bad_adapter_and_compare(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--adapter", str(tmp_path / "empty"), "--limit", "1"]) == 2
    assert "not an adapter" in capsys.readouterr().err
    assert main(["evaluate", "--compare", str(tmp_path / "nothing.json"), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and len(err.strip().splitlines()) == 1


def test_training_run_with_epoch_eval_then_evaluate(tmp_path: Path, tiny_native: Path, capsys) -> None:
    """The trainer's contract: evaluate_fn after the epoch is logged; the run folder evaluates."""
    from phi4mm_lora.train.finetune import train

    run = tmp_path / "run"
    cfg = load_config(None, [f"model.path={tiny_native}", f"output_dir={run}", "data.limit=2", "train.epochs=1",
                             "train.batch_size=2", "train.grad_accum=1", "train.lr=1e-3", "eval.subset=2",
                             "adapter.mode=fresh", "adapter.r=4", "train.gradient_checkpointing=false", *SMALL])
    result = train(cfg, evaluate_fn=make_epoch_evaluator(cfg), progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("type") == "eval"]
    assert len(evals) == 1 and evals[0]["parse_failures"] == 4 and "total_pcc" in evals[0]
    # what evaluation cost, against the training around it (issue 11: at most 10% of an epoch)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_s"] == evals[0]["seconds"] > 0 and summary == json.loads(json.dumps(result.summary))
    train_s = summary["eval_s"] / summary["eval_share"]
    assert 0 < train_s < summary["wall_s"]
    assert (run / "eval" / "epoch-1" / "report.md").is_file()
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(tiny_native), "--adapter", str(run), "--limit", "2",
                 "--output", str(out), "--no-progress", *SMALL]) == 0
    meta = json.loads((out / "run.json").read_text())
    assert meta["adapter"] == str(run / "adapter") and meta["adapter_mode"] == "fresh"
    capsys.readouterr()


def test_evaluate_manifest_task_reports_cer_and_bleu_for_its_language(tmp_path: Path, tiny_native: Path, capsys) -> None:
    """A manifest (speech translation into Chinese) goes through the same evaluate command:
    the language on each line selects CER and sacrebleu's zh tokenizer, and results.json is
    exactly what compute_all gives on the saved predictions."""
    import shutil

    from phi4mm_lora.data.examples import bundled_corpus_path

    wavs = sorted((bundled_corpus_path() / "WAVE").rglob("*.flac"))[:3]
    lines = []
    for i, w in enumerate(wavs):
        shutil.copy(w, tmp_path / f"a{i}.flac")
        lines.append(json.dumps({"id": f"u{i}", "split": "test", "audio": f"a{i}.flac", "language": "zh",
                                 "prompt": "Translate the speech into Chinese.", "answer": "我喜欢读书"}))
    manifest = tmp_path / "st.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_native), "--split", "test", "--output", str(out), "--no-progress",
                 "data.source=manifest", f"data.path={manifest}", "eval.max_new_tokens=6"]) == 0
    preds = load_predictions(out / "predictions.jsonl")
    assert len(preds) == 3 and {p["task"] for p in preds} == {"manifest"}
    assert all(p["language"] == "zh" and p["reference"] == {"text": "我喜欢读书"} for p in preds)
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(compute_all(preds)))
    m = results["manifest"]
    assert "cer" in m and m["bleu"]["tokenizer"] == "zh"


def test_evaluate_reads_the_data_once_and_writes_the_report_once(loaded, tiny_native: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """One read of the dataset (the MDD references come with the examples), one write of report.md
    holding the run section (the real reader and writer, counted)."""
    import phi4mm_lora.data.examples as examples_mod
    import phi4mm_lora.data.speechocean as speechocean
    from phi4mm_lora.evaluate.run import evaluate

    reads, writes = [], []
    real_read, real_write = speechocean.read_speechocean, Path.write_text
    for mod in (speechocean, examples_mod):
        monkeypatch.setattr(mod, "read_speechocean", lambda *a, **kw: reads.append(a) or real_read(*a, **kw))

    def write_text(self, data, *a, **kw):
        writes.append((self.name, data))
        return real_write(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)
    cfg = load_config(None, [f"model.path={tiny_native}", *SMALL])
    out = tmp_path / "eval"
    evaluate(cfg, loaded=loaded, limit=1, output_dir=out, progress=False)
    assert len(reads) == 1
    [written] = [data for name, data in writes if name == "report.md"]
    report = (out / "report.md").read_text()
    assert written == report  # nothing appended afterwards
    assert report.count("## Run") == 1 and "- generation:" in report and report.endswith("\n")
    [mdd] = [r for r in load_predictions(out / "predictions.jsonl") if r["task"] == "mdd"]
    assert mdd["canonical_phones"] and len(mdd["annotated_at"]) == len(mdd["canonical_phones"].split())
    assert mdd["reference"]["accuracy"] is not None
