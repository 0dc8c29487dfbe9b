"""A run folder opened as one object; scoring uses the run's base model and says what produced it.

The run folder here is written by the project's own savers (``save_trained``, ``dump_config``)
on the tiny model, with a *copy* of the tiny model as its base, so a test can tell whether
``score``/``evaluate`` loaded the run's base model or fell back to the default one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from phi4mm_lora.cli import main
from phi4mm_lora.config import load_config
from phi4mm_lora.data.examples import bundled_corpus_path
from phi4mm_lora.errors import UserError
from phi4mm_lora.model.run_folder import Run
from phi4mm_lora.train import checkpoint as ckpt

PROVENANCE_KEYS = {"model", "adapter", "precision", "phi4mm_lora_version"}


@pytest.fixture(scope="module")
def base_copy(tmp_path_factory, tiny_native: Path) -> Path:
    """The tiny model under another path: 'the model the run was trained on'."""
    dst = tmp_path_factory.mktemp("models") / "my-base-model"
    shutil.copytree(tiny_native, dst)
    return dst


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, base_copy: Path) -> Path:
    """A run folder: config.yaml naming base_copy, a final adapter (unfreeze), two checkpoints."""
    from phi4mm_lora.config import dump_config
    from phi4mm_lora.model.adapters import save_trained
    from phi4mm_lora.model.load import load_model

    run = tmp_path_factory.mktemp("runs") / "paper"
    cfg = load_config(None, [f"output_dir={run}", f"model.path={base_copy}", "precision=fp32", "model.device=cpu",
                             "adapter.mode=fresh", "adapter.r=4", "adapter.alpha=8", "adapter.trainable=unfreeze",
                             "eval.max_new_tokens=6", "eval.batch_size=4"])
    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    with torch.no_grad():  # "trained": non-zero LoRA B, changed encoder
        for n, p in loaded.model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    run.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run / "config.yaml")
    save_trained(loaded.model, loaded.adapters, run / "adapter")
    for step in (2, 4):
        ckpt.write_atomic_dir(run / "checkpoints" / ckpt.checkpoint_name(step),
                              lambda tmp: shutil.copytree(run / "adapter", tmp / "adapter"))
    return run


@pytest.fixture(scope="module")
def flac() -> Path:
    return sorted((bundled_corpus_path() / "WAVE").rglob("*.flac"))[0]


def test_run_opens_every_form_of_the_folder(run_dir: Path, base_copy: Path) -> None:
    step4 = run_dir / "checkpoints" / "step-00000004"
    for given, adapter in [(run_dir, run_dir / "adapter"), (run_dir / "adapter", run_dir / "adapter"),
                           (step4, step4 / "adapter"), (step4 / "adapter", step4 / "adapter")]:
        run = Run.open(given)
        assert (run.adapter_dir, run.root) == (adapter, run_dir), given
    assert Run.open(run_dir, checkpoint="latest").adapter_dir == step4 / "adapter"
    assert Run.open(run_dir, checkpoint=2).adapter_dir == run_dir / "checkpoints" / "step-00000002" / "adapter"
    with pytest.raises(UserError, match="has steps 2, 4"):
        Run.open(run_dir, checkpoint=3)
    run = Run.open(run_dir)
    assert run.checkpoints == ckpt.list_checkpoints(run_dir)  # same reading as the trainer's
    model, source = run.base_model()
    assert model.path == str(base_copy) and "config.yaml" in source
    cfg = run.configure(load_config())
    assert cfg.model.path == str(base_copy)
    assert cfg.adapter.init_from == str(run_dir / "adapter") and cfg.adapter.trainable == "unfreeze"
    assert run.configure(load_config(None, ["model.path=/elsewhere"])).model.path == "/elsewhere"  # explicit wins


def test_score_uses_the_runs_base_model_and_states_provenance(run_dir: Path, base_copy: Path, tiny_native: Path,
                                                                flac: Path, capsys) -> None:
    assert main(["score", "--adapter", str(run_dir), "--text", "we call it bear", "--json", str(flac), "eval.max_new_tokens=4"]) == 0
    [by_run] = json.loads(capsys.readouterr().out)
    prov = by_run["provenance"]
    assert PROVENANCE_KEYS <= set(prov)
    assert prov["model"].startswith(str(base_copy)) and prov["adapter"] == str(run_dir / "adapter")
    assert prov["precision"] == "fp32" and prov["phi4mm_lora_version"]
    # --model wins, and the same weights under another path give the same answers
    assert main(["score", "--adapter", str(run_dir), "--model", str(tiny_native), "--text", "we call it bear",
                 "--json", str(flac), "precision=fp32", "eval.max_new_tokens=4"]) == 0
    [by_flag] = json.loads(capsys.readouterr().out)
    assert by_flag["provenance"]["model"].startswith(str(tiny_native))
    assert (by_flag["apa_raw"], by_flag["mdd_raw"]) == (by_run["apa_raw"], by_run["mdd_raw"])
    # the terminal report names model, adapter, precision and version too
    assert main(["score", "--adapter", str(run_dir), "--text", "we call it bear", str(flac),
                 "eval.max_new_tokens=4"]) == 0
    out = capsys.readouterr().out
    assert "scored by: model " + str(base_copy) in out
    assert "precision fp32" in out and "phi4mm-lora" in out


def test_missing_base_model_is_named_with_the_flag(tmp_path: Path, run_dir: Path, flac: Path, capsys) -> None:
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    text = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(text.replace(str(Run.open(run_dir).base_model()[0].path),
                                                    "/models/Phi-4-multimodal-instruct"))
    bare = tmp_path / "bare-adapter"
    shutil.copytree(run_dir / "adapter", bare)
    pc = json.loads((bare / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**pc, "base_model_name_or_path": "/gone/base"}))
    cases = [(["score", "--adapter", str(moved), "--text", "hi", str(flac)], "/models/Phi-4-multimodal-instruct"),
             (["evaluate", "--adapter", str(moved), "--limit", "1"], "/models/Phi-4-multimodal-instruct"),
             (["score", "--adapter", str(bare), "--text", "hi", str(flac)], "/gone/base")]
    for argv, name in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err and "--model" in err, err


def test_evaluate_run_states_provenance_in_json_and_report(run_dir: Path, base_copy: Path, tmp_path: Path,
                                                            capsys) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", "--adapter", str(run_dir), "--limit", "1", "--output", str(out), "--json",
                 "--no-progress", "eval.max_new_tokens=4"]) == 0
    results = json.loads(capsys.readouterr().out)
    prov = results["meta"]["provenance"]
    assert prov["model"].startswith(str(base_copy)) and prov["adapter"] == str(run_dir / "adapter")
    assert json.loads((out / "run.json").read_text())["provenance"] == prov
    report = (out / "report.md").read_text()
    assert f"model {base_copy}" in report and "precision fp32" in report and "phi4mm-lora" in report


def test_python_api_takes_a_run(run_dir: Path, base_copy: Path, flac: Path) -> None:
    from phi4mm_lora.evaluate.score import score

    cfg = load_config(None, ["eval.max_new_tokens=4"])
    [by_path] = score(cfg, [flac], "we call it bear", run=run_dir)
    [by_run] = score(cfg, [flac], "we call it bear", run=Run.open(run_dir, checkpoint="latest"))
    assert by_path["provenance"]["model"].startswith(str(base_copy))
    assert by_run["provenance"]["adapter"] == str(run_dir / "checkpoints" / "step-00000004" / "adapter")
    assert by_run["apa_raw"] == by_path["apa_raw"]  # the checkpoint holds the same weights as the final adapter


def test_every_entry_takes_a_run_like_the_cli(run_dir: Path, base_copy: Path, flac: Path, tmp_path: Path,
                                              capsys) -> None:
    """score, score_rows (score --batch) and the service, given run=RUN from Python, answer
    exactly what the CLI answers with --adapter RUN (same base model, adapter, prompts)."""
    import io

    import soundfile as sf
    from starlette.testclient import TestClient

    from phi4mm_lora.evaluate.batch import read_rows, score_rows
    from phi4mm_lora.evaluate.score import score
    from phi4mm_lora.serve.service import create_service

    text, small = "we call it bear", ["eval.max_new_tokens=4"]
    assert main(["score", "--adapter", str(run_dir), "--text", text, "--json", str(flac), *small]) == 0
    [by_cli] = json.loads(capsys.readouterr().out)
    [by_api] = score(load_config(None, small), [flac], text, run=run_dir)
    assert by_api == by_cli
    assert by_api["provenance"]["model"].startswith(str(base_copy))

    listing = tmp_path / "list.csv"
    listing.write_text(f"audio,text\n{flac},{text}\n")
    assert main(["score", "--batch", str(listing), "--adapter", str(run_dir), "--output", str(tmp_path / "cli.jsonl"),
                 "--no-progress", *small]) == 0
    summary = score_rows(load_config(None, small), None, read_rows(listing), tmp_path / "api.jsonl", progress=False,
                         run=Run.open(run_dir))
    cli_rows = [json.loads(line) for line in (tmp_path / "cli.jsonl").read_text().splitlines()]
    api_rows = [json.loads(line) for line in (tmp_path / "api.jsonl").read_text().splitlines()]
    assert api_rows == cli_rows and summary["provenance"] == by_cli["provenance"]
    assert {k: v for k, v in api_rows[0].items() if k not in ("row", "error")} == by_cli

    service = create_service(load_config(None, small), run=run_dir, sentences=[])
    buf = io.BytesIO()
    samples, sr = sf.read(flac)
    sf.write(buf, samples, sr, format="WAV")
    with TestClient(service.app) as client:
        resp = client.post("/score", files={"audio": ("rec.wav", buf.getvalue())}, data={"text": text})
    assert resp.status_code == 200, resp.text
    served = resp.json()
    assert service.provenance == by_cli["provenance"]
    assert (served["apa_raw"], served["mdd_raw"], served["scores"]) == (by_cli["apa_raw"], by_cli["mdd_raw"],
                                                                          by_cli["scores"])


def test_a_run_on_the_pretrained_tiny_base_is_evaluated_on_that_base(tmp_path: Path, run_dir: Path) -> None:
    """An adapter trained on ``model.tiny=pretrained`` (the demo) must not be scored on the random tiny model."""
    import yaml

    moved = tmp_path / "demo-run"
    shutil.copytree(run_dir, moved)
    raw = yaml.safe_load((moved / "config.yaml").read_text())
    raw["model"].update({"path": None, "tiny": "pretrained"})
    (moved / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = Run.open(moved).configure(load_config())
    assert (cfg.model.path, cfg.model.tiny) == (None, "pretrained")
