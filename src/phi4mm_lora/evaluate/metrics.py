"""The paper's metrics, computed from saved prediction records.

Everything here works on plain Python data so a results.json can be recomputed from the
saved predictions without the model. Library choices are deliberate: Pearson's r and its
p-value come from ``scipy.stats.pearsonr`` and WER/PER/CER from ``jiwer``, so numbers equal
what anyone else computing "the same metric" with those libraries gets; BLEU from
``sacrebleu`` with the tokenizer that suits the target language.

Prediction record (one per utterance and task; the evaluate command writes these as
predictions.jsonl)::

    {
      "id": "000010011",               # utterance id (same id for its apa and mdd records)
      "task": "apa" | "mdd" | <manifest task name>,
      "raw": "<model answer as generated>",
      "parsed": {...} | None,          # parse_for_task(task, raw).value; None = unparseable
      "reference": {...},              # apa: accuracy/fluency/prosodic/total ints
                                       # mdd: word_transcript, phoneme_transcript (annotated)
                                       #      (+ optional "accuracy" for the PER plot)
                                       # other: {"text": target text}
      "canonical_phones": "DH AH ...", # mdd only (str or list)
      "annotated_phones": "DH AH ...", # mdd only; defaults to reference phoneme_transcript
      "language": "en",                # manifest tasks: target language code (CER/BLEU)
      "parse_error": "..."             # optional: why parsed is None (else re-derived from raw)
    }

Unparseable answers never improve a score (``docs/metrics.md``). The headline figures are
over **all** utterances: an unparseable MDD answer is a total failure - for WER/PER every
reference word/phone is an error (scored as an empty hypothesis: N errors out of N), for
MDD every judgement is wrong (mispronounced phones missed, correct ones rejected: see
:mod:`phi4mm_lora.evaluate.mdd`). The parse rate sits next to them, and the same figures
over the parsed answers only are reported separately (``parsed_only``), labelled as such.
APA PCC can only use parsed answers: its ``n`` and ``n_left_out`` say how many were
scored and how many were left out. Manifest answers that fail score as empty text. All
failures are counted and listed per task.
"""

from __future__ import annotations

import math
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import jiwer
from scipy import stats

from phi4mm_lora.evaluate.mdd import mdd_scores, normalize_phones
from phi4mm_lora.evaluate.parse import APA_KEYS, parse_for_task

#: Languages scored by characters (no word spaces) instead of words.
CHAR_LANGUAGES: frozenset[str] = frozenset({"zh", "ja", "ko", "th", "yue", "cmn"})

#: Paper column order for the summary block.
SUMMARY_KEYS: tuple[str, ...] = (
    "acc_pcc",
    "flu_pcc",
    "pros_pcc",
    "total_pcc",
    "wer",
    "per",
    "f1",
    "precision",
    "recall",
)
_APA_SHORT = {"accuracy": "acc", "fluency": "flu", "prosodic": "pros", "total": "total"}


# ----------------------------------------------------------------------------- PCC


def pcc(pred: Sequence[float], ref: Sequence[float]) -> dict[str, Any]:
    """Pearson's r with its two-sided p-value and n; NaN with a note where undefined."""
    n = len(pred)
    if n != len(ref):
        raise ValueError(f"pcc: {n} predictions vs {len(ref)} references")
    if n < 2:
        return {"pcc": math.nan, "p_value": math.nan, "n": n, "note": f"n={n}: need at least 2 pairs"}
    if len(set(pred)) == 1 or len(set(ref)) == 1:
        which = "predictions" if len(set(pred)) == 1 else "references"
        return {"pcc": math.nan, "p_value": math.nan, "n": n, "note": f"constant {which}: r undefined"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.pearsonr([float(x) for x in pred], [float(x) for x in ref])
    return {"pcc": float(res.statistic), "p_value": float(res.pvalue), "n": n}


# ----------------------------------------------------------------------------- text


def normalize_text(text: str | None) -> str:
    """Lower-case, punctuation removed (apostrophes inside words kept), spaces collapsed."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s']", " ", text)
    words = [w.strip("'") for w in text.split()]
    return " ".join(w for w in words if w)


def _error_rate(refs: Sequence[str], hyps: Sequence[str], unit: str) -> dict[str, Any]:
    """(S+D+I)/N via jiwer over already-normalised, space-separated token strings."""
    n_ref = sum(len(r.split()) for r in refs)
    if not refs or n_ref == 0:
        return {unit: math.nan, "n": len(refs), "n_ref_tokens": n_ref, "note": "no reference tokens"}
    out = jiwer.process_words(list(refs), list(hyps))
    return {
        unit: float(out.wer),
        "n": len(refs),
        "n_ref_tokens": n_ref,
        "substitutions": out.substitutions,
        "deletions": out.deletions,
        "insertions": out.insertions,
        "hits": out.hits,
    }


def wer(refs: Sequence[str], hyps: Sequence[str | None]) -> dict[str, Any]:
    """Corpus WER: errors summed over utterances / reference words (``None`` hyp = empty)."""
    return _error_rate([normalize_text(r) for r in refs], [normalize_text(h) for h in hyps], "wer")


def per(refs: Sequence[Any], hyps: Sequence[Any]) -> dict[str, Any]:
    """Corpus PER over ARPAbet tokens (stress stripped, upper-cased; ``None`` hyp = empty)."""
    return _error_rate(
        [" ".join(normalize_phones(r)) for r in refs], [" ".join(normalize_phones(h)) for h in hyps], "per"
    )


def utterance_per(ref: Any, hyp: Any) -> float:
    """PER of one utterance (for the PER-vs-accuracy plot); NaN for an empty reference."""
    r = " ".join(normalize_phones(ref))
    if not r:
        return math.nan
    return float(jiwer.wer(r, " ".join(normalize_phones(hyp))))


def _char_string(text: str | None) -> str:
    """Characters as space-separated tokens (whitespace dropped) for CER."""
    return " ".join(c for c in normalize_text(text) if not c.isspace())


def cer(refs: Sequence[str], hyps: Sequence[str | None]) -> dict[str, Any]:
    """Corpus CER over characters without spaces (CJK and other unspaced scripts).

    Characters are fed to jiwer as tokens so the result equals ``jiwer.cer`` on the
    space-free strings.
    """
    return _error_rate([_char_string(r) for r in refs], [_char_string(h) for h in hyps], "cer")


@cache
def bleu_tokenizer(language: str | None) -> str:
    """sacrebleu tokenizer for a target language.

    zh -> 'zh'; ja/ko -> 'ja-mecab'/'ko-mecab' when their optional packages are installed
    (``pip install sacrebleu[ja]`` / ``[ko]``), else 'char' (character BLEU; needs nothing
    extra); everything else -> the standard '13a'.
    """
    lang = (language or "").lower().replace("_", "-").split("-")[0]
    if lang in ("zh", "cmn", "yue"):
        return "zh"
    if lang in ("ja", "ko"):
        import sacrebleu

        name = f"{lang}-mecab"
        try:
            sacrebleu.BLEU(tokenize=name).corpus_score(["a"], [["a"]])
            return name
        except Exception:  # missing mecab extras raise RuntimeError/ImportError
            return "char"
    if lang in ("th",):
        return "char"
    return "13a"


def bleu(refs: Sequence[str], hyps: Sequence[str | None], language: str | None) -> dict[str, Any]:
    """Corpus BLEU (0-100) with sacrebleu; the tokenizer used is reported."""
    import sacrebleu

    tok = bleu_tokenizer(language)
    if not refs:
        return {"bleu": math.nan, "tokenizer": tok, "n": 0}
    score = sacrebleu.BLEU(tokenize=tok).corpus_score([h or "" for h in hyps], [list(refs)])
    return {"bleu": float(score.score), "tokenizer": tok, "n": len(refs)}


def exact_match(refs: Sequence[str], hyps: Sequence[str | None]) -> dict[str, Any]:
    """Share of answers equal to the reference after :func:`normalize_text`."""
    if not refs:
        return {"exact_match": math.nan, "n": 0}
    hits = sum(normalize_text(r) == normalize_text(h) for r, h in zip(refs, hyps, strict=True))
    return {"exact_match": hits / len(refs), "n": len(refs)}


# ----------------------------------------------------------------------------- per task


def apa_metrics(preds: Sequence[dict[str, Any] | None], refs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """PCC per aspect over the parsed answers; each aspect reports ``n`` and ``n_left_out``."""
    pairs = [(p, r) for p, r in zip(preds, refs, strict=True) if p is not None]
    out: dict[str, Any] = {}
    for key in APA_KEYS:
        usable = [(p[key], r[key]) for p, r in pairs if key in p and r.get(key) is not None]
        out[key] = pcc([u[0] for u in usable], [u[1] for u in usable])
        out[key]["n_left_out"] = sum(r.get(key) is not None for r in refs) - len(usable)
    out["n_total"] = len(refs)
    out["n_parsed"] = len(pairs)
    out["parse_rate"] = len(pairs) / len(refs) if refs else math.nan
    return out


def _transcript_metrics(preds: Sequence[dict[str, Any] | None], refs: Sequence[dict[str, Any]],
                        mdd_items: Sequence[tuple[Any, ...]] | None) -> dict[str, Any]:
    """WER, PER and both MDD variants of one set of utterances (``None`` = unparseable)."""
    hyp_words = [p.get("word_transcript", "") if p else "" for p in preds]
    hyp_phones = [p.get("phoneme_transcript", "") if p else "" for p in preds]
    out: dict[str, Any] = {
        "wer": wer([r.get("word_transcript", "") for r in refs], hyp_words),
        "per": per([r.get("phoneme_transcript", "") for r in refs], hyp_phones),
    }
    if mdd_items is not None:
        out["mdd"] = mdd_scores(mdd_items)
        out["mdd_insertion_aware"] = mdd_scores(mdd_items, count_insertions=True)
    return out


def mdd_metrics(
    preds: Sequence[dict[str, Any] | None],
    refs: Sequence[dict[str, Any]],
    canonical: Sequence[Any] | None = None,
    annotated: Sequence[Any] | None = None,
    annotated_at: Sequence[Sequence[str] | None] | None = None,
) -> dict[str, Any]:
    """WER, PER and (with canonical phones) MDD precision/recall/F1, headline and parsed-only.

    Headline (top-level keys): all utterances, an unparseable answer (``None``) a total
    failure. ``parsed_only``: the same figures over the parsed answers alone. ``mdd`` is
    the standard definition, ``mdd_insertion_aware`` the variant that also scores
    insertions. ``annotated`` defaults to the references' phoneme transcripts;
    ``annotated_at`` (per canonical phone, from the dataset's indices) is used where
    given. Utterances without canonical phones are left out of MDD only.
    """
    if annotated is None:
        annotated = [r.get("phoneme_transcript", "") for r in refs]
    if annotated_at is None:
        annotated_at = [None] * len(refs)
    hyp_phones = [p.get("phoneme_transcript", "") if p else None for p in preds]
    items = None
    if canonical is not None:
        items = [(c, a, h, at) for c, a, h, at in zip(canonical, annotated, hyp_phones, annotated_at, strict=True)
                 if c is not None]
    out = _transcript_metrics(preds, refs, items)
    if items is not None:
        used = [at is not None for c, at in zip(canonical or [], annotated_at, strict=True) if c is not None]
        out["annotation"] = ("dataset indices" if used and all(used) else
                             "aligned" if not any(used) else "dataset indices where given, else aligned")
    keep = [i for i, p in enumerate(preds) if p is not None]
    parsed_items = None
    if canonical is not None:
        parsed_items = [(canonical[i], annotated[i], hyp_phones[i], annotated_at[i])
                        for i in keep if canonical[i] is not None]
    out["parsed_only"] = {**_transcript_metrics([preds[i] for i in keep], [refs[i] for i in keep], parsed_items),
                          "n": len(keep)}
    out["n_total"] = len(refs)
    out["n_parsed"] = len(keep)
    out["parse_rate"] = len(keep) / len(refs) if refs else math.nan
    return out


def manifest_metrics(
    preds: Sequence[str | None], refs: Sequence[str], language: str | None = None
) -> dict[str, Any]:
    """Free-text task: WER (or CER for unspaced scripts), BLEU and exact match."""
    lang = (language or "").lower().replace("_", "-").split("-")[0]
    out: dict[str, Any] = {"language": language}
    if lang in CHAR_LANGUAGES:
        out["cer"] = cer(refs, preds)
    else:
        out["wer"] = wer(refs, preds)
    out["bleu"] = bleu(refs, preds, language)
    out["exact_match"] = exact_match(refs, preds)
    out["n_total"] = len(refs)
    out["n_parsed"] = sum(p is not None for p in preds)
    return out


# ----------------------------------------------------------------------------- records


def parsed_value(record: dict[str, Any], reparse: bool = False) -> dict[str, Any] | None:
    """The record's parsed answer; parsed from ``raw`` when absent or when ``reparse``."""
    if not reparse and "parsed" in record:
        return record["parsed"]
    res = parse_for_task(record["task"], record.get("raw", ""))
    return res.value if res.ok else None


def _failures(records: Sequence[dict[str, Any]], values: Sequence[Any]) -> dict[str, Any]:
    items = []
    for rec, val in zip(records, values, strict=True):
        if val is None:
            err = rec.get("parse_error")
            if err is None:
                err = (
                    parse_for_task(rec["task"], rec.get("raw")).error or "marked unparseable by the evaluator"
                )
            items.append({"id": rec.get("id"), "raw": rec.get("raw"), "error": err})
    return {"count": len(items), "total": len(records), "items": items}


def json_safe(x: Any) -> Any:
    """NaN -> None recursively, so results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def group_by_task(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(str(rec["task"]), []).append(rec)
    return groups


def compute_all(records: Sequence[dict[str, Any]], reparse: bool = False) -> dict[str, Any]:
    """All metrics from saved prediction records (format in the module docstring).

    Returns ``{"summary": {paper key: value}, "columns": [{key, column, value, p_value, n}]
    in Table 3 order, "parse_failure_counts": {task: n}, "apa": ..., "mdd": ...,
    "<task>": ..., "parse_failures": {task: {"count", "total", "items": [{id, raw,
    error}]}}}`` with NaN written as ``None``.
    """
    groups = group_by_task(records)
    results: dict[str, Any] = {"summary": dict.fromkeys(SUMMARY_KEYS)}
    failures: dict[str, Any] = {}
    for task, recs in groups.items():
        values = [parsed_value(r, reparse) for r in recs]
        failures[task] = _failures(recs, values)
        refs = [r.get("reference") or {} for r in recs]
        if task == "apa":
            results["apa"] = apa_metrics(values, refs)
        elif task == "mdd":
            canonical = [r.get("canonical_phones") for r in recs]
            annotated = [
                r.get("annotated_phones") or (r.get("reference") or {}).get("phoneme_transcript", "")
                for r in recs
            ]
            has_canonical = any(c is not None for c in canonical)
            results["mdd"] = mdd_metrics(values, refs, canonical if has_canonical else None, annotated,
                                         [r.get("annotated_at") for r in recs])
        else:
            langs = sorted({str(r.get("language") or "") for r in recs})
            lang = langs[0] or None if len(langs) == 1 else None
            texts = [v.get("text") if v else None for v in values]
            results[task] = manifest_metrics(texts, [ref.get("text", "") for ref in refs], lang)
            if len(langs) > 1:
                results[task]["note"] = f"mixed languages {langs}: word WER and BLEU tokenizer 13a"
    summary = results["summary"]
    if "apa" in results:
        for key, short in _APA_SHORT.items():
            summary[f"{short}_pcc"] = results["apa"][key]["pcc"]
    if "mdd" in results:
        summary["wer"] = results["mdd"]["wer"]["wer"]
        summary["per"] = results["mdd"]["per"]["per"]
        if "mdd" in results["mdd"]:
            for k in ("f1", "precision", "recall"):
                summary[k] = results["mdd"]["mdd"][k]
    ordered: dict[str, Any] = {
        "summary": summary,
        "columns": _columns(results),
        "parse_rate": {t: (f["total"] - f["count"]) / f["total"] if f["total"] else None
                       for t, f in failures.items()},
        "parse_failure_counts": {t: f["count"] for t, f in failures.items()},
    }
    ordered.update((k, v) for k, v in results.items() if k != "summary")
    ordered["parse_failures"] = failures
    return json_safe(ordered)


#: Display names of the summary keys, in the paper's Table 3 order.
COLUMN_NAMES: dict[str, str] = {
    "acc_pcc": "Acc PCC",
    "flu_pcc": "Flu PCC",
    "pros_pcc": "Pros PCC",
    "total_pcc": "Total PCC",
    "wer": "WER",
    "per": "PER",
    "f1": "F1",
    "precision": "P",
    "recall": "R",
}


def _columns(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 3 columns with value, p-value (PCC only) and n (utterances scored)."""
    rows = []
    apa, mdd = results.get("apa"), results.get("mdd")
    for key in SUMMARY_KEYS:
        row: dict[str, Any] = {"key": key, "column": COLUMN_NAMES[key], "value": results["summary"][key]}
        if key.endswith("_pcc"):
            aspect = next(a for a, s in _APA_SHORT.items() if f"{s}_pcc" == key)
            row["p_value"] = apa[aspect]["p_value"] if apa else None
            row["n"] = apa[aspect]["n"] if apa else 0
            row["n_left_out"] = apa[aspect].get("n_left_out", 0) if apa else 0
            if apa and apa[aspect].get("note"):
                row["note"] = apa[aspect]["note"]
        elif key in ("wer", "per"):
            row["n"] = mdd[key]["n"] if mdd else 0
        else:
            row["n"] = mdd["mdd"]["n_utterances"] if mdd and "mdd" in mdd else 0
        rows.append(row)
    return rows


REQUIRED_KEYS: tuple[str, ...] = ("id", "task", "raw", "reference")


def validate_records(records: Sequence[Any], source: str = "predictions") -> list[str]:
    """Problems that make records unusable (all of them, one line each); empty when fine."""
    problems = []
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            problems.append(f"{source} record {n}: not an object")
            continue
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            problems.append(f"{source} record {n} (id {rec.get('id')!r}): missing {', '.join(missing)}")
        elif not isinstance(rec["reference"], dict):
            problems.append(f"{source} record {n} (id {rec.get('id')!r}): 'reference' must be an object")
    return problems
