"""Does adding FAB-T make robustkit's L∞ ``autoattack`` weaker? Before against after, per sample.

Runs ``autoattack`` (L∞, ε ∈ {0, ε}) through the sweep engine on the first ``--n`` MNIST test
images with whatever robustkit is first on ``PYTHONPATH`` and writes, per sample, whether it was
broken (``--out NAME.json``). Run it once with the code before FAB-T and once after, then
``--compare BEFORE.json AFTER.json`` prints both robust accuracies and the samples each broke
alone. A stage only adds broken samples and the start and Square draws are indexed by sample,
so "after" should break every sample "before" broke (and FAB-T's own on top).

    PYTHONPATH=/path/to/old/checkout python benchmarks/linf_fab_check.py --out before.json
    PYTHONPATH=$PWD python benchmarks/linf_fab_check.py --out after.json
    python benchmarks/linf_fab_check.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import THREADS_HELP, default_data_dir, machine_line, set_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="zoo:mnist_cnn_pgd_at")
    parser.add_argument("--n", type=int, default=100, help="first N test images (default 100)")
    parser.add_argument("--eps", type=float, default=0.3, help="L∞ budget (default 0.3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--out", type=Path, help="write the per-sample verdicts here (JSON)")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep's per-sample verdicts at ε with the robustkit on the path."""
    import robustkit.attacks.ensemble as ensemble
    from robustkit.config import AttackConfig
    from robustkit.data import load_dataset
    from robustkit.evaluation import evaluate
    from robustkit.models import load_model

    model, _ = load_model(args.checkpoint)
    split = load_dataset("mnist", args.data_dir, torch.device("cpu"), val_size=0).test.take(args.n)
    attack = AttackConfig(name="autoattack")
    started = time.perf_counter()
    result = evaluate(model.eval(), split, [attack], [0.0, args.eps], seed=args.seed,
                      n_examples=0)
    broken = (result.per_sample[f"{attack.title}_eps"] <= args.eps).tolist()
    timing = result.timings[result.timings["eps"] == args.eps].iloc[0]
    return {"machine": machine_line(), "stages": list(ensemble.STAGES), "model": args.checkpoint,
            "n": args.n, "eps": args.eps, "seconds": time.perf_counter() - started,
            "grad_evals": int(timing["grad_evals"]), "broken": broken,
            "robust_accuracy": 1 - sum(broken) / len(broken)}


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    old, new = before["broken"], after["broken"]
    assert isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
    only_old = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a and not b]
    only_new = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if b and not a]
    verdict = "not weaker" if not only_old else "WEAKER on some samples"
    return [str(after["machine"]),
            f"{after['model']}, first {len(new)} MNIST test images, L∞ ε = {after['eps']:g}",
            f"before ({' → '.join(map(str, before['stages']))}): robust "
            f"{before['robust_accuracy']:.4f} in {before['seconds']:.0f} s",
            f"after  ({' → '.join(map(str, after['stages']))}): robust "
            f"{after['robust_accuracy']:.4f} in {after['seconds']:.0f} s",
            f"broken only before: {len(only_old)} {only_old}; only after: {len(only_new)} "
            f"{only_new} — {verdict}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        print(*compare(before, after), sep="\n")
        return 0
    set_threads(args.threads)
    figures = run(args)
    print(f"robust accuracy {figures['robust_accuracy']:.4f} in {figures['seconds']:.0f} s")
    if args.out is not None:
        args.out.write_text(json.dumps(figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
