"""Released weights: the model a report evaluated, kept beside the report, and ``zoo:`` names.

``robustkit run`` copies the checkpoint it evaluated into the report folder as
``model.safetensors`` + ``model.json`` (the sidecar: architecture, classes, data set, training
hash, epoch, validation metrics) and records both files' sha256 in the report's manifest, so a
fresh clone can attack the very weights a committed report measured, without training:

    robustkit attack --model reports/mnist_cnn_pgd_at/model.safetensors --attack apgd --eps 0,0.3
    robustkit attack --model zoo:mnist_cnn_pgd_at ...        # the same, by its short name
    robustkit zoo                                           # lists the short names

A ``zoo:NAME`` is the folder ``reports/NAME`` holding ``model.safetensors``, looked up first under
the current folder, then under the checkout robustkit runs from (an editable install of a clone).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustkit.checkpoint import checkpoint_paths, read_sidecar
from robustkit.config import CertifiedConfig
from robustkit.errors import RobustkitError
from robustkit.records import Manifest
from robustkit.storage import atomic_path
from robustkit.vocabulary import CERTIFIED_METHODS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

WEIGHTS_STEM = "model"
ZOO_PREFIX = "zoo:"
REPORTS = "reports"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_provenance(stem: Path) -> dict[str, str]:
    """``weights_sha256`` and ``sidecar_sha256`` of a checkpoint (``stem``, suffix optional)."""
    weights, sidecar = checkpoint_paths(stem)
    return {"weights_sha256": file_sha256(weights), "sidecar_sha256": file_sha256(sidecar)}


def release_mismatch(weights: Path) -> str | None:
    """How a released checkpoint differs from what its report recorded, as one sentence; None
    when the folder's ``manifest.json`` records no sha256 for it (not a released checkpoint)
    or both files match. The report's figures describe the recorded bytes only."""
    manifest = Manifest.read_if_any(weights.parent) or Manifest()
    if manifest.weights_file != weights.name or not manifest.weights_sha256:
        return None
    recorded = {"weights_sha256": manifest.weights_sha256,
                "sidecar_sha256": manifest.sidecar_sha256}
    changed = [kind.split("_")[0] for kind, value in weights_provenance(weights).items()
               if recorded.get(kind) and recorded[kind] != value]
    if not changed:
        return None
    files = " and ".join(f"{weights.with_suffix('.json' if c == 'sidecar' else '.safetensors')}"
                         for c in changed)
    verb = "differ" if len(changed) > 1 else "differs"
    return (f"{files} {verb} from the sha256 recorded in {weights.parent / 'manifest.json'}: "
            "the file was changed after the report was made, so the report's figures do not "
            "describe it")


def release_weights(stem: Path, folder: Path) -> dict[str, str]:
    """Copy the checkpoint ``stem`` into ``folder`` as ``model.safetensors`` + ``model.json``.

    Each copy goes through a temporary file and a rename, the weights first, so a reader never
    finds a sidecar without its weights. Returns the file name and both sha256 (of the copies,
    which equal the originals).
    """
    source_weights, source_sidecar = checkpoint_paths(stem)
    target_weights, target_sidecar = checkpoint_paths(folder / WEIGHTS_STEM)
    for source, target in ((source_weights, target_weights), (source_sidecar, target_sidecar)):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    return {"weights_file": target_weights.name, **weights_provenance(target_weights)}


# --------------------------------------------------------------------------- zoo


def zoo_roots() -> list[Path]:
    """Where ``zoo:`` names are looked up: ./reports, then the source checkout's reports/."""
    roots = [Path.cwd() / REPORTS]
    checkout = Path(__file__).resolve().parent.parent / REPORTS
    if checkout.is_dir() and checkout.resolve() != roots[0].resolve():
        roots.append(checkout)
    return roots


@dataclass(frozen=True)
class Released:
    """One released model: its short name, weights file and training; ``sha256`` is the
    weights file's now, ``modified`` whether it differs from the one its report recorded.
    What its report measured is :mod:`robustkit.catalogue`'s to read."""

    name: str
    path: Path
    arch: str
    dataset: str
    method: str
    train_eps: float | None
    size_bytes: int
    sha256: str
    modified: bool = False


def _training(folder: Path) -> tuple[str, float | None]:
    """(training method, training ε: None for standard training) from the report's
    config.toml; ("", None) when it has none."""
    try:
        config = tomllib.loads((folder / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return "", None
    train: dict[str, Any] = config.get("train", {})
    method = str(train.get("method", "standard"))
    eps = train.get("adversarial", {}).get("eps") if method != "standard" else None
    if method in CERTIFIED_METHODS:  # the target ε it is certified at, not the ramp's end
        eps = train.get("certified", {}).get("eps", CertifiedConfig().eps)
    return method, float(eps) if isinstance(eps, (int, float)) else None


def list_released(roots: list[Path] | None = None) -> list[Released]:
    """Every ``reports/**/model.safetensors`` with its sidecar; a name found twice: first wins."""
    found: dict[str, Released] = {}
    for root in roots if roots is not None else zoo_roots():
        if not root.is_dir():
            continue
        for weights in sorted(root.glob(f"**/{WEIGHTS_STEM}.safetensors")):
            folder = weights.parent
            name = folder.relative_to(root).as_posix()
            if name in found or not weights.with_suffix(".json").is_file():
                continue
            try:
                info = read_sidecar(weights)
            except RobustkitError:
                continue
            method, train_eps = _training(folder)
            found[name] = Released(name, weights, str(info.get("arch", "?")),
                                   str(info.get("dataset", "?")), method, train_eps,
                                   weights.stat().st_size, file_sha256(weights),
                                   release_mismatch(weights) is not None)
    return sorted(found.values(), key=lambda r: r.name)


def resolve_zoo(spec: str, roots: list[Path] | None = None) -> Path:
    """``zoo:NAME`` → the path of ``reports/NAME/model.safetensors``."""
    name = spec[len(ZOO_PREFIX):].strip().strip("/")
    searched = roots if roots is not None else zoo_roots()
    for root in searched:
        weights = root / name / f"{WEIGHTS_STEM}.safetensors"
        if name and ".." not in Path(name).parts and weights.is_file():
            return weights
    names = [r.name for r in list_released(searched)]
    listing = f"released: {', '.join(names)}" if names else "none is released in " + ", ".join(
        str(r) for r in searched)
    raise RobustkitError(f"no released model {spec!r} ({listing}): run robustkit zoo to list them")
