"""Model-independent evaluation: parse answers, compute the paper's metrics, write reports.

Nothing here loads a model: the evaluate command saves prediction records (see
:mod:`phi4mm_lora.evaluate.metrics` for the format) and :func:`compute_all` turns them into
results, so a results.json can always be recomputed from predictions.jsonl.
"""

from phi4mm_lora.evaluate.align import (
    PronunciationReport,
    feedback_from_answer,
    find_mispronunciations,
    render_report,
)
from phi4mm_lora.evaluate.mdd import MDDCounts, align_sequences, mdd_scores, normalize_phones, score_utterance
from phi4mm_lora.evaluate.metrics import (
    SUMMARY_KEYS,
    apa_metrics,
    bleu,
    cer,
    compute_all,
    exact_match,
    manifest_metrics,
    mdd_metrics,
    pcc,
    per,
    wer,
)
from phi4mm_lora.evaluate.parse import ParseResult, parse_apa, parse_for_task, parse_mdd, parse_text
from phi4mm_lora.evaluate.report import (
    PAPER_REFERENCE,
    load_predictions,
    load_results,
    render_table,
    save_predictions,
    write_report,
)

__all__ = [
    "PAPER_REFERENCE",
    "PronunciationReport",
    "feedback_from_answer",
    "find_mispronunciations",
    "load_predictions",
    "load_results",
    "render_report",
    "render_table",
    "save_predictions",
    "write_report",
    "MDDCounts",
    "ParseResult",
    "SUMMARY_KEYS",
    "align_sequences",
    "apa_metrics",
    "bleu",
    "cer",
    "compute_all",
    "exact_match",
    "manifest_metrics",
    "mdd_metrics",
    "mdd_scores",
    "normalize_phones",
    "parse_apa",
    "parse_for_task",
    "parse_mdd",
    "parse_text",
    "pcc",
    "per",
    "score_utterance",
    "wer",
]
