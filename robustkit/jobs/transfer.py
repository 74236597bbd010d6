"""The source models of transfer attacks, loaded for a job and checked against its target.

A transfer attack (``AttackConfig.source``) crafts its examples on another model and the sweep
judges them on the evaluated one (:mod:`robustkit.attacks.transfer`). Both jobs load each
named source once, as ``--model`` is loaded (``zoo:NAME``, a checkpoint, or
``package.module:factory`` with ``source_weights``), and hold it to the target's contract: it
takes the target's images and returns as many logits (the same classes), else one error saying
what to change. The settings record each source and the sha256 of its weights, so a sweep
resumes only on the same source.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.config import AttackConfig
from robustkit.errors import RobustkitError
from robustkit.models import check_logits, load_model
from robustkit.stages.adversarial import model_digest


def load_sources(attacks: Sequence[AttackConfig], images: Tensor, num_classes: int, *,
                 device: Any, app_dir: Path | str | None = None, trust: bool = False
                 ) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Each source the transfer attacks name, loaded on ``device`` and checked on ``images``
    (a few of the target's) against the target's ``num_classes``; with the settings entry
    ``{"transfer_sources": {source: {"weights", "sha256"}}}`` (empty without transfer
    attacks, so other settings keep their fingerprint)."""
    named = {a.source: a.source_weights for a in attacks if a.source is not None}
    models: dict[str, nn.Module] = {}
    record: dict[str, Any] = {}
    for source, weights in named.items():
        net, _ = load_model(source, weights=weights, device=device, trust=trust, app_dir=app_dir)
        check_source(net, source, images, num_classes)
        models[source] = net
        record[source] = {"weights": weights or "", "sha256": model_digest(net)}
    return models, ({"transfer_sources": record} if record else {})


def check_source(source: nn.Module, name: str, images: Tensor, num_classes: int) -> None:
    """The source takes the target's images (``[N, C, H, W]``) and returns logits of the
    target's ``num_classes`` classes; else one error naming what differs and what to do."""
    shape = "×".join(str(d) for d in images.shape[1:])
    try:
        with torch.no_grad():
            out = source(images)
    except Exception as exc:  # a layer that does not fit the target's image shape
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise RobustkitError(
            f"the transfer source {name} cannot take the target's {shape} images "
            f"({type(exc).__name__}: {first}): craft on a model of the target's input shape"
        ) from None
    if isinstance(out, Tensor) and out.dim() == 2 and out.shape[1] != num_classes:
        raise RobustkitError(
            f"the transfer source {name} returns {out.shape[1]} logits per image but the "
            f"evaluated model returns {num_classes}: craft on a model of the same classes "
            "(trained on the same data)")
    try:
        check_logits(source, images, num_classes)
    except RobustkitError as exc:
        raise RobustkitError(f"the transfer source {name}: {exc}") from None
