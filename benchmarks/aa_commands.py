"""The commands a user types: robustkit's ``attack --attack autoattack`` against a script that
runs the AutoAttack authors' ``version="standard"``, each in its own process, alternated.

``benchmarks/autoattack_compare.py`` times the attacks inside one process, where a setting of
the process (robustkit's CLI raises glibc's allocator thresholds, :mod:`robustkit.allocator`)
would help both sides alike. Here each side runs as its users run it, from process start to
exit, imports, model and data loading included:

* robustkit: ``robustkit attack --model M --attack autoattack --eps 0,ε --n N --checks off``
  (``--checks off``: the authors' code runs no sanity checks either);
* the authors: ``python -c SCRIPT`` that loads the same model and the first ``N`` test images
  (through robustkit's loaders, which take a second) and calls their
  ``AutoAttack(model, norm="Linf", eps=ε, version="standard", seed=0)
  .run_standard_evaluation(x, y, bs=N)``, imported from ``--authors-src``.

Both get ``OMP_NUM_THREADS=1`` (one torch thread each). Round ``r`` runs robustkit first when
``r`` is even and the authors first when it is odd. Printed: each run's wall seconds, the
median per side, the ratio authors / robustkit, each side's robust accuracy and the samples
robust under one side only.

    python benchmarks/aa_commands.py --rounds 2 > benchmarks/results/cpu_aa_commands.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import default_data_dir, machine_line

AUTHORS = """
import sys
import numpy as np
import torch
sys.path.insert(0, sys.argv[1])
from autoattack import AutoAttack
from robustkit.data import load_dataset
from robustkit.models import load_model
model_spec, n, eps = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
out, data_dir = sys.argv[5], sys.argv[6]
model, _ = load_model(model_spec)
model.eval()
split = load_dataset("mnist", data_dir, torch.device("cpu"), val_size=0).test.take(n)
attack = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, device="cpu",
                    verbose=False)
adv = attack.run_standard_evaluation(split.images, split.labels, bs=n)
inside = (adv - split.images).abs().flatten(1).amax(1) <= eps + 1e-6
with torch.no_grad():
    robust = (model(adv).argmax(1) == split.labels) & inside
np.save(out, robust.numpy())
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:mnist_cnn_pgd_at")
    parser.add_argument("--n", type=int, default=200, help="first N test images (200)")
    parser.add_argument("--eps", type=float, default=0.3, help="L∞ budget (0.3)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--authors-src", type=Path, default=Path("/tmp/aa"),
                        help="folder holding the authors' autoattack/ package (/tmp/aa)")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="folder with the MNIST IDX files (default: $ROBUSTKIT_DATA)")
    return parser.parse_args(argv)


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def robustkit_robust(folder: Path, eps: float) -> np.ndarray:
    import pandas as pd

    per_sample = pd.read_csv(folder / "per_sample.csv")
    robust: np.ndarray = per_sample["autoattack_eps"].to_numpy(dtype=float) > eps
    return robust


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.authors_src / "autoattack" / "autoattack.py").is_file():
        print(f"skipped: the authors' autoattack/ package is not in {args.authors_src}")
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.data_dir:
        env["ROBUSTKIT_DATA"] = str(args.data_dir)
    print(machine_line())
    print(f"model {args.model}, first {args.n} MNIST test images, L∞ ε = {args.eps:g}, "
          f"{args.rounds} rounds, each command in its own process, one thread", flush=True)
    seconds: dict[str, list[float]] = {"robustkit": [], "authors": []}
    robust: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            order = ["robustkit", "authors"] if r % 2 == 0 else ["authors", "robustkit"]
            for side in order:
                if side == "robustkit":
                    folder = Path(scratch) / f"rk{r}"
                    took = timed(["robustkit", "attack", "--model", args.model, "--attack",
                                  "autoattack", "--eps", f"0,{args.eps:g}", "--n", str(args.n),
                                  "--checks", "off", "-q", "--json", "--out", str(folder)], env)
                    robust[side] = robustkit_robust(folder, args.eps)
                else:
                    out = Path(scratch) / f"authors{r}.npy"
                    took = timed([sys.executable, "-c", AUTHORS, str(args.authors_src),
                                  args.model, str(args.n), f"{args.eps:g}", str(out),
                                  str(args.data_dir or "")], env)
                    robust[side] = np.load(out)
                seconds[side].append(took)
                print(f"round {r} {side}: {took:.1f} s, robust {robust[side].mean():.4f}",
                      flush=True)
    ours, theirs = (statistics.median(seconds[s]) for s in ("robustkit", "authors"))
    print(f"median: robustkit {ours:.1f} s, authors {theirs:.1f} s: the authors' command took "
          f"{theirs / ours:.2f}× robustkit's")
    only_theirs = np.flatnonzero(robust["robustkit"] & ~robust["authors"]).tolist()
    only_ours = np.flatnonzero(~robust["robustkit"] & robust["authors"]).tolist()
    print(f"robust: robustkit {robust['robustkit'].mean():.4f}, authors "
          f"{robust['authors'].mean():.4f}; broken only by the authors: {only_theirs}; only by "
          f"robustkit: {only_ours} (last round)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
