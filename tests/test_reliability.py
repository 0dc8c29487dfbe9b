"""Every fault and bad input ends in one clear line, with the exit code README promises, and
leaves the run folder as it was (docs/reliability.md lists each case and its test).

Most cases go through the real CLI in this process (``cli.main``), on copies of one tiny
finished run; only what needs separate processes (kill, lock, signals) starts them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from test_train_common import make_manifest, small_overrides

from phi4mm_lora.cli import main
from phi4mm_lora.data.audio import AudioError, probe_audio
from phi4mm_lora.data.examples import bundled_corpus_path
from phi4mm_lora.train import checkpoint as ckpt
from phi4mm_lora.train.finetune import finite_row
from phi4mm_lora.train.runlock import RunLock

BAD_UTF8 = b"caf\xe9 \xff\xfe\n"  # latin-1 / stray bytes: not UTF-8
RUN_EXTRA = {"adapter__trainable": "lora", "train__max_steps": 3, "train__epochs": 2, "train__save_every_steps": 1,
             "train__keep_checkpoints": 2, "train__scheduler": "constant"}


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("data"), n=4)


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("cfg") / "run.yaml"
    f.write_text("# everything comes from the overrides\n{}\n")
    return f


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data, cfg_file) -> Path:
    """One tiny finished run (3 steps, checkpoints step-2 and step-3), shared by many cases."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", str(cfg_file), *small_overrides(data, out, **RUN_EXTRA), "--no-progress"]) == 0
    return out


def ov(data: Path, out: Path, **extra) -> list[str]:
    return small_overrides(data, out, **{**RUN_EXTRA, **extra})


@pytest.fixture()
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run."""
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, pattern: str) -> str:
    """The error is exactly one ``error:`` line, matching ``pattern``, with no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert not any(ln.startswith("  ") for ln in err.splitlines()), err  # no continuation lines
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def truncate(path: Path, keep: float = 0.5) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: int(len(b) * keep)])


# ---------------------------------------------------------------- 1. config values (validate and train)

BAD_VALUES = [
    ("train.lr=.nan", r"train\.lr: .*finite"),
    ("train.lr=.inf", r"train\.lr: .*finite"),
    ("train.lr=5", r"train\.lr: must be <= 1"),
    ("train.lr=0", r"train\.lr: must be > 0"),
    ("train.epochs=.nan", r"train\.epochs: .*finite"),
    ("train.epochs=0", r"train\.epochs: must be > 0"),
    ("train.max_steps=-1", r"train\.max_steps: must be >= 1"),
    ("train.max_steps=0", r"train\.max_steps: must be >= 1"),
    ("train.log_every_steps=0", r"train\.log_every_steps: must be >= 1"),
    ("train.num_workers=-1", r"train\.num_workers: must be >= 0"),
    ("train.save_every_steps=-1", r"train\.save_every_steps: must be >= 1"),
    ("train.weight_decay=-1", r"train\.weight_decay: must be in \[0, 1\]"),
    ("train.warmup_ratio=5", r"train\.warmup_ratio: must be in \[0, 1\]"),
    ("train.max_grad_norm=0", r"train\.max_grad_norm: must be > 0"),
    ("train.batch_size=0", r"train\.batch_size: must be >= 1"),
    ("data.limit=-1", r"data\.limit: must be >= 1"),
    ("data.limit=0", r"data\.limit: must be >= 1"),
    ("data.max_audio_seconds=.inf", r"data\.max_audio_seconds: .*finite"),
    ("adapter.dropout=.nan", r"adapter\.dropout: .*finite"),
    ("eval.max_new_tokens=0", r"eval\.max_new_tokens: must be >= 1"),
    ("seed=-1", r"seed: must be in"),
]


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize(("override", "pattern"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_config_value(capsys, cfg_file, data, tmp_path, command, override, pattern):
    out = tmp_path / "run"
    code, _, err = cli(capsys, command, cfg_file, *small_overrides(data, out), override)
    assert code == 2
    one_line(err, pattern)
    assert not out.exists()  # refused before anything was written


def test_all_problems_listed_at_once(capsys, cfg_file, data, tmp_path):
    code, _, err = cli(capsys, "validate", cfg_file, *small_overrides(data, tmp_path / "r"),
                       "train.lr=.nan", "train.log_every_steps=0", "data.limit=-1")
    assert code == 2 and "3 problem(s)" in err
    assert all(k in err for k in ("train.lr", "train.log_every_steps", "data.limit"))


# ---------------------------------------------------------------- 2. pre-flight: paths, files, data


def _speechocean_copy(root: Path) -> Path:
    """The bundled corpus (Speechocean762 release layout) with its tables copied, audio linked."""
    src = bundled_corpus_path()
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("WAVE"))
    (root / "WAVE").symlink_to(src / "WAVE")
    return root


def _case_required(tmp_path, data):
    f = tmp_path / "asr.yaml"
    f.write_text("data:\n  source: manifest\n  path: null            # REQUIRED: the .jsonl manifest\n")
    return f, ["data.path=null"], r"data\.path is marked REQUIRED in .*asr\.yaml but null"


def _case_output_file(tmp_path, data):
    (tmp_path / "run").write_text("not a folder")
    return None, [], r"output_dir .*run is a file"


def _case_data_missing(tmp_path, data):
    return None, [f"data.path={tmp_path / 'nope.jsonl'}"], r"data\.path .*nope\.jsonl does not exist"


def _case_manifest_no_valid_line(tmp_path, data):
    m = tmp_path / "bad.jsonl"
    m.write_text('{"audio": "missing.wav", "prompt": "x", "answer": "y"}\nnot json\n')
    return None, [f"data.path={m}"], r"no training examples in split 'train' .*2 skipped"


def _case_manifest_not_utf8(tmp_path, data):
    m = tmp_path / "latin1.jsonl"
    m.write_bytes(data.read_bytes() + BAD_UTF8)
    return None, [f"data.path={m}"], r"manifest .*latin1\.jsonl is not UTF-8 text"


def _case_config_not_utf8(tmp_path, data):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"# caf\xe9\n{}\n")
    return f, [], r"config file .*latin1\.yaml is not UTF-8 text"


def _so_case(name: str, rel: str, what: str):
    def case(tmp_path, data):
        root = _speechocean_copy(tmp_path / "so")
        f = root / rel
        f.write_bytes(f.read_bytes() + BAD_UTF8)
        return None, ["data.source=speechocean", f"data.path={root}"], rf"{what} .*{re.escape(rel)} is not UTF-8 text"
    case.__name__ = name
    return case


def _case_model_no_weights(tmp_path, data):
    from phi4mm_lora.model.tiny import ensure_tiny

    m = tmp_path / "model"
    shutil.copytree(ensure_tiny("native"), m, ignore=shutil.ignore_patterns("*.safetensors"))
    return None, [f"model.path={m}"], r"model folder .*model holds no weights"


def _case_model_truncated(tmp_path, data):
    from phi4mm_lora.model.tiny import ensure_tiny

    m = tmp_path / "model"
    shutil.copytree(ensure_tiny("native"), m)
    truncate(m / "model.safetensors", 0.6)
    return None, [f"model.path={m}"], r"model weights .*model\.safetensors is damaged \(truncated"


def _case_prompt_missing(tmp_path, data):
    return None, [f"prompts.apa={tmp_path / 'apa.txt'}"], r"prompts\.apa file .*apa\.txt not found"


def _case_init_from_truncated(tmp_path, data):
    a = tmp_path / "adapter"
    shutil.copytree(ckpt_adapter_source(), a)
    truncate(a / "adapter_model.safetensors")
    return None, [f"adapter.init_from={a}"], r"adapter.init_from weights .*adapter_model\.safetensors is damaged"


def ckpt_adapter_source() -> Path:
    from phi4mm_lora.model.tiny import ensure_tiny

    return ensure_tiny("native") / "speech-lora"


PREFLIGHT = [_case_required, _case_output_file, _case_data_missing, _case_manifest_no_valid_line,
             _case_manifest_not_utf8, _case_config_not_utf8,
             _so_case("scores_json_not_utf8", "resource/scores.json", "score table"),
             _so_case("text_not_utf8", "train/text", "Kaldi table"),
             _so_case("wav_scp_not_utf8", "train/wav.scp", "Kaldi table"),
             _case_model_no_weights, _case_model_truncated, _case_prompt_missing, _case_init_from_truncated]


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("case", PREFLIGHT, ids=[c.__name__.removeprefix("_case_") for c in PREFLIGHT])
def test_preflight_refuses_before_loading(capsys, cfg_file, data, tmp_path, command, case, monkeypatch):
    import phi4mm_lora.model.load as load

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded although a pre-flight check should have failed")

    monkeypatch.setattr(load, "load_model", no_loading)
    cfg, extra, pattern = case(tmp_path, data)
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, command, cfg or cfg_file, *small_overrides(data, tmp_path / "run"), *extra)
    assert code == 2
    one_line(err, pattern)
    assert snapshot(tmp_path) == before  # nothing written, nothing removed


def test_read_only_output_folder(capsys, cfg_file, data, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through file modes: a read-only mount is the real thing
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode:
            pytest.skip("running as root but cannot mount a read-only tmpfs here")
    else:
        ro.chmod(0o555)
    try:
        for command in ("validate", "train"):
            code, _, err = cli(capsys, command, cfg_file, *small_overrides(data, ro / "run"))
            assert code == 2
            one_line(err, r"output_dir .*ro/run is not writable .*(Read-only|Permission)")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)])
        else:
            ro.chmod(0o755)


def test_validate_ok_means_training_starts(capsys, cfg_file, data, tmp_path):
    code, out, _ = cli(capsys, "validate", cfg_file, *small_overrides(data, tmp_path / "r"))
    assert code == 0 and "config OK: 4 training examples" in out


def test_truncated_wav_is_rejected(tmp_path):
    """Header 6.6 s, data 2.2 s: libsndfile quietly reports 2.2 s; the RIFF header does not."""
    x = (np.random.default_rng(0).standard_normal(int(6.6 * 16000)) * 0.1).astype("float32")
    full = tmp_path / "full.wav"
    sf.write(full, x, 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: 44 + int(2.2 * 16000) * 2])
    assert probe_audio(full).duration == pytest.approx(6.6)
    with pytest.raises(AudioError, match=r"truncated: its header says 6\.60 s, the file holds 2\.20 s"):
        probe_audio(cut)


def test_truncated_wav_skipped_by_id_and_strict_refuses(capsys, cfg_file, data, tmp_path):
    m = tmp_path / "m.jsonl"
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    clip = tmp_path / "clip0.wav"
    clip.write_bytes((data.parent / rows[0]["audio"]).read_bytes()[:20000])
    # the header still claims the full length
    rows = [{**r, "audio": str(data.parent / r["audio"])} for r in rows]
    rows[0]["audio"] = str(clip)
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = cli(capsys, "validate", cfg_file, *small_overrides(m, tmp_path / "r"))
    assert code == 0 and "config OK: 3 training examples" in out
    assert re.search(r"data: skipped .*clip0.*truncated", out)  # validate shows what training would skip
    code, _, err = cli(capsys, "validate", cfg_file, *small_overrides(m, tmp_path / "r"), "data.strict=true")
    assert code == 2 and "clip0" in err and "truncated" in err and "Traceback" not in err


# ---------------------------------------------------------------- 3. run folder: resume, lock, checkpoints

RESUME_REFUSED = [
    ("train.batch_size=4", r"changed settings: train\.batch_size \(2 -> 4\).*--resume-with-changes"),
    ("train.grad_accum=2", r"changed settings: train\.grad_accum \(1 -> 2\)"),
    ("seed=8", r"changed settings: seed \(7 -> 8\)"),
    ("data.limit=3", r"changed settings: data\.limit \(None -> 3\)"),
    ("train.lr=0.05", r"changed settings: train\.lr \(0\.001 -> 0\.05\)"),
    ("train.scheduler=linear", r"changed settings: train\.scheduler"),
    ("adapter.r=8", r"cannot resume step-00000003 with another adapter/model: adapter\.r \(4 -> 8\)"),
    ("adapter.target_modules=all-linear", r"another adapter/model: adapter\.target_modules"),
]


@pytest.mark.parametrize(("override", "pattern"), RESUME_REFUSED, ids=[r[0] for r in RESUME_REFUSED])
def test_resume_refuses_changed_settings(capsys, cfg_file, data, run, override, pattern):
    before = snapshot(run)
    code, _, err = cli(capsys, "train", cfg_file, *ov(data, run), override, "--resume", "--no-progress")
    assert code == 2
    one_line(err, pattern)
    assert snapshot(run) == before


def test_resume_rank_change_refused_even_with_changes(capsys, cfg_file, data, run):
    before = snapshot(run)
    code, _, err = cli(capsys, "train", cfg_file, *ov(data, run), "--resume", "adapter.r=8", "--resume-with-changes")
    assert code == 2
    one_line(err, r"adapter\.r \(4 -> 8\)")
    assert snapshot(run) == before


def test_resume_of_finished_run_changes_nothing(capsys, cfg_file, data, run):
    before = snapshot(run)
    # flags before overrides, and --resume directly followed by an override
    code, out, err = cli(capsys, "train", cfg_file, "--no-progress", *ov(data, run)[:3], "--resume", *ov(data, run)[3:])
    assert code == 0, err
    assert "already finished (3 of 3 steps" in out and "nothing changed" in out
    assert snapshot(run) == before  # summary.json untouched


def test_legacy_run_without_total_steps_is_finished_too(capsys, cfg_file, data, run):
    """A run written before checkpoints recorded total_steps: summary.json says it finished."""
    last = run / "checkpoints" / "step-00000003"
    st = torch.load(last / ckpt.STATE_FILE, weights_only=False)
    del st["total_steps"]
    torch.save(st, last / ckpt.STATE_FILE)
    (last / ckpt.MARKER).write_text("ok\n")  # the old marker, without a file list
    code, out, _ = cli(capsys, "validate", cfg_file, *ov(data, run), "--resume")
    assert code == 0 and "already finished" in out


def test_truncated_training_state_new_marker(capsys, cfg_file, data, run):
    last = run / "checkpoints" / "step-00000003"
    truncate(last / ckpt.STATE_FILE)
    before = snapshot(run)
    code, _, err = cli(capsys, "train", cfg_file, *ov(data, run), "--resume", last)
    assert code == 2
    one_line(err, r"step-00000003 is not complete: training_state\.pt has \d+ bytes, the marker says \d+")
    assert snapshot(run) == before


def test_truncated_training_state_legacy_marker(capsys, cfg_file, data, run):
    last = run / "checkpoints" / "step-00000003"
    truncate(last / ckpt.STATE_FILE)
    (last / ckpt.MARKER).write_text("ok\n")
    before = snapshot(run)
    code, _, err = cli(capsys, "train", cfg_file, *ov(data, run), "--resume", last)
    assert code == 2
    one_line(err, r"training_state\.pt is damaged .*resume from another checkpoint")
    assert snapshot(run) == before


def test_half_deleted_legacy_checkpoint_is_not_complete(run):
    """The reported failure: a kill while an older version pruned left COMPLETE and the state,
    but not the adapter or the RNG file."""
    old = run / "checkpoints" / "step-00000003"
    (old / ckpt.MARKER).write_text("ok\n")
    assert ckpt.is_complete(old)
    (old / "rng-rank0.pt").unlink()
    shutil.rmtree(old / "adapter")
    assert not ckpt.is_complete(old)
    assert ckpt.latest_checkpoint(run).name == "step-00000002"
    assert "adapter/adapter_model.safetensors" in ckpt.incomplete_reason(old)
    from phi4mm_lora.model.run_folder import Run

    assert [p.name for p in Run.open(run).checkpoints] == ["step-00000002"]  # evaluate --checkpoint latest


def test_resume_with_changes_applies_lr_and_drops_torn_line_and_stale_lock(capsys, cfg_file, data, run):
    """One continued run: a torn last metrics line is dropped with a note, a lock left by a dead
    process is taken over with a note, and a changed lr/max_steps apply for real."""
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"type": "train", "step": 4, "lo')  # a crash mid-write
    (run / ".lock").write_text("pid 999999 on elsewhere since 2020-01-01 00:00:00\n")  # no process holds it
    code, out, err = cli(capsys, "train", cfg_file, *ov(data, run, train__lr=0.05, train__max_steps=4),
                         "--resume", "--resume-with-changes", "--no-progress")
    assert code == 0, err
    assert "note: dropped line 4 of" in out and "took over the run folder from pid 999999" in out
    assert "applied from step 3: train.lr=0.05, train.max_steps=4" in out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["lr"] == pytest.approx(1e-3) and rows[3]["lr"] == pytest.approx(0.05)  # constant schedule
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert (run / ".lock").read_text() == ""  # released


def test_live_lock_refuses_second_run(capsys, cfg_file, data, run):
    """Two processes: a live owner holds the run folder; train and validate name its pid. When
    it is killed (SIGKILL), the next run takes the folder over."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from phi4mm_lora.train.runlock import RunLock
        lock = RunLock({str(run)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        for command in ("train", "validate"):
            code, _, err = cli(capsys, command, cfg_file, *ov(data, run), "--resume")
            assert code == 2
            one_line(err, rf"run folder .*run is in use by pid {holder.pid} on ")
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(run).acquire()
    assert lock.took_over and f"pid {holder.pid}" in lock.took_over
    lock.release()


def test_kill_during_pruning_then_resume(capsys, cfg_file, data, run):
    """SIGKILL while the oldest checkpoint is being deleted (after its first file is gone):
    the folder was renamed first, so no half-deleted ``step-N`` is left, and resume works."""
    code = textwrap.dedent(f"""
        import os, shutil, sys, time
        from pathlib import Path
        from phi4mm_lora.train import checkpoint as ckpt
        real = shutil.rmtree
        def slow_rmtree(path, *a, **k):
            path = Path(path)
            next(f for f in sorted(path.rglob("*")) if f.is_file()).unlink()  # deletion under way
            print("deleting", path.name, flush=True)
            time.sleep(120)
        ckpt.shutil.rmtree = slow_rmtree
        ckpt.prune_checkpoints(Path({str(run)!r}), keep=1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.stdout.readline().strip() == "deleting .del-step-00000002"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".del-step-00000002", "step-00000003"]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000003"]
    code, out, err = cli(capsys, "train", cfg_file, *ov(data, run, train__max_steps=4), "--resume",
                         "--resume-with-changes", "--no-progress")
    assert code == 0, err
    assert "resumed from" in out and "step-00000003" in out
    # the leftover is cleaned by the next prune; the newest two remain
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]


def test_checkpoint_marker_lists_files_and_sizes(finished):
    for c in ckpt.list_checkpoints(finished):
        listed = json.loads((c / ckpt.MARKER).read_text())["files"]
        assert {"training_state.pt", "rng-rank0.pt", "adapter/adapter_model.safetensors"} <= set(listed)
        assert all((c / n).stat().st_size == s for n, s in listed.items())


# ---------------------------------------------------------------- 4. disk full


@pytest.fixture()
def tiny_tmpfs(tmp_path):
    """A 5 MB tmpfs; skipped (with the reason) where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("the disk-full test mounts a small tmpfs and needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("running as root but this machine does not allow mounting a tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)])


def test_disk_full_before_checkpoint(capsys, cfg_file, data, tiny_tmpfs):
    """Each checkpoint (adapter + audio encoder + AdamW moments) takes about 3 MB of the 5 MB:
    the free-space check refuses the second one with numbers, and the first is intact."""
    out = tiny_tmpfs / "run"
    code, _, err = cli(capsys, "train", cfg_file,
                       *small_overrides(data, out, train__save_every_steps=1, train__max_steps=3, adapter__r=8),
                       "--no-progress")
    assert code == 2
    line = one_line(err, r"disk full.* step-0000000\d .*needs about \d+ MB, \d+ MB free\)")
    assert "step-00000001 is intact" in line  # the first checkpoint fits, the second does not
    assert ckpt.is_complete(out / "checkpoints" / "step-00000001")
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_disk_full_while_writing(tiny_tmpfs, tmp_path):
    """ENOSPC in the middle of torch.save (torch says 'unexpected pos'): one line, temp folder gone."""
    from phi4mm_lora.errors import UserError

    final = tiny_tmpfs / "checkpoints" / "step-00000007"
    previous = tiny_tmpfs / "checkpoints" / "step-00000006"
    ckpt.write_atomic_dir(previous, lambda t: (t / "x").write_bytes(b"1" * 1000))
    with pytest.raises(UserError, match=r"disk full while writing checkpoints/step-00000007 .*step-00000006 is intact"):
        with ckpt.disk_full_guard(final, previous, 10):
            tmp = ckpt.begin_atomic_dir(final)
            torch.save(torch.zeros(2**21), tmp / ckpt.STATE_FILE)  # 8 MB into 5 MB
    assert not ckpt.temp_dir_for(final).exists() and ckpt.is_complete(previous)


# ---------------------------------------------------------------- 5. models and adapters in evaluate / score


@pytest.fixture()
def foreign_adapter(finished, tmp_path) -> Path:
    """The run's adapter with every LoRA tensor widened: as if trained on another base model."""
    a = tmp_path / "foreign"
    shutil.copytree(finished / "adapter", a)
    w = load_file(str(a / "adapter_model.safetensors"))
    save_file({k: torch.cat([v, v], dim=1 if "lora_A" in k else 0) for k, v in w.items()},
              str(a / "adapter_model.safetensors"))
    return a


def test_evaluate_adapter_from_another_base(capsys, data, foreign_adapter):
    code, _, err = cli(capsys, "evaluate", "--adapter", foreign_adapter, "--precision", "fp32", "model.device=cpu",
                       "--limit", "1", "--output", foreign_adapter.parent / "ev")
    assert code == 2
    one_line(err, r"adapter 'speech' does not fit this model \(.*size mismatch.*another base model")


def test_evaluate_truncated_adapter(capsys, finished, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(finished / "adapter", a)
    truncate(a / "adapter_model.safetensors")
    code, _, err = cli(capsys, "evaluate", "--adapter", a, "--limit", "1", "--output", tmp_path / "ev")
    assert code == 2
    one_line(err, r"adapter weights .*adapter_model\.safetensors is damaged")


def test_score_truncated_adapter(capsys, finished, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(finished / "adapter", a)
    truncate(a / "adapter_model.safetensors", 0.3)
    wav = next((bundled_corpus_path() / "WAVE").rglob("*.flac"))
    code, _, err = cli(capsys, "score", wav, "--text", "hello", "--adapter", a)
    assert code == 2
    one_line(err, r"adapter_model\.safetensors is damaged")


def test_evaluate_manifest_without_valid_line(capsys, finished, tmp_path, monkeypatch):
    import phi4mm_lora.evaluate.run as run_mod

    monkeypatch.setattr(run_mod, "_load", lambda *a: pytest.fail("the model loaded before the data was checked"))
    m = tmp_path / "bad.jsonl"
    m.write_text('{"audio": "gone.wav", "prompt": "x", "answer": "y", "split": "test"}\n')
    code, _, err = cli(capsys, "evaluate", "--adapter", finished, "--data", m, "data.source=manifest",
                       "--precision", "fp32", "model.device=cpu", "--output", tmp_path / "ev")
    assert code == 2
    one_line(err, r"nothing to evaluate: no usable example in split 'test' .*1 skipped")
    assert not (tmp_path / "ev" / "results.json").exists()


def test_model_config_shapes_do_not_match_weights(capsys, cfg_file, data, tmp_path):
    from phi4mm_lora.model.tiny import ensure_tiny

    m = tmp_path / "model"
    shutil.copytree(ensure_tiny("native"), m)
    c = json.loads((m / "config.json").read_text())
    c["intermediate_size"] *= 2
    (m / "config.json").write_text(json.dumps(c))
    code, _, err = cli(capsys, "train", cfg_file, *small_overrides(data, tmp_path / "run"), f"model.path={m}")
    assert code == 2
    assert not (tmp_path / "run").exists()  # failed before writing anything: no folder left behind
    one_line(err, r"cannot load the weights: model\.layers\.0\.mlp\.down_proj\.weight is \(\d+, \d+\) in "
                  r"model\.safetensors but config\.json makes it")


# ---------------------------------------------------------------- 6. CLI contract: exit codes, flags, signals


def test_debug_anywhere_shows_the_traceback(cfg_file):
    from phi4mm_lora.errors import UserError

    with pytest.raises(UserError, match="train.lr"):
        main(["validate", str(cfg_file), "train.lr=-1", "--debug"])


def test_a_bug_is_exit_1_with_traceback_and_a_report_line(capsys, monkeypatch, cfg_file):
    import phi4mm_lora.config as config

    monkeypatch.setattr(config, "load_config", lambda *a, **k: 1 / 0)
    code, _, err = cli(capsys, "validate", cfg_file)
    assert code == 1 and "Traceback" in err and "This is a bug in phi4mm-lora; please report it" in err


def test_metrics_never_hold_non_json_numbers(finished):
    assert finite_row({"loss": float("inf"), "grad_norm": float("nan"), "lr": 1e-3}) == \
        {"loss": None, "grad_norm": None, "lr": 1e-3}

    def refuse(token):
        raise AssertionError(f"non-JSON number {token}")

    for line in (finished / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def _default_sigint() -> None:
    """A shell starts background jobs with SIGINT ignored, and Python then never raises
    KeyboardInterrupt: the child gets the default back, as a terminal's foreground job has it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _train_proc(cfg_file, data, out, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "phi4mm_lora", "train", str(cfg_file),
                             *small_overrides(data, out, **extra), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), preexec_fn=_default_sigint)


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_exit_code_and_exact_resume_command(cfg_file, data, tmp_path, sig, code, word):
    out = tmp_path / "run"
    proc = _train_proc(cfg_file, data, out, train__max_steps=200, train__epochs=100, train__save_every_steps=1,
                       adapter__trainable="lora")
    target = out / "checkpoints" / ckpt.checkpoint_name(1) / ckpt.MARKER
    deadline = time.time() + 240
    while not target.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith(word))
    assert re.search(r"; continue with: phi4mm-lora train \S+run\.yaml .* --resume$", line), line
    assert f"output_dir={out}" in line
    assert (out / ".lock").read_text() == ""  # released on the way out


def test_resume_ignores_keys_the_checkpoint_did_not_have():
    """A checkpoint saved before a config key existed can still be resumed."""
    from phi4mm_lora.config import load_config
    from phi4mm_lora.train.preflight import resume_changes

    cfg = load_config(None, ["train.batch_size=4"])
    saved = load_config(None, []).model_dump(mode="json")
    del saved["train"]["padding_side"]  # as if written by a version without that key
    assert resume_changes(saved, cfg) == {"train.batch_size": (8, 4)}
