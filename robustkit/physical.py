"""Robustness under transformation: do adversarial examples survive the camera?

An adversarial example that fools the model only in the exact pose it was made in is a weak
threat in the physical world. For a distribution ``T`` of transformations
(:class:`~robustkit.attacks.transforms.Transform`: rotation, shift, zoom, lighting, noise, blur)
and a model ``f``, this module measures, for each attack and each ε, with the attack run from
scratch at that ε on every sample the model classifies correctly:

* ``success``: the fraction the attack itself counts as broken (plain: ``x_adv`` misclassified
  as it is; EOT: misclassified under all ``K`` draws of its last check);
* ``success_transformed``: ``mean_i (1/M) Σ_m 1[f(t_m(x_adv_i)) ≠ y_i]`` with ``M`` fresh draws
  ``t_m ∼ T`` per sample (independent of the draws any EOT attack used);
* ``clean_error_transformed``: the same average for the clean images ``x_i`` of those samples,
  the share of the transformed-example success that the transformations alone account for.

Plain PGD's examples, made at the identity, are set side by side with EOT's, made to maximise the
expected loss over ``T`` (Athalye et al., 2018). A row ``attack = "clean"`` gives the model's
accuracy on all samples under ``T``, so a reader can separate the attack from the
transformations. For a model whose forward pass is random, ``T`` may be the identity and the
``M`` draws are of the model's own randomness.

:func:`example_views` gives the report's picture: one sample's clean image and its examples from
each attack, each under the same few random transformations, with the model's predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from robustkit.attack_specs import probing
from robustkit.attacks import attack_mode
from robustkit.attacks.transforms import Transform, fooled_fraction
from robustkit.checkpoint import save_tensors
from robustkit.config import AttackConfig, DefenceConfig, TransformConfig
from robustkit.data import Split
from robustkit.errors import RobustkitError
from robustkit.evaluation import NoiseBank, eot_seed, predict, run_attack, wilson_interval
from robustkit.models.defences import Defended, build_preprocessing, is_random
from robustkit.progress import Bar
from robustkit.runs import write_frame
from robustkit.storage import write_json

PHYSICAL_COLUMNS = ["attack", "eps", "n", "success", "success_transformed", "ci_low", "ci_high",
                    "clean_error_transformed", "draws", "grad_evals"]


def build_transform(config: TransformConfig | None) -> Transform:
    """The distribution a ``[transforms]`` table describes (the identity when there is none)."""
    if config is None:
        return Transform()
    return Transform(rotate=config.rotate, translate=config.translate,
                     scale=_pair(config.scale), brightness=_pair(config.brightness),
                     contrast=_pair(config.contrast), noise=config.noise,
                     blur=_pair(config.blur))


def _pair(values: tuple[float, ...]) -> tuple[float, float]:
    low, high = values
    return (low, high)


def build_defence(model: nn.Module, config: DefenceConfig | None) -> nn.Module:
    """``model`` behind the ``[defence]`` preprocessing (unchanged when there is none)."""
    if config is None:
        return model
    step = build_preprocessing(config.preprocess, bits=config.bits, size=config.size,
                               sigma=config.sigma)
    return Defended(model, step).to(_device(model))


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@dataclass(frozen=True)
class Physical:
    """``table``: one row per (attack, ε) plus the clean row; ``views``: the report picture
    (:func:`example_views`); ``notes``: what the reader must know."""

    table: pd.DataFrame
    views: dict[str, Tensor]
    notes: list[str]


def physical_attacks(attacks: Sequence[AttackConfig]) -> list[AttackConfig]:
    """The attacks measured under transformation: the untargeted iterative ones on the model
    itself (not transfer attacks, crafted on another)."""
    return [a for a in attacks if a.name in probing() and not a.targeted and a.source is None]


def transformation_robustness(
    model: nn.Module,
    data: Split,
    attacks: Sequence[AttackConfig],
    config: TransformConfig,
    eps: Sequence[float],
    *,
    batch_size: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> Physical:
    """Attack every correctly classified sample at each ε; measure success under ``T``."""
    transform = build_transform(config)
    chosen = physical_attacks(attacks)
    if not chosen:
        raise RobustkitError("robustness under transformation needs an untargeted pgd or apgd "
                             "attack (plain and with eot_samples) in the attack list")
    eps_list = sorted({float(e) for e in (config.eps or eps) if e > 0})
    if not eps_list:
        raise RobustkitError("robustness under transformation needs at least one ε > 0: set "
                             "transforms.eps or the sweep's ε")
    x_all, y_all = data.images, data.labels
    draws = config.eval_samples
    rows: list[dict[str, object]] = []
    with attack_mode(model):
        clean_pred = predict(model, x_all, batch_size)
        correct = (clean_pred == y_all).nonzero().squeeze(1)
        clean_fooled = _fooled(model, x_all, y_all, transform, draws, config.seed, batch_size)
        clean_acc = 1.0 - float(clean_fooled.mean())
        rows.append({"attack": "clean", "eps": 0.0, "n": len(y_all), "success": 0.0,
                     "success_transformed": 1.0 - clean_acc,
                     **_interval(1.0 - clean_acc, len(y_all)),
                     "clean_error_transformed": 1.0 - clean_acc, "draws": draws,
                     "grad_evals": 0})
        baseline = float(clean_fooled[correct].mean()) if len(correct) else 0.0
        keep: dict[tuple[str, float], Tensor] = {}
        show = _shown_eps(eps_list)
        for a_index, attack in enumerate(attacks):
            if attack not in chosen:
                continue
            bank = NoiseBank(x_all.shape, attack.norm, seed, a_index)
            with Bar(f"under T: {attack.title}", len(eps_list), progress) as bar:
                for e in eps_list:
                    x_adv, success, evals = _attack_all(model, attack, a_index, x_all, y_all,
                                                        correct, e, bank, seed, batch_size,
                                                        transform)
                    fooled = _fooled(model, x_adv, y_all[correct], transform, draws,
                                     config.seed + 1, batch_size)
                    rate = float(fooled.mean()) if len(correct) else 0.0
                    rows.append({"attack": attack.title, "eps": e, "n": len(correct),
                                 "success": float(success.float().mean()) if len(correct) else 0.0,
                                 "success_transformed": rate, **_interval(rate, len(correct)),
                                 "clean_error_transformed": baseline, "draws": draws,
                                 "grad_evals": evals})
                    if e == show and len(correct):
                        keep[(attack.title, e)] = x_adv
                    bar.advance(1, f"ε={e:g}")
        views = example_views(model, x_all[correct], y_all[correct], keep, transform,
                              config.examples, config.seed + 2)
    notes = [
        f"Robustness under transformation: {transform.describe()}; each attack is run from "
        f"scratch at every ε on the {len(correct)} correctly classified samples, then every "
        f"example is shown to the model under {draws} fresh random transformations.",
    ]
    if any(a.eot_samples for a in chosen):
        notes.append("An EOT attack ascends the mean loss over its K draws per step and counts "
                     "an iterate as adversarial only when all K draws are misclassified.")
    return Physical(pd.DataFrame(rows, columns=PHYSICAL_COLUMNS), views, notes)


def _interval(rate: float, n: int) -> dict[str, float]:
    """Wilson interval of a per-sample average (as if it were a count over ``n``): a guide."""
    low, high = wilson_interval(round(rate * n), n)
    return {"ci_low": low, "ci_high": high}


def _shown_eps(eps_list: list[float]) -> float:
    """The ε the picture shows: the middle of the list."""
    return eps_list[len(eps_list) // 2]


def _attack_all(model: nn.Module, attack: AttackConfig, a_index: int, x_all: Tensor,
                y_all: Tensor, index: Tensor, eps: float, bank: NoiseBank, seed: int,
                batch_size: int, transform: Transform) -> tuple[Tensor, Tensor, int]:
    """``x_adv`` and success of ``attack`` at ``eps`` for the samples ``index``, from scratch."""
    parts, hits, evals = [], [], 0
    for start in range(0, len(index), batch_size):
        rows = index[start:start + batch_size]

        def noise(restart: int, rows: Tensor = rows) -> Tensor:
            return bank(restart)[rows.cpu()].to(x_all.device)

        generator = torch.Generator(x_all.device).manual_seed(
            eot_seed(seed, a_index, eps, int(rows[0])))
        result = run_attack(model, attack, x_all[rows], y_all[rows], eps, noise,
                            transform=transform, generator=generator)
        parts.append(result.x_adv.detach())
        hits.append(result.success)
        evals += result.grad_evals
    if not parts:
        return x_all[:0], torch.zeros(0, dtype=torch.bool), 0
    return torch.cat(parts), torch.cat(hits), evals


def _fooled(model: nn.Module, x: Tensor, y: Tensor, transform: Transform, draws: int,
            seed: int, batch_size: int) -> Tensor:
    """Per sample, the fraction of ``draws`` fresh transformations that are misclassified."""
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.float64)
    generator = torch.Generator(x.device).manual_seed(seed)
    return torch.cat([fooled_fraction(model, x[i:i + batch_size], y[i:i + batch_size],
                                      transform, draws, generator).cpu()
                      for i in range(0, len(x), batch_size)])


@torch.no_grad()
def example_views(model: nn.Module, x: Tensor, y: Tensor, examples: dict[tuple[str, float], Tensor],
                  transform: Transform, count: int, seed: int) -> dict[str, Tensor]:
    """One sample under ``count`` random transformations: its clean image and each attack's
    example, all under the same draws, with the predictions.

    The sample is the first one that every attack broke as it is (so the picture shows what
    becomes of a successful example); returns ``{"index", "label", "clean", "clean_pred",
    "adv/<attack>@<ε>", "pred/<attack>@<ε>"}`` (images ``[count + 1, C, H, W]``, the first the
    untransformed one), or nothing when there are no examples.
    """
    if not examples:
        return {}
    broken = torch.ones(len(y), dtype=torch.bool, device=y.device)
    for x_adv in examples.values():
        broken &= model(x_adv).argmax(1) != y
    i = int(broken.nonzero()[0]) if bool(broken.any()) else 0
    generator = torch.Generator(x.device).manual_seed(seed)
    draw = transform.sample(count, generator, x[i:i + 1])

    def views(image: Tensor) -> Tensor:
        batch = image.unsqueeze(0).expand(count, *image.shape)
        return torch.cat([image.unsqueeze(0), transform.apply(batch, draw)])

    out = {"index": torch.tensor([i]), "label": y[i:i + 1].cpu()}
    clean = views(x[i])
    out["clean"], out["clean_pred"] = clean.cpu(), model(clean).argmax(1).cpu()
    for (title, e), x_adv in examples.items():
        shown = views(x_adv[i])
        out[f"adv/{title}@{e:g}"] = shown.cpu()
        out[f"pred/{title}@{e:g}"] = model(shown).argmax(1).cpu()
    return out


def defence_notes(model: nn.Module, attacks: Sequence[AttackConfig]) -> list[str]:
    """What a report must say about a defended or randomised model and how it was attacked."""
    if not isinstance(model, Defended):
        return []
    notes = [f"The model is defended by {model.step.describe()} in front of the classifier."]
    if model.step.random:
        eot = [a.title for a in attacks if a.eot_samples]
        notes.append("Its forward pass is random, so it is attacked with EOT ("
                     + (", ".join(eot) if eot else "none in this evaluation: add eot_samples")
                     + "); a plain attack's success on one random pass overstates it.")
    bpda = [a.title for a in attacks if a.bpda]
    if bpda:
        notes.append(f"BPDA: {', '.join(bpda)} replace the backward pass of the preprocessing "
                     "by a differentiable approximation; predictions are the defended model's.")
    return notes


def write_physical(out_dir: Path, physical: Physical, settings: dict[str, Any]) -> None:
    """``physical.csv`` (the table), ``physical.safetensors`` (the picture) and
    ``physical.json`` (settings and notes) in an evaluation folder."""
    write_frame(out_dir / "physical.csv", physical.table)
    if physical.views:
        save_tensors(out_dir / "physical.safetensors", physical.views)
    write_json(out_dir / "physical.json", {**settings, "notes": physical.notes})


def wants_physical(model: nn.Module, attacks: Sequence[AttackConfig],
                   config: TransformConfig | None) -> TransformConfig | None:
    """The ``[transforms]`` to measure robustness under: the declared one, or for a randomised
    model attacked with EOT the identity (the draws are then the model's own randomness)."""
    if not physical_attacks(attacks):
        return None
    if config is not None:
        return config
    if is_random(model) and any(a.eot_samples for a in attacks):
        return TransformConfig()
    return None
