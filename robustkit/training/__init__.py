"""Standard and adversarial training (PGD-AT, FGSM-RS, TRADES) with resumable checkpoints."""

from robustkit.training.loop import TrainResult, accuracy, adopt_training, robust_accuracy, train

__all__ = ["TrainResult", "accuracy", "adopt_training", "robust_accuracy", "train"]
