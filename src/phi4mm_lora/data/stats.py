"""``data stats``: what is in a data folder before anyone spends GPU hours on it.

Counts per split and task, a text histogram of durations, the distribution of each APA score
and every problem found, plus an optional matplotlib figure. It goes through
:func:`build_examples`, so it checks exactly what training would use.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from phi4mm_lora.config import DataConfig, PromptConfig
from phi4mm_lora.data.examples import Example, build_examples, bundled_corpus_path
from phi4mm_lora.data.manifest import read_manifest
from phi4mm_lora.data.problems import DataReport
from phi4mm_lora.data.speechocean import read_speechocean

ASPECTS = ("accuracy", "fluency", "prosodic", "total")
DURATION_BINS = (0, 2, 4, 6, 8, 10, 15, 20, 30, 60)


@dataclass
class SplitStats:
    name: str
    tasks: dict[str, int]
    n_utterances: int
    durations: list[float]
    scores: dict[str, list[int]]
    report: DataReport
    phones: Counter = field(default_factory=Counter)


def _split_stats(split: str, examples: list[Example], report: DataReport) -> SplitStats:
    tasks = Counter(e.task for e in examples)
    by_utt: dict[str, float | None] = {}
    scores: dict[str, list[int]] = {a: [] for a in ASPECTS}
    phones: Counter = Counter()
    for e in examples:
        by_utt.setdefault(e.utt_id, e.duration)
        if e.task == "apa":
            ans = json.loads(e.answer)
            for a in ASPECTS:
                scores[a].append(int(ans[a]))
        elif e.task == "mdd":
            phones.update(json.loads(e.answer)["phoneme_transcript"].split())
    durations = [d for d in by_utt.values() if d is not None]
    return SplitStats(split, dict(tasks), len(by_utt), durations, scores, report, phones)


def collect_stats(data: str | Path | None, strict: bool = False, validation_fraction: float = 0.0) -> list[SplitStats]:
    """Build examples (both tasks) for every split found in ``data`` (``None``: bundled corpus)."""
    path = Path(data).expanduser() if data else bundled_corpus_path()
    is_manifest = path.is_file() and path.suffix in (".jsonl", ".json")
    source = "manifest" if is_manifest else "speechocean"
    cfg = DataConfig(source=source, path=str(path), task="both", strict=strict,
                     validation_fraction=validation_fraction)
    if is_manifest:
        splits = sorted({it.split for it in read_manifest(path)[0]}) or ["train"]
    else:
        splits = read_speechocean(path).splits()
        if validation_fraction > 0:
            splits.append("validation")
    out = []
    for split in splits:
        examples, report = build_examples(cfg, PromptConfig(), split)
        out.append(_split_stats(split, examples, report))
    return out


def _hist(values: list[float], edges: tuple[float, ...], width: int = 40) -> list[str]:
    counts = [0] * (len(edges))
    for v in values:
        i = next((k for k in range(len(edges) - 1) if edges[k] <= v < edges[k + 1]), len(edges) - 1)
        counts[i] += 1
    top = max(counts) or 1
    last = max((k for k, c in enumerate(counts) if c), default=0)
    lines = []
    for k, c in enumerate(counts[: last + 1]):
        label = f"{edges[k]:>4g}-{edges[k + 1]:<4g}s" if k < len(edges) - 1 else f"{edges[k]:>4g}+    s"
        lines.append(f"    {label} {c:>6} {'#' * round(width * c / top)}")
    return lines


def format_stats(stats: list[SplitStats]) -> str:
    """The text report ``data stats`` prints."""
    lines = []
    for s in stats:
        tasks = ", ".join(f"{k} {v}" for k, v in sorted(s.tasks.items())) or "none"
        total_h = sum(s.durations) / 3600
        lines.append(f"split {s.name}: {s.n_utterances} utterances, examples: {tasks}, audio {total_h:.2f} h")
        if s.durations:
            ds = sorted(s.durations)
            lines.append(f"  duration s: min {ds[0]:.1f}  median {ds[len(ds) // 2]:.1f}  max {ds[-1]:.1f}")
            lines.extend(_hist(s.durations, DURATION_BINS))
        for a in ASPECTS:
            vals = s.scores[a]
            if vals:
                c = Counter(vals)
                dist = " ".join(f"{k}:{c[k]}" for k in range(11) if c[k])
                lines.append(f"  {a:<9} mean {sum(vals) / len(vals):5.2f}  {dist}")
        if s.phones:
            unk = s.phones.get("<unk>", 0)
            lines.append(f"  phones pronounced: {sum(s.phones.values())} ({len(s.phones)} symbols, <unk> {unk})")
        lines.append("  " + s.report.summary().replace("\n", "\n  "))
    return "\n".join(lines)


def plot_stats(stats: list[SplitStats], png: str | Path, title: str = "") -> Path:
    """Duration histogram and the four score distributions, one colour per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(19, 4.0))
    longest = max((max(s.durations) for s in stats if s.durations), default=1.0)
    bins = [longest * k / 20 for k in range(21)]
    for s in stats:
        axes[0].hist(s.durations, bins=bins, alpha=0.55, label=f"{s.name} (n={len(s.durations)})")
    axes[0].set_title("duration")
    axes[0].set_xlabel("seconds")
    axes[0].set_ylabel("utterances")
    axes[0].legend(fontsize=8)
    width = 0.8 / max(1, len(stats))
    for ax, a in zip(axes[1:], ASPECTS, strict=True):
        for j, s in enumerate(stats):
            c = Counter(s.scores[a])
            n = max(1, len(s.scores[a]))
            xs = [k + (j - (len(stats) - 1) / 2) * width for k in range(11)]
            ax.bar(xs, [c[k] / n for k in range(11)], width=width, alpha=0.8, label=s.name)
        ax.set_title(f"{a} score")
        ax.set_xticks(range(0, 11, 2))
        ax.set_xlabel("score (0-10)")
        ax.set_ylabel("share of utterances")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
