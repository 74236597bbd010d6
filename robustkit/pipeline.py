"""End-to-end jobs behind the CLI: attack a model (``robustkit attack``) and run an experiment
(``robustkit run``). Each writes a complete run folder; the CLI only parses and prints."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from robustkit.config import AttackConfig, to_dict
from robustkit.data import load_dataset
from robustkit.errors import RobustkitError
from robustkit.evaluation import Evaluation
from robustkit.models import check_logits, load_model, parse_normalize
from robustkit.runs import evaluate_to_folder
from robustkit.runtime import now_iso, provenance, resolve_device


def model_name(spec: str) -> str:
    """A short display name: ``runs/mnist_cnn/model-best.safetensors`` → ``mnist_cnn``."""
    if ":" in spec and not Path(spec).exists():
        return spec.split(":")[-1]
    path = Path(spec)
    stem = path.name.split(".")[0]
    return path.parent.name if stem.startswith("model-") and path.parent.name else stem


def accuracy_table(results: Any) -> str:
    """Accuracy vs ε, one column per attack, as text."""
    table = results.pivot_table(index="eps", columns="attack", values="accuracy", sort=False)
    return str(table.to_string(float_format=lambda v: f"{v:.4f}"))


def attack_model(
    *,
    model: str,
    attacks: Sequence[AttackConfig],
    eps: Sequence[float],
    n: int | None = None,
    batch_size: int = 1000,
    seed: int = 0,
    dataset: str = "mnist",
    weights: Path | None = None,
    normalize: str | None = None,
    device: str | None = None,
    data_dir: Path | None = None,
    out_dir: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    log: Callable[[str], None] = print,
    report: bool = True,
) -> Evaluation:
    """Load any supported model, sweep the attacks over ε on the test set, write a run folder."""
    for e in eps:
        if e < 0 or (e > 1 and all(a.norm == "linf" for a in attacks)):
            raise RobustkitError(
                f"--eps {e:g} is out of range: L∞ budgets are in [0, 1] pixel units "
                "(write e.g. 0.3 or 8/255, not 8)"
            )
    if n is not None and n < 1:
        raise RobustkitError(f"--n {n}: must be at least 1")
    if batch_size < 1:
        raise RobustkitError(f"--batch-size {batch_size}: must be at least 1")
    target = resolve_device(device or "auto")
    stats = parse_normalize(normalize) if normalize else None
    net, info = load_model(model, weights=weights, device=target, normalize=stats)
    data = load_dataset(dataset, data_dir, target, val_size=0)
    split = data.test.take(n)
    check_logits(net, split.images[:8], len(data.classes))
    name = model_name(model)
    folder = out_dir or Path("runs") / f"attack-{name}"
    settings = {
        "model": info["model"], "model_kind": info["kind"], "weights": str(weights or ""),
        "normalize": normalize or "", "dataset": dataset, "split": "test", "n": len(split),
        "eps": sorted(set(eps)), "attacks": [to_dict(a) for a in attacks], "seed": seed,
        "device": str(target), "batch_size": batch_size,
    }
    manifest = {"command": "attack", "start": now_iso(), **provenance(target, seed),
                "model_info": {k: v for k, v in info.items() if k != "checkpoint"}}
    evaluation = evaluate_to_folder(
        net, split, attacks, eps, out_dir=folder, settings=settings, manifest=manifest,
        model_name=name, batch_size=batch_size, seed=seed, progress=progress,
        overwrite=overwrite,
    )
    echo(f"robust accuracy of {name} on {len(split)} {dataset} test images:")
    echo(accuracy_table(evaluation.results))
    for note in evaluation.notes:
        echo(f"note: {note}")
    if report:
        _report(folder, log)
    echo(f"results in {folder}/ (results.csv, per_sample.csv, timings.csv, settings.json)")
    return evaluation


def _report(folder: Path, log: Callable[[str], None]) -> None:
    try:
        from robustkit.reporting import build_report
    except ImportError:  # reporting not available
        return
    paths = build_report([folder], folder)
    log(f"report: {paths}")


def replace_attack(attack: AttackConfig, **changes: Any) -> AttackConfig:
    return dataclasses.replace(attack, **changes)
