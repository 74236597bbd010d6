"""Where the time of a whole `robustkit attack` command goes: the sweep, the checks, the rest.

Runs each command as a user types it (a fresh process through `python -m robustkit`, its own
output folder), reads the sweep's seconds from `timings.csv` and the checks' seconds from the
log line `sanity checks (LEVEL, S s) ...`, and prints one row per command and checks level:

    command                 checks  total s  sweep s  checks s  rest s  checks/total  total/sweep

`rest` is startup (imports, data), the report and the files. Levels run in turn for each
command (alternated, so load from other jobs hits each alike). The issue's targets: with the
default (quick) checks, FGSM on 200 images within max(3 × sweep, 20 s), and checks at most a
quarter of the command on the PGD and default-preset commands.

    export ROBUSTKIT_DATA=../shared/data/mnist
    python benchmarks/command_cost.py --quick            # FGSM and PGD on zoo:mnist_cnn, ~2 min
    python benchmarks/command_cost.py                    # + the default preset on a robust CNN
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKS_LINE = re.compile(r"sanity checks \((\w+), ([0-9.]+) s\)")

#: (name, arguments after `robustkit attack`)
COMMANDS: list[tuple[str, list[str]]] = [
    ("fgsm n=200 cnn", ["--model", "zoo:mnist_cnn", "--attack", "fgsm", "--eps", "0,0.1",
                        "--n", "200"]),
    ("pgd n=500 cnn", ["--model", "zoo:mnist_cnn", "--attack", "pgd", "--eps", "0,0.1",
                       "--n", "500"]),
]
SLOW_COMMANDS: list[tuple[str, list[str]]] = [
    ("standard n=100 pgd-at cnn", ["--model", "zoo:mnist_cnn_pgd_at", "--eps", "0,0.3",
                                   "--n", "100"]),
]


@dataclass(frozen=True)
class Cost:
    total: float
    sweep: float
    checks: float

    @property
    def rest(self) -> float:
        return self.total - self.sweep - self.checks


def run(arguments: list[str], level: str, threads: int) -> Cost:
    """One command, timed whole, in a fresh output folder."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out"
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "robustkit", "attack", *arguments, "--checks", level,
             "--out", str(out), "-q"], capture_output=True, text=True, env=env, check=False)
        total = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(arguments)} failed:\n{done.stderr}")
        with open(out / "timings.csv", encoding="utf-8", newline="") as handle:
            sweep = sum(float(row["seconds"]) for row in csv.DictReader(handle))
        found = CHECKS_LINE.search(done.stderr + done.stdout)
        return Cost(total, sweep, float(found.group(2)) if found else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the two fast commands")
    parser.add_argument("--levels", default="quick,full,off", help="checks levels to compare")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS)")
    args = parser.parse_args()
    commands = COMMANDS + ([] if args.quick else SLOW_COMMANDS)
    print(f"{'command':<28}{'checks':>7}{'total s':>9}{'sweep s':>9}{'checks s':>9}"
          f"{'rest s':>8}{'checks/total':>14}{'total/sweep':>13}")
    for name, arguments in commands:
        for level in args.levels.split(","):
            cost = run(arguments, level, args.threads)
            print(f"{name:<28}{level:>7}{cost.total:>9.1f}{cost.sweep:>9.1f}{cost.checks:>9.1f}"
                  f"{cost.rest:>8.1f}{cost.checks / cost.total:>14.2f}"
                  f"{cost.total / max(cost.sweep, 1e-9):>13.1f}", flush=True)


if __name__ == "__main__":
    main()
