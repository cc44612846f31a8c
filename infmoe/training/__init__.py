"""Training: settings (`TrainConfig`), the loop (`train`), and its components."""

from infmoe.training.config import TrainConfig, resolve
from infmoe.training.loop import CHECKPOINT, TrainingDiverged, TrainResult, train

__all__ = ["CHECKPOINT", "TrainConfig", "TrainResult", "TrainingDiverged", "resolve", "train"]
