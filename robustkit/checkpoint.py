"""Checkpoints: weights as safetensors plus a JSON sidecar; nothing is ever unpickled.

A checkpoint named ``model`` is two files, ``model.safetensors`` (the state dict) and
``model.json`` (architecture, resolved config, metrics, seed, versions, device). Every write
is atomic (:mod:`robustkit.storage`: a temporary file renamed into place), so an interrupted
write never leaves a half-written checkpoint behind, and what a killed write leaves is
recognised as scratch and removed (:func:`remove_leftovers`).
Tensors are serialised in memory and written the same way (safetensors' own ``save_file``
writes through a temporary file of its own naming, which a kill would leave unrecognised).

Resume state (optimizer, scheduler, RNG states, epoch, step) is kept the same way: tensors in
``state.safetensors``, everything else in ``state.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from robustkit.errors import RobustkitError
from robustkit.storage import TEMPORARY, read_json, read_json_if_any, write_bytes, write_json

PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".bin", ".ckpt"}


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
                 ) -> None:
    """Write ``tensors`` as a safetensors file, atomically (see :func:`write_bytes`): the
    only temporary file is robustkit's own, so a killed write leaves nothing unrecognised."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_bytes(path, save(cpu, metadata=metadata))


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    if path.suffix in PICKLE_SUFFIXES:
        raise RobustkitError(
            f"{path} is a pickle-based file, which robustkit never unpickles: re-save the weights "
            "with safetensors, or load it as --model package.module:factory --weights FILE"
        )
    if not path.is_file():
        raise RobustkitError(f"checkpoint {path} not found: check the path")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustkitError(
            f"{path} is not a readable safetensors file ({exc}): pass a robustkit checkpoint"
        ) from None


def checkpoint_paths(stem: Path) -> tuple[Path, Path]:
    stem = stem.with_suffix("") if stem.suffix in {".safetensors", ".json"} else stem
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_checkpoint(stem: Path, model: nn.Module, info: dict[str, Any]) -> Path:
    """Write ``stem.safetensors`` and ``stem.json``; ``info`` must name the ``arch``."""
    weights, sidecar = checkpoint_paths(stem)
    save_tensors(weights, dict(model.state_dict()), metadata={"arch": str(info.get("arch"))})
    write_json(sidecar, info)
    return weights


def read_sidecar(stem: Path) -> dict[str, Any]:
    weights, sidecar = checkpoint_paths(stem)
    if not sidecar.is_file():
        raise RobustkitError(
            f"{sidecar} not found beside {weights.name}: a robustkit checkpoint is a .safetensors "
            "file with its .json sidecar"
        )
    info = read_json(sidecar, "the checkpoint is damaged")
    classes = info.get("num_classes", 10)
    if not isinstance(info.get("arch"), str) or isinstance(classes, bool) or not (
            isinstance(classes, int) and 2 <= classes <= 100_000):
        raise RobustkitError(f"{sidecar} does not name a string arch and a class count: the "
                             "checkpoint is damaged; save it again with robustkit")
    return info


def load_checkpoint_tensors(stem: Path | str, device: torch.device | str = "cpu"
                            ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The checkpoint's weights and its sidecar (no unpickling); turning them into a model is
    the models layer's job (`robustkit.models.loading.load_checkpoint`)."""
    stem = Path(stem)
    if stem.suffix in PICKLE_SUFFIXES:
        load_tensors(stem)  # raises the pickle refusal
    weights, _ = checkpoint_paths(stem)
    info = read_sidecar(stem)
    return load_tensors(weights, device), info


# --------------------------------------------------------------------------- resume state


def flatten_state(prefix: str, value: Any, tensors: dict[str, Tensor]) -> Any:
    """Split a nested state (dicts, lists, tensors, scalars) into JSON plus named tensors."""
    if isinstance(value, Tensor):
        name = f"{prefix}"
        tensors[name] = value
        return {"__tensor__": name}
    if isinstance(value, dict):
        return {"__dict__": [[flatten_state(f"{prefix}.k{i}", k, tensors),
                              flatten_state(f"{prefix}.v{i}", v, tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        items = [flatten_state(f"{prefix}.{i}", v, tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in resume state at {prefix}")


def unflatten_state(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(unflatten_state(v, tensors) for v in value["__tuple__"])
        return {unflatten_state(k, tensors): unflatten_state(v, tensors)
                for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [unflatten_state(v, tensors) for v in value]
    return value


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """Atomically replace the resume state of ``folder``.

    Tensors go to a new uniquely named file first; ``state.json``, which names that file, is
    renamed into place last. A crash at any point leaves the previous state intact.
    """
    tensors: dict[str, Tensor] = {}
    layout = flatten_state("s", state, tensors)
    previous = _state_tensor_file(folder)
    tensor_file = f"state-{os.getpid()}-{time.time_ns()}.safetensors"
    save_tensors(folder / tensor_file, tensors)
    write_json(folder / "state.json", {"tensors": tensor_file, "layout": layout})
    if previous and previous != tensor_file and (folder / previous).exists():
        (folder / previous).unlink()


def _state_tensor_file(folder: Path) -> str | None:
    name = (read_json_if_any(folder / "state.json") or {}).get("tensors")
    return None if name is None else str(name)


def load_state(folder: Path) -> dict[str, Any] | None:
    """The last complete resume state in ``folder``, or None when there is none."""
    if not (folder / "state.json").is_file():
        return None
    saved = read_json(folder / "state.json",
                      "the resume state is damaged; delete it to train from the start")
    tensors = load_tensors(folder / saved["tensors"])
    state: dict[str, Any] = unflatten_state(saved["layout"], tensors)
    return state


def remove_leftovers(folder: Path) -> None:
    """Remove what a killed process left in ``folder``: temporary files of atomic writes
    (:data:`TEMPORARY`) and resume tensors that ``state.json`` does not name."""
    if not folder.is_dir():
        return
    current = _state_tensor_file(folder)
    for path in folder.iterdir():
        orphan_state = (path.name.startswith("state-") and path.suffix == ".safetensors"
                        and path.name != current)
        if (orphan_state or TEMPORARY.fullmatch(path.name)) and path.is_file():
            path.unlink(missing_ok=True)


def clear_state(folder: Path) -> None:
    """Remove the resume state once a run has finished."""
    name = _state_tensor_file(folder)
    (folder / "state.json").unlink(missing_ok=True)
    if name:
        (folder / name).unlink(missing_ok=True)
