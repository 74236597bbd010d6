"""A robust MNIST model that robustkit did not train: plain PyTorch and torchattacks only.

The AutoAttack-grade issue asks that robustkit's ensemble match the reference AutoAttack on
models nobody here trained. This file is that model's whole story, written without importing
robustkit: the IDX files are read with gzip and numpy, the network is a 784-256-256-10 MLP
(not one of robustkit's architectures), and training is Madry-style PGD adversarial training
with torchattacks' PGD (L∞, ε = 0.1, 7 steps of 0.025, random start), Adam, fixed seed.

    python benchmarks/elsewhere_model.py --data-dir ../shared/data/mnist \\
        --out logs/elsewhere/mlp_at.safetensors          # train (about 4 minutes on 2 cores)
    robustkit attack --model elsewhere_model:mlp --app-dir benchmarks \\
        --weights logs/elsewhere/mlp_at.safetensors --attack autoattack --eps 0,0.1 --n 1000
    python benchmarks/autoattack_compare.py --checkpoint elsewhere_model:mlp \\
        --weights logs/elsewhere/mlp_at.safetensors --eps 0.1 --n 1000

``mlp()`` is the factory robustkit loads (``--model elsewhere_model:mlp``); it takes [0, 1]
images of shape [n, 1, 28, 28] and returns logits.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian header: magic, then one uint32 per dimension) as uint8."""
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def mnist(folder: Path, kind: str) -> tuple[Tensor, Tensor]:
    images = read_idx(folder / f"{kind}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{kind}-labels-idx1-ubyte.gz")
    return (torch.from_numpy(images.copy()).float().div(255).unsqueeze(1),
            torch.from_numpy(labels.copy()).long())


def main() -> None:
    import torchattacks  # the benchmark extra; only the trainer needs it

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x_train, y_train = mnist(args.data_dir, "train")
    x_test, y_test = mnist(args.data_dir, "t10k")
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    attack = torchattacks.PGD(model, eps=0.1, alpha=0.025, steps=7, random_start=True)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train))
        for start in range(0, len(order), 128):
            index = order[start:start + 128]
            model.eval()
            x_adv = attack(x_train[index], y_train[index])
            model.train()
            loss = nn.functional.cross_entropy(model(x_adv), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            clean = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1}: clean test accuracy {clean:.4f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(args.out))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
