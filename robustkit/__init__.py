"""robustkit: evaluate and improve the adversarial robustness of PyTorch image classifiers.

The public API, for notebooks and scripts::

    import robustkit as rk
    data = rk.load_dataset("mnist")        # or rk.load_data("cifar10" | "my.npz" | "my_images/")
    model, _ = rk.load_model("runs/mnist_cnn/model-best.safetensors")
    ev = rk.evaluate(model, data.test, [rk.AttackConfig(name="pgd")], eps=[0, 0.1, 0.3])
    ev.results, ev.per_sample
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError as _NotInstalled
from importlib.metadata import version as _version

try:
    __version__ = _version("robustkit")  # the installed distribution's, from pyproject.toml
except _NotInstalled:  # pragma: no cover - a source tree on PYTHONPATH without installing
    __version__ = "0.1.0+source"

from robustkit.attacks import AttackResult, apgd, apgd_targeted, fgsm, pgd, square
from robustkit.attacks.ensemble import autoattack
from robustkit.config import AttackConfig, ExperimentConfig, load_config
from robustkit.data import Dataset, Split, load_dataset
from robustkit.errors import RobustkitError
from robustkit.evaluation import Evaluation, evaluate
from robustkit.models import Normalized, build_model, load_model
from robustkit.sources import load_data
from robustkit.training import train

__all__ = [
    "AttackConfig",
    "AttackResult",
    "Dataset",
    "Evaluation",
    "ExperimentConfig",
    "Normalized",
    "RobustkitError",
    "Split",
    "__version__",
    "apgd",
    "apgd_targeted",
    "autoattack",
    "build_model",
    "evaluate",
    "fgsm",
    "load_config",
    "load_data",
    "load_dataset",
    "load_model",
    "pgd",
    "square",
    "train",
]
