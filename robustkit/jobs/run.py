"""The run job behind ``robustkit run``: for each seed of an experiment config, train (or
reuse) its model, sweep the config's attacks, run the post-sweep stages; then the summary over
seeds and the report.

Checkpoints go to ``runs_dir/<name>/seed-<s>/`` (:mod:`robustkit.training.reuse` decides
whether one can be reused); results, figures and reports go to ``reports/<name>/``. Under
torchrun every rank runs the job: training and the sweep are shared out, and rank 0 alone
writes files, runs the stages and reports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from robustkit import distributed
from robustkit.config import ExperimentConfig, config_hash, load_config, to_toml
from robustkit.data import Dataset, Split
from robustkit.distributed import Context
from robustkit.errors import RobustkitError
from robustkit.evaluation import Evaluation
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
from robustkit.jobs.outcome import SweepOutcome
from robustkit.jobs.transfer import load_sources
from robustkit.outputs import (
    Holder,
    Owner,
    checkpoint_folder,
    config_file_label,
    guard_folder,
    hash_change,
    prepare_staging,
    refuse_working_folder,
    remove_empty,
    swap_in,
    version_change,
    writing,
)
from robustkit.physical import build_defence, build_transform
from robustkit.released import WEIGHTS_STEM, release_weights, weights_provenance
from robustkit.runs import attack_records, evaluate_to_folder, finish_sweep, write_frame
from robustkit.runtime import now_iso, provenance
from robustkit.sources import load_configured
from robustkit.stages import SweepDone, check_certifiable, run_stages
from robustkit.storage import read_json_if_any, write_json, write_text
from robustkit.training.pretrained import find_pretrained, training_fingerprint
from robustkit.training.reuse import Reuse, load_everywhere, train_or_reuse


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
    show: Callable[[SweepOutcome], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[int, Evaluation]:
    """Train (or reuse) each seed's model, sweep the config's attacks, run the stages, report.

    Checkpoints go to ``runs_dir/<name>/seed-<s>/`` and are reused while their training hash
    matches the config; results, figures and reports go to ``out_dir`` (default
    ``reports/<name>/``), one sub-folder per seed when there are several seeds. ``show``
    receives each seed's sweep as it finishes (the CLI prints it).
    """
    cfg = load_config(config_path, list(overrides))
    find_pretrained(cfg.model)  # a missing or changed starting point, before any work
    target, dist = distributed.setup(device or cfg.device)
    main = dist is None or dist.is_main
    if not main:
        log, show = silent, None
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
        made = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]
        work = distributed.on_main(
            lambda: prepare_staging(folder, keep_sweep(folder, seed_dirs)), dist)
        run = _Run(cfg=cfg, target=target, dist=dist, main=main, several=several, data=data,
                   split=split, folder=folder, work=work, owner=owner, runs_dir=runs_dir,
                   retrain=retrain, progress=progress, show=show, log=log)
        try:
            evaluations = {seed: _run_seed(run, seed) for seed in cfg.all_seeds}
        except BaseException:
            if main:
                remove_empty(work, *made)  # a training that failed left nothing to resume
            raise
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
    show: Callable[[SweepOutcome], None] | None
    log: Callable[[str], None]

    def eval_dir(self, seed: int) -> Path:
        """Where a seed's results go: ``seed-<s>/`` when there are several seeds."""
        return self.work / f"seed-{seed}" if self.several else self.work


def _run_seed(run: _Run, seed: int) -> Evaluation:
    """One seed: train (or reuse) its model, sweep it, run the stages on rank 0, show it."""
    cfg, eval_dir = run.cfg, run.eval_dir(seed)
    ckpt_dir = checkpoint_folder(run.runs_dir, cfg.name, seed)
    fingerprint = training_fingerprint(cfg, seed)
    best = ckpt_dir / "model-best"
    reused = train_or_reuse(Reuse(cfg, seed, ckpt_dir, fingerprint, run.data, run.runs_dir,
                                  run.owner), retrain=run.retrain, target=run.target,
                            dist=run.dist, progress=run.progress, log=run.log)
    model, info = load_everywhere(best, run.target, run.dist, cfg.model)
    model = build_defence(model, cfg.defence)
    if cfg.evaluate.certify:
        check_certifiable(model, cfg.evaluate.certify)
    sources, source_settings = load_sources(
        cfg.attacks, run.split.images[:8], int(info.get("num_classes", 10)), device=run.target,
        app_dir=cfg.model.app_dir)
    settings = {**_seed_settings(run, seed, fingerprint, best), **source_settings}
    manifest = {**_seed_manifest(run, seed, ckpt_dir, best, info, reused),
                "checks": cfg.evaluate.checks,
                **({"certify": list(cfg.evaluate.certify)} if cfg.evaluate.certify else {})}
    evaluation = evaluate_to_folder(
        model, run.split, cfg.attacks, cfg.evaluate.eps, out_dir=eval_dir, settings=settings,
        manifest=manifest, model_name=f"{cfg.name}/seed-{seed}" if run.several else cfg.name,
        batch_size=cfg.evaluate.batch_size, seed=cfg.evaluate.seed, progress=run.progress,
        dist=run.dist, transform=build_transform(cfg.transforms), log=run.log,
        keep_adversarial=cfg.evaluate.save_adversarial is not None, sources=sources,
    )
    done = None
    if run.main:
        release_weights(best, eval_dir)
        _copy_training_outputs(ckpt_dir, eval_dir, to_toml(cfg))
        stages = post_sweep_stages(level=cfg.evaluate.checks, attacks=cfg.attacks,
                                   eps=cfg.evaluate.eps, transforms=cfg.transforms,
                                   reference=cfg.reference, certify=cfg.evaluate.certify,
                                   save_adversarial=cfg.evaluate.save_adversarial)
        done = run_stages(stages, SweepDone(
            model=model, split=run.split, evaluation=evaluation, checks=None, settings=settings,
            folder=eval_dir, shown=run.folder / eval_dir.relative_to(run.work),
            seed=cfg.evaluate.seed, batch_size=cfg.evaluate.batch_size, progress=run.progress,
            log=run.log), cfg.name)
    sweep = sweep_outcome(done, evaluation, cfg.evaluate.checks,
                          f"{cfg.name} seed {seed}: robust accuracy on {len(run.split)} "
                          f"{cfg.evaluate.split} images")
    if run.show is not None:
        run.show(sweep)
    return sweep.evaluation


def _seed_settings(run: _Run, seed: int, fingerprint: str, best: Path) -> dict[str, Any]:
    """``settings.json`` of one seed's sweep: everything its numbers depend on."""
    cfg = run.cfg
    return {
        "experiment": cfg.name, "config_hash": config_hash(cfg), "seed": seed,
        "training_hash": fingerprint, "model": str(best), "dataset": run.data.name,
        "split": cfg.evaluate.split, "n": len(run.split), "eps": sorted(set(cfg.evaluate.eps)),
        "attacks": attack_records(cfg.attacks), "device": str(run.target),
        "batch_size": cfg.evaluate.batch_size, **data_settings(run.data),
        **physical_settings(cfg.defence, cfg.transforms),
    }


def _seed_manifest(run: _Run, seed: int, ckpt_dir: Path, best: Path, info: dict[str, Any],
                   reused: bool) -> dict[str, Any]:
    """The manifest of one seed's sweep: who ran it when, where, on what data, and the
    checkpoint evaluated with its training record."""
    return {"command": "run", "owner": run.owner.record(), "start": now_iso(),
            **provenance(run.target, seed), **data_provenance(run.data, run.split),
            **weights_provenance(best), "weights_file": f"{WEIGHTS_STEM}.safetensors",
            "config_hash": config_hash(run.cfg),
            "training": read_json_if_any(ckpt_dir / "manifest.json") or {},
            "checkpoint_epoch": info.get("epoch"),
            "checkpoint_selected_by": info.get("selected_by"),
            "reused_checkpoint": reused}


def _finish_run(run: _Run, evaluations: dict[int, Evaluation], replacing: list[str]) -> None:
    """Rank 0, once every seed is done: the summary over seeds, the report, and the staging
    folder swapped in for the report folder."""
    cfg, work = run.cfg, run.work
    if run.several:
        rows, summary = seed_summary(evaluations)
        write_frame(work / "seeds.csv", rows)
        write_frame(work / "seed_summary.csv", summary)
        write_json(work / "manifest.json", {
            "command": "run", "owner": run.owner.record(), "config_hash": config_hash(cfg),
            "seeds": list(cfg.all_seeds), **provenance(run.target)})
    run_dirs = [run.eval_dir(seed) for seed in cfg.all_seeds]
    report_folders(work, run_dirs, cfg.name, run.log, shown_as=run.folder)
    for eval_dir in run_dirs:
        finish_sweep(eval_dir)
    swap_in(work, run.folder)
    for line in replacing:
        run.log(line)


def seed_summary(evaluations: dict[int, Evaluation]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every seed's results (with a ``seed`` column) and their mean, sd, min, max and count
    over the seeds, per attack and ε (``seeds.csv`` and ``seed_summary.csv``)."""
    rows = pd.concat([ev.results.assign(seed=seed) for seed, ev in evaluations.items()])
    summary = (rows.groupby(["attack", "eps"], sort=False)["accuracy"]
               .agg(mean="mean", sd="std", min="min", max="max", seeds="count").reset_index())
    return rows, summary


def _copy_training_outputs(ckpt_dir: Path, eval_dir: Path, config_toml: str) -> None:
    write_text(eval_dir / "config.toml", config_toml)
    metrics = ckpt_dir / "metrics.csv"
    if metrics.is_file():
        write_text(eval_dir / "metrics.csv", metrics.read_text(encoding="utf-8"))


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

