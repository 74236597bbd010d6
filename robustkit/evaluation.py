"""The robust-accuracy sweep: attacks × ε on a labelled split, as tidy pandas frames.

For each attack and each sample the engine finds the smallest ε of the sweep at which the sample
is broken, i.e. misclassified. Robust accuracy at ε is the fraction of samples not broken at any
ε' ≤ ε. A targeted attack pushes towards the target (y + 1) mod K but is judged the same way, as
AutoAttack judges APGD-T: a sample it pushes into a third class is broken, and its worst case is
the first misclassified iterate. How often the kept example is classified as the target is
reported apart, in the ``target_hit`` column of the results (present only when an attack is
targeted, so the results of untargeted sweeps keep their columns).

Three shortcuts make this fast without making the attack weaker than attacking every ε from
scratch:

* a sample misclassified on clean input is broken at every ε and never attacked;
* early stopping: inside an attack, a sample leaves the batch as soon as it is broken;
* ε-monotone reuse: an adversarial example found at ε_k lies in every larger ε-ball, so at
  ε_{k+1} only samples still robust at ε_k are attacked.

Random starts come from a noise bank indexed by (seed, attack, restart, sample index), so a
sample's attack does not depend on which other samples share its batch; with the shortcuts off
(``shortcuts=False``) the engine is the plain per-ε reference loop with the same starts.

Several processes (``dist``, see :mod:`robustkit.distributed`): every rank holds the whole split
and the whole sweep state. In each (attack, ε) cell the batches the one-process engine forms
(consecutive ``batch_size`` runs of the still-robust samples, and the clean-prediction batches)
are dealt out to the ranks in contiguous runs, and each batch's per-sample outcomes are gathered
onto every rank before the next cell. Per-row model outputs on CPU depend on the batch size
(and on the thread count) in the last bits, so sharding by sample could flip a borderline
outcome; with batch-level sharding every batch is the one a single process attacks and the
results equal the one-process results exactly (same thread count per process on CPU;
deterministic kernels on GPU). Only timings differ.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from robustkit.attack_specs import SPECS
from robustkit.attacks import AttackResult, attack_mode, margin, random_unit_ball, registry
from robustkit.attacks.base import max_eps
from robustkit.attacks.registry import Draws, pass_budget
from robustkit.attacks.square import SquareNoise
from robustkit.attacks.transfer import craft
from robustkit.attacks.transforms import EOT, Transform
from robustkit.config import AttackConfig
from robustkit.data import Split
from robustkit.distributed import Context, all_gather_object, all_gather_tensor, batch_shard, shard
from robustkit.errors import RobustkitError
from robustkit.models.defences import with_bpda
from robustkit.progress import Bar, counting_rows
from robustkit.results import ANY, RESULT_COLUMNS, TARGET_HIT, ResultRow
from robustkit.vocabulary import Norm

SHORTCUTS_NOTE = (
    "ε-monotone reuse: an adversarial example found at a smaller ε is admissible at every larger "
    "ε, so only samples still robust are attacked at the next ε; clean-misclassified samples "
    "count as broken at every ε; per-sample early stopping."
)


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion p = correct/n:
    ``(p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n)``, which always contains p (at p = 0
    the lower bound is exactly 0, which float rounding alone would miss by ~1e-19)."""
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


@dataclass
class AttackState:
    """Per-sample outcome of one attack so far: smallest breaking ε (inf if none) and the
    prediction there; ``done`` lists the ε already swept."""

    broken_eps: Tensor
    adv_pred: Tensor
    done: list[float] = field(default_factory=list)
    grad_evals: dict[float, int] = field(default_factory=dict)
    queries: dict[float, int] = field(default_factory=dict)
    seconds: dict[float, float] = field(default_factory=dict)
    success_at: dict[float, Tensor] = field(default_factory=dict)
    target_at: dict[float, Tensor] = field(default_factory=dict)


@dataclass
class CellProgress:
    """An (attack, ε) cell as far as it got: the samples it attacks (fixed when it starts, in
    order, ``batch_size`` at a time), how many of them are done, and what those gave.

    Saved between batches so that an interrupted cell resumes at its next batch. A sample's
    start noise, Square draws and EOT seed depend on the sample and its batch, never on when the
    batch runs, so a resumed cell ends exactly as an uninterrupted one (timings aside).
    """

    title: str
    eps: float
    active: Tensor
    batch_size: int
    success: Tensor
    on_target: Tensor
    pictures: Tensor
    kept: dict[str, Tensor] | None = None
    attacked: int = 0
    evals: int = 0
    queries: int = 0
    seconds: float = 0.0

    def matches(self, title: str, eps: float, batch_size: int) -> bool:
        return (self.title, self.eps, self.batch_size) == (title, eps, batch_size)


@dataclass
class SweepState:
    """All that a resumed sweep needs: clean predictions, each attack's state, the example
    pictures, (when kept) every cell's adversarial examples (:class:`Adversarial`'s ``images``,
    ``pred`` and ``eps`` by cell ``TITLE@EPS``), and the cell in progress, if any."""

    clean_pred: Tensor
    attacks: dict[str, AttackState] = field(default_factory=dict)
    examples: dict[str, Tensor] = field(default_factory=dict)
    adversarial: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    cell: CellProgress | None = None


@dataclass(frozen=True)
class Adversarial:
    """One (attack, ε) cell's examples, one row per sample of ``index`` (split order): the
    image the sweep judged (the first adversarial example found at some ε' ≤ ε, else the
    attack's last example at ε; the clean image of a clean-misclassified sample), the true
    label, the clean and the adversarial prediction, and the ε the image was found at. The
    model's prediction on ``images`` is ``adv_pred`` (an EOT attack's examples are judged under
    its transformations instead), so the cell's robust accuracy is ``mean(adv_pred == labels)``
    over all n samples."""

    images: Tensor
    index: Tensor
    labels: Tensor
    clean_pred: Tensor
    adv_pred: Tensor
    eps: Tensor

    def broken(self) -> Adversarial:
        """Only the rows whose adversarial prediction is wrong."""
        keep = self.adv_pred != self.labels
        return Adversarial(self.images[keep], self.index[keep], self.labels[keep],
                           self.clean_pred[keep], self.adv_pred[keep], self.eps[keep])


@dataclass(frozen=True)
class Evaluation:
    results: pd.DataFrame
    per_sample: pd.DataFrame
    timings: pd.DataFrame
    examples: dict[str, Tensor]
    notes: list[str]
    kept: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    def adversarial(self, attack: str, eps: float) -> Adversarial:
        """The examples of the cell (``attack`` title, ``eps``) of a sweep run with
        ``keep_adversarial=True``; every sample of the split, in order."""
        key = f"{attack}@{eps:g}"
        if key not in self.kept:
            kept = ", ".join(self.kept) or "none: evaluate with keep_adversarial=True"
            raise RobustkitError(f"no adversarial examples kept for {attack} at ε = {eps:g} "
                                 f"(kept: {kept})")
        cell = self.kept[key]
        labels = torch.tensor(self.per_sample["label"].to_numpy())
        return Adversarial(cell["images"], torch.arange(len(labels)), labels,
                           torch.tensor(self.per_sample["clean_pred"].to_numpy()),
                           cell["pred"], cell["eps"])


class NoiseBank:
    """Unit-ball start noise u[r, i] that depends only on (seed, attack, restart r, sample i).

    Restart r's noise for the whole split is drawn from a generator seeded with
    ``seed·1000003 + attack·1009 + r``. Drawn tensors are kept while they fit in
    ``cache_bytes`` (least recently used goes first) and are drawn again, identically, when
    needed after that, so memory does not grow with the number of restarts.
    """

    def __init__(self, x_shape: Sequence[int], norm: Norm, seed: int, attack_index: int,
                 cache_bytes: int = 256 * 2**20) -> None:
        self.shape, self.norm = tuple(x_shape), norm
        self.seed = seed * 1_000_003 + attack_index * 1009
        per_restart = 4 * math.prod(self.shape)  # float32
        self.capacity = max(1, cache_bytes // max(per_restart, 1))
        self._cache: OrderedDict[int, Tensor] = OrderedDict()

    def __call__(self, restart: int) -> Tensor:
        if restart in self._cache:
            self._cache.move_to_end(restart)
            return self._cache[restart]
        generator = torch.Generator().manual_seed(self.seed + restart)
        noise = random_unit_ball(self.shape, self.norm, generator)
        self._cache[restart] = noise
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return noise


class SquareBank:
    """Square's uniforms u[step, i, :m] that depend only on (seed, attack, step, sample i)."""

    def __init__(self, n: int, seed: int, attack_index: int) -> None:
        self.n = n
        self.seed = seed * 1_000_003 + attack_index * 1009 + 7_919

    def __call__(self, step: int, m: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 65_537 + step + 1)
        return torch.rand((self.n, m), generator=generator, dtype=torch.float64)


def eot_seed(seed: int, attack_index: int, eps: float, first: int) -> int:
    """The seed of an EOT attack's draws on the batch whose first sample is ``first``."""
    return (seed * 1_000_003 + attack_index * 1009 + round(eps * 1e6) * 7 + first) % 2**62


def run_attack(model: nn.Module, attack: AttackConfig, x: Tensor, y: Tensor, eps: float,
               noise: Callable[[int], Tensor] | None, early_stop: bool = True,
               labels: Tensor | None = None,
               square_noise: SquareNoise | None = None, *, transform: Transform | None = None,
               generator: torch.Generator | None = None,
               starts: torch.Generator | None = None,
               source: nn.Module | None = None) -> AttackResult:
    """One attack at one ε on a batch: the one place an :class:`AttackConfig` is run (the
    sweep, ``physical`` and the model checks use it), through the runner table
    (:func:`robustkit.attacks.registry.run`, which holds the result to the ε-ball and the box).
    ``y`` holds the targets of a targeted attack and ``labels`` the true classes (success =
    misclassified); random starts come from ``noise`` (by restart), else from ``starts``;
    ``attack.eot_samples`` draws of ``transform`` (the identity by default) per step from
    ``generator``; ``attack.bpda`` through the model's preprocessing. ``source``: a transfer
    attack's model, which the examples are crafted on, blind to its verdict
    (:func:`robustkit.attacks.transfer.craft`); the caller judges them on ``model``."""
    if source is not None:
        draws = Draws(start_noise=noise, square_noise=square_noise, starts=starts)
        return craft(source, attack, x, y, eps, draws, labels=labels)
    if attack.bpda is not None:
        model = with_bpda(model, attack.bpda)
    eot = (EOT(transform or Transform(), attack.eot_samples, generator)
           if attack.eot_samples is not None else None)
    draws = Draws(start_noise=noise, square_noise=square_noise, starts=starts, eot=eot)
    return registry.run(model, attack, x, y, eps, draws, labels=labels, early_stop=early_stop)


def check_eps(eps: Sequence[float], norm: Norm, x: Tensor) -> None:
    """ε is in pixel units: [0, 1] in L∞, [0, √d] in L2."""
    upper = max_eps(norm, x)
    for e in eps:
        if not 0.0 <= e <= upper:
            raise RobustkitError(
                f"ε = {e:g} is out of range for {norm}: ε is in [0, {upper:g}] pixel units "
                "(write e.g. 0.3 or 8/255, not 8)"
            )


#: Share of the free device memory an attack batch may use (the rest is headroom).
MEMORY_SHARE = 0.5
#: Image-sized tensors an attack keeps per sample besides the model's activations (iterates,
#: gradients, APGD's state, the worst-case record), counted generously.
STATE_TENSORS = 16


def batch_for_memory(requested: int, n: int, bytes_per_sample: float, free_bytes: int) -> int:
    """The attack batch for ``n`` samples: as many as fit in :data:`MEMORY_SHARE` of
    ``free_bytes`` at ``bytes_per_sample``, never fewer than ``requested`` (nor more than ``n``
    unless ``requested`` is)."""
    fits = int(MEMORY_SHARE * free_bytes // max(bytes_per_sample, 1.0))
    return max(requested, min(n, fits))


def device_batch_size(model: nn.Module, x: Tensor, y: Tensor, requested: int) -> int:
    """The attack batch the device chooses: ``requested`` on the CPU; on CUDA the whole of
    ``x`` when it fits, else as much as fits (:func:`batch_for_memory`).

    On the CPU a bigger batch buys nothing (the cores are busy at any size) and the per-row
    outputs would change in the last bits. On CUDA a small batch leaves the GPU idle between
    kernel launches; one forward/backward pass over ``requested`` samples measures the memory a
    sample needs. Results do not depend on the batch (random starts come from the noise bank).
    """
    if x.device.type != "cuda" or len(x) <= requested:
        return requested
    device = x.device
    probe_n = min(requested, len(x))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    x_in = x[:probe_n].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = nn.functional.cross_entropy(model(x_in), y[:probe_n], reduction="sum")
    torch.autograd.grad(value, x_in)
    peak = torch.cuda.max_memory_allocated(device) - before
    free, _ = torch.cuda.mem_get_info(device)
    state = STATE_TENSORS * x[0].numel() * x.element_size()
    return batch_for_memory(requested, len(x), peak / probe_n + state, free)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int, dist: Context | None = None) -> Tensor:
    """Predicted classes in batches ``[0, b), [b, 2b), …``; with ``dist`` each rank predicts
    its whole batches and every rank gets all predictions."""
    if dist is not None:
        part = x[batch_shard(len(x), batch_size, dist.rank, dist.world)]
        mine = predict(model, part, batch_size) if len(part) else torch.empty(
            0, dtype=torch.long, device=x.device)
        return torch.cat(all_gather_tensor(mine, dist))
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def target_labels(labels: Tensor, num_classes: int) -> Tensor:
    """The fixed target of a targeted attack: the next class, (y + 1) mod K."""
    return (labels + 1) % num_classes


def evaluate(
    model: nn.Module,
    data: Split,
    attacks: Sequence[AttackConfig],
    eps: Sequence[float],
    *,
    model_name: str = "model",
    batch_size: int = 1000,
    seed: int = 0,
    shortcuts: bool = True,
    n_examples: int = 8,
    progress: bool = False,
    state: SweepState | None = None,
    on_cell: Callable[[SweepState], None] | None = None,
    dist: Context | None = None,
    device_batch: bool = True,
    transform: Transform | None = None,
    keep_adversarial: bool = False,
    sources: Mapping[str, nn.Module] | None = None,
    save_every: float = 60.0,
) -> Evaluation:
    """Sweep every attack over every ε; return tidy results, per-sample outcomes and timings.

    ``state``/``on_cell`` make a sweep resumable: ``on_cell`` is called with the state to save
    after each finished (attack, ε) cell, and inside a cell after a batch once ``save_every``
    seconds have passed since the last call (the state's ``cell`` is then the cell in progress,
    :class:`CellProgress`; one process only). A saved state passed back skips the finished
    cells and the finished batches of the cell in progress. A resumed sweep may add ε values
    below those already swept: there every sample not broken at a smaller ε is attacked,
    including those first broken at a larger one, so the result equals a fresh sweep's at
    that ε.

    ``dist`` shares the work among the processes of a torch.distributed group: every rank
    passes the same split and state and gets the same (complete) result; ``on_cell`` and the
    progress bar run on rank 0 only.

    ``device_batch``: on CUDA (one process), attack and predict in the batches the device
    chooses (:func:`device_batch_size`, the whole split when it fits) instead of
    ``batch_size``; the CPU always uses ``batch_size``.

    EOT attacks (``eot_samples``) draw from ``transform`` (default: the identity, for a
    randomised model), seeded per (seed, attack, ε, first sample of the batch).

    ``keep_adversarial``: keep every cell's examples, one per sample (on the CPU, one copy of
    the split per cell), in the state and in :meth:`Evaluation.adversarial` (one process only).

    ``sources``: the models transfer attacks craft on, by their ``source`` (each takes the
    split's images and returns the model's K logits); their examples are judged on ``model``.
    """
    main = dist is None or dist.is_main
    if keep_adversarial and dist is not None:
        raise RobustkitError("keeping the adversarial examples works in one process: run "
                             "without torchrun, or without --save-adversarial")
    eps_list = sorted({float(e) for e in eps})
    _check_attacks(attacks, eps_list, data.images)
    sources = dict(sources or {})
    _check_sources(attacks, sources)
    with attack_mode(model):
        if device_batch and dist is None:
            batch_size = device_batch_size(model, data.images, data.labels, batch_size)
        if state is None:
            state = SweepState(clean_pred=predict(model, data.images, batch_size, dist))
        sweep = _Sweep.start(model, data, state, n_examples=n_examples, batch_size=batch_size,
                             seed=seed, shortcuts=shortcuts, dist=dist, transform=transform,
                             keep_adversarial=keep_adversarial, sources=sources,
                             save_every=save_every)
        for a_index, attack in enumerate(attacks):
            _sweep_attack(sweep, state, attack, a_index, eps_list,
                          bar=f"{model_name} {attack.title}", progress=progress and main,
                          on_cell=on_cell if main else None)
    return _frames(state, attacks, eps_list, data.labels, model_name, shortcuts)


def _check_attacks(attacks: Sequence[AttackConfig], eps_list: list[float], x: Tensor) -> None:
    """Every ε in range for every attack's norm; at least one attack, no two with one title."""
    for attack in attacks:
        check_eps(eps_list, attack.norm, x)
    titles = [a.title for a in attacks]
    if len(set(titles)) != len(titles):
        raise RobustkitError(f"two attacks share a name in {titles}: give one a label")
    if not attacks:
        raise RobustkitError(f"no attack given: choose at least one of {', '.join(SPECS)}")


def _check_sources(attacks: Sequence[AttackConfig], sources: Mapping[str, nn.Module]) -> None:
    """Every transfer attack's source model is given."""
    for attack in attacks:
        if attack.source is not None and attack.source not in sources:
            raise RobustkitError(f"{attack.title} crafts on {attack.source}, which was not "
                                 "loaded: pass it in sources={source: model}")


@dataclass(frozen=True)
class _Sweep:
    """What every (attack, ε) cell of one sweep shares: the model, the split on its device,
    which samples the clean model gets right, the samples shown as examples, and the settings."""

    model: nn.Module
    x: Tensor
    y: Tensor
    clean_correct: Tensor
    example_idx: Tensor
    num_classes: int
    batch_size: int
    seed: int
    shortcuts: bool
    dist: Context | None
    transform: Transform | None
    keep_adversarial: bool = False
    sources: Mapping[str, nn.Module] = field(default_factory=dict)
    save_every: float = 60.0

    def source_of(self, attack: AttackConfig) -> nn.Module | None:
        """The model a transfer attack crafts on; None for an attack on the evaluated model."""
        return None if attack.source is None else self.sources[attack.source]

    @classmethod
    def start(cls, model: nn.Module, data: Split, state: SweepState, *, n_examples: int,
              batch_size: int, seed: int, shortcuts: bool, dist: Context | None,
              transform: Transform | None, keep_adversarial: bool = False,
              sources: Mapping[str, nn.Module] | None = None,
              save_every: float = 60.0) -> _Sweep:
        """Moves ``state``'s clean predictions to the split's device; the examples are the first
        ``n_examples`` samples classified correctly."""
        x, y = data.images, data.labels
        state.clean_pred = state.clean_pred.to(x.device)
        clean_correct = state.clean_pred == y
        num_classes = int(model(x[:1]).shape[1])
        return cls(model, x, y, clean_correct, clean_correct.nonzero().squeeze(1)[:n_examples],
                   num_classes, batch_size=batch_size, seed=seed, shortcuts=shortcuts, dist=dist,
                   transform=transform, keep_adversarial=keep_adversarial,
                   sources=dict(sources or {}), save_every=save_every)


def _attack_state(state: SweepState, title: str, clean_correct: Tensor) -> AttackState:
    """The attack's state in ``state``, new when the sweep has none: clean-misclassified samples
    broken at ε = 0, the others not yet broken."""
    if title not in state.attacks:
        state.attacks[title] = AttackState(
            broken_eps=torch.where(clean_correct, math.inf, 0.0).to(torch.float64).cpu(),
            adv_pred=state.clean_pred.clone().cpu(),
        )
    return state.attacks[title]


class _Meter:
    """Moves a sweep's bar with the model's forward passes (:func:`counting_rows`): each cell
    owns ``active × budget`` units of the bar, filled by the rows the model processes and
    completed when the cell ends (early stopping spends less than the budget)."""

    def __init__(self, bar: Bar, budget: int) -> None:
        self.bar, self.budget = bar, budget
        self.allotted = self.used = 0

    def start(self, active: int, cells_left: int) -> None:
        """A cell attacking ``active`` samples begins; ``cells_left`` counts it and the rest."""
        self.allotted, self.used = active * self.budget, 0
        self.bar.resize(self.bar.done + self.allotted * cells_left)

    def rows(self, n: int) -> None:
        step = max(0, min(n, self.allotted - self.used - 1))
        self.used += step
        self.bar.advance(step)

    def finish(self, info: str) -> None:
        self.bar.advance(self.allotted - self.used, info)
        self.allotted = self.used = 0


def _sweep_attack(sweep: _Sweep, state: SweepState, attack: AttackConfig, a_index: int,
                  eps_list: list[float], *, bar: str, progress: bool,
                  on_cell: Callable[[SweepState], None] | None) -> None:
    """Attack at every ε > 0 of ``eps_list`` not done yet, smallest first; ``on_cell`` after
    each. The bar measures forward passes against each cell's budget (:func:`pass_budget`);
    piped, one line per cell."""
    title = attack.title
    a_state = _attack_state(state, title, sweep.clean_correct)
    targets = target_labels(sweep.y, sweep.num_classes) if attack.targeted else sweep.y
    banks = (NoiseBank(sweep.x.shape, attack.norm, sweep.seed, a_index),
             SquareBank(len(sweep.x), sweep.seed, a_index))
    todo = [e for e in eps_list if e > 0 and e not in a_state.done]
    done = [e for e in a_state.done if f"{title}@{e:g}" in state.examples]
    pictures = (state.examples[f"{title}@{max(done):g}"] if done
                else sweep.x[sweep.example_idx].detach().cpu())
    budget = pass_budget(attack)
    with Bar(bar, max(1, len(todo) * len(sweep.x) * budget), progress,
             counts=False) as progress_bar:
        meter = _Meter(progress_bar, budget)
        with counting_rows(sweep.source_of(attack) or sweep.model, meter.rows):
            for i, e in enumerate(todo):
                pictures = _sweep_cell(sweep, state, attack, a_index, a_state, targets, banks,
                                       e, pictures, meter, cells_left=len(todo) - i,
                                       on_cell=on_cell)
                if on_cell is not None:
                    on_cell(state)


def _sweep_cell(sweep: _Sweep, state: SweepState, attack: AttackConfig, a_index: int,
                a_state: AttackState, targets: Tensor, banks: tuple[NoiseBank, SquareBank],
                e: float, previous: Tensor, meter: _Meter, cells_left: int,
                on_cell: Callable[[SweepState], None] | None) -> Tensor:
    """One (attack, ε) cell: attack the samples not broken at any ε' ≤ ``e`` (all the clean-
    correct ones without shortcuts), record its outcome, timing and the example pictures (a
    copy of ``previous`` updated), and return those pictures. A saved cell in progress
    (``state.cell``) resumes at its next batch."""
    cell = _open_cell(sweep, state, attack.title, a_state, e, previous)
    meter.start(len(cell.active) - cell.attacked, cells_left)
    meter.bar.info = f"ε={e:g}"
    started, last_save = time.perf_counter(), time.perf_counter()

    def checkpoint() -> None:  # between batches: save the cell in progress now and then
        nonlocal last_save
        if on_cell is None or time.perf_counter() - last_save < sweep.save_every:
            return
        state.cell = dataclasses.replace(
            cell, seconds=cell.seconds + time.perf_counter() - started)
        on_cell(state)
        last_save = time.perf_counter()

    _attack_cell(sweep.model, attack, sweep.x, sweep.y, targets, e, banks, cell,
                 shortcuts=sweep.shortcuts, a_state=a_state,
                 picture_idx=sweep.example_idx.cpu(), dist=sweep.dist,
                 transform=sweep.transform, eot=(sweep.seed, a_index),
                 source=sweep.source_of(attack),
                 checkpoint=checkpoint if sweep.dist is None else None)
    state.cell = None
    state.examples[f"{attack.title}@{e:g}"] = cell.pictures
    if cell.kept is not None:
        state.adversarial[f"{attack.title}@{e:g}"] = cell.kept
    a_state.success_at[e] = cell.success
    if attack.targeted:
        a_state.target_at[e] = cell.on_target
    a_state.grad_evals[e] = cell.evals
    a_state.queries[e] = cell.queries
    a_state.seconds[e] = cell.seconds + time.perf_counter() - started
    a_state.done.append(e)
    left = int((_accuracy_at(a_state, e, sweep.clean_correct.cpu(), sweep.shortcuts)).sum())
    meter.finish(f"ε={e:g}")
    meter.bar.note(f"{meter.bar.title} ε={e:g}: {left} of {len(sweep.x)} robust "
                   f"({a_state.seconds[e]:.1f} s, {len(cell.active)} attacked)")
    return cell.pictures


def _open_cell(sweep: _Sweep, state: SweepState, title: str, a_state: AttackState, e: float,
               previous: Tensor) -> CellProgress:
    """The saved cell in progress when it is this one (same attack, ε and batch size), else a
    new cell over the samples not broken at any ε' ≤ ``e`` (a resumed sweep may add an ε below
    those done, and a sample first broken at a larger ε must be attacked there too)."""
    saved = state.cell
    if saved is not None and saved.matches(title, e, sweep.batch_size):
        return saved
    state.cell = None
    robust = (a_state.broken_eps > e) if sweep.shortcuts else sweep.clean_correct.cpu()
    n = len(sweep.x)
    return CellProgress(
        title, e, robust.nonzero().squeeze(1), sweep.batch_size,
        success=torch.zeros(n, dtype=torch.bool), on_target=torch.zeros(n, dtype=torch.bool),
        pictures=previous.clone(),
        kept=_kept_base(sweep, state, title, e) if sweep.keep_adversarial else None)


def _kept_base(sweep: _Sweep, state: SweepState, title: str, e: float) -> dict[str, Tensor]:
    """The examples a cell starts from: a copy of the attack's cell at the largest ε' < ``e``
    done (the samples not attacked again keep the example found there), else the clean images
    and predictions at ε = 0."""
    below = [float(key.rpartition("@")[2]) for key in state.adversarial
             if key.rpartition("@")[0] == title and float(key.rpartition("@")[2]) < e]
    if below:
        return {k: v.clone() for k, v in state.adversarial[f"{title}@{max(below):g}"].items()}
    return {"images": sweep.x.detach().cpu().clone(), "pred": state.clean_pred.cpu().clone(),
            "eps": torch.zeros(len(sweep.x), dtype=torch.float64)}


def _attack_cell(
    model: nn.Module, attack: AttackConfig, x_all: Tensor, y_all: Tensor, targets: Tensor,
    eps: float, banks: tuple[NoiseBank, SquareBank], cell: CellProgress, *,
    shortcuts: bool, a_state: AttackState, picture_idx: Tensor,
    dist: Context | None = None,
    transform: Transform | None = None, eot: tuple[int, int] = (0, 0),
    source: nn.Module | None = None, checkpoint: Callable[[], None] | None = None,
) -> None:
    """Attack the samples of ``cell`` not attacked yet, one batch at a time, at one ε; record
    first breaks in ``a_state`` and the rest in ``cell``.

    After each batch ``cell`` holds the per-sample success (misclassified) mask at this ε, the
    mask of samples whose example is classified as the target (all false for untargeted
    attacks), the gradient evaluations and the queries (forward passes of gradient-free
    attacks); the adversarial images of the samples ``picture_idx`` (sorted) are in its
    ``pictures``, and with ``kept`` every attacked sample's example, prediction and ε; then
    ``checkpoint`` runs. With ``dist``, each rank attacks a contiguous run of the batches and
    the outcomes are merged on every rank. ``source``: a transfer attack's model; the examples
    crafted on it are judged on ``model`` alone (:func:`_judge`).
    """
    device = x_all.device
    bank, square_bank = banks
    starts = range(cell.attacked, len(cell.active), cell.batch_size)
    if dist is not None:
        starts = starts[shard(len(starts), dist.rank, dist.world)]
    for start in starts:
        index = cell.active[start:start + cell.batch_size]
        on_device = index.to(device)

        def noise(restart: int, index: Tensor = index) -> Tensor:
            return bank(restart)[index].to(device)

        def square_noise(step: int, m: int, index: Tensor = index) -> Tensor:
            return square_bank(step, m)[index].to(device)

        labels = y_all[on_device] if attack.targeted else None
        generator = (torch.Generator(device).manual_seed(eot_seed(*eot, eps, int(index[0])))
                     if attack.eot_samples is not None else None)
        result = run_attack(model, attack, x_all[on_device], targets[on_device], eps, noise,
                            early_stop=shortcuts, labels=labels,
                            square_noise=square_noise, transform=transform,
                            generator=generator, source=source)
        with torch.no_grad():
            adv_logits = model(result.x_adv)
        hit = _judge(adv_logits, y_all[on_device], result, attack, eps, transfer=source is not None)
        adv_pred = adv_logits.argmax(1).cpu()
        cell.success[index[hit]] = True
        first = hit & (a_state.broken_eps[index] > eps)  # a new smallest breaking ε
        a_state.adv_pred[index[first]] = adv_pred[first]
        a_state.broken_eps[index[first]] = eps
        if attack.targeted:
            cell.on_target[index] = hit & (adv_pred == targets[index.to(targets.device)].cpu())
        if cell.kept is not None:
            cell.kept["images"][index] = result.x_adv.detach().cpu()
            cell.kept["pred"][index] = adv_pred
            cell.kept["eps"][index] = eps
        chosen = torch.isin(index, picture_idx)
        if chosen.any():
            slots = torch.searchsorted(picture_idx, index[chosen])
            cell.pictures[slots] = result.x_adv[chosen.to(device)].detach().cpu()
        cell.evals += result.grad_evals
        cell.queries += result.queries
        cell.attacked = start + len(index)
        if checkpoint is not None and cell.attacked < len(cell.active):
            checkpoint()
    if dist is not None:
        mine = cell.active[starts.start:starts.stop]
        cell.evals, cell.queries = _merge_cell(dist, mine, cell.success, cell.on_target,
                                               a_state, picture_idx, cell.pictures,
                                               (cell.evals, cell.queries))
        cell.attacked = len(cell.active)


def _judge(logits: Tensor, labels: Tensor, result: AttackResult, attack: AttackConfig,
           eps: float, *, transfer: bool) -> Tensor:
    """Which samples of a batch the attack broke, on the CPU: an EOT attack by its own
    criterion (misclassified under all K draws), a transfer attack on the target's pass alone
    (its own flags speak of the source), any other attack re-judged (:func:`rejudge`)."""
    if attack.eot_samples is not None:
        return result.success.cpu()
    if transfer:
        return (logits.argmax(1) != labels).cpu()
    return rejudge(logits, labels, result.success, attack.title, eps).cpu()


#: Largest logit gap, relative to max(1, max |z|), that a disagreement between the attack's
#: success flag and the re-run may have and still count as a float tie (batch-size-dependent
#: kernels change the last bits of the logits); the re-run then decides.
REJUDGE_TOLERANCE = 1e-4


def rejudge(logits: Tensor, labels: Tensor, success: Tensor, title: str, eps: float) -> Tensor:
    """Success (``argmax ≠ label``) judged on one forward pass over the returned examples.

    The attack's own flag comes from the pass at the iterate, inside a batch that early stopping
    shrinks; AutoAttack re-runs the model on the final examples and so does the engine. A float
    tie (logit gap within ``REJUDGE_TOLERANCE``) goes by the re-run; a larger disagreement means
    the model's output depends on the batch or on chance, and no number could be trusted:
    :class:`RobustkitError`.
    """
    judged = logits.argmax(1) != labels
    differ = judged != success.to(judged.device)
    if not bool(differ.any()):
        return judged
    z = logits[differ].double()
    gap = margin(z, labels[differ]).abs()  # |z_label − max_{j≠label} z_j|
    scale = z.abs().amax(1).clamp(min=1.0)
    real = gap > REJUDGE_TOLERANCE * scale
    if bool(real.any()):
        count, total = int(differ.sum()), len(labels)
        raise RobustkitError(
            f"{title} at ε = {eps:g}: for {count} of {total} samples the model's prediction on "
            "the returned adversarial example differs from the one the attack saw (logit gap "
            f"up to {float(gap.max()):.3g}): the model's output depends on the batch or on "
            "chance (train-mode BatchNorm, dropout?); export it in eval mode, or attack a "
            "random model with EOT"
        )
    return judged


def _merge_cell(dist: Context, mine: Tensor, success: Tensor, on_target: Tensor,
                a_state: AttackState, picture_idx: Tensor, pictures: Tensor,
                evals: tuple[int, int]) -> tuple[int, int]:
    """Give every rank the outcomes of the samples each rank attacked in this cell.

    The ranks attacked disjoint samples, so their updates never overlap; returns the total
    gradient evaluations and queries.
    """
    chosen = mine[torch.isin(mine, picture_idx)]
    slots = torch.searchsorted(picture_idx, chosen)
    parts = all_gather_object((mine, success[mine], on_target[mine], a_state.broken_eps[mine],
                               a_state.adv_pred[mine], slots, pictures[slots], evals), dist)
    total, total_queries = 0, 0
    for index, hit, reached, broken, pred, where, images, (count, queries) in parts:
        success[index] = hit
        on_target[index] = reached
        a_state.broken_eps[index] = broken
        a_state.adv_pred[index] = pred
        pictures[where] = images
        total += count
        total_queries += queries
    return total, total_queries


def _accuracy_at(a_state: AttackState, eps: float, clean_correct: Tensor, shortcuts: bool
                 ) -> Tensor:
    """Per-sample robustness at ε: not broken at any ε' ≤ ε (reference: not broken at ε)."""
    if eps == 0:
        return clean_correct
    if shortcuts:
        return a_state.broken_eps > eps
    return clean_correct & ~a_state.success_at[eps]


def _target_hit_at(a_state: AttackState, eps: float, n: int, shortcuts: bool) -> float:
    """Fraction of the n samples whose kept example at ε is classified as the target: with the
    shortcuts a sample's example is the one of its first break at some ε' ≤ ε."""
    if eps == 0:
        return 0.0
    if shortcuts:
        hits = [mask for e, mask in a_state.target_at.items() if e <= eps]
        reached = torch.stack(hits).any(0) if hits else torch.zeros(n, dtype=torch.bool)
    else:
        reached = a_state.target_at.get(eps, torch.zeros(n, dtype=torch.bool))
    return int(reached.sum()) / n if n else math.nan


def _frames(state: SweepState, attacks: Sequence[AttackConfig], eps_list: list[float],
            labels: Tensor, model_name: str, shortcuts: bool) -> Evaluation:
    clean_correct = (state.clean_pred == labels).cpu()
    n = len(labels)
    rows: list[dict[str, Any]] = []
    timing_rows: list[dict[str, Any]] = []
    robust_any = {e: clean_correct.clone() for e in eps_list}
    for attack in attacks:
        a_state = state.attacks[attack.title]
        for e in eps_list:
            robust = _accuracy_at(a_state, e, clean_correct, shortcuts)
            robust_any[e] &= robust
            rows.append(_row(model_name, attack.title, attack.norm, e, int(robust.sum()), n,
                             a_state.grad_evals.get(e, 0)))
            if attack.targeted:
                rows[-1][TARGET_HIT] = _target_hit_at(a_state, e, n, shortcuts)
            timing_rows.append({"model": model_name, "attack": attack.title, "eps": e,
                                "seconds": a_state.seconds.get(e, 0.0),
                                "grad_evals": a_state.grad_evals.get(e, 0),
                                "queries": a_state.queries.get(e, 0)})
    if len(attacks) > 1:
        norms = {a.norm for a in attacks}
        norm = norms.pop() if len(norms) == 1 else "mixed"
        for e in eps_list:
            evals = sum(state.attacks[a.title].grad_evals.get(e, 0) for a in attacks)
            rows.append(_row(model_name, ANY, norm, e, int(robust_any[e].sum()), n, evals))
    targeted = any(a.targeted for a in attacks)
    results = pd.DataFrame(rows, columns=RESULT_COLUMNS + ([TARGET_HIT] if targeted else []))

    per_sample = pd.DataFrame({
        "index": np.arange(n),
        "label": labels.cpu().numpy(),
        "clean_pred": state.clean_pred.cpu().numpy(),
    })
    smallest_any = torch.full((n,), math.inf, dtype=torch.float64)
    for attack in attacks:
        a_state = state.attacks[attack.title]
        per_sample[f"{attack.title}_eps"] = a_state.broken_eps.numpy()
        per_sample[f"{attack.title}_pred"] = a_state.adv_pred.numpy()
        smallest_any = torch.minimum(smallest_any, a_state.broken_eps)
    if len(attacks) > 1:
        per_sample[f"{ANY}_eps"] = smallest_any.numpy()
    notes = [SHORTCUTS_NOTE] if shortcuts else ["reference mode: every ε attacked from scratch"]
    notes += [transfer_note(a) for a in attacks if a.source is not None]
    return Evaluation(results, per_sample, pd.DataFrame(timing_rows), dict(state.examples), notes,
                      dict(state.adversarial))


def transfer_note(attack: AttackConfig) -> str:
    """What a transfer attack's rows are, in one line."""
    return (f"{attack.title}: crafted on {attack.source} with its gradients, blind to its "
            "verdict (every step runs; the iterate of highest loss on the source is kept), "
            "then judged on this model; a transfer attack must not beat the white-box attacks "
            "(check transfer_not_stronger)")


def _row(model: str, attack: str, norm: str, eps: float, correct: int, n: int, evals: int
         ) -> dict[str, Any]:
    low, high = wilson_interval(correct, n)
    return ResultRow(model, attack, norm, eps, n, correct, correct / n if n else math.nan,
                     low, high, evals)._asdict()
