"""The L1 ensemble runs what the AutoAttack authors' ``version="standard"`` runs for
``norm="L1"`` (their ``autoattack.py``, ``set_version``): APGD-CE with 5 random restarts and
APGD-T with 5 target classes, both l1-APGD with the 3ε/2ε/ε schedule (``use_largereps``) and
100 steps; then FAB-T with 9 target classes, one start from the clean point, 100 steps,
α_max = 0.1, η = 1.05, β = 0.9; then the L1 Square, 5000 queries.

Each stage is recorded on a model no attack can fool (constant logits), so every stage runs
on every sample and the record is the whole recipe."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robustkit.attacks import ensemble, fab
from robustkit.attacks.apgd_l1 import EPS_SCHEDULE
from robustkit.attacks.base import AttackResult
from robustkit.attacks.fab import fab_targeted
from robustkit.attacks.square import square

#: The module (the package's name ``apgd`` is the function).
apgd_module = importlib.import_module("robustkit.attacks.apgd")

pytestmark = pytest.mark.usefixtures("single_thread")


class Unfoolable(nn.Module):
    """Logits ``b`` whatever the input (class 0 first, then 1, 2, …), with a zero-weight path
    from the input so that gradients exist: every sample of label 0 stays robust."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(classes, 16))
        self.bias = nn.Parameter(-torch.arange(classes, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def record_stages(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Wrap l1-APGD's one start, FAB-T and Square; return the list their calls append to."""
    calls: list[tuple[str, dict[str, Any]]] = []
    run_l1 = apgd_module.run_l1

    def spy_run_l1(objective: Any, *args: Any, **kwargs: Any) -> int:
        eps = args[4]
        calls.append(("apgd-t" if kwargs["aim"] is not None else "apgd-ce",
                      {"loss": objective.kind, "eps": eps.flatten().tolist(),
                       "steps": kwargs["steps"], "schedule": tuple(kwargs["schedule"]),
                       "aim": None if kwargs["aim"] is None else kwargs["aim"].tolist()}))
        spent: int = run_l1(objective, *args, **kwargs)
        return spent

    def spy_fab(*args: Any, **kwargs: Any) -> AttackResult:
        calls.append(("fab-t", {k: kwargs.get(k) for k in ("norm", "steps", "targets")}
                      | {"restarts": kwargs.get("restarts", 1)}))
        result: AttackResult = fab_targeted(*args, **kwargs)
        return result

    def spy_square(*args: Any, **kwargs: Any) -> AttackResult:
        calls.append(("square", {k: kwargs.get(k) for k in ("norm", "budget", "p_init",
                                                              "rescale")}))
        result: AttackResult = square(*args, **kwargs)
        return result

    monkeypatch.setattr(apgd_module, "run_l1", spy_run_l1)
    monkeypatch.setattr(ensemble, "fab_targeted", spy_fab)
    monkeypatch.setattr(ensemble, "square", spy_square)
    return calls


def test_the_l1_ensemble_is_the_authors_standard_l1_recipe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_stages(monkeypatch)
    model = Unfoolable()
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(2, dtype=torch.long)
    result = ensemble.autoattack(model, x, y, eps=3.0, norm="l1",
                                 generator=torch.Generator().manual_seed(0))
    assert not result.success.any()
    names = [name for name, _ in calls]
    assert names == ["apgd-ce"] * 5 + ["apgd-t"] * 5 + ["fab-t", "square"]
    for name, call in calls[:10]:
        assert call["steps"] == 100
        assert call["schedule"] == EPS_SCHEDULE == ((3.0, 0.3), (2.0, 0.3), (1.0, 0.4))
        assert call["eps"] == [3.0, 3.0]  # the schedule multiplies ε itself, not the caller
        assert call["loss"] == ("ce" if name == "apgd-ce" else "dlr")
    # APGD-T's targets: the 5 highest wrong classes, highest first (logits 0, -1, -2, …)
    assert [call["aim"] for _, call in calls[5:10]] == [[t, t] for t in (1, 2, 3, 4, 5)]
    assert calls[10][1] == {"norm": "l1", "steps": 100, "targets": 9, "restarts": 1}
    # the authors' L1 Square: 5000 queries, p_init 0.8, the fixed schedule (rescale off)
    assert calls[11][1] == {"norm": "l1", "budget": 5000, "p_init": 0.8, "rescale": False}


def test_fab_keeps_the_authors_step_constants() -> None:
    # FABAttack's defaults in the authors' fab_base.py: alpha_max 0.1, eta 1.05, beta 0.9
    assert (fab.ALPHA_MAX, fab.ETA, fab.BETA) == (0.1, 1.05, 0.9)


def test_the_l1_ensemble_needs_ten_classes_for_the_authors_target_counts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # with K = 5 classes both target counts fall to K - 1 = 4
    calls = record_stages(monkeypatch)
    model = Unfoolable(classes=5)
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ensemble.autoattack(model, x, torch.zeros(1, dtype=torch.long), eps=2.0, norm="l1",
                        steps=4, generator=torch.Generator().manual_seed(0))
    assert [name for name, _ in calls] == ["apgd-ce"] * 5 + ["apgd-t"] * 4 + ["fab-t", "square"]
    assert calls[-2][1]["targets"] == 4
