"""The built-in architectures, by name.

Every model takes float pixels ``[N, C, H, W]`` in [0, 1] and returns logits ``[N, K]``; the
input shape ``in_shape = (C, H, W)`` defaults to MNIST's ``(1, 28, 28)`` and sets the first layer
and the flattened size (a 3-channel 32×32 data set gets the same layers, wider where it must).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustkit.errors import RobustkitError

Shape = tuple[int, int, int]
MNIST_SHAPE: Shape = (1, 28, 28)


def softmax_net(num_classes: int = 10, in_shape: Shape = MNIST_SHAPE) -> nn.Module:
    """The shallow softmax classifier: one dense layer, z = W·vec(x) + b (784 → 10)."""
    c, h, w = in_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))


def mlp(num_classes: int = 10, hidden: int = 512, in_shape: Shape = MNIST_SHAPE) -> nn.Module:
    """784 → 512 ReLU → 10."""
    c, h, w = in_shape
    return nn.Sequential(
        nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def cnn(num_classes: int = 10, in_shape: Shape = MNIST_SHAPE) -> nn.Module:
    """A small convnet (≈0.2M parameters) that passes 99% on MNIST in two or three CPU epochs.

    conv3×3-32, ReLU, maxpool 2 → conv3×3-64, ReLU, maxpool 2 → fc-128, ReLU → fc-10.
    """
    c, h, w = in_shape
    side_h, side_w = ((h - 2) // 2 - 2) // 2, ((w - 2) // 2 - 2) // 2  # 28 → 26 → 13 → 11 → 5
    return nn.Sequential(
        nn.Conv2d(c, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * side_h * side_w, 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def madry_cnn(num_classes: int = 10, in_shape: Shape = MNIST_SHAPE) -> nn.Module:
    """The MNIST-challenge network of Madry et al. (2018).

    conv5×5-32 (same padding), ReLU, maxpool 2 → conv5×5-64, ReLU, maxpool 2 → fc-1024, ReLU →
    fc-10.
    """
    c, h, w = in_shape
    return nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 1024), nn.ReLU(),
        nn.Linear(1024, num_classes),
    )


def strided_cnn(num_classes: int = 10, in_shape: Shape = MNIST_SHAPE) -> nn.Module:
    """The MNIST network of Wong, Rice & Kolter (2020), which down-samples by stride, not pooling.

    conv4×4-16 stride 2, ReLU → conv4×4-32 stride 2, ReLU → fc-100, ReLU → fc-10 (28 → 14 → 7).
    """
    c, h, w = in_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "softmax": softmax_net,
    "mlp": mlp,
    "cnn": cnn,
    "madry-cnn": madry_cnn,
    "strided-cnn": strided_cnn,
}


def build_model(arch: str, num_classes: int = 10, in_shape: Shape = MNIST_SHAPE) -> nn.Module:
    """A freshly initialised model of a registered architecture for ``in_shape`` inputs."""
    if arch not in ARCHITECTURES:
        raise RobustkitError(
            f"unknown model {arch!r}: choose one of {', '.join(ARCHITECTURES)}"
        )
    c, h, w = in_shape
    if arch == "cnn" and min(h, w) < 10:
        raise RobustkitError(f"model cnn needs images of at least 10×10 pixels, not {h}×{w}")
    return ARCHITECTURES[arch](num_classes=num_classes, in_shape=(c, h, w))


class Normalized(nn.Module):
    """Wraps a model that expects normalised input: f(x) = model((x − mean) / std).

    The wrapper keeps the [0, 1] pixel contract, so ε stays in pixel units.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if any(s <= 0 for s in std):
            raise RobustkitError(f"--normalize: std values must be > 0, got {std}")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.model((x - self.mean) / self.std)
        return logits
