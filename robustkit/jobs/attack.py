"""The attack job behind ``robustkit attack``: load any supported model, sweep the attacks over
ε on the test set, run the post-sweep stages and write a complete run folder.

Under torchrun (several processes, :mod:`robustkit.distributed`) every rank runs the same job:
the sweep is shared out, and rank 0 alone writes files, runs the stages and reports, so the
folder is the one a single process writes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from robustkit import distributed
from robustkit.budgets import sweep_eps_bound
from robustkit.config import SEED_MAX, AttackConfig, DefenceConfig, TransformConfig
from robustkit.data import Dataset, Split
from robustkit.errors import RobustkitError
from robustkit.jobs.common import (
    data_provenance,
    data_settings,
    keep_sweep,
    physical_settings,
    post_sweep_stages,
    report_folders,
    silent,
    sweep_outcome,
)
from robustkit.jobs.outcome import AttackOutcome, SweepOutcome
from robustkit.jobs.transfer import load_sources
from robustkit.models import check_logits, load_model, parse_normalize
from robustkit.outputs import (
    Holder,
    Owner,
    config_file_label,
    guard_folder,
    hash_change,
    prepare_staging,
    refuse_working_folder,
    swap_in,
    version_change,
    writing,
)
from robustkit.physical import build_defence, build_transform
from robustkit.released import WEIGHTS_STEM, ZOO_PREFIX, weights_provenance
from robustkit.runs import attack_records, evaluate_to_folder, finish_sweep, settings_fingerprint
from robustkit.runtime import now_iso, provenance
from robustkit.sources import load_data
from robustkit.stages import SweepDone, as_model_failure, check_certifiable, run_stages
from robustkit.storage import read_json_if_any
from robustkit.vocabulary import CertifyMethod, ChecksLevel, SaveAdversarial


def model_name(spec: str, weights: Path | str | None = None) -> str:
    """A short display name: ``runs/mnist_cnn/model-best.safetensors``,
    ``reports/mnist_cnn/model.safetensors`` and ``zoo:mnist_cnn`` → ``mnist_cnn``;
    ``my_nets:small_cnn`` with ``--weights w/cnn_a.pt`` → ``my_nets.small_cnn-cnn_a`` (the
    module and the weights, so two factories or two weight files get two folders)."""
    if spec.startswith(ZOO_PREFIX):
        return spec[len(ZOO_PREFIX):].strip("/").replace("/", "-")
    if ":" in spec and not Path(spec).exists():
        module, _, factory = spec.partition(":")
        name = f"{module.split('.')[-1]}.{factory.split('.')[-1]}"
        if weights is not None:
            name += f"-{Path(weights).name.split('.')[0]}"
        return name
    path = Path(spec)
    stem = path.name.split(".")[0]
    checkpoint = stem == WEIGHTS_STEM or stem.startswith("model-")
    return path.parent.name if checkpoint and path.parent.name else stem


def attack_model(
    *,
    model: str,
    attacks: Sequence[AttackConfig],
    eps: Sequence[float],
    n: int | None = None,
    batch_size: int = 1000,
    seed: int = 0,
    dataset: str = "mnist",
    data_source: str | None = None,
    resize: Sequence[int] | None = None,
    app_dir: Path | None = None,
    weights: Path | None = None,
    normalize: str | None = None,
    device: str | None = None,
    data_dir: Path | None = None,
    out_dir: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    show: Callable[[SweepOutcome], None] | None = None,
    log: Callable[[str], None] = print,
    trust_model_file: bool = False,
    defence: DefenceConfig | None = None,
    transforms: TransformConfig | None = None,
    checks_level: ChecksLevel = "quick",
    output: str | None = None,
    certify: Sequence[CertifyMethod] = (),
    save_adversarial: SaveAdversarial | None = None,
) -> AttackOutcome:
    """Load any supported model, sweep the attacks over ε on the test set, run the post-sweep
    stages (:func:`~robustkit.jobs.common.post_sweep_stages`), write a run folder.

    Returns the sweep with its checks, warnings and output files (the ``--json`` document is
    :func:`robustkit.terminal.attack_summary`); ``show`` receives the sweep before the folder
    is swapped in (the CLI prints it). ``defence`` puts a preprocessing step in front of the
    model; ``transforms`` is the distribution EOT attacks draw from and robustness under
    transformation is measured with. ``checks_level``: how much checking follows the sweep
    (:func:`robustkit.checks.run_checks`). ``output``: where a model whose forward returns more
    than logits keeps them (:func:`robustkit.models.load_model`). ``certify``: the certified
    bounds computed at the same ε (:class:`~robustkit.stages.CertifiedBounds`).
    ``save_adversarial``: each cell's examples written to ``adversarial/``
    (:class:`~robustkit.stages.SavedAdversarial`). A transfer attack (``source`` set) crafts
    on its source model, loaded here and held to the model's input shape and classes
    (:func:`~robustkit.jobs.transfer.load_sources`).
    """
    _check_attack_request(attacks, eps, transforms, seed=seed, n=n, batch_size=batch_size)
    target, dist = distributed.setup(device or "auto")
    main = dist is None or dist.is_main
    if not main:
        log, show = silent, None
    name = model_name(model, weights)
    folder = out_dir or Path("runs") / f"attack-{name}"
    refuse_working_folder(folder)
    with writing([(folder, "--out")], dist):  # one writer of the folder, for the whole job
        stats = parse_normalize(normalize) if normalize else None
        net, info = load_model(model, weights=weights, device=target, normalize=stats,
                               trust=trust_model_file, app_dir=app_dir, output=output)
        data = distributed.local_first(lambda: load_data(
            data_source, dataset=dataset, data_dir=data_dir, device=target, val_size=0,
            parts=("test",), resize=resize, limit=n), dist)  # the test split, its first n images
        split = data.test.take(n)
        num_classes = _model_width(net, split) or max(2, len(data.classes))
        check_logits(net, split.images[:8], num_classes)
        _check_labels(split, num_classes, data.name, model)
        data = _named_up_to(data, num_classes)
        sources, source_settings = load_sources(attacks, split.images[:8], num_classes,
                                                device=target, app_dir=app_dir,
                                                trust=trust_model_file)
        mismatch = [info["release_mismatch"]] if info.get("release_mismatch") else []
        for warning in mismatch:
            log(f"warning: {warning}")
        net = build_defence(net, defence)  # after the checks a random defence would fail
        if certify:
            check_certifiable(net, certify)
        owner = _attack_owner(model)
        settings = _attack_settings(info, data, split, attacks, eps, weights=weights,
                                    normalize=normalize, seed=seed, target=target,
                                    batch_size=batch_size, defence=defence, transforms=transforms)
        if save_adversarial is not None:  # a sweep that kept none cannot resume into one that does
            settings["save_adversarial"] = save_adversarial
        settings.update(source_settings)
        fingerprint = settings_fingerprint(settings)
        replacing = distributed.on_main(lambda: guard_folder(
            folder, owner, overwrite, lambda held: _settings_changes(held, folder, fingerprint)),
            dist)
        work = distributed.on_main(lambda: prepare_staging(folder, keep_sweep(folder, [None])),
                                   dist)
        manifest = {**_attack_manifest(owner, info, data, split, target, seed),
                    "checks": checks_level, **({"certify": list(certify)} if certify else {})}
        evaluation = as_model_failure(model, "the sweep", work, lambda: evaluate_to_folder(
            net, split, attacks, eps, out_dir=work, settings=settings, manifest=manifest,
            model_name=name, batch_size=batch_size, seed=seed, progress=progress, dist=dist,
            transform=build_transform(transforms), log=log,
            keep_adversarial=save_adversarial is not None, sources=sources,
        ))
        warnings = clean_accuracy_warnings(evaluation.results, data.name, normalize)
        done, outputs = None, {"folder": str(folder)}
        if main:  # the stages and the report: rank 0 only
            stages = post_sweep_stages(level=checks_level, attacks=attacks, eps=eps,
                                       transforms=transforms, certify=certify,
                                       save_adversarial=save_adversarial)
            done = run_stages(stages, SweepDone(
                model=net, split=split, evaluation=evaluation, checks=None, settings=settings,
                folder=work, shown=folder, seed=seed, batch_size=batch_size, progress=progress,
                log=log), model)
            outputs.update(report_folders(work, [work], name, log, shown_as=folder))
        sweep = sweep_outcome(done, evaluation, checks_level,
                              f"robust accuracy of {name} on {len(split)} {data.name} test images")
        if show is not None:
            show(sweep)
        if main:
            finish_sweep(work)
            swap_in(work, folder)
            if replacing:
                log(replacing)
    for warning in warnings:
        log(f"warning: {warning}")
    outputs.update(_result_files(folder))
    return AttackOutcome(sweep, mismatch + warnings, outputs, settings, name)



def _model_width(net: Any, split: Split) -> int | None:
    """K, the number of logits the model returns per image: the class count of an evaluation
    (not the largest label: data whose labels happen to stop at 7 still meets a 10-class
    model). None when the model returns no ``[N, K ≥ 2]`` tensor or fails, for
    :func:`check_logits` to say what is wrong."""
    try:
        with torch.no_grad():
            out = net(split.images[:8])
    except Exception:  # check_logits runs it again and reports the failure
        return None
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= 2:
        return int(out.shape[1])
    return None


def _named_up_to(data: Dataset, num_classes: int) -> Dataset:
    """``data`` with a name for each of ``num_classes`` classes: its own, then ``8``, ``9``, …
    for the classes of the model its labels do not reach."""
    if num_classes <= len(data.classes):
        return data
    extra = tuple(str(i) for i in range(len(data.classes), num_classes))
    return dataclasses.replace(data, classes=data.classes + extra)


def _check_labels(split: Split, num_classes: int, data_name: str, model: str) -> None:
    """Every evaluated label must index one of the model's ``num_classes`` logits."""
    if len(split) == 0:
        return
    largest = int(split.labels.max())
    if largest >= num_classes:
        index = int((split.labels == largest).nonzero()[0])
        raise RobustkitError(
            f"{data_name}: test image {index} has label {largest}, but the model {model} "
            f"returns {num_classes} logits (classes 0 to {num_classes - 1}): use data whose "
            "labels are the model's classes, or the model trained on this data")


def _check_attack_request(attacks: Sequence[AttackConfig], eps: Sequence[float],
                          transforms: TransformConfig | None, *, seed: int, n: int | None,
                          batch_size: int) -> None:
    """The ``robustkit attack`` arguments checked before anything loads, each with its fix."""
    _check_budgets(attacks, eps, transforms)
    if not 0 <= seed <= SEED_MAX:
        raise RobustkitError(f"--seed {seed}: must be in [0, {SEED_MAX}]")
    if n is not None and n < 1:
        raise RobustkitError(f"--n {n}: must be at least 1")
    if batch_size < 1:
        raise RobustkitError(f"--batch-size {batch_size}: must be at least 1")


def _check_budgets(attacks: Sequence[AttackConfig], eps: Sequence[float],
                   transforms: TransformConfig | None) -> None:
    """Every ε within the attacks' norms' bounds, and one above 0 unless ``[transforms]``
    brings its own ε."""
    upper = sweep_eps_bound(a.norm for a in attacks)  # L2's √d is checked once data is loaded
    for e in eps:
        if not 0 <= e <= upper:
            raise RobustkitError(
                f"--eps {e:g} is out of range: L∞ budgets are in [0, 1] pixel units "
                "(write e.g. 0.3 or 8/255, not 8)"
            )
    if not any(e > 0 for e in eps) and not (transforms is not None and transforms.eps):
        raise RobustkitError(
            f"--eps {','.join(f'{e:g}' for e in eps) or '(empty)'}: give at least one budget "
            "above 0 (0 alone measures clean accuracy only), e.g. 0,0.1,0.2,0.3"
        )


def _attack_owner(model: str) -> Owner:
    """Who writes an attack's folder: the model file's path as recorded (relative to the
    working folder when inside it), or the model spec when it names no file (``zoo:…``)."""
    return Owner("attack", config_file_label(Path(model)) if Path(model).exists() else model)


def _attack_settings(info: dict[str, Any], data: Dataset, split: Split,
                     attacks: Sequence[AttackConfig], eps: Sequence[float], *,
                     weights: Path | None, normalize: str | None, seed: int, target: Any,
                     batch_size: int, defence: DefenceConfig | None,
                     transforms: TransformConfig | None) -> dict[str, Any]:
    """``settings.json`` of an attack: everything its numbers depend on (its fingerprint
    decides whether a folder's sweep may resume)."""
    settings = {
        "model": info["model"], "model_kind": info["kind"], "weights": str(weights or ""),
        "normalize": normalize or "", "dataset": data.name, "split": "test", "n": len(split),
        "eps": sorted(set(eps)), "attacks": attack_records(attacks), "seed": seed,
        "device": str(target), "batch_size": batch_size,
        **physical_settings(defence, transforms),
        **({"output": info["output"]} if info.get("output") else {}),
    }
    settings.update(data_settings(data))
    return settings


def _attack_manifest(owner: Owner, info: dict[str, Any], data: Dataset, split: Split,
                     target: Any, seed: int) -> dict[str, Any]:
    """The manifest of an attack: who ran it when, where, on what data and which model."""
    manifest = {"command": "attack", "owner": owner.record(), "start": now_iso(),
                **provenance(target, seed), **data_provenance(data, split),
                "model_info": {k: v for k, v in info.items() if k != "checkpoint"}}
    if info["kind"] == "checkpoint":
        manifest.update(weights_provenance(Path(info["path"])))
    return manifest


def _result_files(folder: Path) -> dict[str, str]:
    """The tables of ``folder`` that exist, kind → path."""
    return {kind: str(folder / f"{kind}.csv")
            for kind in ("results", "per_sample", "timings", "checks")
            if (folder / f"{kind}.csv").is_file()}


#: Clean accuracy below which a model looks mis-fed on a built-in data set (a linear model
#: reaches about 92% on MNIST and 84% on Fashion-MNIST, a small CNN 99% and 90%).
PLAUSIBLE_CLEAN = {"mnist": 0.90, "fashion-mnist": 0.75}

NORMALIZE_HINTS = {"mnist": "0.1307,0.3081", "fashion-mnist": "0.2860,0.3530"}


def clean_accuracy_warnings(results: Any, dataset: str, normalize: str | None) -> list[str]:
    """A warning when clean accuracy is far below what the data set allows: the usual cause is
    a model trained on normalised inputs fed raw [0, 1] pixels (or given the wrong statistics).
    """
    floor = PLAUSIBLE_CLEAN.get(dataset)
    clean_rows = results[results["eps"] == 0]
    if floor is None or clean_rows.empty:
        return []
    clean = float(clean_rows["accuracy"].max())
    if clean >= floor:
        return []
    fix = (f"check the --normalize {normalize} statistics against the model's training"
           if normalize else
           f"if the model was trained on normalised inputs, pass --normalize MEAN,STD (for "
           f"{dataset}: --normalize {NORMALIZE_HINTS[dataset]}); robustkit feeds pixels in [0, 1]")
    return [f"clean accuracy {clean:.1%} on {dataset} is far below what models reach there "
            f"(below {floor:.0%} is unusual): {fix}"]


def _settings_changes(held: Holder, folder: Path, new: str) -> str:
    """What differs from the attack recorded in ``folder``: settings fingerprint, version."""
    recorded = held.manifest.fingerprint
    settings = read_json_if_any(folder / "settings.json")
    rehashed = settings_fingerprint(settings) if settings else None
    return (f"{hash_change('settings', str(recorded) if recorded else rehashed, new, rehashed)}"
            f", {version_change(held.manifest)}")

