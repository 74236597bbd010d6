"""Fine-tuning: training that starts from pretrained weights (``[model] pretrained``).

The weights come from a released model (``zoo:NAME``, held to the sha256 its report recorded)
or a ``.safetensors`` file, relative to the current folder: a robustkit checkpoint, whose
sidecar must name the config's network, or a bare state dict. They are read as tensors (never
unpickled) and loaded strictly into the network the config builds: every parameter and buffer
by name and shape, else one error naming the first difference. They replace the random
initialisation (certified training's IBP initialisation included); a resumed run continues
from its own saved state.

A training is known by its hash (:func:`robustkit.config.training_hash`); fine-tuning's takes
the sha256 of the starting weights in place of the file's name, so other bytes under the same
name train again and the same bytes under another name are reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from robustkit.checkpoint import checkpoint_paths, load_tensors, read_sidecar
from robustkit.config import ExperimentConfig, ModelConfig, training_hash
from robustkit.errors import RobustkitError
from robustkit.released import ZOO_PREFIX, file_sha256, release_mismatch, resolve_zoo

KEY = "model.pretrained"


@dataclass(frozen=True)
class Pretrained:
    """The starting weights as the config names them (``spec``), their file and its sha256."""

    spec: str
    path: Path
    sha256: str

    def record(self) -> dict[str, str]:
        """What a fine-tuned model's sidecar and manifest say of where it started."""
        return {"pretrained": self.spec, "pretrained_sha256": self.sha256}


def find_pretrained(model: ModelConfig) -> Pretrained | None:
    """The file ``model.pretrained`` names and its sha256 (None without one); refused when it
    is missing, or a released model whose bytes differ from its report's record, or a
    checkpoint whose sidecar names another network than the config's."""
    spec = model.pretrained
    if spec is None:
        return None
    path = resolve_zoo(spec) if spec.startswith(ZOO_PREFIX) else Path(spec.strip()).expanduser()
    if not path.is_file():
        raise RobustkitError(f"{KEY}: {path} is not a file: name a .safetensors file of this "
                             "network (relative to the current folder) or a released model "
                             "(robustkit zoo lists them)")
    tampered = release_mismatch(path)
    if tampered is not None:
        raise RobustkitError(f"{KEY}: {tampered}; fine-tune from the released bytes")
    _check_sidecar(path, model)
    return Pretrained(spec, path, file_sha256(path))


def _check_sidecar(path: Path, model: ModelConfig) -> None:
    """A robustkit checkpoint's sidecar names the network the config builds."""
    sidecar = checkpoint_paths(path)[1]
    if not sidecar.is_file():
        return  # a bare state dict: the strict load checks it
    info = read_sidecar(path)
    theirs = info.get("factory") or info.get("arch")
    ours = model.factory or model.arch
    if theirs != ours:
        raise RobustkitError(
            f"{KEY}: {path} holds a {theirs} network (its sidecar {sidecar.name} says so) but "
            f"the config builds {ours}: set model.{'factory' if model.factory else 'arch'} to "
            "the checkpoint's network, or name weights of this one")


def training_fingerprint(config: ExperimentConfig, seed: int) -> str:
    """The training hash of ``config`` with ``seed``, the starting weights' sha256 included."""
    found = find_pretrained(config.model)
    return training_hash(config, seed, found.sha256 if found else None)


def load_pretrained(model: nn.Module, pretrained: Pretrained) -> None:
    """Copy the pretrained tensors into ``model``'s parameters and buffers, all of them by name
    and shape (one error naming the first that differs)."""
    own = model.state_dict()
    device = next(iter(own.values())).device if own else "cpu"
    theirs = load_tensors(pretrained.path, device)
    missing = [name for name in own if name not in theirs]
    extra = [name for name in theirs if name not in own]
    reshaped = [name for name in own if name in theirs and theirs[name].shape != own[name].shape]
    if missing or extra or reshaped:
        if reshaped:
            name = reshaped[0]
            what = (f"its {name} is {_shape(theirs[name])} where the network's is "
                    f"{_shape(own[name])}")
        elif missing:
            what = f"it has no {missing[0]}" + (f" (nor {len(missing) - 1} more)"
                                                 if len(missing) > 1 else "")
        else:
            what = f"it has {extra[0]}, which the network lacks"
        raise RobustkitError(f"{KEY}: {pretrained.path} does not fit the config's network: "
                             f"{what}; name weights of this network (same architecture and "
                             "number of classes)")
    model.load_state_dict(theirs)


def _shape(tensor: Tensor) -> str:
    return "×".join(str(d) for d in tensor.shape) or "a scalar"
