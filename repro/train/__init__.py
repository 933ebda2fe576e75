"""Training loop and recipe."""

from repro.train.config import TrainConfig
from repro.train.loop import TrainResult, evaluate, seed_everything, train_and_evaluate

__all__ = ["TrainConfig", "TrainResult", "evaluate", "seed_everything", "train_and_evaluate"]
