"""Training: the recipe (:func:`train`), answer-only loss, crash-safe checkpoints, benchmark.

``from phi4mm_lora.train import train`` then ``train(load_config("configs/demo.yaml"))``;
pass ``evaluate_fn(model, processor, epoch) -> dict`` to evaluate after each epoch.

The names below load on first use (PEP 562), so importing a light submodule such as
``phi4mm_lora.train.checkpoint`` from a command that never trains does not import the recipe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from phi4mm_lora.train.finetune import EvaluateFn, TrainingDiverged, TrainResult, train

__all__ = ["EvaluateFn", "TrainResult", "TrainingDiverged", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from phi4mm_lora.train import finetune

        return getattr(finetune, name)
    raise AttributeError(f"module 'phi4mm_lora.train' has no attribute {name!r}")
