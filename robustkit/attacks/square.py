"""The Square attack (Andriushchenko et al., 2020): random search that needs no gradient.

Square only reads the model's logits, so gradient masking (non-differentiable layers,
saturated or noisy gradients) cannot hide a non-robust sample from it. With the margin
``m(x') = z'_y − max_{j≠y} z'_j`` (:func:`~robustkit.attacks.losses.margin`) it keeps per sample
the point ``x̂`` with the lowest margin found since the start and, at each iteration ``i``, proposes

    x_new = clip_[0,1](x + δ_new),   accepted iff m(x_new) < m(x̂) or argmax f(x_new) ≠ y

where ``δ_new`` equals ``δ̂ = x̂ − x`` except on one random ``s × s`` square:

* **L∞** (Algorithm 2): the square is set to ``±ε``, one random sign per channel; the start is
  vertical stripes, ``δ⁽⁰⁾[c, :, j] = ±ε`` (one sign per channel and column).
* **L2** (Algorithm 3): a second square ``W₂`` gives up its mass to the first, ``W₁``, which gets
  ``η_s·(±1) + δ̂_{W₁}/‖δ̂_{W₁}‖`` per channel, rescaled to norm
  ``√(max(ε² − ‖δ̂‖², 0)/c + ‖δ̂_{W₁∪W₂}‖²)``; ``δ̂_{W₂} := 0``; then ``δ_new`` is rescaled to
  ``‖δ_new‖₂ = ε``. ``η_s`` (:func:`eta`) is a ``+/−`` pair of centred pyramids of weights
  ``Σ_{k ≥ d} 1/(k+1)²`` (``d`` = distance to the centre in the max norm), unit norm, transposed
  with probability ½; the start tiles the image with such patterns, rescaled to norm ``ε``.
* **L1** (Croce & Hein, 2021, the L1 Square of AutoAttack's L1 ensemble): as L2 with L1 norms,
  the pyramids' weights ``Σ_{k ≥ d} 1/(k+1)⁴`` and unit L1 mass. Per channel ``W₁`` gets
  ``η_s·(±1) + δ̂_{W₁}/‖δ̂_{W₁}‖₁`` rescaled to the mass ``max(ε − ‖δ̂‖₁, 0)/c +
  ‖δ̂_{W₁∪W₂}‖₁`` of that channel (the unused budget and the mass of both windows move into
  ``W₁``; AutoAttack's code multiplies this by ``c``, the same on one channel); ``δ̂_{W₂} := 0``.
  The box is met by projecting (:func:`~robustkit.attacks.norms.project_l1_box`, the exact
  projection onto ``‖δ‖₁ ≤ ε`` ∩ ``x + δ ∈ [0, 1]``) rather than clipping: clipping an L1
  perturbation wastes the mass the box cuts off, the projection moves it to where it fits.
  The start tiles the image with such patterns (mass 1 each) and projects them.

The square side is ``s = round(√(p_i·h·w))`` (at least 1 for L∞, at least 3 and odd for L2/L1;
at most ``min(h, w)``) at iteration ``i = 0, 1, …`` after the start, with AutoAttack's schedule
(its ``SquareAttack(p_init=0.8, resc_schedule=False)``, :func:`square_fraction`):

    p_i = p_init / 2^k(i),   k(i) = #{t ∈ (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000) : i > t}

So at the default 5,000 queries ``p`` halves after iterations 10, 50, 200, 500, 1000, 2000 and
4000, and on a 28 × 28 image the last thousand iterations use 2 × 2 squares
(``p = 0.8/128``). The schedule does not depend on the budget: a larger budget replays a
smaller one's iterations draw for draw before going on, so with the same draws it never breaks
fewer samples. ``rescale=True`` stretches it over the budget instead, ``j = ⌊10 000·i/budget⌋``
in place of ``i`` in ``k(·)`` (the Square paper's code; AutoAttack's ``resc_schedule=True``):
short budgets then reach small squares too. The gradient-free check runs it so, at its 500 to
1,000 queries: on the test suite's gradient-masked decoy (ε = 0.05, 100 samples) it breaks 45
at 500 queries and 70 at 1,000 where the fixed schedule breaks 12 and 18 (95 against 83 at
5,000). The search always starts
from the stripes (L2, L1: the tiles), even where their margin lies above the clean point's, as the
authors' code does. It differs from the authors' code in three details: the budget counts the
start (theirs runs ``n_queries`` iterations after it), each sample draws its own square (theirs
one position per iteration for the whole batch), and an L∞ proposal equal to ``x̂`` flips its
signs. A sample stops as soon as it is broken (per-sample early stop).

``queries`` counts forward passes per sample, summed over samples, as ``grad_evals`` counts
gradients: the start costs one, each iteration one per sample still being attacked; the
forward pass at the clean point, shared by every attack, is not counted. So no sample uses more
than ``budget`` queries. All randomness comes from ``noise(step, m)`` — ``m`` uniforms in
``[0, 1)`` per sample of the batch for step ``step`` (``−1`` the start) — or, without it, from
``generator``: with the same draws per sample the attack on a sample does not depend on the
rest of its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from robustkit.attacks.base import AttackResult, as_eps, attack_mode, check_inputs, clip_box
from robustkit.attacks.iterative import check_count
from robustkit.attacks.losses import check_logits, is_adversarial, margin
from robustkit.attacks.norms import check_norm, project_l1_box, row_norm
from robustkit.errors import RobustkitError
from robustkit.vocabulary import Norm

#: The balls Square searches.
SQUARE_NORMS: tuple[Norm, ...] = ("linf", "l2", "l1")

#: ``noise(step, m)`` → ``[N, m]`` uniforms in [0, 1) for every sample of the batch ``x``.
SquareNoise = Callable[[int, int], Tensor]

#: AutoAttack's query budget and initial square fraction.
DEFAULT_QUERIES = 5000
DEFAULT_P_INIT = 0.8
#: ``p`` halves after each of these iterations, whatever the budget (AutoAttack's
#: ``resc_schedule=False``).
HALVE_AFTER = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(p_init: float, i: int, budget: int | None = None) -> float:
    """``p`` at iteration ``i`` (0 the first after the start): ``p_init / 2^k``,
    ``k = #{t ∈ HALVE_AFTER : j > t}`` with ``j = i`` (AutoAttack's), or ``j = ⌊10 000·i/budget⌋``
    given ``budget`` (the schedule stretched over the budget, as the Square paper's code does)."""
    j = i if budget is None else int(i / budget * 10_000)
    halvings = sum(j > t for t in HALVE_AFTER)
    return p_init / 2.0**halvings


def square_side(p: float, h: int, w: int, norm: Norm) -> int:
    """``s = round(√(p·h·w))``: at least 1 (L∞), or at least 3 and odd (L2, L1); at most
    ``min(h, w)``."""
    s = round(math.sqrt(p * h * w))
    if norm != "linf":
        s = max(s, 3)
        s += 1 - s % 2
    return max(1, min(s, h, w))


def eta(rows: int, cols: int, *, dtype: torch.dtype, device: torch.device,
        norm: Norm = "l2") -> Tensor:
    """The proposal pattern ``[rows, cols]``: the top half a centred pyramid, the bottom half
    its negative. L2: weights ``Σ_{k ≥ d} 1/(k+1)²``, unit Frobenius norm; L1: weights
    ``Σ_{k ≥ d} 1/(k+1)⁴``, unit L1 mass (each half, then the whole)."""
    power = 4 if norm == "l1" else 2

    def unit(t: Tensor) -> Tensor:
        size = t.abs().sum() if norm == "l1" else t.norm()
        return t / size

    def pyramid(r: int, c: int) -> Tensor:
        depth = max(r // 2 + 1, c // 2 + 1)
        weights = 1.0 / torch.arange(1, depth + 1, dtype=dtype, device=device) ** power
        tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = Σ_{k ≥ d} 1/(k+1)^power
        di = (torch.arange(r, device=device) - r // 2).abs()
        dj = (torch.arange(c, device=device) - c // 2).abs()
        return unit(tail[torch.maximum(di[:, None], dj[None, :])])

    half = rows // 2
    parts = [pyramid(half, cols)] if half else []
    return unit(torch.cat([*parts, -pyramid(rows - half, cols)]))


def square(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    norm: Norm = "linf",
    budget: int = DEFAULT_QUERIES,
    p_init: float = DEFAULT_P_INIT,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    noise: SquareNoise | None = None,
) -> AttackResult:
    """Square attack within ``‖x_adv − x‖ ≤ ε`` and ``x_adv ∈ [0, 1]``; ``y`` true labels.

    Args:
        budget: queries (forward passes) per sample, the start included.
        p_init: initial fraction of the image a square covers, in ``(0, 1]``.
        rescale: stretch the schedule over the budget (``j = ⌊10 000·i/budget⌋``, the Square
            paper's code) instead of AutoAttack's fixed one (see the module docstring).
        generator / noise: the source of randomness (see the module docstring).

    Returns ``AttackResult`` with ``grad_evals = 0`` and ``queries`` the forward passes spent;
    ``x_adv`` is each sample's first adversarial point, else ``x̂``, the lowest-margin point
    from the start on (the clean point is not among them).
    """
    check_inputs(x, y)
    norm = check_norm(norm, SQUARE_NORMS, "square")
    eps_t = as_eps(eps, x, norm)
    check_count(budget, "budget", minimum=1)
    if not 0 < p_init <= 1:
        raise RobustkitError(f"p_init must lie in (0, 1], got {p_init}")
    draw = noise if noise is not None else _generator_noise(len(x), x, generator)
    x = x.detach()
    n, c, h, w = x.shape
    with attack_mode(model), torch.no_grad():
        logits = model(x)
        check_logits(logits, y)
        success = is_adversarial(logits, y)
        x_best = x.clone()
        idx = (~success & (eps_t.view(-1) > 0)).nonzero().squeeze(1)
        u = _uniforms(draw, -1, c * w + c * 25 + 1, n, idx, x)
        if idx.numel() == 0:
            return AttackResult(x_adv=x_best, success=success, grad_evals=0, queries=0)
        start = _start(x[idx], eps_t[idx], norm, u)
        logits = model(start)
        queries = int(idx.numel())
        live = _Live(idx, x[idx], start, margin(logits, y[idx]), y[idx], eps_t[idx])
        live = live.settle(is_adversarial(logits, live.y), x_best, success)
        squares = _Squares(live.x)
        for i in range(1, budget):
            if live.k == 0:
                break
            s = square_side(square_fraction(p_init, i - 1, budget if rescale else None), h, w,
                            norm)
            u = _uniforms(draw, i, c + 5, n, live.idx, x)
            if norm == "linf":
                at, new, old = squares.linf_proposal(live, s, u)
                proposal = squares.proposal(live.k)
            elif norm == "l2":
                proposal = _l2_proposal(live.x, live.x_hat, live.eps, s, u)
            else:
                proposal = _l1_proposal(live.x, live.x_hat, live.eps, s, u)
            logits = model(proposal)
            queries += live.k
            m_new = margin(logits, live.y)
            adv = is_adversarial(logits, live.y)
            accept = (m_new < live.m_hat) | adv
            if norm == "linf":  # the proposal differs from x̂ on its square alone
                live.x_hat.put_(at, torch.where(accept[:, None], new, old))
            else:
                live.x_hat[accept] = proposal[accept]
            live.m_hat = torch.where(accept, m_new, live.m_hat)
            live = live.settle(adv, x_best, success)
        x_best[live.idx] = live.x_hat
    return AttackResult(x_adv=x_best, success=success, grad_evals=0, queries=queries)


class _Live:
    """The samples still attacked, as contiguous tensors: their index in the batch, ``x``,
    ``x̂``, margin ``m(x̂)``, label and ``ε`` (``[k, 1, 1, 1]``)."""

    def __init__(self, idx: Tensor, x: Tensor, x_hat: Tensor, m_hat: Tensor, y: Tensor,
                 eps: Tensor) -> None:
        self.idx, self.x, self.x_hat, self.m_hat, self.y, self.eps = idx, x, x_hat, m_hat, y, eps
        self.k = int(idx.shape[0])

    def settle(self, broken: Tensor, x_best: Tensor, success: Tensor) -> _Live:
        """Record the samples flagged ``broken`` (``[k]`` bool): their ``x̂`` into ``x_best``,
        ``success`` set; return the others (``self``, no copy, when none broke)."""
        if not bool(broken.any()):
            return self
        done = self.idx[broken]
        x_best[done], success[done] = self.x_hat[broken], True
        keep = ~broken
        return _Live(self.idx[keep], self.x[keep], self.x_hat[keep], self.m_hat[keep],
                     self.y[keep], self.eps[keep])


class _Squares:
    """L∞ proposals through flat indices: the ``s × s`` square of sample ``r`` at (``top``,
    ``left``) is ``r·chw + top·w + left + offsets_s``, ``offsets_s = {ch·hw + a·w + b}``; the
    proposal is written into one buffer reused by every iteration (the live samples are its
    first rows), so an iteration allocates nothing image-sized."""

    def __init__(self, x: Tensor) -> None:
        k, c, h, w = x.shape
        self.shape = (c, h, w)
        self.buffer = torch.empty_like(x, memory_format=torch.contiguous_format)
        self.rows = torch.arange(k, device=x.device) * (c * h * w)
        self.offsets: dict[int, Tensor] = {}
        self.corners: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def proposal(self, k: int) -> Tensor:
        return self.buffer[:k]

    def index(self, u: Tensor, s: int) -> Tensor:
        """``[k, c·s·s]`` flat indices of each sample's square, its top-left corner uniform
        in ``{0, …, h − s} × {0, …, w − s}`` from the uniforms ``u[:, :2]`` (:func:`_corner`)."""
        c, h, w = self.shape
        if s not in self.offsets:
            a = torch.arange(s, device=u.device)
            grid = (torch.arange(c, device=u.device)[:, None, None] * (h * w)
                    + a[None, :, None] * w + a[None, None, :])
            self.offsets[s] = grid.reshape(1, -1)
            self.corners[s] = (torch.tensor([h - s + 1, w - s + 1], dtype=u.dtype,
                                            device=u.device),
                               torch.tensor([h - s, w - s], device=u.device),
                               torch.tensor([w, 1], device=u.device))
        sizes, last, stride = self.corners[s]
        corner = torch.minimum((u[:, :2] * sizes).floor().long(), last)  # (top, left)
        start = self.rows[:len(u)] + (corner * stride).sum(dim=1)
        return start[:, None] + self.offsets[s]

    def linf_proposal(self, live: _Live, s: int, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Algorithm 2 into the buffer: ``x̂`` with one ``s × s`` square set to ``clip(x ± ε)``
        (a sign per channel). A proposal equal to ``x̂`` would waste a query; there the signs
        are flipped, which always changes the square when ``ε > 0`` (the authors' code redraws
        them instead). Returns the square's flat indices, its new and its old values
        (``[k, c·s·s]``)."""
        c, k = self.shape[0], live.k
        at = self.index(u, s)
        x_square = live.x.take(at).view(k, c, s * s)
        old = live.x_hat.take(at)
        signs = _signs(u[:, 5:5 + c]).to(live.x.dtype).view(k, c, 1)
        eps = live.eps.view(k, 1, 1)
        new = clip_box(torch.addcmul(x_square, eps, signs), x_square).view(k, -1)
        same = (new == old).all(dim=1)
        if bool(same.any()):
            flipped = clip_box(x_square - eps * signs, x_square).view(k, -1)
            new = torch.where(same[:, None], flipped, new)
        proposal = self.buffer[:k]
        proposal.copy_(live.x_hat)
        proposal.put_(at, new)
        return at, new, old


def _linf_proposal(x: Tensor, x_hat: Tensor, eps: Tensor, s: int, u: Tensor) -> Tensor:
    """One L∞ proposal per sample (:meth:`_Squares.linf_proposal`), as a new tensor."""
    k = len(x)
    live = _Live(torch.arange(k, device=x.device), x.contiguous(), x_hat.contiguous(),
                 x.new_zeros(k), torch.zeros(k, dtype=torch.long, device=x.device), eps)
    squares = _Squares(live.x)
    squares.linf_proposal(live, s, u)
    return squares.buffer


def _generator_noise(n: int, x: Tensor, generator: torch.Generator | None) -> SquareNoise:
    def draw(step: int, m: int) -> Tensor:
        device = generator.device if generator is not None else x.device
        return torch.rand((n, m), generator=generator, device=device, dtype=torch.float64)

    return draw


def _uniforms(draw: SquareNoise, step: int, m: int, n: int, idx: Tensor, x: Tensor) -> Tensor:
    u = draw(step, m)
    if not isinstance(u, Tensor) or u.shape != (n, m):
        raise RobustkitError(f"noise({step}, {m}) must return a tensor of shape [{n}, {m}], got "
                             f"{list(u.shape) if isinstance(u, Tensor) else type(u).__name__}")
    return u.to(device=x.device)[idx]


def _signs(u: Tensor) -> Tensor:
    """±1 from uniforms: −1 below ½, +1 from ½ on."""
    return torch.where(u < 0.5, -1.0, 1.0)


def _corner(u: Tensor, side: int, s: int) -> Tensor:
    """A uniform top-left corner in ``{0, …, side − s}`` from uniforms ``u``."""
    return (u * (side - s + 1)).floor().long().clamp(max=side - s)


def _window(top: Tensor, left: Tensor, s: int, h: int, w: int) -> Tensor:
    """``[k, 1, h, w]`` bool mask of the ``s × s`` square at (``top``, ``left``) per sample."""
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + s)
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + s)
    return (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def _start(x: Tensor, eps: Tensor, norm: Norm, u: Tensor) -> Tensor:
    """The starting point: stripes of ``±ε`` (L∞), or tiled ``η`` patterns rescaled to norm
    ``ε`` and clipped (L2), or projected onto the L1 ball ∩ box (L1)."""
    k, c, h, w = x.shape
    if norm == "linf":
        stripes = _signs(u[:, : c * w]).to(x.dtype).view(k, c, 1, w)
        return clip_box(x + eps * stripes, x)
    s = max(h // 5, 1)
    first = (h - 5 * s) // 2
    delta = torch.zeros_like(x)
    signs = _signs(u[:, c * w: c * w + c * 25]).to(x.dtype).view(k, c, 25)
    tile = eta(s, s, dtype=x.dtype, device=x.device, norm=norm)
    for a in range(min(h // s, 5)):
        for b in range(min(w // s, 5)):
            top, left = first + a * s, first + b * s
            if top + s <= h and left + s <= w:
                delta[:, :, top:top + s, left:left + s] += (
                    tile * signs[:, :, a * 5 + b, None, None])
    if norm == "l1":
        return _into_l1_ball(x, delta, eps)
    return clip_box(x + eps * _unit(delta), x)


def _into_l1_ball(x: Tensor, delta: Tensor, eps: Tensor) -> Tensor:
    """``x + P(δ)``, ``P`` the projection onto ``‖δ‖₁ ≤ ε`` ∩ ``x + δ ∈ [0, 1]``; the last bits
    clipped, as the projection runs in float64."""
    return clip_box(x + project_l1_box(delta, x, eps), x)


def _unit(delta: Tensor) -> Tensor:
    norms = row_norm(delta)
    return torch.where(norms > 0, delta / norms.clamp_min(1e-12), delta)


def _square_index(top: Tensor, left: Tensor, s: int, c: int) -> tuple[Tensor, ...]:
    """Advanced index of the ``s × s`` square at (``top``, ``left``) per sample: ``t[index]`` is
    ``[k, c, s, s]``."""
    k, device = len(top), top.device
    rows = top[:, None] + torch.arange(s, device=device)  # [k, s]
    cols = left[:, None] + torch.arange(s, device=device)
    return (torch.arange(k, device=device)[:, None, None, None],
            torch.arange(c, device=device)[None, :, None, None],
            rows[:, None, :, None], cols[:, None, None, :])


def _l2_proposal(x: Tensor, x_hat: Tensor, eps: Tensor, s: int, u: Tensor) -> Tensor:
    """Algorithm 3: square ``W₂`` gives its mass to square ``W₁``; the result has norm ``ε``."""
    k, c, h, w = x.shape
    delta = x_hat - x
    top1, left1 = _corner(u[:, 0], h, s), _corner(u[:, 1], w, s)
    w1 = _window(top1, left1, s, h, w)
    w2 = _window(_corner(u[:, 2], h, s), _corner(u[:, 3], w, s), s, h, w)
    budget_left = (eps.view(-1) ** 2 - row_norm(delta).view(-1) ** 2).clamp_min(0)
    union = row_norm(delta * (w1 | w2)).view(-1)
    target = torch.sqrt(budget_left / c + union**2).view(k, 1, 1, 1)

    square_at = _square_index(top1, left1, s, c)
    old = delta[square_at]  # [k, c, s, s]
    old_norm = old.flatten(2).norm(dim=2)[:, :, None, None]
    pattern = eta(s, s, dtype=x.dtype, device=x.device)
    patterns = torch.where((u[:, 4] < 0.5).view(k, 1, 1), pattern, pattern.T)
    signs = _signs(u[:, 5:5 + c]).to(x.dtype).view(k, c, 1, 1)
    new = patterns[:, None] * signs + old / (old_norm + 1e-12)
    new = new / new.flatten(2).norm(dim=2)[:, :, None, None] * target

    delta = torch.where(w2, torch.zeros_like(delta), delta)
    delta[square_at] = new
    return clip_box(x + eps * _unit(delta), x)


def _l1_proposal(x: Tensor, x_hat: Tensor, eps: Tensor, s: int, u: Tensor) -> Tensor:
    """The L1 search step: square ``W₂`` gives its mass, and ``W₁`` the unused budget, to
    ``W₁`` (per channel), then the projection onto the L1 ball ∩ box."""
    k, c, h, w = x.shape
    delta = x_hat - x
    top1, left1 = _corner(u[:, 0], h, s), _corner(u[:, 1], w, s)
    w1 = _window(top1, left1, s, h, w)
    w2 = _window(_corner(u[:, 2], h, s), _corner(u[:, 3], w, s), s, h, w)
    budget_left = (eps.view(-1) - delta.flatten(1).abs().sum(1)).clamp_min(0)
    union = (delta * (w1 | w2)).abs().sum(dim=(2, 3))  # [k, c]
    target = (budget_left[:, None] / c + union)[:, :, None, None]

    square_at = _square_index(top1, left1, s, c)
    old = delta[square_at]  # [k, c, s, s]
    old_mass = old.abs().sum(dim=(2, 3), keepdim=True)
    pattern = eta(s, s, dtype=x.dtype, device=x.device, norm="l1")
    patterns = torch.where((u[:, 4] < 0.5).view(k, 1, 1), pattern, pattern.T)
    signs = _signs(u[:, 5:5 + c]).to(x.dtype).view(k, c, 1, 1)
    new = patterns[:, None] * signs + old / (old_mass + 1e-12)
    new = new / new.abs().sum(dim=(2, 3), keepdim=True).clamp_min(1e-12) * target

    delta = torch.where(w2, torch.zeros_like(delta), delta)
    delta[square_at] = new
    return _into_l1_ball(x, delta, eps)
