"""robustkit: evaluate and improve the adversarial robustness of PyTorch image classifiers.

The public API, for notebooks and scripts (runs as written in a clone, with the MNIST files
in ``$ROBUSTKIT_DATA``; ``zoo:mnist_cnn`` is the weights released with ``reports/mnist_cnn``)::

    import robustkit as rk
    data = rk.load_dataset("mnist")        # or rk.load_data("cifar10" | "my.npz" | "my_images/")
    model, _ = rk.load_model("zoo:mnist_cnn")
    test = data.test.take(100)             # the first 100 test images
    ev = rk.evaluate(model, test, [rk.AttackConfig(name="pgd", steps=20)], eps=[0, 0.1, 0.2])
    print(ev.results)                      # accuracy and its 95% interval per attack and ε
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from robustkit.version import __version__

#: Public name → the module that defines it. Imported on first use (PEP 562), so that
#: ``import robustkit.cli`` (and ``robustkit --help``) does not load torch and the engine.
_EXPORTS = {
    "AttackResult": "robustkit.attacks",
    "apgd": "robustkit.attacks",
    "apgd_targeted": "robustkit.attacks",
    "fgsm": "robustkit.attacks",
    "pgd": "robustkit.attacks",
    "square": "robustkit.attacks",
    "autoattack": "robustkit.attacks.ensemble",
    "AttackConfig": "robustkit.config",
    "ExperimentConfig": "robustkit.config",
    "load_config": "robustkit.config",
    "Dataset": "robustkit.data",
    "Split": "robustkit.data",
    "load_dataset": "robustkit.data",
    "RobustkitError": "robustkit.errors",
    "Evaluation": "robustkit.evaluation",
    "evaluate": "robustkit.evaluation",
    "Normalized": "robustkit.models",
    "build_model": "robustkit.models",
    "load_model": "robustkit.models",
    "load_data": "robustkit.sources",
    "train": "robustkit.training",
}

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

if TYPE_CHECKING:
    from robustkit.attacks import AttackResult, apgd, apgd_targeted, fgsm, pgd, square
    from robustkit.attacks.ensemble import autoattack
    from robustkit.config import AttackConfig, ExperimentConfig, load_config
    from robustkit.data import Dataset, Split, load_dataset
    from robustkit.errors import RobustkitError
    from robustkit.evaluation import Evaluation, evaluate
    from robustkit.models import Normalized, build_model, load_model
    from robustkit.sources import load_data
    from robustkit.training import train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'robustkit' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
