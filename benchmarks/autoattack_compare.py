"""robustkit's `autoattack` ensemble against torchattacks' AutoAttack(version="standard").

On one model (a robustkit checkpoint, or anything ``robustkit attack --model`` loads) and the first
``--n`` MNIST test images (default 1000), at one ε:

1. robustkit: the ensemble APGD-CE → APGD-T (9 targets) → Square (5000 queries), run through
   the sweep engine (``robustkit.evaluation.evaluate`` with ``name = "autoattack"``, ε ∈ {0, ε}),
   exactly what ``robustkit attack --attack autoattack`` runs;
2. torchattacks: ``AutoAttack(model, norm, eps, version="standard", n_classes=K, seed)``
   (APGD-CE, APGD-T, FAB-T, Square 5000), batch by batch. Its APGD, APGD-T and FAB run 10 steps
   by default, a tenth of robustkit's and of the authors' standard version;
   ``--reference-steps 100`` sets them to 100 (like for like), and ``--steps 10`` makes
   robustkit as cheap as torchattacks' default;
3. with ``--authors``: the AutoAttack authors' own package (``from autoattack import
   AutoAttack``, ``version="standard"``: 100 iterations, Square 5000), if it is importable.

Each reference's adversarial images are checked to lie in the ε-ball and the [0, 1] box, and a
sample counts as robust iff the model still classifies its image correctly.

The tools alternate: the images are cut into rounds of ``--chunk`` (default 50) and every round
runs each tool on its images in turn, the order rotated from round to round, so a machine whose
load drifts (a shared CPU) weighs on every tool alike; each tool's time is the sum of its
rounds. ``--chunk 0`` runs each tool once on all the images, one after the other.

Printed: clean and robust accuracy of each, the per-sample disagreements (indices; which side
broke them), and the wall time of each with the ratio reference / robustkit. ``--json OUT``
saves the same figures (with every disagreeing index) as JSON.

    python benchmarks/autoattack_compare.py --checkpoint runs/mlp_at/model-best.safetensors \\
        --eps 0.1 --n 1000
    python benchmarks/autoattack_compare.py \\
        --checkpoint runs/mnist_cnn_pgd_at/seed-0/model-best.safetensors \\
        --eps 0.3 --device cuda --json logs/aa_pgd_at.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import THREADS_HELP, default_data_dir, machine_line, print_table, set_threads
from torch import Tensor, nn

from robustkit.budgets import eps_bound
from robustkit.config import AttackConfig
from robustkit.data import Split, load_dataset
from robustkit.errors import RobustkitError
from robustkit.evaluation import evaluate
from robustkit.models import load_model
from robustkit.runtime import resolve_device

#: How many disagreeing indices the terminal shows per side (the JSON has all).
SHOW = 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="the model: a robustkit checkpoint (or any robustkit --model spec)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="safetensors state dict for a package.module:factory --checkpoint")
    parser.add_argument("--n", type=int, default=1000, help="first N test images (default 1000)")
    parser.add_argument("--eps", type=float, default=0.3, help="budget in [0,1] pixel units")
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="batch size of both tools (default 1000)")
    parser.add_argument("--chunk", type=int, default=50,
                        help="images per round of the alternation (default 50; 0: one round)")
    parser.add_argument("--steps", type=int, default=100, help="robustkit's APGD steps (100)")
    parser.add_argument("--queries", type=int, default=5000, help="robustkit's Square budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="folder with the MNIST IDX files (default: $ROBUSTKIT_DATA)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="also write the figures and every disagreeing index to OUT")
    parser.add_argument("--skip-reference", action="store_true",
                        help="run robustkit only (no torchattacks)")
    parser.add_argument("--reference-steps", type=int, default=None, metavar="N",
                        help="steps of torchattacks' APGD, APGD-T and FAB inside its AutoAttack "
                             "(default: torchattacks' own, 10; the authors' standard uses 100)")
    parser.add_argument("--authors", action="store_true",
                        help="also run the AutoAttack authors' package (import autoattack; "
                             "version='standard': APGD/APGD-T/FAB-T 100 iterations, Square 5000)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.chunk < 0:
        parser.error("--n and --batch-size must be at least 1, --chunk at least 0")
    if not 0 < args.eps <= eps_bound(args.norm):  # L2's √d: checked once the data is loaded
        parser.error(f"--eps {args.eps} is out of range for {args.norm}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_robustkit(model: nn.Module, split: Split, args: argparse.Namespace,
                  device: torch.device) -> tuple[Tensor, float, dict[str, Any]]:
    """Per-sample robustness at ε ``[n]`` (CPU bool), seconds, and the engine's cost figures."""
    attack = AttackConfig(name="autoattack", norm=args.norm, steps=args.steps,
                          queries=args.queries)
    _sync(device)
    started = time.perf_counter()
    result = evaluate(model, split, [attack], [0.0, args.eps], batch_size=args.batch_size,
                      seed=args.seed, n_examples=0)
    _sync(device)
    seconds = time.perf_counter() - started
    broken_eps = torch.tensor(result.per_sample[f"{attack.title}_eps"].to_numpy())
    robust = broken_eps > args.eps
    timing = result.timings[result.timings["eps"] == args.eps].iloc[0]
    return robust, seconds, {"grad_evals": int(timing["grad_evals"]),
                             "queries": int(timing["queries"])}


def run_torchattacks(model: nn.Module, split: Split, args: argparse.Namespace,
                     device: torch.device, num_classes: int) -> tuple[Tensor, float, int]:
    """Per-sample robustness ``[n]`` under torchattacks' AutoAttack, seconds, and the number of
    adversarial images outside the ε-ball or the box (they count as not broken)."""
    import torchattacks

    norm = "Linf" if args.norm == "linf" else "L2"
    attack = torchattacks.AutoAttack(model, norm=norm, eps=args.eps, version="standard",
                                     n_classes=num_classes, seed=args.seed)
    if args.reference_steps is not None:  # APGD, APGD-T and FAB; Square counts queries
        for stage in attack._autoattack.attacks:
            if hasattr(stage, "steps"):
                stage.steps = args.reference_steps
    return _run_reference(lambda x, y: attack(x, y), model, split, args, device)


def run_authors(model: nn.Module, split: Split, args: argparse.Namespace,
                device: torch.device) -> tuple[Tensor, float, int]:
    """The same under the AutoAttack authors' own package, ``version="standard"``."""
    from autoattack import AutoAttack

    norm = "Linf" if args.norm == "linf" else "L2"
    attack = AutoAttack(model, norm=norm, eps=args.eps, version="standard", seed=args.seed,
                        device=str(device), verbose=False)
    return _run_reference(
        lambda x, y: attack.run_standard_evaluation(x, y, bs=len(x)), model, split, args, device)


def _run_reference(attack: Any, model: nn.Module, split: Split, args: argparse.Namespace,
                   device: torch.device) -> tuple[Tensor, float, int]:
    """Per-sample robustness ``[n]`` under ``attack(x, y) -> x_adv``, seconds, and the number of
    adversarial images outside the ε-ball or the box (they count as not broken)."""
    robust, invalid = [], 0
    _sync(device)
    started = time.perf_counter()
    for i in range(0, len(split), args.batch_size):
        x = split.images[i:i + args.batch_size]
        y = split.labels[i:i + args.batch_size]
        adv = attack(x, y).detach()
        with torch.no_grad():
            still = model(adv).argmax(1) == y
        diff = (adv - x).flatten(1)
        size = diff.abs().amax(1) if args.norm == "linf" else diff.norm(dim=1)
        outside = (size > args.eps + 1e-5) | (adv.flatten(1).amin(1) < -1e-6) | (
            adv.flatten(1).amax(1) > 1 + 1e-6)
        invalid += int(outside.sum())
        clean_ok = model(x).argmax(1) == y if outside.any() else still
        robust.append(torch.where(outside, clean_ok, still).cpu())
    _sync(device)
    return torch.cat(robust), time.perf_counter() - started, invalid


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    try:
        device = resolve_device(args.device)
        model, info = load_model(args.checkpoint, weights=args.weights, device=device)
        data = load_dataset("mnist", args.data_dir, device, val_size=0)
    except RobustkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model.eval()
    split = data.test.take(args.n)
    if args.eps > eps_bound(args.norm, split.images[0].numel()):
        print(f"error: --eps {args.eps} is out of range for {args.norm}", file=sys.stderr)
        return 2
    with torch.no_grad():
        logits = torch.cat([model(split.images[i:i + args.batch_size])
                            for i in range(0, len(split), args.batch_size)])
    clean = (logits.argmax(1) == split.labels).cpu()
    n = len(split)
    print(machine_line())
    print(f"model {args.checkpoint} ({info.get('kind', '?')}), device {device}, first {n} "
          f"MNIST test images, {args.norm} ε = {args.eps:g}; "
          f"clean accuracy {clean.float().mean():.4f}")

    Run = Callable[[Split], tuple[Tensor, float, Any]]
    tools: list[tuple[str, str, Run]] = [
        ("robustkit autoattack", "robustkit",
         lambda part: run_robustkit(model, part, args, device))]
    if not args.skip_reference:
        tools.append((f"torchattacks AutoAttack standard, {args.reference_steps or 10} steps",
                      "torchattacks",
                      lambda part: run_torchattacks(model, part, args, device,
                                                    int(logits.shape[1]))))
    if args.authors:
        tools.append(("authors' AutoAttack standard", "authors",
                      lambda part: run_authors(model, part, args, device)))
    found, skipped = alternate(tools, split, args.chunk or n)
    rk_robust, rk_seconds, rk_costs = found["robustkit"]
    figures: dict[str, Any] = {
        "model": args.checkpoint, "device": str(device), "n": n, "norm": args.norm,
        "eps": args.eps, "clean_accuracy": float(clean.float().mean()), "machine": machine_line(),
        "rounds": math.ceil(n / (args.chunk or n)),
        "robustkit": {"accuracy": float(rk_robust.float().mean()), "seconds": rk_seconds,
                      "steps": args.steps, "queries_budget": args.queries,
                      "grad_evals": sum(c["grad_evals"] for c in rk_costs),
                      "queries": sum(c["queries"] for c in rk_costs)},
    }
    rows: list[list[object]] = [["robustkit autoattack", f"{rk_robust.float().mean():.4f}",
                                 f"{rk_seconds:.1f}", ""]]
    references = [(title, key) for title, key, _ in tools[1:] if key in found]
    for title, key, _ in tools[1:]:
        if key not in found:
            print(f"{title}: skipped ({skipped[key]}; see benchmarks/README.md)")
    for title, key in references:
        ref_robust, ref_seconds, invalids = found[key]
        ratio = ref_seconds / rk_seconds if rk_seconds > 0 else math.nan
        rows.append([title, f"{ref_robust.float().mean():.4f}", f"{ref_seconds:.1f}",
                     f"{ratio:.2f}"])
        figures[key] = {
            "title": title, "accuracy": float(ref_robust.float().mean()),
            "seconds": ref_seconds, "invalid_adversarials": sum(invalids),
            "time_ratio_over_robustkit": ratio,
            "accuracy_gap_robustkit_minus_reference": float(
                rk_robust.float().mean() - ref_robust.float().mean()),
            "broken_only_by_reference": (rk_robust & ~ref_robust).nonzero().squeeze(1).tolist(),
            "broken_only_by_robustkit": (~rk_robust & ref_robust).nonzero().squeeze(1).tolist(),
        }
    print_table(["attack", "robust accuracy", "seconds", "time / robustkit"], rows)
    for title, key in references:
        _print_comparison(title, figures[key])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        tmp.replace(args.json)
        print(f"figures written to {args.json}")
    return 0


def alternate(tools: list[tuple[str, str, Any]], split: Split, chunk: int
              ) -> tuple[dict[str, tuple[Tensor, float, list[Any]]], dict[str, str]]:
    """Run every tool on each round of ``chunk`` images, the order rotated by one each round.

    Returns per tool key: robustness ``[n]`` (the rounds concatenated), the summed seconds, and
    the third item of every round's result; and per tool whose import failed, why (it is left
    out)."""
    skipped: dict[str, str] = {}
    parts: dict[str, list[tuple[Tensor, float, Any]]] = {key: [] for _, key, _ in tools}
    for r, start in enumerate(range(0, len(split), chunk)):
        part = Split(split.images[start:start + chunk], split.labels[start:start + chunk])
        shift = r % len(tools)
        for _, key, run in tools[shift:] + tools[:shift]:
            if key in skipped:
                continue
            try:
                parts[key].append(run(part))
            except ImportError as exc:
                skipped[key] = str(exc)
    found = {key: (torch.cat([p[0] for p in done]), sum(p[1] for p in done), [p[2] for p in done])
             for key, done in parts.items() if key not in skipped and done}
    return found, skipped


def _print_comparison(title: str, found: dict[str, Any]) -> None:
    """robustkit against one reference: the accuracy gap, the time ratio, the disagreements."""
    print(f"robustkit − {title}: {100 * found['accuracy_gap_robustkit_minus_reference']:+.2f} "
          f"points; it took {found['time_ratio_over_robustkit']:.2f}× robustkit's time")
    for side, key in (("the reference", "broken_only_by_reference"),
                      ("robustkit", "broken_only_by_robustkit")):
        indices = found[key]
        shown = ", ".join(map(str, indices[:SHOW])) + (" …" if len(indices) > SHOW else "")
        print(f"  broken only by {side}: {len(indices)}"
              + (f" (indices {shown})" if indices else ""))
    if found["invalid_adversarials"]:
        print(f"  warning: {found['invalid_adversarials']} of its images left the ε-ball or "
              "the box; they were counted as not broken")


if __name__ == "__main__":
    sys.exit(main())
