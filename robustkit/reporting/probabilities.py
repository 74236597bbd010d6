"""Storing the model's class probabilities beside the example images, so a report can print
"7 (98.1%)" without the model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from robustkit.attacks import attack_mode
from robustkit.checkpoint import load_tensors, save_tensors
from robustkit.errors import RobustkitError
from robustkit.reporting.load import EXAMPLES_FILE


def _device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def _probabilities(model: nn.Module, images: Tensor, device: torch.device) -> Tensor:
    logits = model(images.to(device=device, dtype=torch.float32))
    return torch.softmax(logits.float(), dim=1).cpu()


def add_probabilities(path: Path, model: nn.Module) -> Path:
    """Add ``clean_probs`` and ``adv_probs/<attack>@<eps>`` ([k, K] softmax of the model's
    logits) to an ``examples.safetensors`` file (or a run folder holding one) and rewrite it.

    Existing probability keys are replaced; the images are left as they are. Returns the path.
    A run folder whose sweep attacked nothing (ε = 0 only) has no such file and is left as is.
    """
    path = Path(path)
    if path.is_dir():
        path = path / EXAMPLES_FILE
    if not path.is_file() and (path.parent / "results.csv").is_file():
        return path  # a sweep at ε = 0 alone keeps no adversarial examples: nothing to add
    if not path.is_file():
        raise RobustkitError(
            f"{path} not found: add_probabilities needs the examples.safetensors "
            "of an evaluation run folder"
        )
    tensors = {
        k: v
        for k, v in load_tensors(path).items()
        if k != "clean_probs" and not k.startswith("adv_probs/")
    }
    if "clean" not in tensors:
        raise RobustkitError(f"{path} has no 'clean' images: it is not an examples file")
    device = _device(model)
    with attack_mode(model):
        probs = {"clean_probs": _probabilities(model, tensors["clean"], device)}
        for key, images in tensors.items():
            if key.startswith("adv/"):
                probs[f"adv_probs/{key[4:]}"] = _probabilities(model, images, device)
    save_tensors(path, {**tensors, **probs})
    return path
