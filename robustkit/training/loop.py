"""The training loop: standard and adversarial training on whole-tensor data.

One iteration draws a slice of a seeded permutation, builds the method's inputs (clean, PGD,
FGSM-RS or TRADES), takes an optimizer step and a scheduler step. Each epoch ends with clean
validation and test accuracy, robust validation accuracy for adversarial methods, a ``last``
checkpoint, a ``best`` checkpoint (best robust validation accuracy for adversarial methods,
best clean validation accuracy otherwise) and a resume state. Test accuracy is recorded but
never selects a checkpoint: without a validation split ``best`` is the last epoch, and the run
says so in its notes.

Resume state is also written every ``save_every`` seconds within an epoch. Everything random
comes from explicit generators whose states are saved, so on CPU a run that is killed and
resumed ends with bitwise the same weights as one that never stopped.

Several processes (``dist``, see :mod:`robustkit.distributed`): the model is wrapped in
``DistributedDataParallel``. Every rank draws the same seeded permutation and takes its
contiguous piece of each global batch of ``batch_size``; its loss is weighted by
``len(piece) · world / len(batch)``, so the averaged gradient is the gradient of the global
batch's mean loss, i.e. the one-process gradient up to float summation order. Rank ``r`` draws
its attack starts from seed + 1 + 1000·r (rank 0 uses the one-process stream). The per-epoch
evaluation runs replicated on every rank (same weights, same numbers); rank 0 alone writes
checkpoints, metrics and resume state (which holds every rank's attack generator).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks import attack_mode, pgd
from robustkit.checkpoint import (
    atomic_path,
    clear_state,
    load_state,
    remove_leftovers,
    save_checkpoint,
    save_state,
    write_json,
    write_text,
)
from robustkit.config import ExperimentConfig, config_hash, to_toml, training_hash
from robustkit.data import Dataset, Split, batches
from robustkit.distributed import (
    Context,
    agree,
    all_gather_object,
    all_reduce_sum,
    local_first,
    on_main,
    shard,
    wrap,
)
from robustkit.errors import RobustkitError
from robustkit.models.factory import build_network, network_spec
from robustkit.progress import Bar
from robustkit.runtime import (
    now_iso,
    provenance,
    resolve_device,
    seed_everything,
    use_deterministic_algorithms,
)
from robustkit.sources import load_configured
from robustkit.training.objectives import (
    CapturedPGD,
    PGDExamples,
    pgd_examples,
    trades_examples,
    trades_loss,
)
from robustkit.training.optim import build_optimizer, build_scheduler

COLLAPSE_DROP = 0.3  # a fall of robust validation accuracy this large below the best is flagged
PROGRESS_EVERY = 25  # steps between progress-bar refreshes (each reads the running sums back)
LAST_EPOCH = "last_epoch"  # ``selected_by`` of a run without validation data
NO_VALIDATION_NOTE = ("no validation split (data.val_size = 0): model-best is the last epoch; "
                      "test accuracy is reported but never selects a checkpoint")


def selection_metric(adversarial: bool, *, validated: bool) -> str:
    """The metrics column that picks ``model-best``, or ``LAST_EPOCH`` without validation data.

    Choosing on test accuracy would bias the reported clean accuracy upward, so the test split
    never selects: robust validation accuracy for adversarial methods, clean validation
    accuracy otherwise, and the last epoch when there is no validation split.
    """
    if adversarial:
        return "val_robust_acc"
    return "val_acc" if validated else LAST_EPOCH


@dataclass
class TrainResult:
    model: nn.Module
    metrics: pd.DataFrame
    out_dir: Path
    best: Path
    last: Path
    seconds: float
    warnings: list[str]


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 2000) -> float:
    """Top-1 accuracy in eval mode."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches(split, batch_size))
    model.train(was_training)
    return correct / max(len(split), 1)


def robust_accuracy(model: nn.Module, split: Split, *, eps: float, steps: int, seed: int,
                    batch_size: int = 1000) -> float:
    """Accuracy under L∞ PGD (cross-entropy, step 2.5ε/steps, one random start)."""
    if eps == 0:
        return accuracy(model, split)
    generator = torch.Generator(device=split.images.device).manual_seed(seed)
    robust = 0
    for x, y in batches(split, batch_size):
        result = pgd(model, x, y, eps=eps, steps=steps, generator=generator)
        robust += int((~result.success).sum())
    return robust / max(len(split), 1)


@torch.no_grad()
def update_average(averaged: nn.Module, model: nn.Module, decay: float, iteration: int) -> None:
    """The bias-corrected exponential moving average of the weights after step t = 0, 1, …

    θ̄_t = Σ_{s≤t} d^{t−s} θ_s · (1 − d) / (1 − d^{t+1}), a weighted mean of the iterates with
    no weight left on the initialisation (Adam's bias correction). As a recursion,
    θ̄_t = θ̄_{t−1} + w_t·(θ_t − θ̄_{t−1}) with w_t = (1 − d) / (1 − d^{t+1}) (w_0 = 1).
    Buffers are copied, not averaged.
    """
    weight = (1 - decay) / (1 - decay ** (iteration + 1))
    for p_avg, p in zip(averaged.parameters(), model.parameters(), strict=True):
        p_avg.lerp_(p, weight)
    for b_avg, b in zip(averaged.buffers(), model.buffers(), strict=True):
        b_avg.copy_(b)


def current_eps(cfg: ExperimentConfig, iteration: int, steps_per_epoch: int) -> float:
    """ε ramps linearly from 0 over the first ``warmup_epochs`` epochs, then stays at ε."""
    adv = cfg.train.adversarial
    if adv.warmup_epochs == 0:
        return adv.eps
    return adv.eps * min(1.0, (iteration + 1) / (adv.warmup_epochs * steps_per_epoch))


def training_loss(model: nn.Module, cfg: ExperimentConfig, x: Tensor, y: Tensor, eps: float,
                  generator: torch.Generator, inner: nn.Module | None = None,
                  examples: PGDExamples = pgd_examples) -> tuple[Tensor, Tensor]:
    """The method's loss on one batch, and the logits used for the running accuracy.

    ``inner`` is the model the attack examples are built on when ``model`` is a wrapper whose
    forward must run once per backward (``DistributedDataParallel``); default ``model``.
    ``examples`` builds the PGD / FGSM-RS examples: :func:`pgd_examples`, or the same
    iterations replayed from a CUDA graph (:class:`CapturedPGD`).
    """
    train, adv = cfg.train, cfg.train.adversarial
    attacked = model if inner is None else inner
    smoothing = train.label_smoothing
    if train.method == "standard" or eps == 0:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=smoothing), logits
    if train.method == "trades":
        step = adv.step_size or 2.5 * eps / adv.steps
        x_adv = trades_examples(attacked, x, eps=eps, steps=adv.steps, step_size=step,
                                generator=generator)
        return trades_loss(model, x, y, x_adv, adv.beta)
    if train.method == "fgsm-rs":
        x_adv = examples(attacked, x, y, eps=eps, steps=1,
                         step_size=adv.step_size or 1.25 * eps, random_start=True,
                         generator=generator)
    else:
        x_adv = examples(attacked, x, y, eps=eps, steps=adv.steps,
                         step_size=adv.step_size or 2.5 * eps / adv.steps,
                         random_start=adv.random_start, generator=generator)
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
    if adv.clean_fraction > 0:
        clean = F.cross_entropy(model(x), y, label_smoothing=smoothing)
        loss = (1 - adv.clean_fraction) * loss + adv.clean_fraction * clean
    return loss, logits


class Autocast(nn.Module):
    """Runs ``model`` under autocast at ``dtype`` and returns fp32 logits (mixed precision)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.device_type, self.dtype = model, device.type, dtype

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            logits: Tensor = self.model(x)
        return logits.float()


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Set to 0 to build PGD-AT examples eagerly on CUDA too.
CUDA_GRAPHS_ENV = "ROBUSTKIT_CUDA_GRAPHS"


def examples_builder(model: nn.Module, attacked: nn.Module, cfg: ExperimentConfig,
                     device: torch.device, dist: Context | None) -> PGDExamples:
    """How PGD-AT / FGSM-RS examples are built: replayed from CUDA graphs
    (:class:`CapturedPGD`) for a one-process fp32 run on CUDA, where a step on a small batch is
    bound by kernel launches; :func:`pgd_examples` otherwise, or with
    ``ROBUSTKIT_CUDA_GRAPHS=0``."""
    if (device.type == "cuda" and dist is None and attacked is model
            and cfg.train.method in ("pgd-at", "fgsm-rs")
            and os.environ.get(CUDA_GRAPHS_ENV, "1") != "0"):
        return CapturedPGD(model)
    return pgd_examples


def loss_models(model: nn.Module, net: nn.Module, cfg: ExperimentConfig, device: torch.device
                ) -> tuple[nn.Module, nn.Module]:
    """(the module the training loss runs through, the module attacks differentiate).

    ``train.precision`` bf16/fp16 puts the training forward under autocast; attack gradients
    stay in fp32 unless ``train.amp_attacks``. ``train.compile`` compiles the loss module.
    """
    loss_net, attacked = net, model
    if cfg.train.precision != "fp32":
        dtype = PRECISIONS[cfg.train.precision]
        loss_net = Autocast(net, device, dtype)
        if cfg.train.amp_attacks:
            attacked = Autocast(model, device, dtype)
    if cfg.train.compile:
        loss_net = typing.cast(nn.Module, torch.compile(loss_net))
    return loss_net, attacked


#: What a finished run leaves in its folder; a fresh start removes them first, so that until its
#: first epoch ends the folder never pairs the new config with an older run's weights or metrics.
RUN_OUTPUTS = ("model-best.safetensors", "model-best.json", "model-last.safetensors",
               "model-last.json", "metrics.csv", "manifest.json")


def _remove_previous_outputs(out_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)


def train(
    config: ExperimentConfig,
    *,
    out_dir: Path,
    seed: int | None = None,
    device: str | torch.device | None = None,
    data: Dataset | None = None,
    progress: bool = True,
    resume: bool = True,
    save_every: float = 60.0,
    log: Any = None,
    dist: Context | None = None,
) -> TrainResult:
    """Train ``config``'s model with its method; write checkpoints and metrics into ``out_dir``.

    ``out_dir`` receives ``config.toml``, ``manifest.json``, ``metrics.csv``,
    ``model-last.{safetensors,json}`` and ``model-best.{safetensors,json}``. A fresh start
    (no resume state of this config and seed) first removes those left by an earlier run.

    ``dist``: train with DistributedDataParallel in a torch.distributed group (every rank calls
    ``train`` with the same arguments and the device of its context); rank 0 writes ``out_dir``.
    """
    seed = config.seed if seed is None else seed
    device = resolve_device(device if device is not None else config.device)
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    main = rank == 0
    say = (log if main else None) or (lambda message: None)
    progress = progress and main
    train_cfg, adv = config.train, config.train.adversarial
    adversarial = train_cfg.method != "standard"
    out_dir = Path(out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir)  # temporary files of a killed run
    fingerprint = training_hash(config, seed)

    use_deterministic_algorithms()
    seed_everything(seed)
    if data is None:
        data = local_first(lambda: load_configured(config.data, device),
                           dist)  # one download per node at most
    elif data.train.images.device != device:
        raise RobustkitError(f"data lives on {data.train.images.device}, training on {device}")
    if len(data.val) == 0 and adversarial:
        raise RobustkitError("adversarial training selects models on validation data: "
                             "set data.val_size > 0")
    selected_by = selection_metric(adversarial, validated=len(data.val) > 0)
    network = network_spec(config.model.arch, config.model.factory, config.model.args,
                           config.model.app_dir, in_shape=data.in_shape)
    model = build_network(network, len(data.classes)).to(device)
    optimizer = build_optimizer(model, train_cfg)
    steps_per_epoch = -(-len(data.train) // train_cfg.batch_size)
    scheduler = build_scheduler(optimizer, train_cfg, steps_per_epoch)
    order_generator = torch.Generator().manual_seed(seed)
    attack_generator = torch.Generator(device=device).manual_seed(seed + 1 + 1000 * rank)
    averaged = copy.deepcopy(model) if train_cfg.ema_decay is not None else None
    net = wrap(model, dist)  # the forward/backward of the training loss; attacks use ``model``
    loss_net, attacked = loss_models(model, net, config, device)
    examples = examples_builder(model, attacked, config, device, dist)
    # fp16 needs loss scaling against gradient underflow; a disabled scaler is a no-op
    scaler = torch.amp.GradScaler(device.type, enabled=train_cfg.precision == "fp16")

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    best_score, start_epoch, start_step, order = -1.0, 0, 0, None
    elapsed_before = 0.0
    resumed_sums: tuple[float, int, int] = (0.0, 0, 0)  # train loss, correct, seen so far
    state = on_main(lambda: load_state(out_dir) if resume else None, dist)
    if state is not None and state.get("fingerprint") == fingerprint:
        saved_world = int(state.get("world_size", 1))
        if saved_world != world:
            how = ("without torchrun" if saved_world == 1
                   else f"under torchrun --nproc-per-node … with {saved_world} processes in all")
            raise RobustkitError(
                f"{out_dir} holds the resume state of a {saved_world}-process run: resume it "
                f"{how}, or start over (robustkit train --fresh, robustkit run --retrain)"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        order_generator.set_state(state["order_generator"])
        attack_generator.set_state(state["attack_generators"][rank] if dist is not None
                                   else state["attack_generator"])
        start_epoch, start_step, order = state["epoch"], state["step"], state["order"]
        rows, notes = list(state["rows"]), list(state["notes"])
        best_score, elapsed_before = state["best_score"], state["elapsed"]
        if state.get("running_sums"):  # the interrupted epoch's sums (mid-epoch states)
            loss_so_far, correct_so_far, seen_so_far = state["running_sums"][rank]
            resumed_sums = (float(loss_so_far), int(correct_so_far), int(seen_so_far))
        say(f"resuming from epoch {start_epoch + 1}, step {start_step}")
    elif state is not None:
        say("ignoring a resume state from a different config or seed")
    if main and not rows and start_step == 0:
        _remove_previous_outputs(out_dir)
    if selected_by == LAST_EPOCH and NO_VALIDATION_NOTE not in notes:
        notes.append(NO_VALIDATION_NOTE)
        say(f"note: {NO_VALIDATION_NOTE}")

    info_base = {**network, "num_classes": len(data.classes),
                 **({"data_sha256": data.provenance["data_sha256"]}
                    if "data_sha256" in data.provenance else {}),
                 "dataset": data.name, "config": config_hash(config),
                 "training_hash": fingerprint, "seed": seed}
    if main:
        write_text(out_dir / "config.toml", to_toml(dataclasses.replace(config, seed=seed,
                                                                         seeds=None)))
    manifest = {"config_hash": config_hash(config), "training_hash": fingerprint,
                "command": "train", "start": now_iso(), **provenance(device, seed)}

    started = time.perf_counter()
    last_save = started

    def snapshot(epoch: int, step: int, current_order: Tensor | None,
                 sums: tuple[float, int, int] = (0.0, 0, 0)) -> None:
        extra: dict[str, Any] = {"running_sums": [list(sums)]}
        if dist is not None:  # a collective: every rank's generator and sums go into the state
            extra = {"world_size": world, "attack_generators": all_gather_object(
                attack_generator.get_state(), dist),
                "running_sums": all_gather_object(list(sums), dist)}
        if not main:
            return
        save_state(out_dir, {
            "fingerprint": fingerprint, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "averaged": averaged.state_dict() if averaged is not None else None,
            "scaler": scaler.state_dict(), "order_generator": order_generator.get_state(),
            "attack_generator": attack_generator.get_state(), "epoch": epoch, "step": step,
            "order": current_order, "rows": rows, "notes": notes, "best_score": best_score,
            "elapsed": elapsed_before + time.perf_counter() - started, **extra,
        })

    for epoch in range(start_epoch, train_cfg.epochs):
        epoch_start = time.perf_counter()
        if order is None or start_step == 0:
            order = torch.randperm(len(data.train), generator=order_generator)
        device_order = order.to(device)
        model.train()
        # running sums stay on the device (no host sync per step); float64 like Python floats;
        # a mid-epoch resume starts from the interrupted epoch's sums
        loss_so_far, correct_so_far, seen = resumed_sums if start_step > 0 else (0.0, 0, 0)
        loss_total = torch.tensor(loss_so_far, dtype=torch.float64, device=device)
        correct_total = torch.tensor(correct_so_far, dtype=torch.int64, device=device)
        with Bar(f"epoch {epoch + 1}/{train_cfg.epochs}", steps_per_epoch, progress) as bar:
            bar.advance(start_step)
            for step in range(start_step, steps_per_epoch):
                index = device_order[step * train_cfg.batch_size:(step + 1) * train_cfg.batch_size]
                global_len = len(index)
                if dist is not None:
                    index = index[shard(global_len, rank, world)]
                x, y = data.train.images[index], data.train.labels[index]
                eps = current_eps(config, epoch * steps_per_epoch + step, steps_per_epoch)
                if len(y) == 0:  # fewer samples than ranks: take part in the all-reduce only
                    logits = net(x)
                    loss, objective = logits.sum() * 0.0, logits.sum() * 0.0
                else:
                    loss, logits = training_loss(loss_net, config, x, y, eps, attack_generator,
                                                 inner=attacked, examples=examples)
                    objective = loss if dist is None else loss * (len(y) * world / global_len)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(objective).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if averaged is not None and train_cfg.ema_decay is not None:
                    update_average(averaged, model, train_cfg.ema_decay,
                                   epoch * steps_per_epoch + step)
                loss_total += loss.detach().double() * len(y)
                correct_total += (logits.argmax(1) == y).sum()
                seen += len(y)
                if bar.enabled and (step % PROGRESS_EVERY == 0 or step + 1 == steps_per_epoch):
                    shown = max(seen, 1)  # a rank's first piece is empty when batch < world
                    bar.advance(step + 1 - bar.done, f"loss {float(loss_total) / shown:.4f} "
                                f"acc {int(correct_total) / shown:.4f}")
                due = time.perf_counter() - last_save > save_every
                if step + 1 < steps_per_epoch and agree(due, dist):
                    snapshot(epoch, step + 1, order,
                             (float(loss_total), int(correct_total), seen))
                    last_save = time.perf_counter()
        start_step = 0
        loss_sum, correct = float(loss_total), int(correct_total)
        if dist is not None:
            loss_sum, total_correct, total_seen = all_reduce_sum([loss_sum, correct, seen], dist)
            correct, seen = int(total_correct), int(total_seen)

        evaluated = averaged if averaged is not None else model  # what is validated and saved
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "val_acc": accuracy(evaluated, data.val) if len(data.val) else float("nan"),
            "test_acc": accuracy(evaluated, data.test),
        }
        if adversarial:
            row["eps"] = current_eps(config, (epoch + 1) * steps_per_epoch - 1, steps_per_epoch)
            row["val_robust_acc"] = robust_accuracy(
                evaluated, data.val.take(adv.val_n), eps=adv.eps, steps=adv.val_steps,
                seed=config.evaluate.seed)
        score = float(epoch + 1) if selected_by == LAST_EPOCH else row[selected_by]
        row["seconds"] = time.perf_counter() - epoch_start
        rows.append(row)
        if adversarial and best_score > 0 and score < best_score - COLLAPSE_DROP:
            note = (f"epoch {epoch + 1}: robust validation accuracy collapsed from "
                    f"{best_score:.3f} to {score:.3f} (catastrophic overfitting?); the best "
                    "checkpoint stays the one used downstream")
            notes.append(note)
            if main:
                warnings.warn(note, stacklevel=2)
            say(f"warning: {note}")
        info = {**info_base, "epoch": epoch + 1, "metrics": row}
        if main:
            save_checkpoint(out_dir / "model-last", evaluated, info)
        if score > best_score:
            best_score = score
            if main:
                save_checkpoint(out_dir / "model-best", evaluated,
                                {**info, "selected_by": selected_by})
        if main:
            with atomic_path(out_dir / "metrics.csv") as tmp:
                pd.DataFrame(rows).to_csv(tmp, index=False)
        snapshot(epoch + 1, 0, None)
        last_save = time.perf_counter()
        say(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items()))

    seconds = elapsed_before + time.perf_counter() - started
    metrics = pd.DataFrame(rows)
    if main:
        write_json(out_dir / "manifest.json", {**manifest, "end": now_iso(), "seconds": seconds,
                                               "warnings": notes, "processes": world})
        clear_state(out_dir)
    best_model = build_network(network, len(data.classes)).to(device)
    from robustkit.checkpoint import load_tensors

    best_state = on_main(lambda: load_tensors(out_dir / "model-best.safetensors"), dist)
    best_model.load_state_dict(best_state)
    return TrainResult(best_model.eval(), metrics, out_dir, out_dir / "model-best",
                       out_dir / "model-last", seconds, notes)


__all__ = ["TrainResult", "accuracy", "attack_mode", "robust_accuracy", "train"]
