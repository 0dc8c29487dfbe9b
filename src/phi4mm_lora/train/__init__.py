"""Training: the recipe (:func:`train`), answer-only loss, crash-safe checkpoints, benchmark.

``from phi4mm_lora.train import train`` then ``train(load_config("configs/demo.yaml"))``;
pass ``evaluate_fn(model, processor, epoch) -> dict`` to evaluate after each epoch.
"""

from phi4mm_lora.train.finetune import EvaluateFn, TrainingDiverged, TrainResult, train

__all__ = ["EvaluateFn", "TrainResult", "TrainingDiverged", "train"]
