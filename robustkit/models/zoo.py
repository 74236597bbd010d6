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


def _with_head(features: nn.Sequential, hidden: tuple[int, ...], num_classes: int,
               in_shape: Shape) -> nn.Module:
    """``features`` (convolutions and ReLUs), Flatten, then a ReLU layer of each ``hidden``
    width and the linear layer to the logits; the flattened size read from one dry pass."""
    with torch.no_grad():
        flat = int(features(torch.zeros(1, *in_shape)).numel())
    layers: list[nn.Module] = [*features, nn.Flatten()]
    for width in hidden:
        layers += [nn.Linear(flat, width), nn.ReLU()]
        flat = width
    return nn.Sequential(*layers, nn.Linear(flat, num_classes))


def dm_small(num_classes: int = 10, in_shape: Shape = MNIST_SHAPE) -> nn.Module:
    """DM-small of Gowal et al. (2018), the smallest network of their certified training (no
    pooling: it down-samples by stride, so CROWN bounds it).

    conv4×4-16 stride 2, ReLU → conv4×4-32 stride 1, ReLU → fc-100, ReLU → fc-10
    (28 → 13 → 10, no padding).
    """
    c = in_shape[0]
    features = nn.Sequential(nn.Conv2d(c, 16, 4, stride=2), nn.ReLU(),
                             nn.Conv2d(16, 32, 4, stride=1), nn.ReLU())
    return _with_head(features, (100,), num_classes, in_shape)


def dm_medium(num_classes: int = 10, in_shape: Shape = MNIST_SHAPE) -> nn.Module:
    """DM-medium of Gowal et al. (2018).

    conv3×3-32, ReLU → conv4×4-32 stride 2, ReLU → conv3×3-64, ReLU → conv4×4-64 stride 2,
    ReLU → fc-512, ReLU → fc-512, ReLU → fc-10 (28 → 26 → 12 → 10 → 4, no padding).
    """
    c = in_shape[0]
    features = nn.Sequential(nn.Conv2d(c, 32, 3), nn.ReLU(),
                             nn.Conv2d(32, 32, 4, stride=2), nn.ReLU(),
                             nn.Conv2d(32, 64, 3), nn.ReLU(),
                             nn.Conv2d(64, 64, 4, stride=2), nn.ReLU())
    return _with_head(features, (512, 512), num_classes, in_shape)


def dm_large(num_classes: int = 10, in_shape: Shape = MNIST_SHAPE) -> nn.Module:
    """DM-large of Gowal et al. (2018), the network of CROWN-IBP's best MNIST results
    (Zhang et al., 2020).

    conv3×3-64, ReLU → conv3×3-64, ReLU → conv3×3-128 stride 2, ReLU → conv3×3-128, ReLU →
    conv3×3-128, ReLU → fc-512, ReLU → fc-10 (padding 1: 28 → 28 → 28 → 14 → 14 → 14).
    """
    c = in_shape[0]
    features = nn.Sequential(nn.Conv2d(c, 64, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(128, 128, 3, padding=1), nn.ReLU())
    return _with_head(features, (512,), num_classes, in_shape)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "softmax": softmax_net,
    "mlp": mlp,
    "cnn": cnn,
    "madry-cnn": madry_cnn,
    "strided-cnn": strided_cnn,
    "dm-small": dm_small,
    "dm-medium": dm_medium,
    "dm-large": dm_large,
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
    smallest = {"dm-small": 10, "dm-medium": 16}.get(arch, 0)
    if min(h, w) < smallest:
        raise RobustkitError(f"model {arch} needs images of at least {smallest}×{smallest} "
                             f"pixels, not {h}×{w}")
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
