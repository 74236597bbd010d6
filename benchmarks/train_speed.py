"""Training speed: robustkit's whole-tensor loop against a plain torchvision DataLoader loop.

Both train the same architecture from the same initial weights (same seed) with SGD (lr 0.1,
momentum 0.9), batch 128, for the same number of epochs on the same 55,000 training images
(robustkit holds out 5,000 for validation; the plain loop gets the same indices through a
``Subset``), and both evaluate test accuracy after every epoch.

* robustkit: ``robustkit.training.train`` timed as one call. Besides the optimisation steps this
  includes what train() always does: clean validation (5,000) and test (10,000) accuracy every
  epoch, writing ``model-last``/``model-best`` checkpoints, metrics.csv, the resume state and the
  manifest, and reloading the best checkpoint at the end. So robustkit's time is conservative.
* plain: the PyTorch MNIST example's way: ``torchvision.datasets.MNIST`` with
  ``transforms.ToTensor()``, ``DataLoader(batch_size=128, shuffle=True)``, a
  ``model.train(); for x, y in loader: ...`` loop and a test pass through a DataLoader
  (batch 1000) after each epoch. Run with num_workers=0 (the default) and num_workers=2.

Runs are interleaved round by round; the table gives the median (and min) over rounds. Data
loading (robustkit: md5-checked IDX → tensors; torchvision: reading the IDX files) is timed once
and reported separately, outside the ratio.

    python benchmarks/train_speed.py                 # mlp, 1 epoch, 3 rounds
    python benchmarks/train_speed.py --model cnn --repeats 1
    python benchmarks/train_speed.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    THREADS_HELP,
    default_data_dir,
    machine_line,
    print_table,
    set_threads,
    torchvision_mnist_root,
)
from torch import nn

from robustkit.config import config_from_dict
from robustkit.data import Dataset, Split, load_dataset, validation_indices
from robustkit.models import build_model
from robustkit.training import train
from robustkit.training.loop import accuracy

LR, MOMENTUM, BATCH = 0.1, 0.9, 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="folder with the MNIST IDX files (default: $ROBUSTKIT_DATA)")
    parser.add_argument("--model", default="mlp",
                        choices=["softmax", "mlp", "cnn", "madry-cnn", "strided-cnn"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--no-workers2", action="store_true",
                        help="skip the DataLoader num_workers=2 variant")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 6,000 training images, 1 epoch, 1 round")
    return parser.parse_args(argv)


def robustkit_run(arch: str, data: Dataset, epochs: int, seed: int, val_size: int
                  ) -> tuple[float, nn.Module, dict[str, float]]:
    config = config_from_dict({
        "name": "train-speed", "seed": seed, "device": "cpu",
        "data": {"val_size": val_size},
        "model": {"arch": arch},
        "train": {"method": "standard", "epochs": epochs, "batch_size": BATCH,
                  "optimizer": "sgd", "lr": LR, "momentum": MOMENTUM, "schedule": "constant"},
    })
    with tempfile.TemporaryDirectory(prefix="rk-train-speed-") as out:
        start = time.perf_counter()
        result = train(config, out_dir=Path(out), data=data, progress=False)
        seconds = time.perf_counter() - start
    # train() turns deterministic algorithms on globally; the plain loop runs with torch defaults.
    torch.use_deterministic_algorithms(False)
    extra = {"epoch_loop_s": float(result.metrics["seconds"].sum())}
    return seconds, result.model, extra


def plain_run(arch: str, train_set: Any, test_set: Any, epochs: int, seed: int, workers: int
              ) -> tuple[float, nn.Module, float]:
    """The PyTorch MNIST example's loop (cross-entropy on logits = log_softmax + nll_loss)."""
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    model = build_model(arch)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    train_loader = DataLoader(train_set, batch_size=BATCH, shuffle=True, num_workers=workers)
    test_loader = DataLoader(test_set, batch_size=1000, num_workers=workers)
    start = time.perf_counter()
    test_acc = 0.0
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += int((model(x).argmax(1) == y).sum())
        test_acc = correct / len(test_set)
    return time.perf_counter() - start, model.eval(), test_acc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torchvision
    from torch.utils.data import Subset
    from torchvision import transforms

    set_threads(args.threads)
    if args.quick:
        args.epochs, args.repeats = 1, 1

    t0 = time.perf_counter()
    data = load_dataset("mnist", args.data_dir, "cpu", val_size=args.val_size)
    rk_load = time.perf_counter() - t0
    train_idx, _ = validation_indices(60_000, args.val_size)
    if args.quick:
        keep = 6000
        data = Dataset(data.name, data.classes, data.train.take(keep), data.val.take(1000),
                       data.test, data.source)
        train_idx = train_idx[:keep]

    with tempfile.TemporaryDirectory(prefix="rk-torchvision-") as tmp:
        root = torchvision_mnist_root(data.source, Path(tmp))
        t0 = time.perf_counter()
        tv_train = torchvision.datasets.MNIST(str(root), train=True, download=False,
                                              transform=transforms.ToTensor())
        tv_test = torchvision.datasets.MNIST(str(root), train=False, download=False,
                                             transform=transforms.ToTensor())
        tv_load = time.perf_counter() - t0
        train_set = Subset(tv_train, train_idx.tolist())
        check = torch.stack([tv_train[int(i)][0] for i in train_idx[:64]])
        if not torch.equal(check, data.train.images[:64]):
            print("error: torchvision and robustkit images differ", file=sys.stderr)
            return 1

        variants = ["robustkit", "plain, num_workers=0"]
        if not args.no_workers2:
            variants.append("plain, num_workers=2")
        times: dict[str, list[float]] = {v: [] for v in variants}
        accs: dict[str, float] = {}
        loop_acc: dict[str, float] = {}
        rk_loop: list[float] = []
        for rnd in range(args.repeats):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for variant in order:
                if variant == "robustkit":
                    seconds, model, extra = robustkit_run(args.model, data, args.epochs,
                                                          args.seed, args.val_size)
                    rk_loop.append(extra["epoch_loop_s"])
                else:
                    workers = int(variant.rsplit("=", 1)[1])
                    seconds, model, acc = plain_run(args.model, train_set, tv_test, args.epochs,
                                                    args.seed, workers)
                    loop_acc[variant] = acc
                times[variant].append(seconds)
                accs[variant] = accuracy(model, Split(data.test.images, data.test.labels))
                print(f"  round {rnd + 1}/{args.repeats}  {variant:<22} {seconds:7.2f} s",
                      file=sys.stderr, flush=True)

    n_train = len(train_idx)
    print(f"train_speed: model={args.model} epochs={args.epochs} train images={n_train} "
          f"batch={BATCH} SGD lr={LR} momentum={MOMENTUM} seed={args.seed} "
          f"rounds={args.repeats}{'  [QUICK]' if args.quick else ''}")
    print(machine_line())
    print()
    rk_median = statistics.median(times["robustkit"])
    rows = []
    for variant in variants:
        med = statistics.median(times[variant])
        rows.append([variant, f"{med:.2f}", f"{min(times[variant]):.2f}",
                     f"{accs[variant]:.4f}", f"{med / rk_median:.2f}x"])
    print_table(["loop", "wall s (median)", "min s", "test acc", "time / robustkit"], rows)
    print()
    print(f"robustkit's time is the whole train() call: {args.epochs} epoch(s) of steps plus "
          "val+test accuracy every epoch, checkpoints, metrics, resume state and reloading the "
          f"best model (epoch loops alone: {statistics.median(rk_loop):.2f} s median).")
    print("plain loops' time includes a DataLoader test pass every epoch "
          + ", ".join(f"({v}: test acc {a:.4f})" for v, a in loop_acc.items()) + ".")
    print(f"data loading, not in the times above: robustkit load_dataset {rk_load:.2f} s "
          f"(md5-checked, decompressed); torchvision MNIST train+test {tv_load:.2f} s "
          "(already-decompressed files).")
    plain = [v for v in variants if v != "robustkit"]
    best_plain = min(plain, key=lambda v: statistics.median(times[v]))
    ratio = statistics.median(times[best_plain]) / rk_median
    gap = accs["robustkit"] - accs[best_plain]
    verdict = "MET" if ratio >= 3.0 and gap >= -0.005 else "NOT MET"
    print(f"fastest plain loop ({best_plain}) / robustkit = {ratio:.2f}x; test accuracy "
          f"robustkit {accs['robustkit']:.4f} vs {accs[best_plain]:.4f} (diff {gap:+.4f}). "
          f"Target >= 3x at equal accuracy (within 0.5 points): {verdict}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
