"""Training and attack throughput on every available device (CPU, and CUDA when present).

Prints images/s for training steps (fp32, and bf16 autocast on CUDA) and image-steps/s for the
raw PGD step, per device, and the CUDA / CPU ratios measured in the same run. Every timed
region ends with ``torch.cuda.synchronize()`` on CUDA, so queued kernels are counted.

    python benchmarks/device_throughput.py [--model cnn] [--batch 512] [--steps 30]

Without a CUDA device it measures the CPU alone and says so.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from robustkit.attacks import pgd
from robustkit.models import build_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call, after one warm-up call, with the device synchronised around it."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def measure(device: torch.device, arch: str, batch: int, steps: int, precision: str
            ) -> tuple[float, float]:
    """(training images/s, PGD image-steps/s) for one device and precision."""
    torch.manual_seed(0)
    model = build_model(arch).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]

    def train_step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_seconds = timed(device, train_step, steps)
    model.eval()
    attack_seconds = timed(device, lambda: pgd(model, x, y, eps=0.3, steps=steps,
                                               early_stop=False), 1)
    return batch / train_seconds, batch * steps / attack_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = []
    for device in devices:
        for precision in ("fp32", "bf16") if device.type == "cuda" else ("fp32",):
            train_rate, attack_rate = measure(device, args.model, args.batch, args.steps,
                                              precision)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            rows.append((f"{device.type} {precision}", name, train_rate, attack_rate))
    print(f"device_throughput: model={args.model} batch={args.batch} steps={args.steps} "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'device':<12} {'name':<28} {'train img/s':>12} {'PGD img-steps/s':>16}")
    for label, name, train_rate, attack_rate in rows:
        print(f"{label:<12} {name[:28]:<28} {train_rate:>12,.0f} {attack_rate:>16,.0f}")
    cpu = rows[0]
    for label, _, train_rate, attack_rate in rows[1:]:
        print(f"{label} / cpu: training {train_rate / cpu[2]:.1f}x, "
              f"PGD {attack_rate / cpu[3]:.1f}x")
    if len(devices) == 1:
        print("no CUDA device here: measured the CPU only")


if __name__ == "__main__":
    main()
