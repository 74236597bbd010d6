"""Attack speed: robustkit's PGD step and ε-sweep, against torchattacks and foolbox when installed.

On one model (a quick robustkit-trained ``mlp``, or ``--checkpoint PATH``) and the first ``--n``
MNIST test images it measures:

1. the raw PGD step: ``robustkit.attacks.pgd`` with ``early_stop=False``, one restart and a
   fixed number of steps on one batch, as image-steps per second (n·steps / seconds); the same
   for torchattacks' and foolbox's PGD when they are importable;
2. the robustness sweep (FGSM + PGD-40, ε ∈ {0, .05, …, .3}) through
   ``robustkit.evaluation.evaluate`` with ``shortcuts=True`` and with ``shortcuts=False`` (every
   ε attacked from scratch, no early stopping): both times, their ratio, and a check that the
   shortcut accuracy is ≤ the reference accuracy at every ε;
3. PGD-40 sweeps (step 2.5·ε/40, random start) by torchattacks (one ``torchattacks.PGD`` per ε)
   and foolbox (one ``LinfPGD`` call with all ε at once), each ε attacked from scratch as a user
   would, side by side with robustkit's PGD-40-only sweep (shortcuts on): accuracy and seconds
   per ε, totals, and the ratio of the fastest library's total to robustkit's.

At ε = 0 every tool is given clean accuracy (one forward pass) rather than a zero-budget attack,
which favours torchattacks and foolbox. Rounds are interleaved and the best time of
``--repeats`` rounds is used for every tool.

    python benchmarks/attack_speed.py                       # trains an mlp for 2 epochs
    python benchmarks/attack_speed.py --checkpoint runs/x/model-best.safetensors
    python benchmarks/attack_speed.py --quick               # smoke run
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import THREADS_HELP, default_data_dir, machine_line, print_table, set_threads
from torch import Tensor, nn

from robustkit.attacks import pgd
from robustkit.budgets import STEP_FACTOR, default_step_size
from robustkit.config import AttackConfig, config_from_dict
from robustkit.data import Dataset, Split, load_dataset
from robustkit.evaluation import evaluate
from robustkit.models import load_model
from robustkit.results import ANY
from robustkit.training import train

EPS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
STEPS = 40
FGSM = AttackConfig(name="fgsm")
PGD40 = AttackConfig(name="pgd", steps=STEPS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="folder with the MNIST IDX files (default: $ROBUSTKIT_DATA)")
    parser.add_argument("--checkpoint", default=None,
                        help="a robustkit checkpoint to attack instead of training an mlp")
    parser.add_argument("--arch", default="mlp", help="architecture trained when no checkpoint")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs when no checkpoint")
    parser.add_argument("--n", type=int, default=1000, help="test images attacked")
    parser.add_argument("--batch-size", type=int, default=1000, help="attack batch, all tools")
    parser.add_argument("--raw-steps", type=int, default=40, help="steps of the raw PGD timing")
    parser.add_argument("--raw-eps", type=float, default=0.3, help="ε of the raw PGD timing")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (best kept)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-others", action="store_true", help="skip torchattacks/foolbox")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 200 images, 1 round, a 1-epoch mlp on 10,000 images")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the model


def get_model(args: argparse.Namespace, data: Dataset) -> tuple[nn.Module, str]:
    if args.checkpoint:
        model, info = load_model(args.checkpoint)
        return model.eval(), f"checkpoint {args.checkpoint} ({info.get('arch', '?')})"
    config = config_from_dict({
        "name": "attack-speed", "seed": args.seed, "device": "cpu",
        "model": {"arch": args.arch},
        "train": {"method": "standard", "epochs": args.epochs, "batch_size": 128,
                  "optimizer": "sgd", "lr": 0.1, "momentum": 0.9},
    })
    with tempfile.TemporaryDirectory(prefix="rk-attack-speed-") as out:
        result = train(config, out_dir=Path(out), data=data, progress=False)
    torch.use_deterministic_algorithms(False)  # train() sets it globally; attack with defaults
    return result.model.eval(), (f"{args.arch} trained by robustkit, {args.epochs} epoch(s) on "
                                 f"{len(data.train)} images")


# --------------------------------------------------------------------------- other libraries


def others_available() -> dict[str, Any]:
    found: dict[str, Any] = {}
    try:
        import torchattacks

        found["torchattacks"] = torchattacks
    except ImportError:
        pass
    try:
        import foolbox

        found["foolbox"] = foolbox
    except ImportError:
        pass
    return found


@torch.no_grad()
def correct_on(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    correct: Tensor = model(x).argmax(1) == y
    return correct


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def torchattacks_sweep(ta: Any, model: nn.Module, x: Tensor, y: Tensor, eps: list[float],
                       batch: int) -> tuple[dict[float, float], dict[float, float]]:
    """One ``torchattacks.PGD`` per ε, every ε from scratch; (accuracy, seconds) per ε."""
    accs, secs = {}, {}
    for e in eps:
        start = time.perf_counter()
        correct = 0
        for part in chunks(len(x), batch):
            if e == 0:
                correct += int(correct_on(model, x[part], y[part]).sum())
                continue
            attack = ta.PGD(model, eps=e, alpha=default_step_size(e, STEPS), steps=STEPS,
                            random_start=True)
            adv = attack(x[part], y[part])
            correct += int(correct_on(model, adv, y[part]).sum())
        secs[e] = time.perf_counter() - start
        accs[e] = correct / len(x)
    return accs, secs


def foolbox_sweep(fb: Any, model: nn.Module, x: Tensor, y: Tensor, eps: list[float],
                  batch: int) -> tuple[dict[float, float], dict[float, float]]:
    """One ``LinfPGD`` call with every ε > 0 at once (foolbox attacks each from scratch).

    Per-ε seconds are not separable: the total is reported under key ``math.inf``.
    """
    positive = [e for e in eps if e > 0]
    start = time.perf_counter()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device="cpu")
    attack = fb.attacks.LinfPGD(rel_stepsize=STEP_FACTOR / STEPS, abs_stepsize=None, steps=STEPS,
                                random_start=True)
    clean = 0
    broken = torch.zeros(len(positive), dtype=torch.long)
    for part in chunks(len(x), batch):
        clean += int(correct_on(model, x[part], y[part]).sum())
        _, _, success = attack(fmodel, x[part], y[part], epsilons=positive)
        broken += success.sum(1).cpu()
    total = time.perf_counter() - start
    accs = {0.0: clean / len(x)} if 0.0 in eps else {}
    accs.update({e: 1.0 - int(b) / len(x) for e, b in zip(positive, broken, strict=True)})
    return accs, {math.inf: total}


# --------------------------------------------------------------------------- raw step


def raw_pgd_seconds(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    pgd(model, x, y, eps=eps, steps=steps, restarts=1, early_stop=False, generator=generator)
    return time.perf_counter() - start


def raw_other_seconds(name: str, lib: Any, model: nn.Module, x: Tensor, y: Tensor, eps: float,
                      steps: int) -> float:
    start = time.perf_counter()
    if name == "torchattacks":
        lib.PGD(model, eps=eps, alpha=default_step_size(eps, steps), steps=steps,
                random_start=True)(x, y)
    else:
        fmodel = lib.PyTorchModel(model, bounds=(0, 1), device="cpu")
        lib.attacks.LinfPGD(rel_stepsize=STEP_FACTOR / steps, abs_stepsize=None, steps=steps,
                            random_start=True)(fmodel, x, y, epsilons=[eps])
    return time.perf_counter() - start


# --------------------------------------------------------------------------- main


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@dataclass
class Timings:
    """Wall seconds per interleaved round, and what the timed runs returned."""

    raw: dict[str, list[float]]
    sweep: dict[str, list[float]]
    versus: dict[str, list[float]]
    evals: dict[str, Any] = field(default_factory=dict)
    rk_pgd: Any = None
    other_results: dict[str, tuple[dict[float, float], dict[float, float]]] = field(
        default_factory=dict)


def log(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def measure(args: argparse.Namespace, model: nn.Module, split: Split, eps: list[float],
            others: dict[str, Any]) -> Timings:
    """Every timed run, ``args.repeats`` rounds, alternating the order of the two sweeps."""
    x, y = split.images, split.labels
    # warm-up: first calls pay for lazy initialisation in every library
    pgd(model, x[:8], y[:8], eps=0.1, steps=2, early_stop=False)
    for name, lib in others.items():
        raw_other_seconds(name, lib, model, x[:8], y[:8], 0.1, 2)
    t = Timings({"robustkit": [], **{k: [] for k in others}}, {"shortcuts": [], "reference": []},
                {"robustkit": [], **{k: [] for k in others}})
    for rnd in range(args.repeats):
        torch.manual_seed(args.seed + rnd)
        t.raw["robustkit"].append(raw_pgd_seconds(model, x, y, args.raw_eps, args.raw_steps))
        for name, lib in others.items():
            t.raw[name].append(raw_other_seconds(name, lib, model, x, y, args.raw_eps,
                                                 args.raw_steps))
        log(f"round {rnd + 1}: raw step " + ", ".join(f"{k} {v[-1]:.2f}s"
                                                      for k, v in t.raw.items()))
        modes = [("shortcuts", True), ("reference", False)]
        for label, flag in modes if rnd % 2 == 0 else modes[::-1]:
            seconds, t.evals[label] = timed(functools.partial(
                evaluate, model, split, [FGSM, PGD40], eps, batch_size=args.batch_size,
                seed=args.seed, shortcuts=flag))
            t.sweep[label].append(seconds)
            log(f"round {rnd + 1}: FGSM+PGD-40 sweep, {label}: {seconds:.2f}s")
        seconds, t.rk_pgd = timed(lambda: evaluate(model, split, [PGD40], eps,
                                                   batch_size=args.batch_size, seed=args.seed))
        t.versus["robustkit"].append(seconds)
        log(f"round {rnd + 1}: robustkit PGD-40 sweep {seconds:.2f}s")
        for name, lib in others.items():
            torch.manual_seed(args.seed + rnd)
            fn = torchattacks_sweep if name == "torchattacks" else foolbox_sweep
            seconds, result = timed(functools.partial(fn, lib, model, x, y, eps,
                                                      args.batch_size))
            t.versus[name].append(seconds)
            t.other_results.setdefault(name, result)
            log(f"round {rnd + 1}: {name} PGD-40 sweep {seconds:.2f}s")
    return t


def report_raw(t: Timings, n: int, args: argparse.Namespace) -> None:
    print(f"1. Raw PGD step (ε={args.raw_eps:g}, {args.raw_steps} steps, one restart, "
          f"no early stop, batch of {n})")
    rk_rate = n * args.raw_steps / min(t.raw["robustkit"])
    rows = []
    for name, times in t.raw.items():
        rate = n * args.raw_steps / min(times)
        rows.append([name, f"{min(times):.3f}", f"{rate:,.0f}", f"{rk_rate / rate:.2f}x"])
    print_table(["tool", "seconds", "image-steps/s", "robustkit speed-up"], rows)


def report_shortcuts(t: Timings, eps: list[float]) -> float:
    """Section 2; returns the shortcut sweep's best time."""
    print("2. FGSM + PGD-40 sweep over ε, robustkit evaluate(): shortcuts on vs off")
    short, ref = t.evals["shortcuts"].results, t.evals["reference"].results
    attacks_seen = list(dict.fromkeys(short["attack"]))
    rows, ok = [], True
    for e in eps:
        row: list[object] = [f"{e:.2f}"]
        for attack in attacks_seen:
            a = float(short[(short.attack == attack) & (short.eps == e)].accuracy.iloc[0])
            b = float(ref[(ref.attack == attack) & (ref.eps == e)].accuracy.iloc[0])
            ok &= a <= b
            row.append(f"{a:.4f} / {b:.4f}")
        rows.append([str(cell) for cell in row])
    print_table(["eps"] + [f"{a} acc (short / ref)" for a in attacks_seen], rows)
    g_short = int(short[short.attack != ANY].grad_evals.sum())
    g_ref = int(ref[ref.attack != ANY].grad_evals.sum())
    t_short, t_ref = min(t.sweep["shortcuts"]), min(t.sweep["reference"])
    print(f"time: shortcuts {t_short:.2f} s, reference {t_ref:.2f} s -> shortcuts are "
          f"{t_ref / t_short:.1f}x faster; per-sample gradients {g_short:,} vs {g_ref:,} "
          f"({g_ref / max(g_short, 1):.1f}x fewer)")
    print(f"shortcut accuracy <= reference accuracy at every ε and attack: "
          f"{'yes' if ok else 'NO'}")
    return t_short


def report_versus(t: Timings, eps: list[float], n: int, others: dict[str, Any],
                  t_short: float) -> None:
    """Section 3: robustkit's PGD-40 sweep beside the other libraries'."""
    print("3. PGD-40 sweep (step 2.5·ε/40, random start), every library on the same model and "
          "images")
    rk_res = t.rk_pgd.results
    rk_acc = {e: float(rk_res[(rk_res.attack == PGD40.title) & (rk_res.eps == e)].accuracy.iloc[0])
              for e in eps}
    rk_sec = dict(zip(t.rk_pgd.timings.eps, t.rk_pgd.timings.seconds, strict=True))
    if not others:
        print("torchattacks and foolbox skipped: not importable (or --no-others). Install them "
              "with: pip install -e \".[bench]\"  (or: pip install torchattacks foolbox)")
    headers = ["eps", "robustkit acc", "s"]
    for name in others:
        headers += [f"{name} acc", "s"]
    rows = []
    higher: dict[str, list[str]] = {name: [] for name in others}
    for e in eps:
        row = [f"{e:.2f}", f"{rk_acc[e]:.4f}", f"{rk_sec.get(e, 0.0):.2f}" if e else "-"]
        for name in others:
            accs, secs = t.other_results[name]
            if rk_acc[e] > accs[e]:
                images = round((rk_acc[e] - accs[e]) * n)
                higher[name].append(f"ε={e:g} by {images} of {n} images")
            row += [f"{accs[e]:.4f}", f"{secs[e]:.2f}" if e in secs else "-"]
        rows.append([str(cell) for cell in row])
    total_row = ["total (best wall)", "", f"{min(t.versus['robustkit']):.2f}"]
    for name in others:
        total_row += ["", f"{min(t.versus[name]):.2f}"]
    rows.append(total_row)
    print_table(headers, rows)
    print("(robustkit's per-ε seconds are its attack cells; its total also covers the clean "
          "pass. foolbox attacks all ε in one call, so only its total is known. ε = 0 is clean "
          "accuracy for every tool.)")
    if others:
        fastest = min(others, key=lambda k: min(t.versus[k]))
        t_fast, t_rk = min(t.versus[fastest]), min(t.versus["robustkit"])
        for name in others:
            where = "; ".join(higher[name])
            print(f"{name}: {min(t.versus[name]) / t_rk:.1f}x robustkit's PGD-40 sweep time; "
                  f"robustkit accuracy <= {name}'s at every ε: "
                  f"{'yes' if not where else 'NO, robustkit is higher at ' + where}")
        verdict = "MET" if t_fast / t_rk >= 10 and not higher[fastest] else "NOT MET"
        print(f"fastest library ({fastest}) / robustkit PGD-40 sweep = {t_fast / t_rk:.1f}x "
              f"(vs robustkit's FGSM+PGD-40 sweep: {t_fast / t_short:.1f}x). "
              f"Target >= 10x at equal or lower accuracy at every ε: {verdict}.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.quick:
        args.n, args.repeats, args.epochs, args.raw_steps = 200, 1, 1, 10
    data = load_dataset("mnist", args.data_dir, "cpu")
    if args.quick:
        data = Dataset(data.name, data.classes, data.train.take(10_000), data.val.take(1000),
                       data.test, data.source)
    model, described = get_model(args, data)
    split = data.test.take(args.n)
    split = Split(split.images.contiguous(), split.labels.contiguous())
    eps = list(EPS)
    others = {} if args.no_others else others_available()
    t = measure(args, model, split, eps, others)
    n = len(split)
    print(f"attack_speed: {described}; {n} test images; attack batch {args.batch_size}; "
          f"best of {args.repeats} interleaved round(s){'  [QUICK]' if args.quick else ''}")
    print(machine_line())
    print("clean accuracy on these images: "
          f"{float(correct_on(model, split.images, split.labels).float().mean()):.4f}")
    print()
    report_raw(t, n, args)
    print()
    t_short = report_shortcuts(t, eps)
    print()
    report_versus(t, eps, n, others, t_short)
    return 0


if __name__ == "__main__":
    sys.exit(main())
