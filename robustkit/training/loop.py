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

:func:`train` is :func:`prepare` (a fixed :class:`TrainSetup` and the mutable
:class:`~robustkit.training.state.TrainState`, which saves and restores the resume state),
:func:`begin` (resume or start fresh), then :func:`train_epoch` and :func:`end_epoch` per
epoch, and :func:`finish`.

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

import dataclasses
import os
import shutil
import time
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit.attacks import attack_mode, pgd
from robustkit.budgets import default_step_size
from robustkit.checkpoint import (
    clear_state,
    load_state,
    load_tensors,
    remove_leftovers,
    save_checkpoint,
)
from robustkit.config import ExperimentConfig, config_hash, to_toml, training_hash
from robustkit.data import Dataset, Split, batches
from robustkit.distributed import (
    Context,
    agree,
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
from robustkit.storage import atomic_path, read_json, write_json, write_text
from robustkit.training.certified import (
    certified_fraction,
    certified_loss,
    exact_float32,
    ibp_initialise,
    live_steps,
    schedule,
)
from robustkit.training.objectives import (
    CapturedPGD,
    PGDExamples,
    pgd_examples,
    trades_examples,
    trades_loss,
)
from robustkit.training.pretrained import find_pretrained, load_pretrained
from robustkit.training.state import TrainState
from robustkit.vocabulary import CERTIFIED_METHODS

COLLAPSE_DROP = 0.3  # a fall of robust validation accuracy this large below the best is flagged
PROGRESS_EVERY = 25  # steps between progress-bar refreshes (each reads the running sums back)
LAST_EPOCH = "last_epoch"  # ``selected_by`` of a run without validation data
NO_VALIDATION_NOTE = ("no validation split (data.val_size = 0): model-best is the last epoch; "
                      "test accuracy is reported but never selects a checkpoint")


def selection_metric(adversarial: bool, *, validated: bool, certified: bool = False) -> str:
    """The metrics column that picks ``model-best``, or ``LAST_EPOCH`` without validation data.

    Choosing on test accuracy would bias the reported clean accuracy upward, so the test split
    never selects: certified validation accuracy for certified training, robust validation
    accuracy for adversarial methods, clean validation accuracy otherwise, and the last epoch
    when there is no validation split.
    """
    if certified:
        return "val_certified_acc"
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
    """ε ramps linearly from 0 over the first ``warmup_epochs`` epochs, then stays at ε
    (certified training: its own schedule, :func:`robustkit.training.certified.schedule`)."""
    if cfg.train.method in CERTIFIED_METHODS:
        return schedule(cfg.train.certified_settings, iteration, steps_per_epoch).eps
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
    if train.method in CERTIFIED_METHODS:
        raise RuntimeError("certified training takes its loss from certified_loss")
    if train.method == "standard" or eps == 0:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=smoothing), logits
    if train.method == "trades":
        step = adv.step_size or default_step_size(eps, adv.steps)
        x_adv = trades_examples(attacked, x, eps=eps, steps=adv.steps, step_size=step,
                                generator=generator)
        return trades_loss(model, x, y, x_adv, adv.beta)
    if train.method == "fgsm-rs":
        x_adv = examples(attacked, x, y, eps=eps, steps=1,
                         step_size=adv.step_size or 1.25 * eps, random_start=True,
                         generator=generator)
    else:
        x_adv = examples(attacked, x, y, eps=eps, steps=adv.steps,
                         step_size=adv.step_size or default_step_size(eps, adv.steps),
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


def adopt_training(donor: Path, out_dir: Path, config: ExperimentConfig, seed: int,
                   owner: dict[str, Any]) -> None:
    """Make ``out_dir`` hold the finished training in ``donor`` as if ``config`` had trained it.

    The caller has checked that ``donor``'s training hash and data checksum are ``config``'s
    for ``seed``, so its weights are the ones this training would make. ``out_dir`` gets this
    config's ``config.toml``, the donor's weights, sidecars and metrics, and last its
    ``manifest.json`` with ``owner`` and ``copied_from`` added. Each file is written whole and
    each sidecar after its weights, so a copy cut short never leaves a sidecar without them.
    """
    _remove_previous_outputs(out_dir)
    write_text(out_dir / "config.toml", to_toml(dataclasses.replace(config, seed=seed, seeds=None)))
    for name in RUN_OUTPUTS[:-1]:  # the weights before their sidecars, the manifest after all
        if (donor / name).is_file():
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(donor / name, tmp)
    manifest = read_json(donor / "manifest.json", "train again with --retrain")
    write_json(out_dir / "manifest.json",
               {**manifest, "owner": owner, "copied_from": donor.as_posix()})


@dataclass
class TrainSetup:
    """What stays fixed while a run trains: the settings and seed, the data, this process's
    place in the group, the modules the loss and the attacks run through, and the output folder.

    :func:`prepare` builds it with its :class:`TrainState`, whose model the modules wrap: a
    setup trains only that state (restore a saved state into it, not into another). ``net`` is
    the model as the loss's backward must see it (``DistributedDataParallel`` under
    ``dist``), ``loss_net`` the module the training loss runs through, ``attacked`` the one
    attacks differentiate (see :func:`loss_models`). ``info`` goes into every checkpoint's
    sidecar, ``manifest`` into ``manifest.json`` at the end. ``say`` prints on rank 0 only.
    """

    config: ExperimentConfig
    seed: int
    data: Dataset
    device: torch.device
    out_dir: Path
    dist: Context | None
    network: dict[str, Any]
    fingerprint: str
    selected_by: str
    steps_per_epoch: int
    net: nn.Module
    loss_net: nn.Module
    attacked: nn.Module
    examples: PGDExamples
    info: dict[str, Any]
    manifest: dict[str, Any]
    say: Callable[[str], None]
    progress: bool
    save_every: float

    @property
    def rank(self) -> int:
        return self.dist.rank if self.dist is not None else 0

    @property
    def world(self) -> int:
        return self.dist.world if self.dist is not None else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def adversarial(self) -> bool:
        return self.config.train.method != "standard"

    @property
    def certified(self) -> bool:
        return self.config.train.method in CERTIFIED_METHODS

    def save(self, state: TrainState) -> None:
        """Write ``state``'s resume state (a collective under ``dist``)."""
        state.save(self.out_dir, fingerprint=self.fingerprint, dist=self.dist)


def _training_data(config: ExperimentConfig, device: torch.device, data: Dataset | None,
                   dist: Context | None) -> Dataset:
    """``data``, or the configured data set loaded onto ``device``; refused when it lives
    elsewhere, has fewer than two classes (before any training: a one-class model is no
    classifier) or an adversarial method has no validation split to select on."""
    if data is None:
        data = local_first(lambda: load_configured(config.data, device),
                           dist)  # one download per node at most
    elif data.train.images.device != device:
        raise RobustkitError(f"data lives on {data.train.images.device}, training on {device}")
    if len(data.classes) < 2:
        raise RobustkitError(
            f"{data.name} has one class only ({', '.join(data.classes) or 'no labels'}): a "
            "classifier needs at least two; check the labels (class indices 0, 1, …) or name "
            "the classes")
    if len(data.val) == 0 and config.train.method != "standard":
        raise RobustkitError("adversarial training selects models on validation data: "
                             "set data.val_size > 0")
    return data


def prepare(config: ExperimentConfig, *, out_dir: Path, seed: int | None = None,
            device: str | torch.device | None = None, data: Dataset | None = None,
            progress: bool = True, save_every: float = 60.0, log: Any = None,
            dist: Context | None = None) -> tuple[TrainSetup, TrainState]:
    """The setup of training ``config`` with ``seed`` (default ``config.seed``) into
    ``out_dir``, and the state before its first step (seeded weights, optimizer, generators).

    Creates ``out_dir`` and removes a killed run's temporary files once the data and the
    network are sound (nothing is written before); reads no resume state (:func:`begin`
    does). Arguments as for :func:`train`.
    """
    seed = config.seed if seed is None else seed
    device = resolve_device(device if device is not None else config.device)
    rank = dist.rank if dist is not None else 0
    out_dir = Path(out_dir)
    pretrained = find_pretrained(config.model)
    use_deterministic_algorithms()
    seed_everything(seed)
    data = _training_data(config, device, data, dist)
    network = network_spec(config.model.arch, config.model.factory, config.model.args,
                           config.model.app_dir, in_shape=data.in_shape,
                           output=config.model.output)
    model = build_network(network, len(data.classes)).to(device)
    _prepare_certified(config, model, dist, initialise=pretrained is None)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    if rank == 0:  # the data, the network and its weights are sound: now write
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir)  # temporary files of a killed run
    steps_per_epoch = -(-len(data.train) // config.train.batch_size)
    state = TrainState.create(model, config.train, device=device,
                              steps_per_epoch=steps_per_epoch, seed=seed, rank=rank)
    net = wrap(model, dist)  # the forward/backward of the training loss; attacks use ``model``
    loss_net, attacked = loss_models(model, net, config, device)
    started = pretrained.record() if pretrained is not None else {}
    fingerprint = training_hash(config, seed, pretrained.sha256 if pretrained else None)
    info = {**network, "num_classes": len(data.classes), **started,
            **({"data_sha256": data.provenance["data_sha256"]}
               if "data_sha256" in data.provenance else {}),
            "dataset": data.name, "config": config_hash(config),
            "training_hash": fingerprint, "seed": seed}
    manifest = {"config_hash": config_hash(config), "training_hash": fingerprint,
                "command": "train", "start": now_iso(), **started,
                **provenance(device, seed)}
    setup = TrainSetup(
        config=config, seed=seed, data=data, device=device, out_dir=out_dir, dist=dist,
        network=network, fingerprint=fingerprint,
        selected_by=selection_metric(config.train.method != "standard",
                                     validated=len(data.val) > 0,
                                     certified=config.train.method in CERTIFIED_METHODS),
        steps_per_epoch=steps_per_epoch, net=net, loss_net=loss_net, attacked=attacked,
        examples=examples_builder(model, attacked, config, device, dist), info=info,
        manifest=manifest, say=(log if rank == 0 else None) or (lambda message: None),
        progress=progress and rank == 0, save_every=save_every)
    return setup, state


def _prepare_certified(config: ExperimentConfig, model: nn.Module, dist: Context | None, *,
                       initialise: bool) -> None:
    """For certified training: one process only, the network's layers checked before any
    step, TF32 off, and where ``initialise`` (not fine-tuning) the configured initialisation
    (Shi et al.'s IBP init by default)."""
    method = config.train.method
    if method not in CERTIFIED_METHODS:
        return
    if dist is not None:
        raise RobustkitError(f"{method} training runs in one process: start it without "
                             "torchrun")
    live_steps(model, method)
    exact_float32()
    if initialise and config.train.certified_settings.init == "ibp":
        ibp_initialise(model)


def _check_world_size(saved: dict[str, Any], setup: TrainSetup) -> None:
    saved_world = int(saved.get("world_size", 1))
    if saved_world != setup.world:
        how = ("without torchrun" if saved_world == 1
               else f"under torchrun --nproc-per-node … with {saved_world} processes in all")
        raise RobustkitError(
            f"{setup.out_dir} holds the resume state of a {saved_world}-process run: resume it "
            f"{how}, or start over (robustkit train --fresh, robustkit run --retrain)"
        )


def begin(setup: TrainSetup, state: TrainState, *, resume: bool = True) -> None:
    """Continue ``state`` from the resume state in the output folder when ``resume`` and it
    belongs to this config and seed (refused when saved by another number of processes);
    otherwise start fresh, first removing an earlier run's outputs. Writes ``config.toml``."""
    saved = on_main(lambda: load_state(setup.out_dir) if resume else None, setup.dist)
    if saved is not None and saved.get("fingerprint") == setup.fingerprint:
        _check_world_size(saved, setup)
        state.load_state_dict(saved, setup.rank)
        setup.say(f"resuming from epoch {state.epoch + 1}, step {state.step}")
    elif saved is not None:
        setup.say("ignoring a resume state from a different config or seed")
    if setup.main and not state.rows and state.step == 0:
        _remove_previous_outputs(setup.out_dir)
        if "pretrained" in setup.info:
            setup.say(f"starting from the pretrained weights {setup.info['pretrained']} "
                      f"(sha256 {setup.info['pretrained_sha256'][:16]})")
    if setup.selected_by == LAST_EPOCH and NO_VALIDATION_NOTE not in state.notes:
        state.notes.append(NO_VALIDATION_NOTE)
        setup.say(f"note: {NO_VALIDATION_NOTE}")
    if setup.main:
        write_text(setup.out_dir / "config.toml",
                   to_toml(dataclasses.replace(setup.config, seed=setup.seed, seeds=None)))


def _batch_loss(setup: TrainSetup, state: TrainState, x: Tensor, y: Tensor, global_len: int,
                iteration: int) -> tuple[Tensor, Tensor, Tensor]:
    """(the mean loss of this rank's piece, its logits, the objective to differentiate).

    Under ``dist`` the objective is the loss weighted by ``len(piece) · world / global_len``,
    so the gradient averaged over ranks is that of the global batch's mean loss.
    """
    if len(y) == 0:  # fewer samples than ranks: take part in the all-reduce only
        logits = setup.net(x)
        return logits.sum() * 0.0, logits, logits.sum() * 0.0
    if setup.certified:
        train = setup.config.train
        step = schedule(train.certified_settings, iteration, setup.steps_per_epoch)
        loss, logits = certified_loss(setup.loss_net, x, y, step, train.method,  # type: ignore[arg-type]
                                      train.label_smoothing)
        return loss, logits, loss
    eps = current_eps(setup.config, iteration, setup.steps_per_epoch)
    loss, logits = training_loss(setup.loss_net, setup.config, x, y, eps, state.attack_generator,
                                 inner=setup.attacked, examples=setup.examples)
    objective = loss if setup.dist is None else loss * (len(y) * setup.world / global_len)
    return loss, logits, objective


def train_step(setup: TrainSetup, state: TrainState) -> None:
    """One optimizer step on batch ``state.step`` of the epoch's order (this rank's piece of
    it under ``dist``), then the schedule, the weight average and the running sums; advances
    ``state.step``. The epoch's order must be drawn (:meth:`TrainState.begin_epoch`)."""
    if state.batch_order is None:
        raise RuntimeError("train_step before TrainState.begin_epoch")
    size = setup.config.train.batch_size
    index = state.batch_order[state.step * size:(state.step + 1) * size]
    global_len = len(index)
    if setup.dist is not None:
        index = index[shard(global_len, setup.rank, setup.world)]
    x, y = setup.data.train.images[index], setup.data.train.labels[index]
    iteration = state.epoch * setup.steps_per_epoch + state.step
    loss, logits, objective = _batch_loss(setup, state, x, y, global_len, iteration)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(objective).backward()
    if setup.config.train.grad_clip is not None:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), setup.config.train.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    decay = setup.config.train.ema_decay
    if state.averaged is not None and decay is not None:
        update_average(state.averaged, state.model, decay, iteration)
    state.sums.add(loss, logits, y)
    state.step += 1


def train_epoch(setup: TrainSetup, state: TrainState) -> None:
    """The steps of ``state.epoch`` still to take (all of them unless resumed mid-epoch),
    saving the resume state within the epoch every ``save_every`` seconds."""
    steps = setup.steps_per_epoch
    state.begin_epoch(len(setup.data.train), setup.device)
    state.model.train()
    with Bar(f"epoch {state.epoch + 1}/{setup.config.train.epochs}", steps,
             setup.progress) as bar:
        bar.advance(state.step)
        while state.step < steps:
            train_step(setup, state)
            if bar.enabled and ((state.step - 1) % PROGRESS_EVERY == 0 or state.step == steps):
                loss, correct, seen = state.sums.values()
                shown = max(seen, 1)  # a rank's first piece is empty when batch < world
                bar.advance(state.step - bar.done,
                            f"loss {loss / shown:.4f} acc {correct / shown:.4f}")
            due = time.perf_counter() - state.saved_at > setup.save_every
            if state.step < steps and agree(due, setup.dist):
                setup.save(state)


def epoch_metrics(setup: TrainSetup, state: TrainState) -> dict[str, Any]:
    """The metrics row of ``state.epoch`` (its ``seconds`` aside): learning rate, training
    loss and accuracy over every rank's samples, clean validation (NaN without a validation
    split) and test accuracy of ``state.evaluated``, and for adversarial methods the epoch's
    last ε and the robust validation accuracy at the full ε."""
    loss_sum, correct, seen = state.sums.values()
    if setup.dist is not None:
        loss_sum, total_correct, total_seen = all_reduce_sum([loss_sum, correct, seen],
                                                             setup.dist)
        correct, seen = int(total_correct), int(total_seen)
    evaluated, data, config = state.evaluated, setup.data, setup.config
    row: dict[str, Any] = {
        "epoch": state.epoch + 1,
        "lr": state.optimizer.param_groups[0]["lr"],
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "val_acc": accuracy(evaluated, data.val) if len(data.val) else float("nan"),
        "test_acc": accuracy(evaluated, data.test),
    }
    if setup.certified:
        row.update(_certified_metrics(setup, state))
    elif setup.adversarial:
        adv, steps = config.train.adversarial, setup.steps_per_epoch
        row["eps"] = current_eps(config, (state.epoch + 1) * steps - 1, steps)
        row["val_robust_acc"] = robust_accuracy(
            evaluated, data.val.take(adv.val_n), eps=adv.eps, steps=adv.val_steps,
            seed=config.evaluate.seed)
    return row


def _certified_metrics(setup: TrainSetup, state: TrainState) -> dict[str, Any]:
    """Certified training's columns: the epoch's last ε, κ (and β for CROWN-IBP), then at the
    target ε on ``val_n`` validation samples the PGD accuracy and the certified accuracy."""
    train, steps = setup.config.train, setup.steps_per_epoch
    certified = train.certified_settings
    last = schedule(certified, (state.epoch + 1) * steps - 1, steps)
    row: dict[str, Any] = {"eps": last.eps, "kappa": last.kappa}
    if train.method == "crown-ibp":
        row["beta"] = last.beta
    val = setup.data.val.take(certified.val_n)
    row["val_robust_acc"] = robust_accuracy(state.evaluated, val, eps=certified.eps,
                                            steps=train.adversarial.val_steps,
                                            seed=setup.config.evaluate.seed)
    row["val_certified_acc"] = certified_fraction(state.evaluated, val, certified.eps,
                                                  train.method)  # type: ignore[arg-type]
    return row


def _note_collapse(setup: TrainSetup, state: TrainState, score: float) -> None:
    """Note and warn when robust validation accuracy fell more than ``COLLAPSE_DROP`` below
    the best so far."""
    if not (setup.adversarial and state.best_score > 0
            and score < state.best_score - COLLAPSE_DROP):
        return
    note = (f"epoch {state.epoch + 1}: robust validation accuracy collapsed from "
            f"{state.best_score:.3f} to {score:.3f} (catastrophic overfitting?); the best "
            "checkpoint stays the one used downstream")
    state.notes.append(note)
    if setup.main:
        warnings.warn(note, stacklevel=4)  # attributed to the caller of ``train``
    setup.say(f"warning: {note}")


def _save_epoch(setup: TrainSetup, state: TrainState, row: dict[str, Any], score: float
                ) -> None:
    """``model-last``; ``model-best`` when ``score`` beats the best so far; ``metrics.csv``.
    Only rank 0 writes, every rank keeps ``best_score``."""
    info = {**setup.info, "epoch": state.epoch + 1, "metrics": row}
    if setup.main:
        save_checkpoint(setup.out_dir / "model-last", state.evaluated, info)
    if score > state.best_score:
        state.best_score = score
        if setup.main:
            save_checkpoint(setup.out_dir / "model-best", state.evaluated,
                            {**info, "selected_by": setup.selected_by})
    if setup.main:
        with atomic_path(setup.out_dir / "metrics.csv") as tmp:
            pd.DataFrame(state.rows).to_csv(tmp, index=False)


def end_epoch(setup: TrainSetup, state: TrainState) -> None:
    """Close ``state.epoch``: its metrics row, the collapse check, the checkpoints and
    ``metrics.csv``; then move to the next epoch and save the resume state there."""
    row = epoch_metrics(setup, state)
    score = float(state.epoch + 1) if setup.selected_by == LAST_EPOCH else row[setup.selected_by]
    row["seconds"] = time.perf_counter() - state.epoch_started
    state.rows.append(row)
    _note_collapse(setup, state, score)
    _save_epoch(setup, state, row, score)
    state.next_epoch()
    setup.save(state)
    setup.say(epoch_line(row))


#: How the console names a metrics.csv column where its name alone misleads: ``lr`` is the
#: rate after the epoch's last step (0 at the end of a cosine schedule), not the one it ran at.
METRIC_LABELS = {"lr": "lr at end"}


def metric_text(name: str, value: Any) -> str:
    """A metrics.csv value as the console shows it: the learning rate to 3 significant digits
    (``0.1``, ``0.00342``, ``1.71e-08``, ``0``), seconds to 0.1 s, ε as written, other floats
    to 4 decimals."""
    if not isinstance(value, float):
        return str(value)
    if name == "lr" or name == "eps":
        return f"{value:.3g}"
    if name == "seconds":
        return f"{value:.1f}"
    return f"{value:.4f}"


def epoch_line(row: dict[str, Any]) -> str:
    """``epoch 1 · lr at end 0 · train_loss 0.2905 · … · 57.9 s``: one epoch's metrics."""
    parts = [f"{METRIC_LABELS.get(k, k)} {metric_text(k, v)}" for k, v in row.items()
             if k != "seconds"]
    if "seconds" in row:
        parts.append(f"{metric_text('seconds', row['seconds'])} s")
    return " · ".join(parts)


def metrics_text(metrics: pd.DataFrame) -> str:
    """metrics.csv as the ``train`` command prints it: each column by :func:`metric_text`."""
    formatters = {c: (lambda v, c=c: metric_text(c, v)) for c in metrics.columns}
    return str(metrics.to_string(index=False, formatters=formatters))


def finish(setup: TrainSetup, state: TrainState) -> TrainResult:
    """Write ``manifest.json`` and remove the resume state (rank 0); the result holds the
    ``model-best`` weights, read back from the folder, in eval mode."""
    seconds = state.seconds()
    if setup.main:
        write_json(setup.out_dir / "manifest.json",
                   {**setup.manifest, "end": now_iso(), "seconds": seconds,
                    "warnings": state.notes, "processes": setup.world})
        clear_state(setup.out_dir)
    best_model = build_network(setup.network, len(setup.data.classes)).to(setup.device)
    best_state = on_main(lambda: load_tensors(setup.out_dir / "model-best.safetensors"),
                         setup.dist)
    best_model.load_state_dict(best_state)
    return TrainResult(best_model.eval(), pd.DataFrame(state.rows), setup.out_dir,
                       setup.out_dir / "model-best", setup.out_dir / "model-last", seconds,
                       state.notes)


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
    setup, state = prepare(config, out_dir=out_dir, seed=seed, device=device, data=data,
                           progress=progress, save_every=save_every, log=log, dist=dist)
    begin(setup, state, resume=resume)
    while state.epoch < config.train.epochs:
        train_epoch(setup, state)
        end_epoch(setup, state)
    return finish(setup, state)


__all__ = ["TrainResult", "TrainSetup", "TrainState", "accuracy", "adopt_training", "attack_mode",
           "begin", "end_epoch", "finish", "prepare", "robust_accuracy", "train", "train_epoch",
           "train_step"]
