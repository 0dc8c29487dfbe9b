"""Experiment trackers (``train.report_to``) through accelerate's tracker classes.

``report_to: [tensorboard, mlflow, wandb, ...]`` becomes ``Accelerator(log_with=...)``; the run
config is logged as hyperparameters (flattened dotted keys, e.g. ``train.lr``) by
``init_trackers``, per-step and per-epoch numbers by ``accelerator.log`` (``train/<key>``,
``eval/<key>``), and the run's files (loss curve, summary, metrics) as artifacts where the
tracker stores files (MLflow, W&B). Where each tracker writes follows its own conventions:
``MLFLOW_TRACKING_URI`` / ``MLFLOW_EXPERIMENT_NAME``, ``WANDB_*``; TensorBoard writes to
``RUN/tensorboard``. Only the main process logs (accelerate's trackers see to that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phi4mm_lora.errors import UserError

#: Experiment name (MLflow), project (W&B and the others) unless their own settings say otherwise.
PROJECT = "phi4mm-lora"
#: What ``train.report_to`` accepts: accelerate's tracker names, and what to pip-install for each.
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb", "comet_ml": "comet-ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def check_available(report_to: list[str]) -> None:
    """A tracker whose package is missing is a clear error before the model loads, not a silent no-op."""
    import importlib.util

    module = {"comet_ml": "comet_ml"}
    missing = [n for n in report_to if importlib.util.find_spec(module.get(n, n)) is None]
    if missing:
        raise UserError(f"train.report_to names {', '.join(missing)}, which is not installed: "
                        f"pip install {' '.join(PACKAGES[n] for n in missing)} (or remove it from train.report_to)")


def log_with(report_to: list[str], run_dir: Path) -> list[Any]:
    """``Accelerator(log_with=...)``: tracker names, TensorBoard writing straight into RUN/tensorboard."""
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker("", str(run_dir / "tensorboard")) if n == "tensorboard" else n for n in report_to]


def hparams(cfg: Any) -> dict[str, int | float | str | bool]:
    """The run config as flat ``section.key`` hyperparameters (scalars as is, the rest as JSON text)."""
    out: dict[str, int | float | str | bool] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (bool, int, float, str)):
            out[prefix] = node
        else:
            out[prefix] = json.dumps(node)

    walk("", cfg.model_dump(mode="json"))
    return out


def start(accelerator: Any, cfg: Any, run_dir: Path) -> None:
    """Start every tracker's run, named after the run folder, with the config as hyperparameters
    (TensorBoard's come at the end, in :func:`finish`, with the final numbers as their metrics)."""
    if not accelerator.log_with:
        return
    accelerator.init_trackers(PROJECT, init_kwargs={"mlflow": {"run_name": run_dir.name},
                                                    "wandb": {"name": run_dir.name, "dir": str(run_dir)}})
    for tracker in accelerator.trackers:
        if tracker.name != "tensorboard":
            tracker.store_init_configuration(hparams(cfg))


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers a run ends with: final/min loss, steps, and the last evaluation's metrics."""
    out = {f"hparam/{k}": float(summary[k]) for k in ("final_loss", "min_loss", "steps")
           if isinstance(summary.get(k), (int, float))}
    for k, v in (summary.get("eval") or {}).items():
        if k not in ("type", "step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"hparam/eval_{k}"] = float(v)
    return out


def finish(accelerator: Any, cfg: Any, summary: dict[str, Any]) -> None:
    """TensorBoard's HPARAMS tab: the config next to the final numbers, one session per run,
    written into RUN/tensorboard itself (accelerate's own call would add a session without metrics
    in a timestamped subfolder)."""
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        if tracker.name == "tensorboard":
            tracker.writer.add_hparams(hparams(cfg), final_metrics(summary), run_name=".")
            tracker.writer.flush()


def log_files(accelerator: Any, paths: list[Path]) -> None:
    """Attach the run's files to trackers that keep files (MLflow artifacts, W&B files)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        for p in (p for p in paths if p.is_file()):
            if tracker.name == "mlflow":
                import mlflow

                mlflow.log_artifact(str(p))
            elif tracker.name == "wandb":
                tracker.tracker.save(str(p), base_path=str(p.parent), policy="now")


__all__ = ["PACKAGES", "PROJECT", "check_available", "final_metrics", "finish", "hparams", "log_files", "log_with",
           "start"]
