"""The adversarial examples on disk, as a stage: ``adversarial/<attack>@<eps>.safetensors``.

Each (attack, ε > 0) cell of a sweep run with ``save_adversarial`` becomes one safetensors
file holding, per sample (all of them, or the broken ones):

* ``images`` ``[k, C, H, W]`` float32, exactly as the sweep judged them (no re-quantisation,
  so they stay inside the ε-ball and [0, 1]);
* ``index`` (the sample's position in the evaluated split), ``labels``, ``clean_pred``,
  ``adv_pred`` and ``eps`` (the ε the example was found at: a sample broken at a smaller ε
  keeps that example, a clean-misclassified one its clean image at 0);

with the attack's settings, the cell's ε and norm, the model's name and the sha256 of its
weights (:func:`model_digest`) in the metadata. Running the same model on ``images`` gives
``adv_pred``, so the file reproduces the cell's robust accuracy: with ``all``,
``mean(adv_pred == labels)``; with ``broken``, ``1 − k / n``. ``images`` and ``labels`` are
the names ``--data`` reads, so ``robustkit attack --model OTHER --data FILE`` evaluates the
examples on another model.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import torch
from torch import nn

from robustkit.checkpoint import save_tensors
from robustkit.config import config_from_dict
from robustkit.evaluation import Adversarial
from robustkit.stages.base import SweepDone
from robustkit.vocabulary import SaveAdversarial

FOLDER = "adversarial"


@dataclass(frozen=True)
class SavedAdversarial:
    """Write every cell's examples (``mode``: ``all`` samples or the ``broken`` ones)."""

    mode: SaveAdversarial
    title: str = "saving the adversarial examples"

    def run(self, done: SweepDone) -> SweepDone:
        folder = done.folder / FOLDER
        folder.mkdir(exist_ok=True)
        digest = model_digest(done.model)
        for key in done.evaluation.kept:
            attack, _, eps_text = key.rpartition("@")
            eps = float(eps_text)
            if eps == 0:
                continue
            cell = done.evaluation.adversarial(attack, eps)
            if self.mode == "broken":
                cell = cell.broken()
            metadata = {"attack": attack, "eps": f"{eps:g}", "mode": self.mode,
                        "settings": json.dumps(_record(done, attack)),
                        "model": str(done.settings.get("model", "")), "model_sha256": digest,
                        "n": str(len(done.split))}
            save_tensors(folder / file_name(attack, eps), _tensors(cell), metadata)
        done.log(f"adversarial examples ({self.mode}) written to {done.shown / FOLDER}/")
        return done


def file_name(attack: str, eps: float) -> str:
    """``pgd40@0.3.safetensors``: the cell's key with anything but ``[A-Za-z0-9_.+@-]``
    replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.+@-]", "_", f"{attack}@{eps:g}") + ".safetensors"


def model_digest(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, in order): the same
    weights give the same digest whatever file or form they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _tensors(cell: Adversarial) -> dict[str, torch.Tensor]:
    return {"images": cell.images.float(), "index": cell.index.long(),
            "labels": cell.labels.long(), "clean_pred": cell.clean_pred.long(),
            "adv_pred": cell.adv_pred.long(), "eps": cell.eps.double()}


def _record(done: SweepDone, attack: str) -> dict[str, object]:
    """The settings record of ``attack`` (by title) among the sweep's attacks."""
    for record in done.settings["attacks"]:
        if config_from_dict({"attacks": [record]}).attacks[0].title == attack:
            return dict(record)
    return {}
