"""End-to-end jobs behind the CLI: attack a model (``robustkit attack``) and run an experiment
(``robustkit run``). Each writes a complete run folder; the CLI only parses and prints.

Under torchrun (several processes, :mod:`robustkit.distributed`) every rank runs the same job:
training and the sweep are shared out, and rank 0 alone writes files, checks, reports and
prints, so the folder is the one a single process writes."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch

from robustkit import distributed
from robustkit.budgets import sweep_eps_bound
from robustkit.checkpoint import read_sidecar
from robustkit.checks import UNRELIABLE, flag_results, run_checks, unreliable_attacks
from robustkit.config import (
    SEED_MAX,
    AttackConfig,
    DefenceConfig,
    ExperimentConfig,
    ModelConfig,
    ReferenceConfig,
    TransformConfig,
    config_from_dict,
    config_hash,
    load_config,
    to_dict,
    to_toml,
    training_hash,
)
from robustkit.data import DATASETS, Dataset, Split
from robustkit.distributed import Context
from robustkit.errors import RobustkitError
from robustkit.evaluation import Evaluation
from robustkit.models import check_logits, load_model, parse_normalize
from robustkit.models.factory import build_network
from robustkit.models.loading import load_checkpoint, sidecar_network
from robustkit.outputs import (
    Holder,
    Owner,
    checkpoint_folder,
    config_file_label,
    guard_folder,
    hash_change,
    prepare_staging,
    refuse_working_folder,
    staging_path,
    swap_in,
    version_change,
    writing,
)
from robustkit.physical import (
    build_defence,
    build_transform,
    transformation_robustness,
    wants_physical,
    write_physical,
)
from robustkit.released import WEIGHTS_STEM, ZOO_PREFIX, release_weights, weights_provenance
from robustkit.reporting import add_probabilities, build_report
from robustkit.reporting.headline import headlines, verdict
from robustkit.results import UNRELIABLE_COLUMN, result_types
from robustkit.runs import (
    STATE_DIR,
    attack_records,
    evaluate_to_folder,
    finish_sweep,
    load_checks,
    save_check,
    settings_fingerprint,
    write_frame,
)
from robustkit.runtime import now_iso, provenance
from robustkit.sources import load_configured, load_data
from robustkit.storage import read_json, read_json_if_any, write_json, write_text
from robustkit.training import adopt_training, train
from robustkit.vocabulary import ChecksLevel

_T = TypeVar("_T")


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


def accuracy_table(results: Any, unreliable: dict[str, str] | None = None) -> str:
    """Accuracy vs ε, one column per attack, as text; the numbers at ε > 0 of the attacks in
    ``unreliable`` (title → reason, from :func:`robustkit.checks.unreliable_attacks`) carry a
    mark, explained below the table."""
    table = results.pivot_table(index="eps", columns="attack", values="accuracy", sort=False)
    if not unreliable:
        return str(table.to_string(float_format=lambda v: f"{v:.4f}"))
    text = table.apply(lambda column: [
        f"{v:.4f}" + (f" {UNRELIABLE}" if column.name in unreliable and eps > 0 else "")
        for eps, v in column.items()])
    reasons = sorted(set(unreliable.values()))
    return str(text.to_string()) + f"\n{UNRELIABLE}: {'; '.join(reasons)} (see checks.csv)"


def headline_lines(results: Any, checks: Any, level: ChecksLevel,
                   unreliable: dict[str, str] | None) -> list[str]:
    """The headline printed above the results table, one line per model
    (:mod:`robustkit.reporting.headline`, as the report opens with it)."""
    return [f"{h.model}: {h.text()}" for h in headlines(results, checks, level, unreliable)]


def _unreliable(folder: Path, results: Any, settings: dict[str, Any]) -> dict[str, str]:
    """The attacks whose numbers the failing checks in ``folder/checks.csv`` discredit."""
    file = folder / "checks.csv"
    if not file.is_file():
        return {}
    return unreliable_attacks(pd.read_csv(file), settings, results["attack"].unique())


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
    echo: Callable[[str], None] = print,
    log: Callable[[str], None] = print,
    report: bool = True,
    trust_model_file: bool = False,
    defence: DefenceConfig | None = None,
    transforms: TransformConfig | None = None,
    checks_level: ChecksLevel = "quick",
    output: str | None = None,
) -> AttackOutcome:
    """Load any supported model, sweep the attacks over ε on the test set, write a run folder.

    Returns the evaluation with its checks, warnings and output files (see
    :func:`attack_summary` for the ``--json`` document). ``defence`` puts a preprocessing step
    in front of the model; ``transforms`` is the distribution EOT attacks draw from and
    robustness under transformation is measured with. ``checks_level``: how much checking
    follows the sweep (:func:`robustkit.checks.run_checks`). ``output``: where a model whose
    forward returns more than logits keeps them (:func:`robustkit.models.load_model`).
    """
    _check_attack_request(attacks, eps, transforms, seed=seed, n=n, batch_size=batch_size)
    target, dist = distributed.setup(device or "auto")
    main = dist is None or dist.is_main
    if not main:
        echo = log = _silent
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
        mismatch = [info["release_mismatch"]] if info.get("release_mismatch") else []
        for warning in mismatch:
            log(f"warning: {warning}")
        net = build_defence(net, defence)  # after the checks a random defence would fail
        owner = _attack_owner(model)
        settings = _attack_settings(info, data, split, attacks, eps, weights=weights,
                                    normalize=normalize, seed=seed, target=target,
                                    batch_size=batch_size, defence=defence, transforms=transforms)
        fingerprint = settings_fingerprint(settings)
        replacing = distributed.on_main(lambda: guard_folder(
            folder, owner, overwrite, lambda held: _settings_changes(held, folder, fingerprint)),
            dist)
        work = distributed.on_main(lambda: prepare_staging(folder, _keep_sweep(folder, [None])),
                                   dist)
        manifest = {**_attack_manifest(owner, info, data, split, target, seed),
                    "checks": checks_level}
        evaluation = _user_model_stage(model, "the sweep", work, lambda: evaluate_to_folder(
            net, split, attacks, eps, out_dir=work, settings=settings, manifest=manifest,
            model_name=name, batch_size=batch_size, seed=seed, progress=progress, dist=dist,
            transform=build_transform(transforms), log=log,
        ))
        warnings = clean_accuracy_warnings(evaluation.results, data.name, normalize)
        reporting = report and main  # checks and report: rank 0 only
        checks, outputs = None, {"folder": str(folder)}
        if reporting:
            checks = _user_model_stage(model, "the sanity checks", work, lambda: _after_evaluation(
                net, split, evaluation, settings, work, seed=seed, reference=None, log=log,
                progress=progress, shown=folder, level=checks_level))
            evaluation = _flag_unreliable(work, evaluation, checks, settings)
            _user_model_stage(model, "the physical-world evaluation", work, lambda: _physical(
                net, split, attacks, transforms, eps, work, batch_size=batch_size, seed=seed,
                progress=progress, log=log, shown=folder))
        unreliable = _unreliable(work, evaluation.results, settings) if main else None
        for line in headline_lines(evaluation.results, checks, checks_level, unreliable):
            echo(line)
        echo(f"robust accuracy of {name} on {len(split)} {data.name} test images:")
        echo(accuracy_table(evaluation.results, unreliable))
        for note in evaluation.notes:
            echo(f"note: {note}")
        if reporting:
            outputs.update(_report_folders(work, [work], name, log, shown_as=folder))
            for line in verdict_lines(checks, checks_level):
                echo(line)
        if main:
            finish_sweep(work)
            swap_in(work, folder)
            if replacing:
                log(replacing)
    for warning in warnings:
        log(f"warning: {warning}")
    outputs.update(_result_files(folder))
    warnings = mismatch + warnings
    echo(f"results in {folder}/ (results.csv, per_sample.csv, timings.csv, settings.json)")
    return AttackOutcome(evaluation, checks, warnings, outputs, settings, name, checks_level)


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
        **_physical_settings(defence, transforms),
        **({"output": info["output"]} if info.get("output") else {}),
    }
    settings.update(_data_settings(data))
    return settings


def _attack_manifest(owner: Owner, info: dict[str, Any], data: Dataset, split: Split,
                     target: Any, seed: int) -> dict[str, Any]:
    """The manifest of an attack: who ran it when, where, on what data and which model."""
    manifest = {"command": "attack", "owner": owner.record(), "start": now_iso(),
                **provenance(target, seed), **_data_provenance(data, split),
                "model_info": {k: v for k, v in info.items() if k != "checkpoint"}}
    if info["kind"] == "checkpoint":
        manifest.update(weights_provenance(Path(info["path"])))
    return manifest


def _user_model_stage(model: str, stage: str, work: Path, run: Callable[[], _T]) -> _T:
    """Run ``run``; any error but robustkit's own, the disk's or memory's is the user's model
    failing on some batch or its gradient during ``stage``, reported as such (the finished
    cells stay in ``work``, so the same command resumes)."""
    try:
        return run()
    except (RobustkitError, OSError, MemoryError):
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RobustkitError(
            f"the model {model} failed during {stage} ({type(exc).__name__}: {first}); "
            f"finished (attack, ε) cells are kept in {work}: fix the model and run the same "
            "command again"
        ) from None


def _result_files(folder: Path) -> dict[str, str]:
    """The tables of ``folder`` that exist, kind → path."""
    return {kind: str(folder / f"{kind}.csv")
            for kind in ("results", "per_sample", "timings", "checks")
            if (folder / f"{kind}.csv").is_file()}


@dataclass(frozen=True)
class AttackOutcome:
    """What ``robustkit attack`` produced: the sweep, its checks (None without a report), the
    warnings printed, the files written (kind → path), the settings and the model's name."""

    evaluation: Evaluation
    checks: Any
    warnings: list[str]
    outputs: dict[str, str]
    settings: dict[str, Any]
    model: str
    checks_level: ChecksLevel = "quick"


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


#: Where a check that did not pass is explained, with what to do.
CHECKS_DOC = "what each check means and what to do: docs/checks.md in robustkit's source"
#: What a run without checks says wherever a verdict would stand.
NO_CHECKS = ("checks: none ran (--checks off): nothing tested whether these numbers overstate "
             "robustness; run with --checks quick or full before relying on them")


def verdict_lines(checks: Any, level: ChecksLevel = "full") -> list[str]:
    """``checks: 8 pass, 1 warn, 0 fail`` (``checks (quick): …`` at the quick level) and one
    line per check that did not pass; :data:`NO_CHECKS` when the level is off."""
    if level == "off":
        return [NO_CHECKS]
    if checks is None or len(checks) == 0:
        return []
    lines = [verdict(checks, level)]
    for _, row in checks[checks["status"] != "pass"].iterrows():
        lines.append(f"  {row['status']}: {row['name']}: {row['detail']}")
    if len(lines) > 1:
        lines.append(f"  {CHECKS_DOC}")
    return lines


def attack_summary(outcome: AttackOutcome) -> dict[str, Any]:
    """The ``robustkit attack --json`` document (see ``ATTACK_JSON_FIELDS`` in the tests)."""
    results = outcome.evaluation.results
    columns = {c: kind for c, kind in result_types().items() if c != "model"}
    rows = [{**{c: kind(r[c]) for c, kind in columns.items()},
             UNRELIABLE_COLUMN: r.get(UNRELIABLE_COLUMN) or None} for _, r in results.iterrows()]
    checks = [] if outcome.checks is None else [
        {"name": str(c["name"]), "status": str(c["status"]),
         "value": None if c["value"] is None or c["value"] != c["value"] else float(c["value"]),
         "threshold": str(c["threshold"]), "detail": str(c["detail"])}
        for _, c in outcome.checks.iterrows()]
    counts = {status: sum(c["status"] == status for c in checks)
              for status in ("pass", "warn", "fail")}
    s = outcome.settings
    return {"model": outcome.model, "model_spec": s["model"], "dataset": s["dataset"],
            "split": s["split"], "n": s["n"], "eps": s["eps"],
            "attacks": [a.get("label") or _title(a) for a in s["attacks"]],
            "results": rows, "checks_level": outcome.checks_level, "checks": checks,
            "checks_summary": counts,
            "warnings": list(outcome.warnings), "outputs": dict(outcome.outputs)}


def _title(attack: dict[str, Any]) -> str:
    return config_from_dict({"attacks": [attack]}).attacks[0].title


def run_experiment(
    config_path: Path,
    *,
    overrides: Sequence[str] = (),
    out_dir: Path | None = None,
    runs_dir: Path = Path("runs"),
    retrain: bool = False,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    log: Callable[[str], None] = print,
) -> dict[int, Evaluation]:
    """Train (or reuse) each seed's model, sweep the config's attacks, check and report.

    Checkpoints go to ``runs_dir/<name>/seed-<s>/`` and are reused while their training hash
    matches the config; results, figures and reports go to ``out_dir`` (default
    ``reports/<name>/``), one sub-folder per seed when there are several seeds.
    """
    cfg = load_config(config_path, list(overrides))
    target, dist = distributed.setup(device or cfg.device)
    main = dist is None or dist.is_main
    if not main:
        echo = log = _silent
    folder = out_dir or Path("reports") / cfg.name
    config_file = config_file_label(config_path)
    owner = Owner("run", cfg.name, config_file)
    several = len(cfg.all_seeds) > 1
    refuse_working_folder(folder)
    locks = [(folder, "--out"), *((checkpoint_folder(runs_dir, cfg.name, seed), "--runs")
                                  for seed in cfg.all_seeds)]
    with writing(locks, dist):  # one writer of the report and checkpoint folders at a time
        replacing = distributed.on_main(
            lambda: _guard_run(cfg, folder, owner, runs_dir, config_file, overwrite), dist)
        data = distributed.local_first(lambda: load_configured(cfg.data, target),
                                       dist)  # one download per node at most
        split = (data.test if cfg.evaluate.split == "test" else data.val).take(cfg.evaluate.n)
        seed_dirs = [f"seed-{s}" for s in cfg.all_seeds] if several else [None]
        work = distributed.on_main(
            lambda: prepare_staging(folder, _keep_sweep(folder, seed_dirs)), dist)
        run = _Run(cfg=cfg, target=target, dist=dist, main=main, several=several, data=data,
                   split=split, folder=folder, work=work, owner=owner, runs_dir=runs_dir,
                   retrain=retrain, progress=progress, echo=echo, log=log)
        evaluations = {seed: _run_seed(run, seed) for seed in cfg.all_seeds}
        if main:
            _finish_run(run, evaluations, replacing)
    return evaluations


def _guard_run(cfg: ExperimentConfig, folder: Path, owner: Owner, runs_dir: Path,
               config_file: str | None, overwrite: bool) -> list[str]:
    """Before any work, may this run write its report folder, then each seed's checkpoints?
    Returns what will be replaced, one line each."""
    lines = [guard_folder(folder, owner, overwrite,
                          lambda held: _config_changes(held, folder, config_hash(cfg)))]
    lines += [guard_folder(checkpoint_folder(runs_dir, cfg.name, seed),
                           Owner("train", cfg.name, config_file), overwrite,
                           announce_same=False)  # train() says whether it reuses or resumes
              for seed in cfg.all_seeds]
    return [line for line in lines if line]


@dataclass(frozen=True)
class _Run:
    """What every seed of one ``robustkit run`` shares; ``work`` is the staging folder that
    becomes ``folder``, ``main`` whether this process is rank 0 (or alone)."""

    cfg: ExperimentConfig
    target: Any
    dist: Context | None
    main: bool
    several: bool
    data: Dataset
    split: Split
    folder: Path
    work: Path
    owner: Owner
    runs_dir: Path
    retrain: bool
    progress: bool
    echo: Callable[[str], None]
    log: Callable[[str], None]

    def eval_dir(self, seed: int) -> Path:
        """Where a seed's results go: ``seed-<s>/`` when there are several seeds."""
        return self.work / f"seed-{seed}" if self.several else self.work


def _run_seed(run: _Run, seed: int) -> Evaluation:
    """One seed: train (or reuse) its model, sweep it, check it on rank 0, print its table."""
    cfg, eval_dir = run.cfg, run.eval_dir(seed)
    ckpt_dir = checkpoint_folder(run.runs_dir, cfg.name, seed)
    fingerprint = training_hash(cfg, seed)
    best = ckpt_dir / "model-best"
    reusable = _train_or_reuse(run, seed, ckpt_dir, best, fingerprint)
    model, info = _load_everywhere(best, run.target, run.dist, cfg.model)
    model = build_defence(model, cfg.defence)
    settings = _seed_settings(run, seed, fingerprint, best)
    manifest = {**_seed_manifest(run, seed, ckpt_dir, best, info, reusable),
                "checks": cfg.evaluate.checks}
    evaluation = evaluate_to_folder(
        model, run.split, cfg.attacks, cfg.evaluate.eps, out_dir=eval_dir, settings=settings,
        manifest=manifest, model_name=f"{cfg.name}/seed-{seed}" if run.several else cfg.name,
        batch_size=cfg.evaluate.batch_size, seed=cfg.evaluate.seed, progress=run.progress,
        dist=run.dist, transform=build_transform(cfg.transforms), log=run.log,
    )
    checks = None
    if run.main:
        checks = _after_seed_sweep(run, model, evaluation, settings, ckpt_dir, best, eval_dir)
        evaluation = _flag_unreliable(eval_dir, evaluation, checks, settings)
    unreliable = _unreliable(eval_dir, evaluation.results, settings) if run.main else None
    for line in headline_lines(evaluation.results, checks, cfg.evaluate.checks, unreliable):
        run.echo(line)
    run.echo(f"{cfg.name} seed {seed}: robust accuracy on {len(run.split)} "
             f"{cfg.evaluate.split} images")
    run.echo(accuracy_table(evaluation.results, unreliable))
    for line in verdict_lines(checks, cfg.evaluate.checks):
        run.echo(line)
    return evaluation


def _train_or_reuse(run: _Run, seed: int, ckpt_dir: Path, best: Path, fingerprint: str
                    ) -> bool:
    """Train the seed's model into ``ckpt_dir`` unless its checkpoint ``best`` can be reused
    (not ``--retrain``, no unfinished training, the same training hash and data checksum) or
    another experiment's finished training of the same hash can be copied in. Returns whether
    a finished training was reused (rank 0's disk decides for every rank)."""
    cfg = run.cfg

    def can_reuse() -> bool:
        if run.retrain or not best.with_suffix(".json").is_file() or (
                ckpt_dir / "state.json").exists():
            return False
        sidecar = read_sidecar(best)  # a user's data file can change under the same name
        return (sidecar.get("training_hash") == fingerprint
                and sidecar.get("data_sha256") == run.data.provenance.get("data_sha256"))

    if distributed.on_main(can_reuse, run.dist):
        run.log(f"seed {seed}: reusing {best}.safetensors (training hash {fingerprint})")
        return True
    donor = None if run.retrain else distributed.on_main(
        lambda: _adopt_same_training(run, seed, ckpt_dir, fingerprint), run.dist)
    if donor is not None:
        run.log(f"seed {seed}: reusing {donor / 'model-best'}.safetensors, trained by "
                f"another experiment with the same training hash {fingerprint}; copied "
                f"into {ckpt_dir}")
        return True
    run.log(f"seed {seed}: training {cfg.model.factory or cfg.model.arch} "
            f"({cfg.train.method}) into {ckpt_dir}")
    train(cfg, out_dir=ckpt_dir, seed=seed, device=run.target, data=run.data,
          progress=run.progress, resume=not run.retrain, log=run.log, dist=run.dist)
    return False


def _adopt_same_training(run: _Run, seed: int, ckpt_dir: Path, fingerprint: str
                         ) -> Path | None:
    """Copy into ``ckpt_dir`` a finished training of another experiment under the runs folder
    with the same training hash and data checksum, and return its folder; None when there is
    none, or when ``ckpt_dir`` holds an unfinished training of its own (it resumes instead).

    The training hash covers everything the weights depend on (data, model, training
    settings, seed, device setting), so such a folder holds the weights this run would train:
    ``mnist_cnn_pgd_at_eot`` takes ``mnist_cnn_pgd_at``'s instead of training an hour again.
    """
    if (ckpt_dir / "state.json").exists():
        return None
    data_sha = run.data.provenance.get("data_sha256")
    for donor in sorted(run.runs_dir.glob(f"*/seed-{seed}")):
        if donor.resolve() != ckpt_dir.resolve() and _finished_training(donor, fingerprint,
                                                                         data_sha):
            owner = Owner("train", run.cfg.name, run.owner.config_file)
            adopt_training(donor, ckpt_dir, run.cfg, seed, owner.record())
            return donor
    return None


def _finished_training(folder: Path, fingerprint: str, data_sha: Any) -> bool:
    """Whether ``folder`` holds a finished training (manifest written, no resume state) whose
    best checkpoint has this training hash and data checksum; a damaged one does not count."""
    if (read_json_if_any(folder / "manifest.json") is None or (folder / "state.json").exists()
            or not (folder / "model-best.safetensors").is_file()):
        return False
    try:
        sidecar = read_sidecar(folder / "model-best")
    except RobustkitError:
        return False
    return sidecar.get("training_hash") == fingerprint and sidecar.get("data_sha256") == data_sha


def _seed_settings(run: _Run, seed: int, fingerprint: str, best: Path) -> dict[str, Any]:
    """``settings.json`` of one seed's sweep: everything its numbers depend on."""
    cfg = run.cfg
    return {
        "experiment": cfg.name, "config_hash": config_hash(cfg), "seed": seed,
        "training_hash": fingerprint, "model": str(best), "dataset": run.data.name,
        "split": cfg.evaluate.split, "n": len(run.split), "eps": sorted(set(cfg.evaluate.eps)),
        "attacks": attack_records(cfg.attacks), "device": str(run.target),
        "batch_size": cfg.evaluate.batch_size, **_data_settings(run.data),
        **_physical_settings(cfg.defence, cfg.transforms),
    }


def _seed_manifest(run: _Run, seed: int, ckpt_dir: Path, best: Path, info: dict[str, Any],
                   reusable: bool) -> dict[str, Any]:
    """The manifest of one seed's sweep: who ran it when, where, on what data, and the
    checkpoint evaluated with its training record."""
    return {"command": "run", "owner": run.owner.record(), "start": now_iso(),
            **provenance(run.target, seed), **_data_provenance(run.data, run.split),
            **weights_provenance(best), "weights_file": f"{WEIGHTS_STEM}.safetensors",
            "config_hash": config_hash(run.cfg),
            "training": _read_json(ckpt_dir / "manifest.json"),
            "checkpoint_epoch": info.get("epoch"),
            "checkpoint_selected_by": info.get("selected_by"),
            "reused_checkpoint": reusable}


def _after_seed_sweep(run: _Run, model: Any, evaluation: Evaluation, settings: dict[str, Any],
                      ckpt_dir: Path, best: Path, eval_dir: Path) -> Any:
    """Rank 0's part after a seed's sweep: its weights, config and training metrics beside
    the results, the checks and robustness under transformation; returns the checks frame."""
    cfg = run.cfg
    release_weights(best, eval_dir)
    _copy_training_outputs(ckpt_dir, eval_dir, to_toml(cfg))
    shown = run.folder / eval_dir.relative_to(run.work)
    checks = _after_evaluation(model, run.split, evaluation, settings, eval_dir,
                               seed=cfg.evaluate.seed, reference=cfg.reference, log=run.log,
                               progress=run.progress, shown=shown, level=cfg.evaluate.checks)
    _physical(model, run.split, cfg.attacks, cfg.transforms, cfg.evaluate.eps, eval_dir,
              batch_size=cfg.evaluate.batch_size, seed=cfg.evaluate.seed,
              progress=run.progress, log=run.log, shown=shown)
    return checks


def _finish_run(run: _Run, evaluations: dict[int, Evaluation], replacing: list[str]) -> None:
    """Rank 0, once every seed is done: the summary over seeds, the report, and the staging
    folder swapped in for the report folder."""
    cfg, work = run.cfg, run.work
    if run.several:
        _write_seed_summary(work, evaluations, run.echo)
        write_json(work / "manifest.json", {
            "command": "run", "owner": run.owner.record(), "config_hash": config_hash(cfg),
            "seeds": list(cfg.all_seeds), **provenance(run.target)})
    run_dirs = [run.eval_dir(seed) for seed in cfg.all_seeds]
    _report_folders(work, run_dirs, cfg.name, run.log, shown_as=run.folder)
    for eval_dir in run_dirs:
        finish_sweep(eval_dir)
    swap_in(work, run.folder)
    for line in replacing:
        run.log(line)


def _data_settings(data: Any) -> dict[str, Any]:
    """What identifies data beyond the built-in sets: their class names and checksum (left out
    for MNIST and Fashion-MNIST, whose files are md5-checked, so earlier settings still match)."""
    if data.name in DATASETS:
        return {}
    return {"classes": list(data.classes), "data_sha256": data.provenance.get("data_sha256")}


def _data_provenance(data: Any, split: Any) -> dict[str, Any]:
    """The data's source, size and checksum for the manifest (and the report's provenance)."""
    c, h, w = data.in_shape
    return {**data.provenance,
            "data_evaluated": f"{len(split)} {c}×{h}×{w} images of {data.name}"}


def _physical_settings(defence: DefenceConfig | None, transforms: TransformConfig | None
                       ) -> dict[str, Any]:
    """The settings entries of a defence and a transformation distribution, when declared."""
    entries: dict[str, Any] = {}
    if defence is not None:
        entries["defence"] = to_dict(defence)
    if transforms is not None:
        entries["transforms"] = to_dict(transforms)
    return entries


def _physical(model: Any, split: Any, attacks: Sequence[AttackConfig],
              transforms: TransformConfig | None, eps: Sequence[float], eval_dir: Path, *,
              batch_size: int, seed: int, progress: bool, log: Callable[[str], None],
              shown: Path) -> None:
    """Robustness under transformation (:mod:`robustkit.physical`) when there is a
    ``[transforms]`` table, or a randomised model attacked with EOT. ``shown``: the folder
    ``eval_dir`` becomes (it may be a staging one)."""
    config = wants_physical(model, attacks, transforms)
    if config is None:
        return
    physical = transformation_robustness(model, split, attacks, config, eps,
                                         batch_size=batch_size, seed=seed, progress=progress)
    write_physical(eval_dir, physical, {"transforms": to_dict(config),
                                        "transform": build_transform(config).describe()})
    log(f"robustness under transformation written to {shown / 'physical.csv'}")


def _silent(message: str) -> None:
    """What ranks other than 0 print: nothing."""


def _load_everywhere(best: Path, device: Any, dist: Context | None, model: ModelConfig
                     ) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint on rank 0 and hand its weights to every rank (no shared disk needed).
    The config's ``model.factory`` (the user's own choice) is the one the sidecar may name."""
    if dist is None:
        return load_checkpoint(best, device, factory=model.factory, app_dir=model.app_dir)

    def read() -> tuple[dict[str, Any], dict[str, Any]]:
        net, info = load_checkpoint(best, "cpu", factory=model.factory, app_dir=model.app_dir)
        return {k: v.cpu() for k, v in net.state_dict().items()}, info

    weights, info = distributed.on_main(read, dist)
    network = sidecar_network(info, best, factory=model.factory, app_dir=model.app_dir)
    net = build_network(network, int(info.get("num_classes", 10)))
    net.load_state_dict(weights)
    return net.to(device).eval(), info


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _copy_training_outputs(ckpt_dir: Path, eval_dir: Path, config_toml: str) -> None:
    write_text(eval_dir / "config.toml", config_toml)
    metrics = ckpt_dir / "metrics.csv"
    if metrics.is_file():
        write_text(eval_dir / "metrics.csv", metrics.read_text(encoding="utf-8"))


def _after_evaluation(model: Any, split: Any, evaluation: Evaluation, settings: dict[str, Any],
                      eval_dir: Path, *, seed: int, reference: ReferenceConfig | None,
                      log: Callable[[str], None], progress: bool = False,
                      shown: Path | None = None, level: ChecksLevel = "full") -> Any:
    """Sanity checks at ``level`` (each kept in ``eval_dir`` as it finishes, so an interrupted
    job resumes from them), example probabilities and the paper reference, when available;
    returns the checks frame, None when ``level`` is off. ``shown``: the folder ``eval_dir``
    becomes (it may be a staging one)."""
    checks, started = None, time.perf_counter()
    if level != "off":
        fingerprint = settings_fingerprint(settings)
        checks = run_checks(
            model, split, evaluation.results, settings, seed=seed, progress=progress,
            level=level, per_sample=evaluation.per_sample,
            done=load_checks(eval_dir, fingerprint, level),
            on_check=lambda check: save_check(eval_dir, fingerprint, level, check))
        write_frame(eval_dir / "checks.csv", checks)
    seconds = time.perf_counter() - started
    add_probabilities(eval_dir / "examples.safetensors", model)
    if reference:
        write_json(eval_dir / "reference.json", _reference(reference, evaluation))
    what = (f"sanity checks ({level}, {seconds:.1f} s) and example "
            "pictures" if checks is not None else "example pictures")
    log(f"{what} written to {shown or eval_dir}")
    return checks


def _flag_unreliable(folder: Path, evaluation: Evaluation, checks: Any,
                     settings: dict[str, Any]) -> Evaluation:
    """The evaluation with its results flagged where failed checks discredit them
    (:func:`~robustkit.checks.flag_results`), ``results.csv`` in ``folder`` rewritten to
    match; unchanged when nothing is discredited."""
    flagged = flag_results(evaluation.results, checks, settings)
    if flagged is evaluation.results:
        return evaluation
    write_frame(folder / "results.csv", flagged)
    return dataclasses.replace(evaluation, results=flagged)


def _reference(reference: ReferenceConfig, evaluation: Evaluation) -> dict[str, Any]:
    """robustkit's error rate beside a paper's, for the same attack and ε."""
    res = evaluation.results
    row = res[(res["attack"] == reference.attack) & (res["eps"] - reference.eps).abs().lt(1e-9)]
    if row.empty:
        raise RobustkitError(
            f"reference: the sweep has no {reference.attack} row at ε = {reference.eps:g}; add "
            "that attack and ε to the config"
        )
    return {"source": reference.source, "note": reference.note, "value": reference.error,
            "metric": f"error rate under {reference.attack} at ε = {reference.eps:g}",
            "ours": float(1 - row["accuracy"].iloc[0])}


def _write_seed_summary(folder: Path, evaluations: dict[int, Evaluation],
                        echo: Callable[[str], None]) -> None:
    rows = pd.concat([ev.results.assign(seed=seed) for seed, ev in evaluations.items()])
    summary = (rows.groupby(["attack", "eps"], sort=False)["accuracy"]
               .agg(mean="mean", sd="std", min="min", max="max", seeds="count").reset_index())
    write_frame(folder / "seeds.csv", rows)
    write_frame(folder / "seed_summary.csv", summary)
    echo("mean ± sd over seeds:")
    for _, r in summary.iterrows():
        echo(f"  {r['attack']:>12}  ε={r['eps']:<5g} {r['mean']:.4f} ± {r['sd']:.4f}")


def _report_folders(folder: Path, run_dirs: list[Path], title: str,
                    log: Callable[[str], None], shown_as: Path) -> dict[str, str]:
    """Build the report in the staging ``folder`` as the one it becomes, ``shown_as``."""
    paths = build_report(run_dirs, folder, title=title, shown_as=shown_as)
    final = {kind: shown_as / p.relative_to(folder) for kind, p in paths.items()}
    log(f"report: {', '.join(str(p) for p in final.values())}")
    return {f"report_{kind}": str(path) for kind, path in final.items()}


def _keep_sweep(folder: Path, seed_dirs: Sequence[str | None]) -> Callable[[Path], bool]:
    """What of an interrupted run's staging folder to keep: the sweep states of this layout
    (``sweep-state/``, or ``seed-S/sweep-state/`` per seed); they resume when their
    fingerprint matches and are replaced otherwise."""
    work = staging_path(folder)
    wanted = {work / d / STATE_DIR if d else work / STATE_DIR for d in seed_dirs}
    return lambda path: path in wanted


def _config_changes(held: Holder, folder: Path, new: str) -> str:
    """What differs from the run recorded in ``folder``: config hash and robustkit version.
    The recorded config is re-hashed under today's scheme, so that a change of hashing alone
    reads as the same settings."""
    recorded = held.manifest.config_hash
    configs = [folder / "config.toml", *sorted(folder.glob("seed-*/config.toml"))]
    rehashed = None
    for path in configs:
        if path.is_file():
            try:
                rehashed = config_hash(load_config(path))
            except RobustkitError:
                rehashed = None
            break
    return (f"{hash_change('config hash', str(recorded) if recorded else rehashed, new, rehashed)}"
            f", {version_change(held.manifest)}")


def _settings_changes(held: Holder, folder: Path, new: str) -> str:
    """What differs from the attack recorded in ``folder``: settings fingerprint, version."""
    recorded = held.manifest.fingerprint
    settings = read_json_if_any(folder / "settings.json")
    rehashed = settings_fingerprint(settings) if settings else None
    return (f"{hash_change('settings', str(recorded) if recorded else rehashed, new, rehashed)}"
            f", {version_change(held.manifest)}")
