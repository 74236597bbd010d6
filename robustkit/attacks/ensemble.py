"""The AutoAttack-style ensemble (Croce & Hein, 2020): APGD-CE → APGD-T → Square (L∞, L2),
APGD-CE → APGD-T → FAB-T → Square (L1).

Attacks that fail in different ways, run in sequence, each on the samples the stages before it
left robust:

1. :func:`~robustkit.attacks.apgd` with the cross-entropy loss (one start);
2. :func:`~robustkit.attacks.apgd_t.apgd_targeted`: targeted DLR towards each of the ``k``
   highest wrong classes (scale-invariant, so saturated logits do not hide a weak sample);
3. :func:`~robustkit.attacks.fab.fab_targeted`: FAB-T, the minimum-norm attack towards each of
   the 9 highest wrong classes (``min(9, K − 1)``; one start, as many steps as APGD), judged
   at ε: it follows the linearised decision boundary rather than a loss, so a loss surface
   that misleads APGD does not hide a weak sample from it;
4. :func:`~robustkit.attacks.square.square`: gradient-free random search (gradient masking
   does not hide a weak sample from it), in AutoAttack's configuration: 5,000 queries,
   ``p_init = 0.8``, the square-size schedule fixed in iterations (``resc_schedule=False``:
   ``p`` halves after iterations 10, 50, 200, 500, 1000, 2000, 4000) and the search always
   starting from the random stripes.

A sample counts as robust only if no stage breaks it; its ``x_adv`` is the point that broke it,
else the point with the lowest margin ``z_y − max_{j≠y} z_j`` any stage found. A stage only
adds broken samples, so adding one can only lower the ensemble's robust accuracy.

**L∞ and L2** run APGD-CE, APGD-T and Square (:data:`DEFAULT_STAGES`). AutoAttack's
``version="standard"`` also runs FAB-T between APGD-T and Square; measured per sample against
the authors' code on the committed robust CNNs and an outside LeNet-5 it broke nothing the
other three left (the committed reports were made without it), and it costs as much as APGD-T,
so it is a stage to ask for (``stages=STAGES``, or ``--attack fab-t`` beside the ensemble)
rather than a default.

**L1** (what AutoAttack's ``version="standard"`` runs for ``norm="L1"``, Croce & Hein, 2021):
APGD-CE with 5 restarts and APGD-T with 5 target classes, both l1-APGD with the ε schedule
(3ε, 2ε, ε; :mod:`~robustkit.attacks.apgd_l1`), then L1 FAB-T (9 targets), then the L1 Square
(5,000 queries, :mod:`~robustkit.attacks.square`). On the first 1,000 test images of
``zoo:mnist_cnn_pgd_at`` at ε = 10 the three gradient stages left 2.0% robust, as did the
authors' four (APGD-CE 18.7%, APGD-T 17.2%, FAB-T 2.3%, Square 2.0%; ``benchmarks/l1_compare.py``,
``benchmarks/results/``); two samples only their L1 Square broke, in five reruns each.

Randomness: ``start_noise(r)`` gives draw ``r`` of unit-ball noise shaped like ``x`` (APGD-CE
uses draws ``0 … R − 1`` for its ``R`` restarts, APGD-T's ``j``-th target draw ``R + j``) and
``square_noise`` Square's uniforms, both indexed by sample, so each stage treats a sample
exactly as it would on its own, and the ensemble breaks every sample any of its stages breaks
alone with the same draws. FAB-T's single start is the clean point: it draws nothing.

Speed: on the CPU the stages run the model's weights channels-last
(:func:`~robustkit.attacks.iterative.channels_last`): the same function up to float rounding,
and on a small MNIST CNN about twice the forward passes per second (its NCHW max-pooling is
the slow part). Rounding can move a borderline sample from one stage to another; on the first
100 test images of ``zoo:mnist_cnn_pgd_at`` at ε = 0.3 the ensemble's robust set was the same
sample for sample.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustkit.attacks.apgd import apgd
from robustkit.attacks.apgd_t import DEFAULT_TARGETS, apgd_targeted
from robustkit.attacks.base import AttackResult, WorstCase, as_eps, attack_mode, check_inputs
from robustkit.attacks.fab import fab_targeted
from robustkit.attacks.iterative import StartNoise, channels_last
from robustkit.attacks.losses import check_logits, is_adversarial, objective
from robustkit.attacks.norms import check_norm
from robustkit.attacks.square import DEFAULT_P_INIT, DEFAULT_QUERIES, SquareNoise, square
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Norm

#: Every stage, in order.
STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
#: The stages run in L∞ and L2 unless asked otherwise (see the module docstring).
DEFAULT_STAGES = ("apgd-ce", "apgd-t", "square")
#: The stages that run in L1 (AutoAttack's standard L1).
L1_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
#: FAB-T's target classes in AutoAttack's standard version (at most ``K − 1``), every norm.
FAB_TARGETS = 9
#: AutoAttack's standard L1 recipe: APGD-CE restarts and APGD-T target classes.
L1_RESTARTS = 5
L1_TARGETS = 5


def recipe(norm: Norm, targets: int | None, classes: int) -> tuple[int, int]:
    """``(APGD-CE restarts, APGD-T targets)`` of the standard ensemble in ``norm``: ``(1,
    min(9, K − 1))`` in L∞ and L2, ``(5, min(5, K − 1))`` in L1; ``targets`` overrides."""
    restarts, default = (L1_RESTARTS, L1_TARGETS) if norm == "l1" else (1, DEFAULT_TARGETS)
    return restarts, targets if targets is not None else min(default, classes - 1)


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    norm: Norm = "linf",
    steps: int = 100,
    targets: int | None = None,
    budget: int = DEFAULT_QUERIES,
    p_init: float = DEFAULT_P_INIT,
    stages: tuple[str, ...] | None = None,
    generator: torch.Generator | None = None,
    start_noise: StartNoise | None = None,
    square_noise: SquareNoise | None = None,
) -> AttackResult:
    """APGD-CE → APGD-T → Square within ``‖x_adv − x‖ ≤ ε`` and ``x_adv ∈ [0, 1]`` (L1:
    APGD-CE ×5 → APGD-T → FAB-T → Square; see the module docstring).

    Args:
        steps: APGD steps per run and FAB-T steps per target (AutoAttack: 100).
        targets: APGD-T's target classes (default ``min(9, K − 1)``, L1 ``min(5, K − 1)``).
        budget, p_init: Square's queries per sample and initial square fraction.
        stages: a subsequence of :data:`STAGES` (default :data:`DEFAULT_STAGES`; L1: the
            stages of :data:`L1_STAGES`).
        generator / start_noise / square_noise: randomness (see the module docstring).

    ``grad_evals`` sums the APGD and FAB-T stages' gradients, ``queries`` is Square's forward
    passes.
    """
    check_inputs(x, y)
    norm = check_norm(norm)
    if stages is None:
        stages = L1_STAGES if norm == "l1" else DEFAULT_STAGES
    if norm == "l1":
        stages = tuple(s for s in stages if s in L1_STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise RobustkitError(f"unknown ensemble stage(s) {unknown}; choose from {list(STAGES)}")
    eps_t = as_eps(eps, x, norm).view(-1)
    x = x.detach()
    worst = WorstCase(x)
    with attack_mode(model), torch.no_grad():
        logits = model(x)
    check_logits(logits, y)
    restarts, k = recipe(norm, targets, logits.shape[1])
    _offer(worst, torch.arange(len(x), device=x.device), x, logits, y)
    with channels_last(model, x, logits):
        grad_evals, queries = _run_stages(
            model, x, y, eps_t, worst, stages=stages, norm=norm, steps=steps,
            restarts=restarts, k=k, classes=logits.shape[1], budget=budget, p_init=p_init,
            generator=generator, start_noise=start_noise, square_noise=square_noise)
    return AttackResult(x_adv=worst.x_adv, success=worst.success, grad_evals=grad_evals,
                        queries=queries)


def _run_stages(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_t: Tensor,
    worst: WorstCase,
    *,
    stages: tuple[str, ...],
    norm: Norm,
    steps: int,
    restarts: int,
    k: int,
    classes: int,
    budget: int,
    p_init: float,
    generator: torch.Generator | None,
    start_noise: StartNoise | None,
    square_noise: SquareNoise | None,
) -> tuple[int, int]:
    """Each of ``stages`` in turn on the samples the ones before it left unbroken, its points
    offered to ``worst``; return the gradients and the queries spent."""
    grad_evals = queries = 0
    for stage in STAGES:
        idx = (~worst.success & (eps_t > 0)).nonzero().squeeze(1)
        if stage not in stages or idx.numel() == 0:
            continue
        x_i, y_i, eps_i = x[idx], y[idx], eps_t[idx]
        if stage == "apgd-ce":
            result = apgd(model, x_i, y_i, eps=eps_i, norm=norm, steps=steps, loss="ce",
                          restarts=restarts, generator=generator,
                          start_noise=_rows(start_noise, idx, 0))
        elif stage == "apgd-t":
            result = apgd_targeted(model, x_i, y_i, eps=eps_i, norm=norm, steps=steps,
                                   targets=k, generator=generator,
                                   start_noise=_rows(start_noise, idx, restarts))
        elif stage == "fab-t":
            result = fab_targeted(model, x_i, y_i, eps=eps_i, norm=norm, steps=steps,
                                  targets=min(FAB_TARGETS, classes - 1),
                                  generator=generator)
        else:
            result = square(model, x_i, y_i, eps=eps_i, norm=norm, budget=budget,
                            p_init=p_init, rescale=False, generator=generator,
                            noise=_square_rows(square_noise, idx))
        grad_evals += result.grad_evals
        queries += result.queries
        with attack_mode(model), torch.no_grad():
            _offer(worst, idx, result.x_adv, model(result.x_adv), y_i)
    return grad_evals, queries


def _offer(worst: WorstCase, idx: Tensor, x_adv: Tensor, logits: Tensor, y: Tensor) -> None:
    """A stage's points for the samples ``idx``: adversarial, else judged by the margin loss."""
    worst.update(idx, x_adv, objective(logits, y, "margin", False), is_adversarial(logits, y))


def _rows(start_noise: StartNoise | None, idx: Tensor, offset: int) -> StartNoise | None:
    """Draw ``offset + r`` of ``start_noise``, restricted to the samples ``idx``."""
    if start_noise is None:
        return None
    noise = start_noise

    def draw(r: int) -> Tensor:
        u = noise(offset + r)
        return u[idx.to(u.device)]

    return draw


def _square_rows(square_noise: SquareNoise | None, idx: Tensor) -> SquareNoise | None:
    """``square_noise`` restricted to the samples ``idx``."""
    if square_noise is None:
        return None
    noise = square_noise

    def draw(step: int, m: int) -> Tensor:
        u = noise(step, m)
        return u[idx.to(u.device)]

    return draw
