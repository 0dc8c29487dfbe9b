"""Collecting bad records instead of dying on them.

A long training run must never stop at sample 40,000 because one file is truncated, and it
must never drop that sample silently either. Every reader in this package appends what it
could not use to a :class:`DataReport`; the run goes on with the good records and the report
is printed (counts per kind plus the first few offending ids). With ``strict=True`` the same
report becomes a :class:`UserError` listing them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from phi4mm_lora.errors import UserError

#: How many offending records a summary names per kind of problem.
SHOW_FIRST = 5


@dataclass(frozen=True)
class Problem:
    """One record that was skipped: what kind of problem, which record, and details."""

    kind: str
    item: str
    detail: str

    def __str__(self) -> str:
        return f"{self.item}: {self.detail}"


@dataclass
class DataReport:
    """What happened while turning a data source into examples for one split."""

    source: str = ""
    split: str = ""
    n_utterances: int = 0
    n_examples: int = 0
    problems: list[Problem] = field(default_factory=list)

    def add(self, kind: str, item: str, detail: str) -> None:
        """Record a skipped record; ``kind`` groups problems in the summary (e.g. ``audio``)."""
        self.problems.append(Problem(kind, item, detail))

    def extend(self, other: DataReport) -> None:
        self.problems.extend(other.problems)

    @property
    def n_problems(self) -> int:
        return len(self.problems)

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def summary(self, show_first: int = SHOW_FIRST) -> str:
        """Human-readable, multi-line: always says how many examples were used."""
        head = f"data {self.source or '?'} split={self.split or '?'}: "
        head += f"{self.n_examples} examples used from {self.n_utterances} records"
        if not self.problems:
            return head + ", no problems found"
        lines = [head + f", {self.n_problems} record(s) skipped:"]
        by_kind: dict[str, list[Problem]] = {}
        for p in self.problems:
            by_kind.setdefault(p.kind, []).append(p)
        for kind, items in by_kind.items():
            lines.append(f"  {kind}: {len(items)}")
            for p in items[:show_first]:
                lines.append(f"    - {p}")
            if len(items) > show_first:
                lines.append(f"    ... and {len(items) - show_first} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict:
        """JSON-ready form, for writing next to a run's outputs."""
        return {
            "source": self.source, "split": self.split, "n_utterances": self.n_utterances,
            "n_examples": self.n_examples, "counts": self.counts(),
            "problems": [{"kind": p.kind, "item": p.item, "detail": p.detail} for p in self.problems],
        }

    def raise_if_strict(self, strict: bool) -> None:
        """In strict mode any problem is fatal; the error lists them so all can be fixed at once."""
        if strict and self.problems:
            raise UserError(
                self.summary(show_first=20)
                + "\nstrict mode: fix or remove these records, or set data.strict=false to skip them"
            )
