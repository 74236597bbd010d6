"""Whether a model's forward pass is random, and whether it depends on the rest of the batch.

Two different faults make the logits of the same image differ between two passes, and they
call for different remedies:

* **randomness** (a noise layer, dropout left on): two passes over the *same* batch differ.
  The spread of repeated outputs measures it; an evaluation must attack such a model with EOT
  (averaging each step over ``K`` passes) and judge success over those draws.
* **batch statistics** (BatchNorm frozen in train mode in a TorchScript or ``torch.export``
  file): a sample's logits change with the *other* images of its batch. No attack setting
  repairs that; the model has to be exported in eval mode.

A random model's two passes differ whatever the batch, so comparing two batches is only
meaningful with the randomness held fixed. :func:`batch_effect` does it in the order of the
cheapest exact comparison available:

1. a deterministic model: one pass per batch, compared within float noise;
2. a model whose randomness comes from torch's generators (``randn_like``, ``dropout``): each
   pass starts from the same seed (:func:`same_draws`), so both batches (of the same size and
   shape) draw the same numbers at the same positions, and a batch-independent model gives the
   shared images the same logits exactly;
3. otherwise (a generator of the model's own): ``P`` passes per batch, and the difference of
   the mean logits judged against its standard error, ``t = (z̄_A − z̄_B)/√((s²_A + s²_B)/P)``;
   a batch-independent model gives ``mean(t²) ≈ 1``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: How far a sample's logits may move when the rest of its batch changes, relative to
#: max(1, |z|). Both batches have the same size, so the same kernels run on both.
BATCH_TOLERANCE = 1e-4
#: The seed every pass of :func:`same_draws` starts from.
DRAW_SEED = 20_201_234
#: Passes per batch when only averaging can hold the randomness (case 3 above).
AVERAGED_PASSES = 16
#: ``mean(t²)`` above which the averaged comparison calls the batches different: a
#: batch-independent model gives about 1 (more than 9 has odds below 3 in 1,000 even when all
#: the compared logits move together, as one χ²₁ value).
BATCH_T2_LIMIT = 9.0


def differ(a: Tensor, b: Tensor, tolerance: float = BATCH_TOLERANCE) -> bool:
    """Whether two passes' logits of the same samples differ beyond float noise
    (``tolerance·max(1, |z|)``), or change a prediction."""
    a, b = a.double(), b.double()
    scale = max(1.0, float(a.abs().max()))
    return bool((a - b).abs().max() > tolerance * scale) or bool(
        (a.argmax(1) != b.argmax(1)).any())


def batch_dependent(in_batch: Tensor, alone: Tensor) -> bool:
    """Whether the logits of the same samples in two batches differ beyond float noise, or
    change a prediction."""
    return differ(in_batch, alone)


def swapped_batch(x: Tensor, k: int) -> Tensor:
    """``[x[:k]; 1 − x[k:]]``: a batch of ``len(x)`` images that shares only its first ``k``
    with ``x``."""
    if not 0 < k < len(x):
        raise ValueError(f"need 0 < k < len(x), got k = {k} for {len(x)} images")
    return torch.cat([x[:k], 1 - x[k:]])


def same_size_batches(model: nn.Module, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The logits of ``x[:k]`` in two batches of ``len(x)`` images that differ only after
    position ``k`` (there, ``1 − x``): ``(model(x)[:k], model([x[:k]; 1 − x[k:]])[:k])``.

    A model that normalises with batch statistics gives different logits; one that does not
    gives the same up to float noise. Equal batch sizes matter: GPU libraries pick kernels by
    batch size (TF32 convolutions on an H200 move logits by ~2e-3 between batches of 200 and
    50), which a comparison of ``model(x)[:k]`` with ``model(x[:k])`` would mistake for batch
    statistics."""
    other = swapped_batch(x, k)
    with torch.no_grad():
        return model(x)[:k], model(other)[:k]


@contextlib.contextmanager
def same_draws(device: torch.device, seed: int = DRAW_SEED) -> Iterator[None]:
    """Inside: torch's generators (CPU, and ``device`` when it is a GPU) start from ``seed``;
    outside, their state is as before (the evaluation's draws are not disturbed)."""
    gpus = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class Spread:
    """Two eval-mode passes over the same batch: ``difference = max |z⁽¹⁾ − z⁽²⁾|``, the
    predictions that ``changed``, the logits' ``scale = max(1, |z|)``, and the ``samples``."""

    difference: float
    changed: int
    scale: float
    samples: int

    @property
    def random(self) -> bool:
        """Beyond float noise (``BATCH_TOLERANCE·scale``), or a prediction changes."""
        return (self.changed > 0 or not math.isfinite(self.difference)
                or self.difference > BATCH_TOLERANCE * self.scale)


def output_spread(model: nn.Module, x: Tensor) -> Spread:
    """How much two passes over the same batch ``x`` differ (the model as it is called: put it
    in eval mode first)."""
    with torch.no_grad():
        first, second = model(x), model(x)
    diff = float((first.double() - second.double()).abs().max())
    return Spread(diff, int((first.argmax(1) != second.argmax(1)).sum()),
                  max(1.0, float(first.double().abs().max())), len(x))


@dataclass(frozen=True)
class BatchEffect:
    """What the rest of the batch does to the logits of its first ``shared`` images.

    ``difference``: the largest change of those logits between the two batches (of their means
    over the passes when ``comparison`` is ``"averaged"``); ``changed``: predictions that
    change; ``statistic``: ``mean(t²)`` of the averaged comparison (0 otherwise);
    ``dependent``: the verdict; ``spread``: two passes over the same batch
    (:class:`Spread`); ``comparison``: ``"one pass"``, ``"same draws"`` or ``"averaged"``
    (the cases of the module docstring); ``passes`` per batch."""

    difference: float
    changed: int
    statistic: float
    dependent: bool
    spread: Spread
    comparison: str
    passes: int
    shared: int


def batch_effect(model: nn.Module, x: Tensor, k: int, *,
                 passes: int = AVERAGED_PASSES) -> BatchEffect:
    """Whether the logits of ``x[:k]`` depend on the other ``len(x) − k`` images of their
    batch, with a random model's randomness held fixed (the three comparisons of the module
    docstring). Both batches have ``len(x)`` images."""
    other = swapped_batch(x, k)
    spread = output_spread(model, x)
    with torch.no_grad():
        if not spread.random:
            a, b = model(x)[:k], model(other)[:k]
            return _exact(a, b, spread, "one pass", k)
        with same_draws(x.device):
            a = model(x)[:k]
        with same_draws(x.device):
            again = model(x)[:k]
        if not differ(a, again):
            with same_draws(x.device):
                b = model(other)[:k]
            return _exact(a, b, spread, "same draws", k)
        first = torch.stack([model(x)[:k] for _ in range(passes)]).double()
        second = torch.stack([model(other)[:k] for _ in range(passes)]).double()
    mean_a, mean_b = first.mean(0), second.mean(0)
    error = ((first.var(0) + second.var(0)) / passes).sqrt()
    gap = (mean_a - mean_b).abs()
    tiny = torch.finfo(torch.float64).tiny
    t2 = torch.where(error > tiny, gap / error.clamp(min=tiny), gap * math.inf).nan_to_num(
        nan=0.0) ** 2
    statistic = float(t2.mean())
    scale = max(1.0, float(mean_a.abs().max()))
    dependent = statistic > BATCH_T2_LIMIT and float(gap.max()) > BATCH_TOLERANCE * scale
    changed = int((mean_a.argmax(1) != mean_b.argmax(1)).sum())
    return BatchEffect(float(gap.max()), changed, statistic, dependent, spread, "averaged",
                       passes, k)


def _exact(a: Tensor, b: Tensor, spread: Spread, comparison: str, k: int) -> BatchEffect:
    diff = float((a.double() - b.double()).abs().max())
    changed = int((a.argmax(1) != b.argmax(1)).sum())
    return BatchEffect(diff, changed, 0.0, batch_dependent(a, b), spread, comparison, 1, k)


def describe_comparison(effect: BatchEffect) -> str:
    """How the two batches were compared, for a check's detail or an error message."""
    if effect.comparison == "same draws":
        return "with the same random draws in both batches"
    if effect.comparison == "averaged":
        return (f"averaged over {effect.passes} passes each (mean t² = "
                f"{effect.statistic:.3g}; about 1 when the batch does not matter)")
    return ""
