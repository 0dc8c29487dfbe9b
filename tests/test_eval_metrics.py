"""Metrics equal the reference libraries' values, and compute_all recomputes them from records."""

from __future__ import annotations

import json
import math
import random

import jiwer
import pytest
import sacrebleu
from scipy import stats

from phi4mm_lora.evaluate.mdd import mdd_scores
from phi4mm_lora.evaluate.metrics import (
    SUMMARY_KEYS,
    apa_metrics,
    bleu,
    bleu_tokenizer,
    cer,
    compute_all,
    exact_match,
    manifest_metrics,
    mdd_metrics,
    normalize_text,
    pcc,
    per,
    utterance_per,
    wer,
)

VOCAB = "the a cat dog sat on mat ran fast slow big red green house tree sun moon".split()
PHONES = "AA AE AH AO B CH D DH EH ER F G HH IH IY K L M N OW P R S SH T TH UW V W Z".split()


def _edit(rng: random.Random, seq: list[str], pool: list[str], n: int) -> list[str]:
    """Apply n random substitutions, deletions and insertions."""
    out = list(seq)
    for _ in range(n):
        op = rng.choice("sdi")
        if op == "s" and out:
            out[rng.randrange(len(out))] = rng.choice(pool)
        elif op == "d" and out:
            del out[rng.randrange(len(out))]
        else:
            out.insert(rng.randrange(len(out) + 1), rng.choice(pool))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_wer_equals_jiwer(seed: int) -> None:
    rng = random.Random(seed)
    refs, hyps = [], []
    for _ in range(rng.randint(1, 30)):
        ref = [rng.choice(VOCAB) for _ in range(rng.randint(1, 10))]
        refs.append(" ".join(ref))
        hyps.append(" ".join(_edit(rng, ref, VOCAB, rng.randint(0, 5))))
    out = wer(refs, hyps)
    assert out["wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert out["n"] == len(refs)
    assert out["n_ref_tokens"] == sum(len(r.split()) for r in refs)
    # case and punctuation do not count as errors
    decorated = [h.capitalize() + "." if h else h for h in hyps]
    assert wer(refs, decorated)["wer"] == pytest.approx(out["wer"], abs=1e-12)


def test_wer_normalisation_and_empty_hypothesis() -> None:
    assert normalize_text("Don't STOP, it's 'fine'!") == "don't stop it's fine"
    # None (unparseable) = empty hypothesis = all deletions
    out = wer(["the cat sat", "a dog"], ["the cat sat", None])
    assert out["wer"] == pytest.approx(2 / 5) and out["deletions"] == 2
    assert math.isnan(wer([""], ["x"])["wer"])


@pytest.mark.parametrize("seed", range(6))
def test_per_equals_jiwer_on_stress_stripped_phones(seed: int) -> None:
    rng = random.Random(100 + seed)
    refs, hyps, refs_plain, hyps_plain = [], [], [], []
    for _ in range(rng.randint(1, 30)):
        ref = [rng.choice(PHONES) for _ in range(rng.randint(1, 15))]
        hyp = _edit(rng, ref, PHONES, rng.randint(0, 6))
        # add stress digits to vowels in both; they must not matter
        refs.append(" ".join(p + str(rng.randint(0, 2)) if p[0] in "AEIOU" else p for p in ref))
        hyps.append(" ".join((p + str(rng.randint(0, 2)) if p[0] in "AEIOU" else p).lower() for p in hyp))
        refs_plain.append(" ".join(ref))
        hyps_plain.append(" ".join(hyp))
    out = per(refs, hyps)
    assert out["per"] == pytest.approx(jiwer.wer(refs_plain, hyps_plain), abs=1e-12)
    assert out["n_ref_tokens"] == sum(len(r.split()) for r in refs_plain)
    assert utterance_per(refs[0], hyps[0]) == pytest.approx(jiwer.wer(refs_plain[0], hyps_plain[0]))


@pytest.mark.parametrize("seed", range(5))
def test_pcc_equals_scipy(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(3, 200)
    ref = [rng.randint(0, 10) for _ in range(n)]
    pred = [min(10, max(0, r + rng.randint(-3, 3))) for r in ref]
    if len(set(pred)) == 1 or len(set(ref)) == 1:
        pred[0], ref[0] = 0, 10  # keep it defined
    expected = stats.pearsonr(pred, ref)
    out = pcc(pred, ref)
    assert out["pcc"] == pytest.approx(expected.statistic, abs=1e-12)
    assert out["p_value"] == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
    assert out["n"] == n


def test_pcc_undefined_cases() -> None:
    out = pcc([5, 5, 5], [1, 2, 3])
    assert math.isnan(out["pcc"]) and "constant predictions" in out["note"] and out["n"] == 3
    out = pcc([1, 2, 3], [7, 7, 7])
    assert math.isnan(out["pcc"]) and "constant references" in out["note"]
    assert math.isnan(pcc([1], [2])["pcc"])
    with pytest.raises(ValueError):
        pcc([1, 2], [1])


def test_cer_equals_jiwer_without_spaces() -> None:
    refs = ["我 喜欢 猫。", "今天天气很好"]
    hyps = ["我喜欢狗", "今天 天气 好"]
    expected = jiwer.cer(["我喜欢猫", "今天天气很好"], ["我喜欢狗", "今天天气好"])
    assert cer(refs, hyps)["cer"] == pytest.approx(expected)


def test_bleu_tokenizers_and_value() -> None:
    assert bleu_tokenizer("zh") == "zh"
    assert bleu_tokenizer("en") == "13a"
    assert bleu_tokenizer(None) == "13a"
    for lang in ("ja", "ko"):
        try:
            sacrebleu.BLEU(tokenize=f"{lang}-mecab").corpus_score(["a"], [["a"]])
            expected = f"{lang}-mecab"
        except Exception:
            expected = "char"
        assert bleu_tokenizer(lang) == expected
    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    hyps = ["the cat sat on a mat", "a fast brown fox jumps"]
    out = bleu(refs, hyps, "en")
    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score)
    zh = bleu(["我喜欢猫"], ["我喜欢狗"], "zh")
    assert zh["tokenizer"] == "zh"
    assert zh["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(["我喜欢狗"], [["我喜欢猫"]], tokenize="zh").score
    )


def test_exact_match_and_manifest_metrics() -> None:
    assert exact_match(["Hello, world!", "b"], ["hello world", "c"])["exact_match"] == 0.5
    out = manifest_metrics(["Hello world", None], ["hello world", "good night"], "en")
    assert out["wer"]["wer"] == pytest.approx(2 / 4)
    assert out["exact_match"]["exact_match"] == 0.5
    assert out["n_parsed"] == 1
    zh = manifest_metrics(["我喜欢狗"], ["我喜欢猫"], "zh")
    assert "cer" in zh and "wer" not in zh and zh["cer"]["cer"] == pytest.approx(0.25)


# ----------------------------------------------------------------------------- compute_all


def _records(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs: list[dict] = []
    for u in range(40):
        uid = f"utt{u:03d}"
        ref = {k: rng.randint(3, 10) for k in ("accuracy", "fluency", "prosodic", "total")}
        pred = {k: min(10, max(0, v + rng.randint(-2, 2))) for k, v in ref.items()}
        raw = json.dumps(pred) + "<|end|>"
        rec = {"id": uid, "task": "apa", "raw": raw, "parsed": pred, "reference": ref}
        if u % 10 == 3:  # unparseable answer
            rec.update(raw="I cannot listen to audio.", parsed=None)
        if u % 10 == 7:  # no "parsed" key: compute_all parses raw itself
            del rec["parsed"]
        recs.append(rec)

        can = [rng.choice(PHONES) for _ in range(rng.randint(3, 10))]
        ann = [p if rng.random() > 0.2 else rng.choice(PHONES) for p in can]
        hyp = _edit(rng, ann, PHONES, rng.randint(0, 3))
        words = [rng.choice(VOCAB) for _ in range(4)]
        hyp_words = _edit(rng, words, VOCAB, rng.randint(0, 2))
        value = {"word_transcript": " ".join(hyp_words), "phoneme_transcript": " ".join(hyp)}
        rec = {
            "id": uid,
            "task": "mdd",
            "raw": json.dumps(value),
            "parsed": value,
            "reference": {"word_transcript": " ".join(words), "phoneme_transcript": " ".join(ann)},
            "canonical_phones": " ".join(can),
            "annotated_phones": " ".join(ann),
        }
        if u % 10 == 5:
            rec.update(raw='{"word_transcript": "oops"', parsed=None)
        recs.append(rec)
    recs.append(
        {
            "id": "m1",
            "task": "asr_zh",
            "raw": "我喜欢狗<|end|>",
            "reference": {"text": "我喜欢猫"},
            "language": "zh",
        }
    )
    recs.append(
        {
            "id": "m2",
            "task": "asr_zh",
            "raw": "今天天气好",
            "reference": {"text": "今天天气很好"},
            "language": "zh",
        }
    )
    return recs


def test_compute_all_recomputes_separately_computed_metrics() -> None:
    recs = _records()
    res = compute_all(recs)
    json.dumps(res, allow_nan=False)  # strict JSON

    apa = [r for r in recs if r["task"] == "apa"]
    # parse the record without "parsed" the way the evaluate command would have
    preds = [r["parsed"] if "parsed" in r else json.loads(r["raw"].split("<|end|>")[0]) for r in apa]
    kept = [(p, r["reference"]) for p, r in zip(preds, apa, strict=True) if p is not None]
    assert len(kept) == 36
    for key, short in (("accuracy", "acc"), ("fluency", "flu"), ("prosodic", "pros"), ("total", "total")):
        r = stats.pearsonr([p[key] for p, _ in kept], [h[key] for _, h in kept])
        assert res["summary"][f"{short}_pcc"] == pytest.approx(r.statistic, abs=1e-12)
        assert res["apa"][key]["p_value"] == pytest.approx(r.pvalue, rel=1e-9)
        assert res["apa"][key]["n"] == 36
    assert res["apa"] == apa_metrics(preds, [r["reference"] for r in apa])

    mdd = [r for r in recs if r["task"] == "mdd"]
    hyp_w = [r["parsed"]["word_transcript"] if r["parsed"] else "" for r in mdd]
    hyp_p = [r["parsed"]["phoneme_transcript"] if r["parsed"] else "" for r in mdd]
    assert res["summary"]["wer"] == pytest.approx(
        jiwer.wer([r["reference"]["word_transcript"] for r in mdd], hyp_w)
    )
    assert res["summary"]["per"] == pytest.approx(
        jiwer.wer([r["reference"]["phoneme_transcript"] for r in mdd], hyp_p)
    )
    # headline MDD: all utterances, an unparseable answer (None) a total failure
    m = mdd_scores(
        [(r["canonical_phones"], r["annotated_phones"], h if r["parsed"] else None)
         for r, h in zip(mdd, hyp_p, strict=True)]
    )
    for k in ("f1", "precision", "recall"):
        assert res["summary"][k] == pytest.approx(m[k])
    direct = mdd_metrics(
        [r["parsed"] for r in mdd],
        [r["reference"] for r in mdd],
        [r["canonical_phones"] for r in mdd],
        [r["annotated_phones"] for r in mdd],
    )
    assert res["mdd"]["mdd"]["counts"] == direct["mdd"]["counts"]

    # Table 3 order, p-values and n
    assert list(res["summary"]) == list(SUMMARY_KEYS)
    assert [c["column"] for c in res["columns"]] == [
        "Acc PCC",
        "Flu PCC",
        "Pros PCC",
        "Total PCC",
        "WER",
        "PER",
        "F1",
        "P",
        "R",
    ]
    assert res["columns"][0]["n"] == 36 and res["columns"][0]["p_value"] is not None
    assert res["columns"][4]["n"] == 40

    # failures counted and listed with id and raw text
    assert res["parse_failure_counts"] == {"apa": 4, "mdd": 4, "asr_zh": 0}
    items = res["parse_failures"]["apa"]["items"]
    assert [i["id"] for i in items] == ["utt003", "utt013", "utt023", "utt033"]
    assert items[0]["raw"] == "I cannot listen to audio." and "no '{'" in items[0]["error"]
    assert res["parse_failures"]["mdd"]["total"] == 40

    # a free-text task is scored by CER (Chinese) with the zh BLEU tokenizer
    assert res["asr_zh"]["cer"]["cer"] == pytest.approx(
        jiwer.cer(["我喜欢猫", "今天天气很好"], ["我喜欢狗", "今天天气好"])
    )
    assert res["asr_zh"]["bleu"]["tokenizer"] == "zh"


def test_compute_all_reparse_and_missing_tasks() -> None:
    recs = [r for r in _records(1) if r["task"] == "apa"]
    res = compute_all(recs, reparse=True)
    assert res["summary"]["wer"] is None and "mdd" not in res
    assert res["parse_failure_counts"] == {"apa": 4}
    assert compute_all([])["summary"] == dict.fromkeys(SUMMARY_KEYS)


def test_language_codes_with_region() -> None:
    assert "cer" in manifest_metrics(["我"], ["我"], "zh_CN") and bleu_tokenizer("zh-TW") == "zh"


def test_all_unparseable_scores_zero_and_reports_parse_rate(tmp_path) -> None:
    """A model that never answers gets headline F1 0 (not the recall 1 of an empty transcript)."""
    from phi4mm_lora.evaluate.report import write_report

    recs = [r for r in _records(2) if r["task"] in ("apa", "mdd")]
    for r in recs:
        r.update(raw="I cannot listen to audio.", parsed=None)
    res = compute_all(recs)
    assert res["summary"]["f1"] == 0.0 and res["summary"]["precision"] == 0.0 and res["summary"]["recall"] == 0.0
    assert res["summary"]["wer"] == 1.0 and res["summary"]["per"] == 1.0
    assert res["parse_rate"] == {"apa": 0.0, "mdd": 0.0}
    assert res["mdd"]["parsed_only"]["n"] == 0
    assert res["columns"][0]["n"] == 0 and res["columns"][0]["n_left_out"] == 40
    report = write_report(res, recs, tmp_path)["report"].read_text()
    table = report.split("## Results")[1].split("\n\n")[1]
    assert "| MDD answers parsed | 0.000 |" in table and "| APA answers parsed | 0.000 |" in table
    assert "| F1 | 0.000 |" in table
    assert "(40 left out)" in table


def test_parsed_only_figures_are_separate() -> None:
    recs = [r for r in _records(3) if r["task"] == "mdd"]
    res = compute_all(recs)
    mdd = res["mdd"]
    assert mdd["n_parsed"] == 36 and mdd["parse_rate"] == pytest.approx(0.9)
    kept = [r for r in recs if r["parsed"]]
    direct = mdd_scores([(r["canonical_phones"], r["annotated_phones"], r["parsed"]["phoneme_transcript"])
                         for r in kept])
    assert mdd["parsed_only"]["mdd"]["counts"] == direct["counts"]
    assert mdd["parsed_only"]["per"]["per"] == pytest.approx(jiwer.wer(
        [r["reference"]["phoneme_transcript"] for r in kept], [r["parsed"]["phoneme_transcript"] for r in kept]))
    # leaving the failures out can only look better than counting them as total failures
    assert mdd["parsed_only"]["mdd"]["f1"] >= mdd["mdd"]["f1"]
    assert mdd["mdd_insertion_aware"]["definition"] == "insertion-aware"
