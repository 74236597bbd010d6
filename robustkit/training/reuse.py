"""Checkpoint reuse for ``robustkit run``: train a seed's model unless a finished training of
the same settings can be reused, its own or another experiment's (copied in); load the chosen
checkpoint on every rank."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustkit import distributed
from robustkit.checkpoint import read_sidecar
from robustkit.config import ExperimentConfig, ModelConfig
from robustkit.data import Dataset
from robustkit.distributed import Context
from robustkit.errors import RobustkitError
from robustkit.models.factory import build_network
from robustkit.models.loading import load_checkpoint, sidecar_network
from robustkit.outputs import Owner
from robustkit.storage import read_json_if_any
from robustkit.training.loop import adopt_training, train


@dataclass(frozen=True)
class Reuse:
    """One seed's training as a run sees it: the config and seed, the checkpoint folder, the
    training hash its weights must carry, the data (their checksum must match too), the runs
    folder searched for another experiment's identical training, and the run's owner."""

    cfg: ExperimentConfig
    seed: int
    ckpt_dir: Path
    fingerprint: str
    data: Dataset
    runs_dir: Path
    owner: Owner

    @property
    def best(self) -> Path:
        return self.ckpt_dir / "model-best"


def train_or_reuse(job: Reuse, *, retrain: bool, target: Any, dist: Context | None,
                   progress: bool, log: Callable[[str], None]) -> bool:
    """Train the seed's model into ``job.ckpt_dir`` unless its checkpoint ``model-best`` can be
    reused (not ``retrain``, no unfinished training, the same training hash and data checksum)
    or another experiment's finished training of the same hash can be copied in. Returns whether
    a finished training was reused (rank 0's disk decides for every rank)."""
    cfg, seed, best = job.cfg, job.seed, job.best

    def can_reuse() -> bool:
        if retrain or not best.with_suffix(".json").is_file() or (
                job.ckpt_dir / "state.json").exists():
            return False
        sidecar = read_sidecar(best)  # a user's data file can change under the same name
        return (sidecar.get("training_hash") == job.fingerprint
                and sidecar.get("data_sha256") == job.data.provenance.get("data_sha256"))

    if distributed.on_main(can_reuse, dist):
        log(f"seed {seed}: reusing {best}.safetensors (training hash {job.fingerprint})")
        return True
    donor = None if retrain else distributed.on_main(lambda: _adopt_same_training(job), dist)
    if donor is not None:
        log(f"seed {seed}: reusing {donor / 'model-best'}.safetensors, trained by "
            f"another experiment with the same training hash {job.fingerprint}; copied "
            f"into {job.ckpt_dir}")
        return True
    log(f"seed {seed}: training {cfg.model.factory or cfg.model.arch} "
        f"({cfg.train.method}) into {job.ckpt_dir}")
    train(cfg, out_dir=job.ckpt_dir, seed=seed, device=target, data=job.data,
          progress=progress, resume=not retrain, log=log, dist=dist)
    return False


def _adopt_same_training(job: Reuse) -> Path | None:
    """Copy into ``job.ckpt_dir`` a finished training of another experiment under the runs
    folder with the same training hash and data checksum, and return its folder; None when
    there is none, or when ``ckpt_dir`` holds an unfinished training of its own (it resumes
    instead).

    The training hash covers everything the weights depend on (data, model, training
    settings, seed, device setting), so such a folder holds the weights this run would train:
    ``mnist_cnn_pgd_at_eot`` takes ``mnist_cnn_pgd_at``'s instead of training an hour again.
    """
    if (job.ckpt_dir / "state.json").exists():
        return None
    data_sha = job.data.provenance.get("data_sha256")
    for donor in sorted(job.runs_dir.glob(f"*/seed-{job.seed}")):
        if donor.resolve() != job.ckpt_dir.resolve() and _finished_training(
                donor, job.fingerprint, data_sha):
            owner = Owner("train", job.cfg.name, job.owner.config_file)
            adopt_training(donor, job.ckpt_dir, job.cfg, job.seed, owner.record())
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


def load_everywhere(best: Path, device: Any, dist: Context | None, model: ModelConfig
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

