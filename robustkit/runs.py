"""Run folders: writing an evaluation's outputs, resuming sweeps (guards: :mod:`outputs`).

An evaluation folder holds ``results.csv`` (byte-stable: no timings), ``per_sample.csv``,
``timings.csv``, ``examples.safetensors`` (clean and adversarial images of a few samples),
``settings.json`` (what was evaluated, how) and ``manifest.json`` (provenance). While a sweep
runs, ``sweep-state/`` holds the finished (attack, ε) cells and the finished batches of the cell
in progress (saved at most once a minute), so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from robustkit.checkpoint import (
    clear_state,
    load_state,
    remove_leftovers,
    save_state,
    save_tensors,
)
from robustkit.checks.record import Check
from robustkit.config import config_from_dict, digest, hash_view
from robustkit.distributed import Context, on_main
from robustkit.errors import RobustkitError
from robustkit.evaluation import AttackState, CellProgress, Evaluation, SweepState, evaluate
from robustkit.runtime import now_iso
from robustkit.storage import atomic_path, read_json_if_any, write_json

STATE_DIR = "sweep-state"


def write_frame(path: Path, frame: Any) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


def write_evaluation(out_dir: Path, evaluation: Evaluation, settings: dict[str, Any],
                     manifest: dict[str, Any], images: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_frame(out_dir / "results.csv", evaluation.results)
    write_frame(out_dir / "per_sample.csv", evaluation.per_sample)
    write_frame(out_dir / "timings.csv", evaluation.timings)
    tensors = {f"adv/{k}": v for k, v in evaluation.examples.items()}
    if images is not None and labels is not None and evaluation.examples:
        first = next(iter(evaluation.examples.values()))
        clean_idx = evaluation.per_sample.index[
            evaluation.per_sample["label"] == evaluation.per_sample["clean_pred"]
        ][: len(first)]
        index = torch.tensor(clean_idx.to_numpy().copy(), device=images.device)
        tensors["clean"] = images[index]
        tensors["labels"] = labels[index]
        tensors["index"] = index
    if tensors:
        save_tensors(out_dir / "examples.safetensors", tensors)
    write_json(out_dir / "settings.json", settings)
    write_json(out_dir / "manifest.json", {**manifest, "notes": evaluation.notes})


def attack_records(attacks: Any) -> list[dict[str, Any]]:
    """The attacks as ``settings.json`` records them: every field of the hashed schema, a
    field added since only when set (:func:`robustkit.config.hash_view`)."""
    return [hash_view(a) for a in attacks]


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """The hash of an evaluation's settings, with its attacks read as today's code reads them
    (so a recorded ``settings.json`` re-hashes to the fingerprint a re-run would have)."""
    try:
        attacks = attack_records(config_from_dict({"attacks": list(settings["attacks"])}).attacks)
    except (KeyError, TypeError, RobustkitError):
        return digest(settings)
    return digest({**settings, "attacks": attacks})


def save_sweep(out_dir: Path, fingerprint: str, state: SweepState) -> None:
    save_state(out_dir / STATE_DIR, {
        "fingerprint": fingerprint,
        "clean_pred": state.clean_pred,
        "examples": state.examples,
        "adversarial": state.adversarial,
        "attacks": {title: {"broken_eps": a.broken_eps, "adv_pred": a.adv_pred, "done": a.done,
                            "grad_evals": a.grad_evals, "queries": a.queries,
                            "seconds": a.seconds,
                            "success_at": a.success_at, "target_at": a.target_at}
                    for title, a in state.attacks.items()},
        "cell": None if state.cell is None else {
            f.name: getattr(state.cell, f.name) for f in dataclasses.fields(state.cell)},
    })


def load_sweep(out_dir: Path, fingerprint: str) -> SweepState | None:
    remove_leftovers(out_dir / STATE_DIR)
    saved = load_state(out_dir / STATE_DIR)
    if saved is None or saved.get("fingerprint") != fingerprint:
        return None
    return SweepState(
        clean_pred=saved["clean_pred"],
        examples=dict(saved["examples"]),
        adversarial={k: dict(v) for k, v in saved.get("adversarial", {}).items()},
        attacks={title: AttackState(**a) for title, a in saved["attacks"].items()},
        cell=None if saved.get("cell") is None else CellProgress(**saved["cell"]),
    )


def finish_sweep(out_dir: Path) -> None:
    """Remove the sweep's resume state and the finished checks: the job is done."""
    clear_state(out_dir / STATE_DIR)
    (out_dir / STATE_DIR / CHECKS_STATE).unlink(missing_ok=True)
    folder = out_dir / STATE_DIR
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


#: The finished checks of an interrupted job, beside the sweep state.
CHECKS_STATE = "checks.json"


def load_checks(out_dir: Path, fingerprint: str, level: str) -> dict[str, Check]:
    """The checks an interrupted job finished for these settings and checks level, by name."""
    saved = read_json_if_any(out_dir / STATE_DIR / CHECKS_STATE)
    if saved is None or saved.get("fingerprint") != fingerprint or saved.get("level") != level:
        return {}
    try:
        return {c["name"]: Check(**c) for c in saved["checks"]}
    except (ValueError, KeyError, TypeError):
        return {}


def save_check(out_dir: Path, fingerprint: str, level: str, check: Check) -> None:
    """Add a finished check to the job's record (atomically), so an interrupt keeps it."""
    done = load_checks(out_dir, fingerprint, level)
    done[check.name] = check
    (out_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    write_json(out_dir / STATE_DIR / CHECKS_STATE, {
        "fingerprint": fingerprint, "level": level,
        "checks": [dataclasses.asdict(c) for c in done.values()]})


def evaluate_to_folder(
    model: torch.nn.Module,
    split: Any,
    attacks: Any,
    eps: Any,
    *,
    out_dir: Path,
    settings: dict[str, Any],
    manifest: dict[str, Any],
    model_name: str,
    batch_size: int,
    seed: int,
    progress: bool,
    transform: Any = None,
    dist: Context | None = None,
    log: Callable[[str], None] | None = None,
    keep_adversarial: bool = False,
    sources: Any = None,
) -> Evaluation:
    """Run (or resume) the sweep in ``out_dir`` (a staging folder the caller guarded and will
    swap in), write every output; return the frames. The sweep state stays in ``out_dir`` until
    the caller's job is done (:func:`finish_sweep`), so an interrupt in the checks or the
    report loses no cell. A resumed sweep says so through ``log`` (``resuming N finished cells
    from OUT_DIR``).

    With ``dist`` the ranks share the sweep: rank 0 reads the saved sweep state, which every
    rank resumes; rank 0 saves the state after each cell and writes the outputs.
    """
    fingerprint = settings_fingerprint(settings)

    def prepare() -> SweepState | None:
        out_dir.mkdir(parents=True, exist_ok=True)
        return load_sweep(out_dir, fingerprint)

    state = on_main(prepare, dist)
    if state is not None and log is not None:
        cells = sum(len(attack.done) for attack in state.attacks.values())
        part = state.cell
        within = ("" if part is None else
                  f" and {part.attacked} of {len(part.active)} samples of {part.title} at "
                  f"ε = {part.eps:g}")
        log(f"resuming {cells} finished cell{'' if cells == 1 else 's'}{within} from {out_dir}")
    started = time.perf_counter()
    evaluation = evaluate(
        model, split, attacks, eps, model_name=model_name, batch_size=batch_size, seed=seed,
        progress=progress, state=state, on_cell=lambda s: save_sweep(out_dir, fingerprint, s),
        dist=dist, transform=transform, keep_adversarial=keep_adversarial, sources=sources,
    )
    if dist is None or dist.is_main:
        manifest = {**manifest, "fingerprint": fingerprint, "end": now_iso(),
                    "evaluation_seconds": time.perf_counter() - started,
                    "resumed": state is not None,
                    **({"processes": dist.world} if dist is not None else {})}
        write_evaluation(out_dir, evaluation, settings, manifest, split.images, split.labels)
    return evaluation
