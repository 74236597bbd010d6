"""The device-throughput machinery, checked on the CPU: compaction schedule, gradient count,
device-chosen batch sizes. None of it may change a result."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robustkit.attacks import apgd, pgd, random_unit_ball
from robustkit.attacks.base import CUDA_COMPACT_EVERY, EarlyStop, compaction_interval
from robustkit.config import config_from_dict
from robustkit.errors import RobustkitError
from robustkit.training.loop import CUDA_GRAPHS_ENV, examples_builder
from robustkit.training.objectives import CapturedPGD, pgd_examples
from robustkit.vocabulary import Loss, Norm

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only contend


def problem(n: int = 48, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 tanh MLP on 2×3×3 inputs with 4 classes; labels are its own predictions, a
    fifth of them changed so that some samples start misclassified."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, 16), nn.Tanh(), nn.Linear(16, 4)).to(DTYPE)
    x = torch.rand(n, 2, 3, 3, dtype=DTYPE)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.rand(n) < 0.2
    return model, x, torch.where(flip, (y + 1) % 4, y)


def test_early_stop_counts_and_compacts_by_hand() -> None:
    """Four samples, compaction every 2 steps; flags chosen so each rule shows."""
    stop = EarlyStop(4, torch.device("cpu"), enabled=True, every=2)
    keep = stop.after_step(0, torch.tensor([False, True, False, False]))
    assert keep is not None and keep.tolist() == [True, False, True, True]  # t = 0 compacts
    assert stop.after_step(1, torch.tensor([False, False, True])) is None   # t = 1 does not
    # t = 2: the row broken at t = 1 is still in the batch but its gradient is not counted
    keep = stop.after_step(2, torch.tensor([False, False, True]))
    assert keep is not None and keep.tolist() == [True, True, False]
    assert stop.after_step(3, torch.tensor([False, False])) is None
    assert stop.grad_evals == 4 + 3 + 2 + 2


def test_early_stop_disabled_never_drops_and_counts_everyone() -> None:
    stop = EarlyStop(3, torch.device("cpu"), enabled=False, every=1)
    for t in range(4):
        assert stop.after_step(t, torch.tensor([True, False, True])) is None
    assert stop.grad_evals == 12


def test_compaction_interval_rule() -> None:
    assert compaction_interval(torch.device("cpu")) == 1
    assert compaction_interval(torch.device("cuda", 0)) == CUDA_COMPACT_EVERY > 1
    assert compaction_interval(torch.device("cpu"), 5) == 5
    for bad in (0, -1, 2.5, True):
        with pytest.raises(RobustkitError, match="compact_every must be an integer >= 1"):
            compaction_interval(torch.device("cpu"), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("attack", [pgd, apgd])
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.25), ("l2", 1.0)])
@pytest.mark.parametrize("loss", ["ce", "margin"])
@pytest.mark.parametrize("targeted", [False, True])
def test_compaction_schedule_changes_nothing(attack: Any, norm: Norm, eps: float, loss: Loss,
                                             targeted: bool) -> None:
    """Dropping broken samples every k steps (as on CUDA) gives exactly what dropping them every
    step gives (the CPU default): same successes, same worst-case points, same gradient count."""
    model, x, y = problem()
    if targeted:
        y = (y + 1) % 4

    def noise(restart: int) -> Tensor:
        return random_unit_ball(x.shape, norm, torch.Generator().manual_seed(restart), dtype=DTYPE)

    kwargs: dict[str, Any] = {"eps": eps, "norm": norm, "steps": 9, "restarts": 3,
                              "loss": loss, "targeted": targeted, "start_noise": noise}
    every_step = attack(model, x, y, compact_every=1, **kwargs)
    assert 0 < int(every_step.success.sum()) < len(y)  # the schedule has something to do
    for every in (2, 3, CUDA_COMPACT_EVERY, 100):
        lazy = attack(model, x, y, compact_every=every, **kwargs)
        assert torch.equal(lazy.success, every_step.success)
        assert torch.allclose(lazy.x_adv, every_step.x_adv, rtol=0, atol=1e-12)
        assert lazy.grad_evals == every_step.grad_evals
    full = attack(model, x, y, early_stop=False, **kwargs)
    assert full.grad_evals > every_step.grad_evals


def test_default_schedule_on_cpu_is_every_step() -> None:
    model, x, y = problem()
    kwargs: dict[str, Any] = {"eps": 0.08, "steps": 6, "restarts": 2,
                              "generator": torch.Generator().manual_seed(3)}
    default = pgd(model, x, y, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(3)
    explicit = pgd(model, x, y, compact_every=1, **kwargs)
    assert torch.equal(default.x_adv, explicit.x_adv)
    assert default.grad_evals == explicit.grad_evals


def test_batch_for_memory_arithmetic() -> None:
    from robustkit.evaluation import MEMORY_SHARE, batch_for_memory

    # 10,000 samples at 1 MB each; 40 GB free → half of it holds 20,000: the whole set
    assert batch_for_memory(250, 10_000, 1e6, 40 * 10**9) == 10_000
    # 4 GB free → 2 GB usable → 2,000 samples
    assert batch_for_memory(250, 10_000, 1e6, 4 * 10**9) == int(MEMORY_SHARE * 4000)
    # never below the requested batch, even when memory looks short
    assert batch_for_memory(250, 10_000, 1e6, 10**8) == 250


def test_device_batch_is_the_requested_one_on_cpu() -> None:
    from robustkit.evaluation import device_batch_size

    model, x, y = problem(n=40)
    assert device_batch_size(model, x, y, 7) == 7
    assert device_batch_size(model, x, y, 100) == 100


# --------------------------------------------------------------------------- PGD-AT on a graph


def replay_by_rerunning(fn: Callable[[], None]) -> Callable[[], None]:
    """A stand-in for a CUDA graph on the CPU: replaying runs the recorded function again,
    reading the same buffers."""
    return fn


def test_captured_pgd_equals_pgd_examples() -> None:
    """Same examples and the same random stream as the eager function, across a changing ε
    (the warm-up ramp), a smaller last batch and no random start."""
    model, x, y = problem(n=40)
    captured = CapturedPGD(model, record=replay_by_rerunning)
    g_eager, g_graph = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    calls = [(slice(0, 16), 0.1, True), (slice(16, 32), 0.2, True), (slice(32, 40), 0.3, True),
             (slice(0, 16), 0.3, False), (slice(16, 32), 0.25, True)]
    for rows, eps, start in calls:
        kwargs: dict[str, Any] = {"eps": eps, "steps": 3, "step_size": eps / 2,
                                  "random_start": start}
        eager = pgd_examples(model, x[rows], y[rows], generator=g_eager, **kwargs)
        graph = captured(model, x[rows], y[rows], generator=g_graph, **kwargs)
        assert torch.equal(graph, eager)
        assert not torch.equal(graph, x[rows])  # the points moved
        assert (graph - x[rows]).abs().max() <= eps + 1e-12
    assert torch.equal(g_eager.get_state(), g_graph.get_state())
    assert captured.failed is None and len(captured.graphs) == 2  # batch 16 and batch 8


def test_captured_pgd_turns_itself_off_when_the_replay_is_wrong() -> None:
    model, x, y = problem(n=16)

    def replay_nothing(fn: Callable[[], None]) -> Callable[[], None]:
        return lambda: None  # the output buffer is never written

    def refuse(fn: Callable[[], None]) -> Callable[[], None]:
        raise RuntimeError("operation not permitted when stream is capturing")

    for record, why in ((replay_nothing, "differs from the eager"), (refuse, "recording failed")):
        captured = CapturedPGD(model, record=record)
        kwargs: dict[str, Any] = {"eps": 0.2, "steps": 2, "step_size": 0.1}
        for seed in (1, 2):
            eager = pgd_examples(model, x, y, generator=torch.Generator().manual_seed(seed),
                                 **kwargs)
            with pytest.warns(UserWarning, match=why) if seed == 1 else nullcontext():
                graph = captured(model, x, y, generator=torch.Generator().manual_seed(seed),
                                 **kwargs)
            assert torch.equal(graph, eager)
        assert captured.failed is not None and not captured.graphs


def test_examples_builder_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_dict({"model": {"arch": "cnn"}, "train": {"method": "pgd-at"}})
    model = nn.Linear(2, 2)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert isinstance(examples_builder(model, model, cfg, cuda, None), CapturedPGD)
    assert examples_builder(model, model, cfg, cpu, None) is pgd_examples
    assert examples_builder(model, nn.Identity(), cfg, cuda, None) is pgd_examples  # autocast
    trades = config_from_dict({"train": {"method": "trades"}})
    assert examples_builder(model, model, trades, cuda, None) is pgd_examples
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "0")
    assert examples_builder(model, model, cfg, cuda, None) is pgd_examples


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_scalar_step_arithmetic_changes_nothing(norm: Norm) -> None:
    """One ε and one step for every row (scalar clamp and multiply, a [0, 1] box) give
    bitwise what per-row tensors and the widened box give."""
    model, x, y = problem()
    eps = 0.25 if norm == "linf" else 1.0
    kwargs: dict[str, Any] = {"norm": norm, "steps": 6, "restarts": 2}

    def run(eps_arg: Any, step_arg: Any, images: Tensor) -> Any:
        return pgd(model, images, y, eps=eps_arg, step_size=step_arg,
                   generator=torch.Generator().manual_seed(4), **kwargs)

    rows = torch.full((len(x),), eps, dtype=DTYPE)
    for step in (None, eps / 4):
        scalar = run(eps, step, x)
        per_row = run(rows, None if step is None else rows / 4, x)
        assert torch.equal(scalar.x_adv, per_row.x_adv)
        assert torch.equal(scalar.success, per_row.success)
        assert scalar.grad_evals == per_row.grad_evals
    # a −0 pixel keeps the widened box; the attack's outcome is the same as with +0
    signed = x.clone()
    signed[:, 0, 0, 0] = -0.0
    unsigned = signed + 0.0  # −0 + 0 = +0
    a, b = run(eps, None, signed), run(eps, None, unsigned)
    assert torch.equal(a.success, b.success) and torch.equal(a.x_adv, b.x_adv)
