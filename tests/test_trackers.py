"""``train.report_to``: MLflow for real, against a local file store, read back with MLflow's client."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from phi4mm_lora.config import load_config
from phi4mm_lora.errors import UserError


def _cfg(out: Path, *extra: str):
    return load_config(None, [
        f"output_dir={out}", "seed=0", "precision=fp32", "model.device=cpu", "data.limit=2",
        "adapter.mode=fresh", "adapter.r=4", "adapter.alpha=8", "adapter.dropout=0.0",
        "train.batch_size=2", "train.grad_accum=1", "train.lr=1e-2", "train.epochs=2", "train.max_grad_norm=null",
        "train.gradient_checkpointing=false", "train.keep_checkpoints=1",
        "eval.subset=1", "eval.max_new_tokens=4", "eval.batch_size=2", *extra,
    ])


def test_mlflow_gets_params_step_and_epoch_metrics_and_the_loss_curve(tmp_path, tiny_native, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    import mlflow

    from phi4mm_lora.evaluate.run import make_epoch_evaluator
    from phi4mm_lora.train import train

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants opting in to the file store
    run_dir = tmp_path / "tracked"
    cfg = _cfg(run_dir, "train.report_to=[tensorboard, mlflow]")
    train(cfg, evaluate_fn=make_epoch_evaluator(cfg), progress=False)

    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    [exp] = [e for e in client.search_experiments() if e.name == "phi4mm-lora"]
    [run] = client.search_runs([exp.experiment_id])
    assert run.data.tags["mlflow.runName"] == "tracked" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.lr"] == "0.01" and params["adapter.r"] == "4" and params["data.limit"] == "2"
    assert json.loads(params["train.report_to"]) == ["tensorboard", "mlflow"]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    eval_rows = [r for r in rows if r["type"] == "eval"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(r["step"], round(r["loss"], 6)) for r in train_rows]
    assert len(history) == 4
    evals = client.get_metric_history(run.info.run_id, "eval/parse_failures")
    assert [m.step for m in evals] == [r["step"] for r in eval_rows] == [2, 4]  # one point per epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "summary.json", "metrics.jsonl"} <= artifacts
    png = Path(client.download_artifacts(run.info.run_id, "loss_curve.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard still where it was


def test_a_tracker_that_is_not_installed_is_a_clear_error(tmp_path) -> None:
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    from phi4mm_lora.train import train

    with pytest.raises(UserError, match="pip install wandb"):
        train(_cfg(tmp_path / "run", "train.report_to=[wandb]"), progress=False)
    with pytest.raises(UserError, match="report_to"):
        load_config(None, ["train.report_to=[tensorbored]"])
