"""Choosing test examples (a helper for the tests, not a test module)."""

from __future__ import annotations

from phi4mm_lora.data.examples import Example


def three_lengths_both_tasks(examples: list[Example]) -> list[Example]:
    """Both tasks' examples of three recordings of different lengths (shortest, middle,
    longest-ish): what a batched-equals-alone comparison needs to mean anything (padding)."""
    utts = sorted({(e.duration, e.utt_id) for e in examples})
    chosen = {u for _, u in utts[:: max(1, len(utts) // 3)][:3]}
    picked = [e for e in examples if e.utt_id in chosen]
    assert len({e.task for e in picked}) == 2 and len({e.duration for e in picked}) == 3
    return picked
