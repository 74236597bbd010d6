"""Attack and adversarial-training throughput per device, the share of the device's peak, and
where the time goes.

Modes (all measure the CPU and, when present, CUDA in the same process, so ratios are fair):

* default: for each device, the measured peak of a large matmul; FLOPs per image from the
  model (``torch.utils.flop_counter``); PGD and APGD image-steps/s (no early stop, so every
  image takes every step) at each batch size, with the best one marked; on CUDA also
  channels-last, bf16 autocast and ``cudnn.benchmark`` at the best batch; PGD-AT seconds per
  epoch for the committed recipe (``experiments/mnist_cnn_pgd_at.toml``: 430 batches of 128,
  10 PGD steps each), extrapolated from ``--at-batches`` batches, plus the per-epoch
  validation it adds;
* ``--compile``: the same PGD and PGD-AT timings with the model under
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs; fixed shapes), CUDA only;
* ``--profile``: ``torch.profiler`` tables of one PGD step, one APGD step and one PGD-AT
  training step at the default and a large batch: wall time, device-busy time and kernel
  launches per step, and the operators that take the time;
* ``--evaluate CHECKPOINT``: the full-test-set strong evaluation (APGD-100 × 2 restarts, CE and
  margin, ε = 0.3) of a trained model, timed, with robust accuracy per attack and overall.

Every timed region ends with ``torch.cuda.synchronize()``. ``--json PATH`` also writes every
figure as JSON. ``--smoke`` shrinks every size so the whole script runs in seconds on a CPU.

    python benchmarks/device_throughput.py [--model cnn] [--json out.json]
    python benchmarks/device_throughput.py --profile
    python benchmarks/device_throughput.py --evaluate runs/x/seed-0/model-best.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks import apgd, pgd
from robustkit.config import AttackConfig, ExperimentConfig, load_config
from robustkit.models import build_model
from robustkit.training.loop import Autocast, accuracy, robust_accuracy, training_loss
from robustkit.training.objectives import CapturedPGD, pgd_examples
from robustkit.training.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "experiments" / "mnist_cnn_pgd_at.toml"
EPOCH_IMAGES = 55_000  # MNIST training images after the 5,000-image validation split
EPS = 0.3
STRONG = (AttackConfig(name="apgd", steps=100, restarts=2, loss="ce"),
          AttackConfig(name="apgd", steps=100, restarts=2, loss="margin"))

Row = dict[str, Any]


def say(text: str = "") -> None:
    print(text, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object], repeats: int = 1,
          warmup: int = 1) -> float:
    """Seconds per call after ``warmup`` calls, the device synchronised around the timing."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- peak and FLOPs


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, tf32: bool = False) -> float:
    """FLOP/s of an ``n×n`` matmul at ``dtype`` (``tf32``: fp32 inputs on TF32 tensor cores)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        repeats = 20 if device.type == "cuda" else 3
        seconds = timed(device, lambda: a @ b, repeats=repeats, warmup=2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / seconds


def peaks(device: torch.device, n: int) -> dict[str, float]:
    found = {"fp32": matmul_peak(device, torch.float32, n)}
    if device.type == "cuda":
        found["tf32"] = matmul_peak(device, torch.float32, n, tf32=True)
        found["bf16"] = matmul_peak(device, torch.bfloat16, n)
    return found


def flops_per_image(model: nn.Module, device: torch.device, *, weights: bool) -> float:
    """FLOPs of one forward pass plus the backward pass to the input (``weights``: and to the
    weights, as a training step needs), per image, counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(weights)
    x = torch.rand(4, 1, 28, 28, device=device, requires_grad=True)
    try:
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x), torch.zeros(4, dtype=torch.long, device=device)).backward()
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    return float(counter.get_total_flops()) / 4


# --------------------------------------------------------------------------- attack throughput


def attack_rate(device: torch.device, model: nn.Module, attack: str, batch: int,
                steps: int) -> float:
    """Image-steps/s of ``attack`` (pgd|apgd) on a random batch, every image taking every step."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, device=device, generator=generator)
    y = torch.randint(0, 10, (batch,), device=device, generator=generator)
    fn = pgd if attack == "pgd" else apgd
    seconds = timed(device, lambda: fn(model, x, y, eps=EPS, steps=steps, early_stop=False,
                                       generator=generator))
    return batch * steps / seconds


def with_option(model: nn.Module, device: torch.device, option: str) -> nn.Module:
    """The model as the option runs it: fp32 | channels_last | bf16 | cudnn_benchmark | compile."""
    torch.backends.cudnn.benchmark = option == "cudnn_benchmark"
    if option == "channels_last":
        return model.to(memory_format=torch.channels_last)
    if option == "bf16":
        return Autocast(model, device, torch.bfloat16)
    if option == "compile":
        return torch.compile(model, mode="reduce-overhead")  # type: ignore[return-value]
    return model


def attack_table(device: torch.device, arch: str, batches: list[int], steps: int,
                 options: list[str], step_flops: float, peak: dict[str, float]) -> list[Row]:
    rows: list[Row] = []

    def measure(attack: str, batch: int, option: str) -> None:
        torch.manual_seed(0)
        model = with_option(build_model(arch).to(device).eval(), device, option)
        try:
            rate = attack_rate(device, model, attack, batch, steps)
        except Exception as error:  # an option a device or torch build lacks: say, go on
            say(f"  {attack} batch {batch} {option}: failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:120]})")
            return
        finally:
            torch.backends.cudnn.benchmark = False
        row = {"device": device.type, "attack": attack, "batch": batch, "option": option,
               "image_steps_per_s": rate, "ms_per_step": 1e3 * batch / rate,
               "tflops": rate * step_flops / 1e12}
        for name, value in peak.items():
            row[f"of_{name}_peak"] = rate * step_flops / value
        rows.append(row)
        say(f"  {attack:<4} batch {batch:>6} {option:<15} {rate:>14,.0f} image-steps/s  "
            f"{row['ms_per_step']:8.2f} ms/step  {row['tflops']:7.2f} TFLOP/s")

    for attack in ("pgd", "apgd"):
        for batch in batches:
            measure(attack, batch, "fp32")
        best = max((r for r in rows if r["attack"] == attack and r["option"] == "fp32"),
                   key=lambda r: r["image_steps_per_s"], default=None)
        if best is None:
            continue
        best["best"] = True
        for option in options:
            measure(attack, best["batch"], option)
    return rows


# --------------------------------------------------------------------------- PGD-AT


def recipe(smoke: bool) -> ExperimentConfig:
    overrides = ["train.adversarial.val_n=32", "train.adversarial.val_steps=2"] if smoke else []
    return load_config(RECIPE, overrides)


def pgd_at_epoch(device: torch.device, cfg: ExperimentConfig, batches: int,
                 option: str = "fp32", deterministic: bool = True, graphs: bool = False) -> Row:
    """Seconds per epoch of the recipe's training steps (its loss, optimizer and schedule) from
    ``batches`` batches, and the per-epoch validation (clean val + test accuracy, PGD robust
    accuracy on ``val_n`` images) on random images of the same shapes. ``graphs``: the
    examples replayed from CUDA graphs, as ``robustkit train`` does on CUDA."""
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.manual_seed(0)
    model = build_model(cfg.model.arch).to(device)
    net = with_option(model, device, option) if option != "fp32" else model
    optimizer = build_optimizer(model, cfg.train)
    steps_per_epoch = -(-EPOCH_IMAGES // cfg.train.batch_size)
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch)
    generator = torch.Generator(device=device).manual_seed(1)
    size = cfg.train.batch_size
    images = torch.rand(batches * size, 1, 28, 28, device=device, generator=generator)
    labels = torch.randint(0, 10, (batches * size,), device=device, generator=generator)
    eps = cfg.train.adversarial.eps
    examples = CapturedPGD(net) if graphs else pgd_examples

    def step(i: int) -> None:
        x, y = images[i * size:(i + 1) * size], labels[i * size:(i + 1) * size]
        loss, _ = training_loss(net, cfg, x, y, eps, generator, inner=net, examples=examples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    model.train()
    try:
        step(0)  # warm-up (and compilation)
        synchronize(device)
        start = time.perf_counter()
        for i in range(1, batches):
            step(i)
        synchronize(device)
        per_step = (time.perf_counter() - start) / max(batches - 1, 1)
        val = cfg.train.adversarial
        from robustkit.data import Split

        val_split = Split(images[:val.val_n], labels[:val.val_n])
        clean_split = Split(images[:min(len(images), 15_000)], labels[:min(len(images), 15_000)])
        started = time.perf_counter()
        robust_accuracy(model, val_split, eps=val.eps, steps=val.val_steps, seed=0)
        accuracy(model, clean_split)
        synchronize(device)
        validation = time.perf_counter() - started
    finally:
        torch.use_deterministic_algorithms(False)
    if isinstance(examples, CapturedPGD) and examples.failed:
        say(f"  PGD-AT graphs failed, measured eager: {examples.failed}")
    return {"device": device.type, "option": option, "deterministic": deterministic,
            "graphs": graphs and isinstance(examples, CapturedPGD) and not examples.failed,
            "batches_timed": batches - 1, "ms_per_batch": 1e3 * per_step,
            "epoch_steps_s": per_step * steps_per_epoch, "validation_s": validation,
            "epoch_s": per_step * steps_per_epoch + validation,
            "run_s_12_epochs": 12 * (per_step * steps_per_epoch + validation)}


def show_at(row: Row) -> None:
    say(f"  PGD-AT {row['option']:<8} deterministic={row['deterministic']!s:<5} "
        f"graphs={row['graphs']!s:<5} "
        f"{row['ms_per_batch']:7.2f} ms/batch -> {row['epoch_steps_s']:7.2f} s of steps + "
        f"{row['validation_s']:5.2f} s validation = {row['epoch_s']:7.2f} s/epoch, "
        f"{row['run_s_12_epochs']:7.1f} s for 12 epochs")


# --------------------------------------------------------------------------- modes


def devices(cpu: bool = True) -> list[torch.device]:
    found = [torch.device("cpu")] if cpu else []
    if torch.cuda.is_available():
        found.append(torch.device("cuda", torch.cuda.current_device()))
    return found


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"attack": [], "pgd_at": [], "peak": {}, "flops": {}}
    cfg = recipe(args.smoke)
    for device in devices():
        cuda = device.type == "cuda"
        say(f"\n== {device.type}: {device_name(device)}")
        peak = peaks(device, args.matmul_n if cuda else min(args.matmul_n, args.cpu_matmul_n))
        out["peak"][device.type] = peak
        say("  measured matmul peak: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s"
                                                   for k, v in peak.items()))
        model = build_model(args.model).to(device)
        step_flops = flops_per_image(model, device, weights=False)
        train_flops = flops_per_image(model, device, weights=True)
        out["flops"] = {"attack_step_per_image": step_flops, "train_step_per_image": train_flops}
        say(f"  {args.model}: {step_flops / 1e6:.2f} MFLOP per image-step of an attack "
            f"(forward + input gradient), {train_flops / 1e6:.2f} MFLOP per training image")
        batches = args.batches if cuda else args.cpu_batches
        options = [o for o in args.options if o] if cuda else []
        out["attack"] += attack_table(device, args.model, batches, args.steps, options,
                                      step_flops, peak)
        at_batches = args.at_batches if cuda else args.cpu_at_batches
        at_rows = [pgd_at_epoch(device, cfg, at_batches, graphs=cuda)]
        if cuda:  # what train() does first; then without graphs, without determinism
            at_rows.append(pgd_at_epoch(device, cfg, at_batches))
            at_rows.append(pgd_at_epoch(device, cfg, at_batches, deterministic=False,
                                        graphs=True))
        for row in at_rows:
            # 10 attack steps (forward + input gradient) and one training forward/backward
            per_image = cfg.train.adversarial.steps * step_flops + train_flops
            row["tflops"] = per_image * cfg.train.batch_size / (row["ms_per_batch"] / 1e3) / 1e12
            show_at(row)
        out["pgd_at"] += at_rows
    summary(out)
    return out


def summary(out: dict[str, Any]) -> None:
    say("\n== summary (same run)")
    best: dict[tuple[str, str], Row] = {}
    default: dict[tuple[str, str], Row] = {}
    for row in out["attack"]:
        key = (row["device"], row["attack"])
        if row["option"] == "fp32" and row["batch"] == min(
                r["batch"] for r in out["attack"] if r["device"] == row["device"]):
            default[key] = row
        if key not in best or row["image_steps_per_s"] > best[key]["image_steps_per_s"]:
            best[key] = row
    for (dev, attack), row in sorted(best.items()):
        base = default.get((dev, attack))
        base_text = (f"batch {base['batch']}: {base['image_steps_per_s']:,.0f}"
                     if base else "-")
        peaks_text = ", ".join(f"{100 * row[k]:.1f}% of {k[3:-5]}" for k in row
                               if k.startswith("of_"))
        say(f"  {dev:<4} {attack:<4} default {base_text} image-steps/s; best batch "
            f"{row['batch']} {row['option']}: {row['image_steps_per_s']:,.0f} ({peaks_text})")
    cpu = {r["attack"]: r for (d, _), r in best.items() if d == "cpu"}
    for (dev, attack), row in sorted(best.items()):
        if dev == "cuda" and attack in cpu:
            ratio = row["image_steps_per_s"] / cpu[attack]["image_steps_per_s"]
            say(f"  cuda/cpu {attack}: {ratio:.1f}x (best against best)")
    for row in out["pgd_at"]:
        say(f"  {row['device']:<4} PGD-AT recipe: {row['epoch_s']:.2f} s/epoch, "
            f"{row['run_s_12_epochs']:.1f} s for 12 epochs (graphs={row['graphs']}, "
            f"deterministic={row['deterministic']}, {row['tflops']:.2f} TFLOP/s in the steps)")


def compiled(args: argparse.Namespace) -> dict[str, Any]:
    """PGD and PGD-AT with the model under torch.compile(mode="reduce-overhead"), CUDA only."""
    out: dict[str, Any] = {"attack": [], "pgd_at": []}
    cuda = devices(cpu=False)
    if not cuda:
        say("--compile: no CUDA device here, nothing measured")
        return out
    device = cuda[0]
    model = build_model(args.model).to(device)
    step_flops = flops_per_image(model, device, weights=False)
    for batch in (args.batches[0], args.batches[-1]):
        for option in ("fp32", "compile"):
            torch.manual_seed(0)
            net = with_option(build_model(args.model).to(device).eval(), device, option)
            started = time.perf_counter()
            try:
                rate = attack_rate(device, net, "pgd", batch, args.steps)
            except Exception as error:
                say(f"  pgd batch {batch} {option}: failed ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:120]})")
                continue
            row = {"device": "cuda", "attack": "pgd", "batch": batch, "option": option,
                   "image_steps_per_s": rate, "tflops": rate * step_flops / 1e12,
                   "first_call_s": time.perf_counter() - started}
            out["attack"].append(row)
            say(f"  pgd batch {batch:>6} {option:<8} {rate:>14,.0f} image-steps/s "
                f"(with warm-up/compilation {row['first_call_s']:.1f} s)")
    cfg = recipe(args.smoke)
    for option in ("fp32", "compile"):
        try:
            row = pgd_at_epoch(device, cfg, args.at_batches, option=option)
        except Exception as error:
            say(f"  PGD-AT {option}: failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:120]})")
            continue
        out["pgd_at"].append(row)
        show_at(row)
    return out


def profiled(args: argparse.Namespace) -> dict[str, Any]:
    """torch.profiler tables: one PGD step, one APGD step, one PGD-AT training step."""
    out: dict[str, Any] = {}
    cfg = recipe(args.smoke)
    for device in devices(cpu=args.smoke or not torch.cuda.is_available()):
        for batch in args.profile_batches:
            torch.manual_seed(0)
            model = build_model(args.model).to(device).eval()
            x = torch.rand(batch, 1, 28, 28, device=device)
            y = torch.randint(0, 10, (batch,), device=device)
            steps = args.profile_steps

            def attack(fn: Callable[..., Any], model: nn.Module = model, x: Tensor = x,
                       y: Tensor = y, steps: int = steps) -> Callable[[], object]:
                return lambda: fn(model, x, y, eps=EPS, steps=steps, early_stop=False)

            out |= profile_job(device, f"pgd batch {batch}", attack(pgd), steps, args)
            out |= profile_job(device, f"apgd batch {batch}", attack(apgd), steps, args)
        size = cfg.train.batch_size
        for label, graphs in (("eager", False), ("cuda-graphs", True)):
            if graphs and device.type != "cuda":
                continue
            step = training_step(device, cfg, graphs=graphs)

            def steps(step: Callable[[], object] = step) -> object:
                return [step() for _ in range(args.profile_steps)]

            out |= profile_job(device, f"pgd-at {label} batch {size}", steps,
                               args.profile_steps, args)
    return out


def training_step(device: torch.device, cfg: ExperimentConfig, *, graphs: bool
                  ) -> Callable[[], None]:
    """One PGD-AT step of the recipe (loss, backward, optimizer) on a fixed random batch."""
    torch.manual_seed(0)
    model = build_model(cfg.model.arch).to(device).train()
    optimizer = build_optimizer(model, cfg.train)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(cfg.train.batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (cfg.train.batch_size,), device=device)
    examples = CapturedPGD(model) if graphs else pgd_examples

    def step() -> None:
        loss, _ = training_loss(model, cfg, x, y, cfg.train.adversarial.eps, generator,
                                examples=examples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def profile_job(device: torch.device, name: str, fn: Callable[[], object], per: int,
                args: argparse.Namespace) -> dict[str, Any]:
    """Profile one call of ``fn`` (``per`` steps, after a warm-up call); print its table."""
    from torch.autograd import DeviceType  # type: ignore[attr-defined]
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    wall_ms = (time.perf_counter() - started) / per * 1e3
    events = prof.key_averages()
    busy_ms = sum(_self_device(e) for e in events  # kernels, as the table's own total
                  if e.device_type != DeviceType.CPU
                  and not getattr(e, "is_user_annotation", False)) / per / 1e3
    launches = sum(e.count for e in events if e.key in LAUNCHES) / per
    key = f"{device.type} {name}"
    text = f"\n== profile {key}: {wall_ms:.3f} ms wall per step"
    if cuda:
        text += (f", device busy {busy_ms:.3f} ms ({100 * busy_ms / wall_ms:.0f}%), "
                 f"{launches:.0f} kernel launches")
    say(text)
    for sort in (("self_device_time_total", "self_cuda_time_total") if cuda
                 else ("self_cpu_time_total",)):
        try:
            say(events.table(sort_by=sort, row_limit=args.profile_rows))
            break
        except (AttributeError, KeyError, TypeError):  # the name this torch version knows
            continue
    return {key: {"wall_ms": wall_ms, "device_busy_ms": busy_ms, "launches": launches}}


LAUNCHES = {"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch"}


def _self_device(event: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def strong_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    """APGD-100 × 2 (CE, margin) at ε ∈ {0, 0.3} on the test set, timed on the best device."""
    from robustkit.data import load_dataset
    from robustkit.evaluation import evaluate
    from robustkit.models import load_model

    device = devices()[-1]
    data = load_dataset("mnist", args.data_dir, device)
    split = data.test.take(args.n)
    model, _ = load_model(args.evaluate, device=device)
    synchronize(device)
    started = time.perf_counter()
    result = evaluate(model, split, STRONG, [0.0, EPS], model_name="model",
                      batch_size=args.eval_batch)
    synchronize(device)
    seconds = time.perf_counter() - started
    table = result.results
    say(f"\n== strong evaluation on {device_name(device)}: {len(split)} test images, "
        f"APGD-100x2 CE + margin at eps {EPS}: {seconds:.1f} s in all")
    rows = []
    for _, r in table.iterrows():
        cell = result.timings[(result.timings["attack"] == r["attack"])
                              & (result.timings["eps"] == r["eps"])]
        spent = float(cell["seconds"].sum()) if len(cell) else math.nan
        say(f"  {r['attack']:<18} eps {r['eps']:<4g} accuracy {r['accuracy']:.4f} "
            f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]  grad_evals {r['grad_evals']:>9,}  "
            f"{spent:6.2f} s")
        rows.append({k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
                    | {"seconds": spent})
    return {"device": device_name(device), "n": len(split), "seconds": seconds, "rows": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--steps", type=int, default=20, help="attack steps per timing")
    parser.add_argument("--batches", default="512,2048,8192,10000",
                        help="CUDA attack batches (the first is the default one)")
    parser.add_argument("--cpu-batches", default="512", help="CPU attack batches")
    parser.add_argument("--options", default="channels_last,bf16,cudnn_benchmark",
                        help="CUDA options tried at the best batch")
    parser.add_argument("--at-batches", type=int, default=300, help="PGD-AT batches on CUDA")
    parser.add_argument("--cpu-at-batches", type=int, default=8, help="PGD-AT batches on CPU")
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--cpu-matmul-n", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, all cores)")
    parser.add_argument("--compile", action="store_true", help="torch.compile timings (CUDA)")
    parser.add_argument("--profile", action="store_true", help="profiler tables")
    parser.add_argument("--profile-batches", default="512,8192")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--evaluate", metavar="CHECKPOINT", help="strong evaluation timing")
    parser.add_argument("--n", type=int, default=None, help="test images for --evaluate")
    parser.add_argument("--eval-batch", type=int, default=1000,
                        help="--evaluate batch_size (CUDA grows it to what fits)")
    parser.add_argument("--data-dir", default=os.environ.get("ROBUSTKIT_DATA"))
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a dry run")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.cpu_batches = [int(b) for b in args.cpu_batches.split(",")]
    args.profile_batches = [int(b) for b in args.profile_batches.split(",")]
    args.options = args.options.split(",")
    if args.smoke:
        args.steps, args.batches, args.cpu_batches = 2, [16, 64], [16]
        args.at_batches = args.cpu_at_batches = 3
        args.matmul_n = args.cpu_matmul_n = 256
        args.profile_batches, args.profile_steps = [16, 32], 2
        args.n = args.n or 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from robustkit.runtime import git_commit

    say(f"device_throughput: torch {torch.__version__}, robustkit {git_commit() or '?'}, "
        f"{torch.get_num_threads()} CPU threads, CUDA "
        f"{torch.version.cuda if torch.cuda.is_available() else 'not available'}"
        + (" [smoke sizes]" if args.smoke else ""))
    if args.evaluate:
        out = strong_evaluation(args)
    elif args.profile:
        out = profiled(args)
    elif args.compile:
        out = compiled(args)
    else:
        out = throughput(args)
    if not torch.cuda.is_available():
        say("no CUDA device here: measured the CPU only")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
