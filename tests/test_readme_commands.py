"""Every ``phi4mm-lora`` command in the README's ```bash blocks runs, as a user would run it,
on the tiny model with short overrides, and prints no warning that is not on the allow-list
below (each entry says why it is true where it appears).

Commands that need what a test machine cannot have (the real checkpoint, the Speechocean762
release) are skipped by name, with the reason. Paths the README uses as placeholders
(``learner.wav``, a run folder) are replaced by real ones: a corpus recording and the run the
README's own ``train configs/demo.yaml`` command just wrote.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from phi4mm_lora.data.examples import bundled_corpus_path

ROOT = Path(__file__).resolve().parents[1]

#: README commands not run here, and why.
SKIP = {
    "phi4mm-lora train configs/pronunciation-paper.yaml data.path=/data/speechocean762":
        "needs the Speechocean762 release and the real 5.6B checkpoint (no hub/network in tests)",
    "phi4mm-lora evaluate --adapter runs/paper --data /data/speechocean762":
        "needs the Speechocean762 release (the README's evaluate --adapter runs/demo runs below)",
    "phi4mm-lora export runs/paper --to exports/paper-adapter --format adapter --push":
        "uploads to the hub (no network in tests); the same export without --push is tests/test_export.py",
    "phi4mm-lora export runs/paper --to exports/paper-official --format official":
        "the demo run's adapter also targets lm_head, which the official layout cannot hold (refused by "
        "design); tests/test_export.py exports a decoder-only adapter",
    "phi4mm-lora serve":
        "a server that runs until stopped; tests/test_serve.py starts it and talks to it over HTTP",
    "phi4mm-lora score --batch":
        "needs a CSV/folder of the user's recordings; tests/test_score_batch.py builds them",
}

#: Warnings that are expected: (line pattern, the commands it may appear in, why it is true there).
ALLOWED_WARNINGS = [
    (r"^warning: precision auto: no CUDA GPU \(cpu\), using fp32$", r"",
     "tests run on CPU: 'auto' really picks fp32 here and says so once"),
    (r"^warning: pretrained 'speech' adapter discarded: a fresh r=32 adapter replaces it", r"^train configs/demo\.yaml",
     "configs/demo.yaml trains a fresh adapter (adapter.mode: fresh): the pretrained one really is discarded; "
     "loading that trained adapter later (evaluate/score --adapter) must not say it"),
]

#: Short overrides per command, so each runs in seconds on the tiny model (appended as key=value).
FAST = {
    "train": ["train.max_steps=1", "data.limit=2", "train.batch_size=2"],
    "evaluate": ["eval.max_new_tokens=4"],
    "score": ["eval.max_new_tokens=4"],
    "verify": [],
    "inspect": [],
}

WARNING = re.compile(r"(?i)(^|\s)warning:|\b\w+Warning\b|^WARNING\b")


def readme_commands() -> list[str]:
    """``phi4mm-lora ...`` lines of the README's bash blocks (continuations joined, comments cut)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("phi4mm-lora "):
                out.append(" ".join(line.split()))
    return out


def test_readme_has_the_commands_this_test_knows() -> None:
    cmds = readme_commands()
    assert len(cmds) >= 10
    for skipped in SKIP:
        assert any(c.startswith(skipped) for c in cmds), f"stale SKIP entry: {skipped}"


def test_every_readme_command_runs_without_unexpected_warnings(tmp_path: Path, tiny_native: Path) -> None:
    recording = sorted((bundled_corpus_path() / "WAVE").rglob("*.flac"))[0]
    run = tmp_path / "demo-run"
    replace = {
        "learner.wav": str(recording),
        "runs/paper": str(run),
        "runs/demo": str(run),
        "my-schema.json": str(tmp_path / "my-schema.json"),
        "exports/": str(tmp_path / "exports") + "/",
        "--limit 8": "--limit 1",  # 1 utterance instead of 8: the same code path, faster
    }
    env = {**os.environ, "COLUMNS": "200"}
    ran, problems = [], []
    for cmd in readme_commands():
        if any(cmd.startswith(s) for s in SKIP):
            continue
        line = cmd
        for a, b in replace.items():
            line = line.replace(a, b)
        argv = shlex.split(line)[1:]
        extra = list(FAST.get(argv[0], []))
        if argv[0] == "train":
            extra.append(f"output_dir={run}")
        # key=value right after the first positional (score's AUDIO... list ends at its first flag)
        at = 2 if len(argv) > 1 and not argv[1].startswith("-") else len(argv)
        argv = [*argv[:at], *extra, *argv[at:]]
        res = subprocess.run([sys.executable, "-m", "phi4mm_lora", *argv], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=600)
        ran.append(cmd)
        if res.returncode != 0:
            problems.append(f"{cmd}: exit {res.returncode}: {res.stderr.strip()[-500:]}")
        for ln in (res.stdout + "\n" + res.stderr).splitlines():
            if WARNING.search(ln) and not any(re.search(p, ln.strip()) and re.search(c, " ".join(argv))
                                              for p, c, _ in ALLOWED_WARNINGS):
                problems.append(f"{cmd}: unexpected warning: {ln.strip()}")
    assert not problems, "\n".join(problems)
    assert any(c.startswith("phi4mm-lora train configs/demo.yaml") for c in ran)
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert list((run / "eval").glob("test-*/results.json"))  # the README's evaluate landed in the run
    assert (tmp_path / "my-schema.json").is_file()


def test_allowed_warnings_have_reasons() -> None:
    for pattern, commands, reason in ALLOWED_WARNINGS:
        re.compile(pattern), re.compile(commands)
        assert len(reason) > 20, pattern
