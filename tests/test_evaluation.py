"""The sweep engine: shortcuts never weaken the attack; frames are right; resume; intervals."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robustkit.config import AttackConfig
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.evaluation import Evaluation, SweepState, evaluate, wilson_interval
from robustkit.runs import load_sweep, save_sweep
from robustkit.vocabulary import AttackName

EPS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3]


def trained_mlp(mnist, epochs: int = 1) -> nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = mnist.train.images[:10_000], mnist.train.labels[:10_000]
    for _ in range(epochs):
        for i in range(0, len(x), 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model_and_data(mnist):  # type: ignore[no-untyped-def]
    return trained_mlp(mnist), mnist.test.take(400)


def test_wilson_interval_matches_hand_computation() -> None:
    low, high = wilson_interval(8, 10)
    # p = 0.8, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half 1.96·√(0.016 + 0.009604)/1.38416
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94332, abs=1e-4)
    assert wilson_interval(0, 50)[0] == pytest.approx(0.0)
    assert wilson_interval(50, 50)[1] == pytest.approx(1.0)
    assert wilson_interval(50, 50)[0] == pytest.approx(50 / (50 + 1.959964**2))


def test_fast_engine_is_never_weaker_than_per_eps_reference(model_and_data) -> None:  # type: ignore[no-untyped-def]
    model, data = model_and_data
    attacks = [AttackConfig(name="fgsm"), AttackConfig(name="pgd", steps=10),
               AttackConfig(name="pgd", steps=10, loss="margin", restarts=2),
               AttackConfig(name="apgd", steps=10)]
    fast = evaluate(model, data, attacks, EPS, batch_size=128)
    slow = evaluate(model, data, attacks, EPS, batch_size=400, shortcuts=False)
    merged = fast.results.merge(slow.results, on=["attack", "eps"], suffixes=("_fast", "_ref"))
    assert len(merged) == len(EPS) * 5
    assert (merged["correct_fast"] <= merged["correct_ref"]).all(), merged
    pgd_fast = fast.results.query("attack == 'pgd10'")
    assert pgd_fast["grad_evals"].sum() < slow.results.query("attack == 'pgd10'")[
        "grad_evals"].sum() / 2


def test_results_frames_are_consistent(model_and_data) -> None:  # type: ignore[no-untyped-def]
    model, data = model_and_data
    ev = evaluate(model, data, [AttackConfig(name="fgsm"), AttackConfig(name="pgd", steps=10)],
                  EPS, model_name="m")
    res = ev.results
    assert list(res["attack"].unique()) == ["fgsm", "pgd10", "any"]
    clean = float((model(data.images).argmax(1) == data.labels).float().mean())
    assert res.query("eps == 0")["accuracy"].tolist() == pytest.approx([clean] * 3)
    for _, rows in res.groupby("attack"):
        assert rows["accuracy"].is_monotonic_decreasing
        assert ((rows["ci_low"] <= rows["accuracy"]) & (rows["accuracy"] <= rows["ci_high"])).all()
    # accuracy at ε equals the share of samples whose smallest breaking ε exceeds it
    ps = ev.per_sample
    for e in EPS:
        for attack in ("fgsm", "pgd10", "any"):
            row = res[(res["attack"] == attack) & (res["eps"] == e)].iloc[0]
            assert row["correct"] == int((ps[f"{attack}_eps"] > e).sum())
    any_acc = res.query("attack == 'any'").set_index("eps")["accuracy"]
    for attack in ("fgsm", "pgd10"):
        acc = res[res["attack"] == attack].set_index("eps")["accuracy"]
        assert (any_acc <= acc + 1e-12).all()
    # misclassified samples are broken at ε = 0 with their clean prediction
    wrong = ps[ps["label"] != ps["clean_pred"]]
    assert (wrong["pgd10_eps"] == 0).all() and (wrong["pgd10_pred"] == wrong["clean_pred"]).all()
    broken = ps[(ps["pgd10_eps"] > 0) & (ps["pgd10_eps"] < math.inf)]
    assert (broken["pgd10_pred"] != broken["label"]).all()


def test_adversarial_predictions_are_reproduced_at_breaking_eps(model_and_data) -> None:  # type: ignore[no-untyped-def]
    model, data = model_and_data
    ev = evaluate(model, data, [AttackConfig(name="fgsm")], [0.0, 0.1])
    broken = ev.per_sample[ev.per_sample["fgsm_eps"] == 0.1]
    index = torch.tensor(broken["index"].to_numpy())
    x = data.images[index].requires_grad_(True)
    nn.functional.cross_entropy(model(x), data.labels[index], reduction="sum").backward()
    assert x.grad is not None
    x_adv = (x + 0.1 * x.grad.sign()).clamp(0, 1)
    assert (model(x_adv).argmax(1).numpy() == broken["fgsm_pred"].to_numpy()).all()


def test_targeted_attack_is_judged_by_misclassification_with_target_hits_apart(
        model_and_data: tuple[nn.Module, Split]) -> None:
    model, data = model_and_data
    targeted = AttackConfig(name="pgd", steps=20, targeted=True)
    ev = evaluate(model, data, [targeted, AttackConfig(name="pgd", steps=20)], [0.0, 0.1, 0.3])
    ps, res = ev.per_sample, ev.results.set_index(["attack", "eps"])
    broken = ps[(ps["pgd20-targeted_eps"] > 0) & (ps["pgd20-targeted_eps"] < math.inf)]
    assert len(broken) > 0 and (broken["pgd20-targeted_pred"] != broken["label"]).all()
    on_target = broken["pgd20-targeted_pred"] == (broken["label"] + 1) % 10
    for e in (0.1, 0.3):
        row = res.xs(("pgd20-targeted", e))
        assert row["correct"] == int((ps["pgd20-targeted_eps"] > e).sum())
        hits = int((on_target & (broken["pgd20-targeted_eps"] <= e)).sum())
        assert row["target_hit"] == pytest.approx(hits / len(ps))
        assert math.isnan(res["target_hit"].loc[("pgd20", e)])
    assert 0 < res["target_hit"].loc[("pgd20-targeted", 0.3)] <= 1
    untargeted = evaluate(model, data.take(50), [AttackConfig(name="fgsm")], [0.0, 0.1])
    assert "target_hit" not in untargeted.results.columns  # untargeted results keep their columns


class ThreeBands(nn.Module):
    """Three classes by the mean brightness s of a 2×2 image: 0 below 0.4, 2 in (0.4, 0.6),
    1 above 0.6 (z₀ = −20(s − 0.4), z₁ = 20(s − 0.6), z₂ = 0). From s = 0.3 (class 0) the way
    to the target class 1 leads through class 2."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([[-5.0] * 4, [5.0] * 4, [0.0] * 4]))
            self.layer.bias.copy_(torch.tensor([8.0, -12.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layer(x.flatten(1))
        return logits


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd"])
def test_targeted_attack_that_stops_in_a_third_class_breaks_the_sample(name: AttackName) -> None:
    model = ThreeBands()
    data = Split(torch.full((1, 1, 2, 2), 0.3), torch.tensor([0]))
    attack = AttackConfig(name=name, steps=10, targeted=True, random_start=False)
    ev = evaluate(model, data, [attack], [0.0, 0.2])
    row = ev.results.iloc[-1]
    assert (row["eps"], row["correct"], row["target_hit"]) == (0.2, 0, 0.0)
    assert ev.per_sample[f"{attack.title}_pred"].tolist() == [2]


def test_interrupted_sweep_resumes_to_the_same_results(model_and_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, data = model_and_data
    attacks = [AttackConfig(name="pgd", steps=5)]
    whole = evaluate(model, data, attacks, EPS)

    class StopError(Exception):
        pass

    cells = []

    def save_then_stop(state):  # type: ignore[no-untyped-def]
        save_sweep(tmp_path, "fp", state)
        cells.append(1)
        if len(cells) == 2:
            raise StopError

    with pytest.raises(StopError):
        evaluate(model, data, attacks, EPS, on_cell=save_then_stop)
    state = load_sweep(tmp_path, "fp")
    assert state is not None and state.attacks["pgd5"].done == [0.05, 0.1]
    assert load_sweep(tmp_path, "other") is None
    resumed = evaluate(model, data, attacks, EPS, state=state)
    assert resumed.results.equals(whole.results)
    assert resumed.per_sample.equals(whole.per_sample)


@pytest.mark.parametrize("keep", [False, True])
def test_sweep_interrupted_inside_a_cell_resumes_at_its_next_batch(  # type: ignore[no-untyped-def]
        model_and_data, tmp_path: Path, keep: bool) -> None:
    model, data = model_and_data
    attacks = [AttackConfig(name="pgd", steps=5),
               AttackConfig(name="square", queries=40, label="sq")]

    def sweep(**options: Any) -> Evaluation:
        return evaluate(model, data, attacks, EPS, batch_size=64, keep_adversarial=keep,
                        **options)

    whole = sweep()

    class StopError(Exception):
        pass

    saves: list[tuple[str, float, int] | None] = []

    def save_then_stop(state: SweepState) -> None:
        save_sweep(tmp_path, "fp", state)
        cell = state.cell
        saves.append(None if cell is None else (cell.title, cell.eps, cell.attacked))
        if cell is not None and cell.title == "sq" and cell.eps == 0.1:
            raise StopError  # Square at ε = 0.1, some batches done

    with pytest.raises(StopError):
        sweep(on_cell=save_then_stop, save_every=0.0)
    state = load_sweep(tmp_path, "fp")
    assert state is not None and state.cell is not None
    assert saves[:2] == [("pgd5", 0.05, 64), ("pgd5", 0.05, 128)]  # after every batch but the last
    assert state.cell.title == "sq" and state.cell.eps == 0.1
    assert 0 < state.cell.attacked < len(state.cell.active)
    from_cell_start = load_sweep(tmp_path, "fp")
    assert from_cell_start is not None and from_cell_start.cell is not None
    from_cell_start.cell.attacked = 0  # the same state, its finished batches forgotten
    rows: list[int] = []
    hook = model.register_forward_hook(lambda _m, inputs, _o: rows.append(len(inputs[0])))
    try:
        resumed = sweep(state=state)
        resumed_rows = sum(rows)
        rows.clear()
        sweep(state=from_cell_start)
    finally:
        hook.remove()
    assert resumed_rows < sum(rows)  # the finished batches were not attacked again
    assert resumed.results.equals(whole.results)
    assert resumed.per_sample.equals(whole.per_sample)
    for key, cell in whole.kept.items():
        assert all(torch.equal(cell[k], resumed.kept[key][k]) for k in cell), key
    assert resumed.examples.keys() == whole.examples.keys()
    assert all(torch.equal(whole.examples[k], resumed.examples[k]) for k in whole.examples)


def test_results_do_not_depend_on_batch_size(model_and_data) -> None:  # type: ignore[no-untyped-def]
    model, data = model_and_data
    attacks = [AttackConfig(name="pgd", steps=10)]
    a = evaluate(model, data, attacks, EPS, batch_size=400)
    b = evaluate(model, data, attacks, EPS, batch_size=64)
    diff = (a.results["correct"] - b.results["correct"]).abs()
    assert int(diff.max()) <= 1  # same starts per sample; only float summation order differs


def test_l2_sweep_and_split_of_n(model_and_data) -> None:  # type: ignore[no-untyped-def]
    model, data = model_and_data
    small = Split(data.images[:100], data.labels[:100])
    ev = evaluate(model, small, [AttackConfig(name="pgd", norm="l2", steps=10)], [0.0, 1.0, 3.0])
    acc = ev.results.set_index("eps")["accuracy"]
    assert acc[0.0] > acc[1.0] > acc[3.0]


class TwoFaced(nn.Module):
    """Two classes; label 0 wins by ``gap`` in passes without autograd (the engine's re-run of
    the returned examples) and loses by ``gap`` in the attack's gradient passes, as a model whose
    outputs depend on the batch or on chance would."""

    def __init__(self, gap: float) -> None:
        super().__init__()
        self.gap = gap
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sign = -1.0 if torch.is_grad_enabled() else 1.0
        base = (x.flatten(1).sum(1, keepdim=True) * self.weight)
        return torch.cat([base + sign * self.gap / 2, base - sign * self.gap / 2], dim=1)


def test_success_is_rejudged_on_the_returned_examples() -> None:
    data = Split(torch.full((3, 1, 2, 2), 0.5), torch.zeros(3, dtype=torch.long))
    attack = [AttackConfig(name="pgd", steps=2)]
    with pytest.raises(RobustkitError, match="differs from the one the attack saw"):
        evaluate(TwoFaced(gap=5.0), data, attack, [0.0, 0.1])
    # a float tie between the two passes goes by the re-run: nothing is broken
    tie = evaluate(TwoFaced(gap=1e-6), data, attack, [0.0, 0.1])
    assert tie.results["correct"].tolist() == [3, 3]


def test_resuming_with_a_smaller_eps_attacks_samples_first_broken_at_a_larger_one(
        model_and_data: tuple[nn.Module, Split]) -> None:
    """Sweep [0, 0.1], then resume with [0, 0.03, 0.1]: at 0.03 the samples broken only at 0.1
    must be attacked again, so the resumed figure equals a fresh sweep's."""
    model, data = model_and_data
    data = data.take(200)
    attacks = [AttackConfig(name="pgd", steps=10)]
    states: list[SweepState] = []
    first = evaluate(model, data, attacks, [0.0, 0.1], on_cell=states.append)
    resumed = evaluate(model, data, attacks, [0.0, 0.03, 0.1], state=states[-1])
    fresh = evaluate(model, data, attacks, [0.0, 0.03, 0.1])
    at = {name: ev.results.set_index("eps")["correct"] for name, ev in
          (("resumed", resumed), ("fresh", fresh), ("first", first))}
    assert at["resumed"][0.03] == at["fresh"][0.03]
    assert at["resumed"][0.03] < at["first"][0.0]  # the small ε does break samples
    assert at["resumed"][0.1] == at["first"][0.1]
    ps = resumed.per_sample
    assert int((ps["pgd10_eps"] > 0.03).sum()) == at["resumed"][0.03]



@pytest.mark.parametrize("n", [1, 3, 200, 1000, 10000])
def test_wilson_interval_contains_the_proportion_at_the_edges(n: int) -> None:
    """At 0 of n the lower bound is exactly 0 and at n of n the upper bound exactly 1 (rounding
    gave 2e-19 at 0 of 1000, which made the chart's error bar negative and crashed it)."""
    assert wilson_interval(0, n)[0] == 0.0
    assert wilson_interval(n, n)[1] == 1.0
