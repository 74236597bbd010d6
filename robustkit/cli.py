"""The ``robustkit`` command line: parse, call the engine, print. User errors → one line, exit 2.

Each command imports the engine it drives (torch, pandas and the modules built on them) in its
own body: those are the only imports below the top of a module in robustkit, and they keep
``robustkit --help``, ``--version`` and usage errors free of torch (a test pins this)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console

from robustkit.attack_specs import OPTIONS, attack_spec, transferable
from robustkit.attack_specs import attack_names as declared_attacks
from robustkit.config import (
    ATTACK_PRESETS,
    EOT_ENSEMBLE,
    AttackConfig,
    config_from_dict,
    load_config,
    parse_defence_spec,
    parse_transform_spec,
    to_dict,
)
from robustkit.errors import RobustkitError
from robustkit.version import INSTALLED, __version__
from robustkit.vocabulary import (
    CERTIFY_METHODS,
    CHECKS_LEVELS,
    SAVE_ADVERSARIAL,
    CertifyMethod,
    ChecksLevel,
    SaveAdversarial,
)

if TYPE_CHECKING:
    from robustkit.certify.evaluate import Certification

app = typer.Typer(
    name="robustkit",
    help=(
        "Evaluate and improve the adversarial robustness of PyTorch image classifiers.\n\n"
        "Example: robustkit run experiments/quickstart.toml"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# markup off: user text (paths, labels, messages) is printed literally, ``[/x]`` included
out = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)

#: The help of the options that several commands share, by flag; each becomes one annotated
#: type below, so a command declares such an option as ``device: DeviceOption = None``.
_SHARED_HELP = {
    "--set": "Override a config value: section.key=value (repeatable).",
    "--device": "auto, cpu, cuda or cuda:N (default: the config's, else auto).",
    "--data": "mnist, fashion-mnist, cifar10, svhn, …, a .npz/.safetensors file "
              "or an image folder (class_name/*.png); default mnist. --dataset is an older "
              "name of this option.",
    "--resize": "Resize images to H,W (or S for S×S); default: keep sizes.",
    "--app-dir": "Folder to import package.module:factory from (searched before the current "
                 "folder).",
    "--data-dir": "Folder holding the IDX files (else $ROBUSTKIT_DATA, cache).",
}


def _shared_option(flag: str) -> Any:
    """The ``typer.Option`` of a shared flag with its help from :data:`_SHARED_HELP` (``Any``,
    as ``typer.Option`` is typed); the default (None) is the command parameter's."""
    return typer.Option(flag, help=_SHARED_HELP[flag])


# Optional rather than X | None: typer needs it here (hence the noqa: UP045)
SetOption = Annotated[Optional[list[str]], _shared_option("--set")]  # noqa: UP045
DeviceOption = Annotated[Optional[str], _shared_option("--device")]  # noqa: UP045
DataOption = Annotated[Optional[str], _shared_option("--data")]  # noqa: UP045
ResizeOption = Annotated[Optional[str], _shared_option("--resize")]  # noqa: UP045
AppDirOption = Annotated[Optional[Path], _shared_option("--app-dir")]  # noqa: UP045
DataDirOption = Annotated[Optional[Path], _shared_option("--data-dir")]  # noqa: UP045
#: ``--dataset``: the older name of ``--data``, kept so old scripts run; hidden from the option
#: list (``--data``'s help names it) and merged into ``--data`` by :func:`_data_source`.
DatasetAlias = Annotated[Optional[str], typer.Option("--dataset", hidden=True)]  # noqa: UP045


def _data_source(data: str | None, dataset: str | None) -> str | None:
    """``--data`` with its older name ``--dataset`` folded in: either names the data; both
    naming different data is refused rather than one silently winning."""
    if data is not None and dataset is not None and data != dataset:
        raise RobustkitError(f"--dataset {dataset} and --data {data} name different data: "
                             "pass only --data")
    return data if data is not None else dataset


def _examples(*commands: str) -> str:
    """A command's ``--help`` epilog: one ``Example: …`` paragraph per command line. Each runs
    as written in a fresh clone with MNIST in $ROBUSTKIT_DATA, on released weights (zoo:NAME,
    reports/NAME/model.safetensors) and small sizes: tests/test_help_examples.py runs them."""
    return "\n\n".join(f"Example: {command}" for command in commands)


def _log(message: str) -> None:
    err.print(message, soft_wrap=True)  # one message, one line


def _shower(echo: Callable[[str], None]) -> Callable[[Any], None]:
    """The jobs' ``show``: a finished sweep's lines (:func:`robustkit.terminal.sweep_lines`)
    through ``echo``."""
    from robustkit.terminal import sweep_lines

    def show(outcome: Any) -> None:
        for line in sweep_lines(outcome):
            echo(line)

    return show


def _is_main_process() -> bool:
    """Whether this process prints: alone, or rank 0 under torchrun."""
    return os.environ.get("RANK", "0") == "0"


def _echo(message: str) -> None:
    """Results for stdout, printed as they are (the consoles take no rich markup) and never
    broken into lines by rich: a headline or a check's verdict stays one line for grep and
    scripts, and the terminal wraps it for the eye."""
    out.print(message, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        note = "" if INSTALLED else " (not installed: version from the source)"
        out.print(f"robustkit {__version__}{note}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.",
                                          callback=_version, is_eager=True)] = False,
) -> None:
    """Evaluate and improve the adversarial robustness of PyTorch image classifiers."""
    from robustkit.allocator import tune_allocator

    tune_allocator()  # fewer page faults per attack step on the CPU (robustkit.allocator)


@app.command(epilog=_examples(
    "robustkit train experiments/mnist_mlp.toml --set train.epochs=1"))
def train(
    config: Annotated[Path, typer.Argument(help="Experiment TOML file (see experiments/).")],
    set_: SetOption = None,
    device: DeviceOption = None,
    data_source: DataOption = None,
    resize: ResizeOption = None,
    app_dir: AppDirOption = None,
    data_dir: DataDirOption = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default runs/NAME/seed-S, where `run` looks; with --out, seed-S sub-folders only for several seeds).")] = None,  # noqa: E501, UP045
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore a resume state in the output folder.")] = False,  # noqa: E501
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace another experiment's model in --out.")] = False,  # noqa: E501
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train a model from an experiment config; writes checkpoints, metrics.csv and manifest."""
    from robustkit import distributed
    from robustkit.outputs import (
        Owner,
        checkpoint_folder,
        config_file_label,
        guard_folder,
        refuse_working_folder,
        writing,
    )
    from robustkit.training import train as train_model
    from robustkit.training.loop import metrics_text

    cfg = load_config(config, _data_overrides(set_, data_dir, data_source, resize, app_dir))
    folder = out_dir or Path("runs") / cfg.name
    _check_out(folder, "--out")
    target_device, dist = distributed.setup(device or cfg.device)
    _on_interrupt(f"the training state saved at each epoch end and every minute is kept in "
                  f"{folder}; run the same command again to resume (--fresh starts over)")
    refuse_working_folder(folder)
    owner = Owner("train", cfg.name, config_file_label(config))

    def seed_folder(seed: int) -> Path:  # --out: one seed's checkpoint, or a seed-S folder each
        if out_dir is None:
            return checkpoint_folder(Path("runs"), cfg.name, seed)
        return out_dir / f"seed-{seed}" if len(cfg.all_seeds) > 1 else out_dir

    targets = {seed: seed_folder(seed) for seed in cfg.all_seeds}
    with writing([(t, "--out") for t in targets.values()], dist):  # one writer at a time
        replacing = distributed.on_main(lambda: [  # before any work; train() resumes or restarts
            guard_folder(t, owner, overwrite, announce_same=False) for t in targets.values()], dist)
        for line in replacing:
            if line and distributed.is_main():
                _log(line)
        for seed in cfg.all_seeds:
            target = targets[seed]
            result = train_model(cfg, out_dir=target, seed=seed, device=target_device,
                                 progress=not quiet, resume=not fresh, log=_log, dist=dist)
            if not distributed.is_main():
                continue
            final = result.metrics.iloc[-1]
            best = result.metrics.loc[result.metrics["epoch"] == _best_epoch(result.best)]
            out.print(metrics_text(result.metrics))
            out.print(f"seed {seed}: test accuracy {final['test_acc']:.4f} after "
                      f"{int(final['epoch'])} epochs in {result.seconds:.1f} s; best checkpoint "
                      f"(epoch {int(best['epoch'].iloc[0])}) at {result.best}.safetensors")
            for note in result.warnings:
                err.print(f"warning: {note}")


def _data_overrides(set_: list[str] | None, data_dir: Path | None, data_source: str | None,
                    resize: str | None, app_dir: Path | None) -> list[str]:
    """--set overrides plus the data options (--data-dir, --data, --resize); --app-dir goes
    onto the import path."""
    overrides = list(set_ or [])
    if data_dir is not None:
        overrides.append(f"data.dir={json.dumps(str(data_dir))}")
    if data_source is not None:
        overrides.append(f"data.source={json.dumps(data_source)}")
    if resize is not None:
        overrides.append(f"data.resize={_resize(resize)}")
    if app_dir is not None:
        from robustkit.models.factory import add_app_dir

        add_app_dir(app_dir)
    return overrides


def _resize(text: str) -> list[int]:
    try:
        size = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        size = []
    if len(size) not in (1, 2) or min(size) < 1:
        raise RobustkitError(f"--resize {text!r}: expected H,W or S (positive pixel counts), "
                             "e.g. 32,32")
    return size


def _best_epoch(stem: Path) -> int:
    from robustkit.checkpoint import read_sidecar

    return int(read_sidecar(stem)["epoch"])


@app.command(epilog=_examples("robustkit data --data mnist"))
def data(
    data_source: DataOption = None,
    dataset: DatasetAlias = None,
    resize: ResizeOption = None,
    data_dir: DataDirOption = None,
    download: Annotated[bool, typer.Option("--download", help="Fetch missing files through torchvision.")] = False,  # noqa: E501
) -> None:
    """Show where data is looked for, what was found and whether checksums match."""
    data_source = _data_source(data_source, dataset)
    if data_source is not None and data_source.lower() not in {"mnist", "fashion-mnist"}:
        from robustkit.sources import load_data

        size = _resize(resize) if resize else None
        try:
            loaded = load_data(data_source, data_dir=data_dir, val_size=0, resize=size)
        except RobustkitError as exc:  # one split only: show it as the test set it is
            if "holds one split" not in str(exc):
                raise
            loaded = load_data(data_source, data_dir=data_dir, parts=("test",), resize=size)
        c, h, w = loaded.in_shape
        out.print(f"{data_source}: {len(loaded.train)} train and {len(loaded.test)} test images "
                  f"of {c}×{h}×{w}, {len(loaded.classes)} classes "
                  f"({', '.join(loaded.classes[:10])}{', …' if len(loaded.classes) > 10 else ''})",
                  highlight=False, markup=False)
        for key, value in loaded.provenance.items():
            out.print(f"  {key}: {value}", highlight=False, markup=False)
        return
    dataset = (data_source or "mnist").lower()
    from robustkit.data import (
        FILE_KEYS,
        dataset_spec,
        find_dataset_files,
        load_split_files,
        locate,
        search_roots,
    )

    spec = dataset_spec(dataset)
    out.print(f"{dataset}: searched in order")
    for reason, root in search_roots(data_dir):
        out.print(f"  {reason:>16}  {root}")
    for folder in spec.system_dirs:
        out.print(f"  {'system':>16}  {folder}")
    found = locate(dataset, data_dir)
    for place in found:
        status = "complete" if place.complete else f"{len(place.files)} of {len(FILE_KEYS)} files"
        out.print(f"found ({status}): {place.folder}")
    located = find_dataset_files(dataset, data_dir, download=download)
    load_split_files(located, spec)
    out.print(f"using {located.folder}: all {len(FILE_KEYS)} files present, md5 checksums match")


def _check_out(folder: Path, option: str) -> None:
    """An output folder must be a folder (or not exist yet), never an existing file."""
    if folder.exists() and not folder.is_dir():
        raise RobustkitError(f"{option} {folder} is a file, not a folder: choose a folder")


def _number(text: str) -> float:
    """``0.3`` or a fraction ``8/255`` (ε is often written in 1/255 steps of a pixel)."""
    numerator, slash, denominator = text.strip().partition("/")
    if not slash:
        return float(numerator)
    return float(numerator) / float(denominator)  # ZeroDivisionError: the caller's error


def _float_list(text: str, what: str) -> list[float]:
    try:
        values = [_number(v) for v in text.split(",") if v.strip()]
    except (ValueError, ZeroDivisionError):
        raise RobustkitError(f"{what} {text!r}: expected comma-separated numbers or fractions, "
                             "e.g. 0,0.1,0.2,0.3 or 0,2/255,8/255") from None
    if not all(math.isfinite(v) for v in values):
        raise RobustkitError(f"{what} {text!r}: nan and inf are not budgets; give finite "
                             "numbers, e.g. 0,0.1,0.2,0.3")
    return values


#: What ``--attack`` accepts: the attacks of :mod:`robustkit.attack_specs` and
#: the presets of ``config.ATTACK_PRESETS``.
PRESET_NAMES = tuple(ATTACK_PRESETS)


def _check_step_size(step: object) -> None:
    """``--step-size`` must be finite, whatever the attacks (checked before the names)."""
    if isinstance(step, float) and not math.isfinite(step):
        raise RobustkitError(f"--step-size {step}: step_size: {step} is not a finite number; "
                             "give a step in [0, 1] pixel units")


def _attack_bases(name: str, eot: bool = False) -> list[dict[str, object]]:
    """The attack tables one ``--attack`` name stands for: a preset's attacks or the attack
    itself; an unknown name is a user error. Under EOT (``eot``) a preset keeps the attacks
    that take it, runs ``EOT_ENSEMBLE`` for ``autoattack`` and leaves out the others, saying so."""
    if name in ATTACK_PRESETS and eot:
        return [to_dict(a) for a in _preset_under_eot(name)]
    if name in ATTACK_PRESETS:
        return [to_dict(a) for a in ATTACK_PRESETS[name]]
    if name in declared_attacks():
        return [{"name": name}]
    raise RobustkitError(
        f"unknown attack {name!r}: choose {', '.join(declared_attacks())} or a preset "
        f"({', '.join(PRESET_NAMES)}), comma-separated")


def _preset_under_eot(name: str) -> list[AttackConfig]:
    """The preset ``name`` for ``--eot-samples``, with one line saying what changed."""
    kept: list[AttackConfig] = []
    said: list[str] = []
    for attack in ATTACK_PRESETS[name]:
        if attack_spec(attack.name).family == "ensemble":
            kept += EOT_ENSEMBLE
            said.append(f"{attack.name} runs as AutoAttack runs randomised models (APGD-CE and "
                        "APGD-DLR with EOT; its APGD-T and Square take none)")
        elif "eot_samples" in attack_spec(attack.name).options:
            kept.append(attack)
        else:
            said.append(f"{attack.name}, which takes no EOT, is left out")
    if said:
        _log(f"--eot-samples: in the {name} preset, {'; '.join(said)}")
    return kept


def _in_norm(bases: list[dict[str, object]], given: dict[str, object]) -> list[dict[str, object]]:
    """A preset's attacks that run in ``--norm`` (``standard`` in L1 is the ensemble alone);
    a single attack stays, for the config check to refuse in a norm it does not run in."""
    norm = given.get("norm", "linf")
    fitting = [b for b in bases if norm in attack_spec(str(b["name"])).norms]
    return fitting if len(bases) > 1 and fitting else bases


def _fit_options_to_attack(entry: dict[str, object], taken: set[str]) -> dict[str, object]:
    """``entry`` (an attack table with the command-line options merged in) without the options
    its attack's spec does not declare, when they are at their defaults or another attack
    named alongside takes them (``taken``: ``--steps`` with ``fgsm,pgd`` is PGD's). Any other
    value stays, for the config check to name."""
    spec = attack_spec(str(entry["name"]))
    defaults = to_dict(AttackConfig(name=spec.name))
    for key in [k for k in OPTIONS if k in entry and k not in spec.options]:
        if key in taken or entry[key] == defaults.get(key):
            entry.pop(key)
    return entry


def _attack_configs(names: str, *, extra: dict[str, object] | None = None,
                    **settings: object) -> list[AttackConfig]:
    """The attacks named by ``--attack`` (attack names or presets), with the options given;
    ``extra`` adds top-level tables (``defence``, ``transforms``) they are checked against."""
    given = {k: v for k, v in settings.items() if v is not None}
    _check_step_size(given.get("step_size"))
    chosen = [n.strip().lower() for n in names.split(",") if n.strip()]
    eot = given.get("eot_samples") is not None
    bases = [base for name in chosen for base in _in_norm(_attack_bases(name, eot), given)]
    taken = {key for base in bases for key in attack_spec(str(base["name"])).options}
    attacks = [_fit_options_to_attack({**base, **given}, taken) for base in bases]
    if not attacks:
        raise RobustkitError(
            f"--attack is empty: choose {', '.join(declared_attacks())} (comma-separated)")
    return list(config_from_dict({"attacks": attacks, **(extra or {})}).attacks)


def _with_transfer(attacks: list[AttackConfig], source: str | None, weights: Path | None
                   ) -> list[AttackConfig]:
    """``attacks`` and, with ``--transfer-from``, the transfer twin of each that transfers
    (the same attack crafted on ``source``, without EOT or BPDA: those are about the evaluated
    model); one line names the attacks left out."""
    if source is None:
        if weights is not None:
            raise RobustkitError("--transfer-weights is the state dict of a factory "
                                 "--transfer-from: give --transfer-from package.module:factory")
        return attacks
    twins = [dataclasses.replace(a, source=source, eot_samples=None, bpda=None,
                                 source_weights=str(weights) if weights else None)
             for a in attacks if a.name in transferable()]
    if not twins:
        raise RobustkitError(f"--transfer-from crafts with {', '.join(transferable())}: name one "
                             "in --attack (e.g. --attack pgd)")
    left = sorted({a.name for a in attacks if a.name not in transferable()})
    if left:
        _log(f"--transfer-from: {', '.join(left)} not transferred (only "
             f"{', '.join(transferable())} are)")
    return list(config_from_dict({"attacks": [to_dict(a) for a in attacks + twins]}).attacks)


def _certify_methods(text: str | None, attacks: list[AttackConfig]) -> tuple[CertifyMethod, ...]:
    """``--certify ibp,crown-ibp`` as methods, checked before anything loads."""
    if text is None:
        return ()
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    if not methods or any(m not in CERTIFY_METHODS for m in methods):
        raise RobustkitError(f"--certify {text!r}: choose from {', '.join(CERTIFY_METHODS)}, "
                             "comma-separated (e.g. --certify ibp,crown-ibp)")
    if len({a.norm for a in attacks}) != 1 or attacks[0].norm not in ("linf", "l2"):
        raise RobustkitError("--certify bounds the L∞ or the L2 ball: attack with --norm linf "
                             "or l2 to compare the certified and the attacked numbers")
    return methods  # type: ignore[return-value]  # checked against CERTIFY_METHODS above


def _save_adversarial(text: str | None) -> SaveAdversarial | None:
    """``--save-adversarial all|broken``."""
    if text is None:
        return None
    if text not in SAVE_ADVERSARIAL:
        raise RobustkitError(f"--save-adversarial {text!r}: choose all (every sample's "
                             "example) or broken (the misclassified ones)")
    return text


def _checks_level(text: str, fail_on_check: bool) -> ChecksLevel:
    """``--checks`` as a level; ``--fail-on-check`` needs checks to gate on."""
    if text not in CHECKS_LEVELS:
        raise RobustkitError(f"--checks {text!r}: choose one of {', '.join(CHECKS_LEVELS)}")
    if text == "off" and fail_on_check:
        raise RobustkitError("--fail-on-check with --checks off would gate on nothing: choose "
                             "--checks quick or full")
    return text


@app.command(epilog=_examples(
    "robustkit attack --model zoo:mnist_cnn --attack fgsm,pgd --eps 0,0.1,0.2,0.3 --n 200",
    "robustkit attack --model reports/mnist_cnn_pgd_at/model.safetensors --attack apgd "
    "--eps 0,0.3 --n 200",
    "robustkit attack --model zoo:mnist_mlp --attack pgd --eps 0,0.01,0.02 --certify "
    "ibp,crown-ibp --n 100",
    "robustkit attack --model zoo:mnist_cnn --attack pgd --eps 0,0.1 --n 100 "
    "--save-adversarial all --out runs/cnn_adv",
    "robustkit attack --model zoo:mnist_mlp --data runs/cnn_adv/adversarial/pgd40@0.1.safetensors "
    "--eps 0,0.1 --attack fgsm --out runs/transfer_check",
    "robustkit attack --model zoo:mnist_cnn_pgd_at --attack apgd --norm l1 --eps 0,10 "
    "--n 20 --checks quick --out runs/pgd_at_l1",
    "robustkit attack --model zoo:mnist_cnn_pgd_at --attack pgd --transfer-from zoo:mnist_cnn "
    "--eps 0,0.3 --n 20 --out runs/pgd_at_transfer"))
def attack(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint (e.g. reports/NAME/model.safetensors), zoo:NAME, TorchScript, .pt2, or package.module:factory.")],  # noqa: E501
    attack_names: Annotated[str, typer.Option("--attack", help=f"Comma-separated attacks ({', '.join(declared_attacks())}) or a preset: standard = fgsm + autoattack; apgd-ce-margin = APGD-100 CE and margin (cheaper); fgsm-pgd = FGSM and PGD-40 (quick, overstates robustness).")] = "standard",  # noqa: E501
    eps: Annotated[str, typer.Option("--eps", help="Comma-separated budgets in pixel units ([0,1] in L∞, up to √d in L2, d in L1); fractions such as 8/255 accepted.")] = "0,0.05,0.1,0.15,0.2,0.25,0.3",  # noqa: E501
    norm: Annotated[str, typer.Option("--norm", help="linf, l2 or l1 (l1: apgd, apgd-t, fab-t, autoattack; ε = Σ|pixel changes|, e.g. --norm l1 --eps 0,5,10).")] = "linf",  # noqa: E501
    steps: Annotated[Optional[int], typer.Option("--steps", help="PGD/APGD steps (default: PGD 40, APGD 100).")] = None,  # noqa: E501, UP045
    step_size: Annotated[Optional[float], typer.Option("--step-size", help="PGD step (default 2.5·ε/steps).")] = None,  # noqa: E501, UP045
    restarts: Annotated[Optional[int], typer.Option("--restarts", help="PGD/APGD random restarts (default 1).")] = None,  # noqa: E501, UP045
    loss: Annotated[Optional[str], typer.Option("--loss", help="ce (default), margin or dlr.")] = None,  # noqa: E501, UP045
    targeted: Annotated[bool, typer.Option("--targeted", help="Aim at class (y+1) mod K.")] = False,
    n: Annotated[Optional[int], typer.Option("--n", help="Evaluate the first N test images.")] = None,  # noqa: E501, UP045
    batch_size: Annotated[int, typer.Option("--batch-size")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random starts.")] = 0,
    data_source: DataOption = None,
    dataset: DatasetAlias = None,
    resize: ResizeOption = None,
    app_dir: AppDirOption = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="State dict for a factory model.")] = None,  # noqa: E501, UP045
    normalize: Annotated[Optional[str], typer.Option("--normalize", help="MEAN,STD the model expects.")] = None,  # noqa: E501, UP045
    device: DeviceOption = None,
    data_dir: DataDirOption = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default runs/attack-MODEL: the zoo or report name, or module.factory-WEIGHTS).")] = None,  # noqa: E501, UP045
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace another experiment's results in --out.")] = False,  # noqa: E501
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    trust_model_file: Annotated[bool, typer.Option(
        "--trust-model-file",
        help="Load a TorchScript or .pt2 --model although loading it can run code its author "
             "chose (pickles, TorchScript, shape expressions). Only for files from people you "
             "trust; checkpoints and factories never need it.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document (accuracies, intervals, checks, files) on stdout; the rest goes to stderr.")] = False,  # noqa: E501
    fail_on_check: Annotated[bool, typer.Option("--fail-on-check", help="Exit with code 1 when a sanity check fails (for CI).")] = False,  # noqa: E501
    output: Annotated[Optional[str], typer.Option("--output", help="Where the logits are when the model returns more: an index of a tuple (--output 0), a dict key or an attribute (--output logits).")] = None,  # noqa: E501, UP045
    checks: Annotated[str, typer.Option("--checks", help="Sanity checks after the sweep: quick (every check that can discredit a number, at budgets scaled to the evaluation), full (each check at its own, larger budget) or off.")] = "quick",  # noqa: E501
    defence: Annotated[Optional[str], typer.Option("--defence", help="Preprocessing in front of the model: bit-depth:BITS, median:SIZE or noise:SIGMA.")] = None,  # noqa: E501, UP045
    bpda: Annotated[Optional[str], typer.Option("--bpda", help="Attack through the --defence with BPDA: identity or mean-filter.")] = None,  # noqa: E501, UP045
    eot_samples: Annotated[Optional[int], typer.Option("--eot-samples", help="EOT: average each PGD/APGD step's gradient over K draws of --transform.")] = None,  # noqa: E501, UP045
    transform: Annotated[Optional[str], typer.Option("--transform", help="Transformations, e.g. rotate=15,translate=2,scale=0.9:1.1,noise=0.05 (also eval_samples=M, eps=E).")] = None,  # noqa: E501, UP045
    save_adversarial: Annotated[Optional[str], typer.Option("--save-adversarial", help="Write each (attack, ε) cell's adversarial examples to OUT/adversarial/ (safetensors, with indices, labels, predictions and ε): all or broken.")] = None,  # noqa: E501, UP045
    certify: Annotated[Optional[str], typer.Option("--certify", help="Also certify at the same ε (a lower bound beside the attacks' upper bound): ibp, crown-ibp or crown, comma-separated.")] = None,  # noqa: E501, UP045
    transfer_from: Annotated[Optional[str], typer.Option("--transfer-from", help="Also run each fgsm/pgd/apgd as a transfer attack: crafted on this model (zoo:NAME, checkpoint, or package.module:factory with --transfer-weights), judged on --model; rows transfer:ATTACK, and the check transfer_not_stronger.")] = None,  # noqa: E501, UP045
    transfer_weights: Annotated[Optional[Path], typer.Option("--transfer-weights", help="State dict for a factory --transfer-from.")] = None,  # noqa: E501, UP045
) -> None:
    """Attack a model over an ε sweep; writes results.csv, per_sample.csv and a report."""
    from robustkit.jobs.attack import attack_model, model_name
    from robustkit.outputs import staging_path
    from robustkit.terminal import attack_summary

    data_source = _data_source(data_source, dataset)
    eps_values = _float_list(eps, "--eps")
    level = _checks_level(checks, fail_on_check)
    extra: dict[str, object] = {}
    if defence is not None:
        extra["defence"] = parse_defence_spec(defence)
    if transform is not None:
        extra["transforms"] = parse_transform_spec(transform)
    attacks = _attack_configs(attack_names, extra=extra, norm=norm, steps=steps,
                              step_size=step_size, restarts=restarts, loss=loss,
                              targeted=targeted, bpda=bpda, eot_samples=eot_samples)
    attacks = _with_transfer(attacks, transfer_from, transfer_weights)
    tables = config_from_dict({"attacks": [], **extra}) if extra else None
    folder = out_dir or Path("runs") / f"attack-{model_name(model, weights)}"
    _check_out(folder, "--out")
    _on_interrupt(f"finished (attack, ε) cells, batches and checks are kept in "
                  f"{staging_path(folder)}; run the same command again to go on from them")
    with _stdout_to_stderr() if as_json else contextlib.nullcontext():
        outcome = attack_model(
            model=model, attacks=attacks, eps=eps_values, n=n, batch_size=batch_size,
            seed=seed, data_source=data_source,
            resize=_resize(resize) if resize else None, app_dir=app_dir, weights=weights,
            normalize=normalize, device=device, data_dir=data_dir, out_dir=out_dir,
            overwrite=overwrite, progress=not quiet, show=_shower(_log if as_json else _echo),
            log=_log,
            trust_model_file=trust_model_file,
            defence=tables.defence if tables else None,
            transforms=tables.transforms if tables else None, checks_level=level,
            output=output, certify=_certify_methods(certify, attacks),
            save_adversarial=_save_adversarial(save_adversarial),
        )
    if _is_main_process():
        (_log if as_json else _echo)(f"results in {outcome.outputs['folder']}/ (results.csv, "
                                     "per_sample.csv, timings.csv, settings.json)")
    if as_json:
        sys.stdout.write(json.dumps(attack_summary(outcome), indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()
    failed = [] if outcome.checks is None else list(
        outcome.checks.loc[outcome.checks["status"] == "fail", "name"])
    if fail_on_check and failed:
        err.print(f"checks failed: {', '.join(failed)} (exit code 1: --fail-on-check)",
                  highlight=False)
        raise typer.Exit(1)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """For ``--json``: while the job (and the user's model code in it) runs, whatever is
    written to stdout goes to stderr instead, ``print`` and writes to file descriptor 1 (C
    code, ``os.write``) alike, so that stdout carries the JSON document alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        _flush_c_stdio()  # C's buffered stdout, filled while fd 1 was stderr, goes there
        os.dup2(saved, 1)
        os.close(saved)


def _flush_c_stdio() -> None:
    """``fflush(NULL)`` of the C library, where there is one to call."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


@app.command(epilog=_examples("robustkit run experiments/quickstart.toml"))
def run(
    config: Annotated[Path, typer.Argument(help="Experiment TOML file (see experiments/).")],
    set_: SetOption = None,
    device: DeviceOption = None,
    data_source: DataOption = None,
    resize: ResizeOption = None,
    app_dir: AppDirOption = None,
    data_dir: DataDirOption = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Report folder (default reports/NAME).")] = None,  # noqa: E501, UP045
    runs_dir: Annotated[Path, typer.Option("--runs", help="Checkpoint folder.")] = Path("runs"),
    retrain: Annotated[bool, typer.Option("--retrain", help="Train anew even if a matching checkpoint exists.")] = False,  # noqa: E501
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace another experiment's results in --out (and its checkpoints in --runs).")] = False,  # noqa: E501
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train (or reuse), attack over the ε sweep, check and report: the whole experiment."""
    from robustkit.jobs.run import run_experiment, seed_summary
    from robustkit.outputs import staging_path
    from robustkit.terminal import seed_summary_lines

    overrides = _data_overrides(set_, data_dir, data_source, resize, app_dir)
    cfg = load_config(config, overrides)
    folder = out_dir or Path("reports") / cfg.name
    _check_out(folder, "--out")
    _check_out(runs_dir, "--runs")
    _on_interrupt(f"finished training epochs (in {runs_dir / cfg.name}) and finished "
                  f"(attack, ε) cells (in {staging_path(folder)}) are kept; run the same "
                  "command again to resume")
    evaluations = run_experiment(
        config, overrides=overrides, out_dir=out_dir, runs_dir=runs_dir, retrain=retrain,
        device=device, progress=not quiet, overwrite=overwrite, show=_shower(_echo), log=_log)
    if len(evaluations) > 1 and _is_main_process():
        for line in seed_summary_lines(seed_summary(evaluations)[1]):
            _echo(line)


@app.command(epilog=_examples("robustkit zoo"))
def zoo(
    reports: Annotated[Optional[Path], typer.Option("--reports", help="Folder of reports (default: ./reports, then the checkout's).")] = None,  # noqa: E501, UP045
) -> None:
    """List the released models: one row per set of weights, with its strongest figure."""
    from robustkit.catalogue import listing
    from robustkit.released import list_released, zoo_roots

    roots = [reports] if reports is not None else zoo_roots()
    found = list_released(roots)
    if not found:
        out.print(f"no released weights in {', '.join(str(r) for r in roots)}: a report "
                  "carries them once robustkit run has written model.safetensors into it")
        return
    for line in listing(found):
        out.print(line, highlight=False, soft_wrap=True)


@app.command(epilog=_examples("robustkit certify --model zoo:mnist_mlp --eps 0,0.01,0.02 --n 100"))
def certify(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint, zoo:NAME, or package.module:factory with --weights (with --report: default, the report's own model).")] = None,  # noqa: E501, UP045
    eps: Annotated[Optional[str], typer.Option("--eps", help="Comma-separated budgets in [0,1] pixel units (L∞) or L2 norms [default: 0,0.1,0.3].")] = None,  # noqa: E501, UP045
    method: Annotated[str, typer.Option("--method", help="Comma-separated bounds: ibp, crown-ibp, crown.")] = "ibp,crown-ibp",  # noqa: E501
    norm: Annotated[Optional[str], typer.Option("--norm", help="The ball: linf or l2 [default: linf].")] = None,  # noqa: E501, UP045
    n: Annotated[Optional[int], typer.Option("--n", help="Certify the first N test images.")] = None,  # noqa: E501, UP045
    report: Annotated[Optional[Path], typer.Option("--report", help="Add the bounds to this finished evaluation (robustkit attack/run folder) at its own images, ε and norm, without attacking again: certified.csv, the check certified_not_broken, the report rebuilt.")] = None,  # noqa: E501, UP045
    tolerance: Annotated[float, typer.Option("--tolerance", help="Bisect each image's certified radius to this width (ε units).")] = 1e-3,  # noqa: E501
    weights: Annotated[Optional[Path], typer.Option("--weights", help="State dict for a factory model.")] = None,  # noqa: E501, UP045
    normalize: Annotated[Optional[str], typer.Option("--normalize", help="MEAN,STD the model expects.")] = None,  # noqa: E501, UP045
    data_source: DataOption = None,
    data_dir: DataDirOption = None,
    app_dir: AppDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result (table, per-image radii) as JSON on stdout.")] = False,  # noqa: E501
) -> None:
    """Certified accuracy: the fraction of images no attack within ε can change (a lower
    bound on robust accuracy, where the attacks give an upper bound), and each image's
    certified radius."""
    from robustkit.budgets import eps_bound
    from robustkit.certify.evaluate import certify_sweep
    from robustkit.models import load_model, parse_normalize
    from robustkit.sources import load_data
    from robustkit.stages import check_certifiable

    if report is not None:
        _certify_report(report, method, tolerance, model=model, eps=eps, norm=norm, n=n,
                        weights=weights, normalize=normalize, data_source=data_source,
                        data_dir=data_dir, app_dir=app_dir, as_json=as_json)
        return
    if model is None:
        raise RobustkitError("certify needs --model M (or --report DIR, to add the bounds to "
                             "a finished evaluation)")
    eps, norm = eps or "0,0.1,0.3", norm or "linf"
    eps_values = _float_list(eps, "--eps")
    methods = _bound_methods(method, norm, tolerance)
    if any(e < 0 for e in eps_values) or (norm == "linf" and any(e > 1 for e in eps_values)):
        raise RobustkitError(f"--eps {eps}: L∞ budgets lie in [0, 1] pixel units, L2 budgets "
                             "are non-negative")
    stats = parse_normalize(normalize) if normalize else None
    net, _ = load_model(model, weights=weights, normalize=stats, app_dir=app_dir)
    check_certifiable(net, methods, "--method")
    data = load_data(data_source, data_dir=data_dir, val_size=0, parts=("test",), limit=n)
    split = data.test.take(n)
    pixels = int(split.images[0].numel()) if len(split) else None
    if any(e > eps_bound(norm, pixels) for e in eps_values):
        raise RobustkitError(f"--eps {eps}: L2 budgets above √d = {eps_bound(norm, pixels):g} "
                             "reach every image; give smaller budgets")
    result = certify_sweep(net, split, eps_values, methods, norm=norm,  # type: ignore[arg-type]
                           tolerance=tolerance)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
        return
    _echo_certification(result, f"{model} on {len(split)} test images, {norm}", tolerance)


def _certify_report(folder: Path, method: str, tolerance: float, *, model: str | None,
                    eps: str | None, norm: str | None, n: int | None, weights: Path | None,
                    normalize: str | None, data_source: str | None, data_dir: Path | None,
                    app_dir: Path | None, as_json: bool) -> None:
    """``certify --report``: the report's own images, ε and norm; the bounds added to it."""
    from robustkit.jobs.certify import certify_report

    for given, option in ((eps, "--eps"), (norm, "--norm"), (n, "--n")):
        if given is not None:
            raise RobustkitError(f"{option} with --report: the bounds are computed on the "
                                 f"report's own images, ε and norm; leave {option} out")
    methods = _bound_methods(method, "linf", tolerance)
    table = certify_report(folder, methods, model=model, weights=weights,  # type: ignore[arg-type]
                           normalize=normalize, data_source=data_source, data_dir=data_dir,
                           app_dir=app_dir, log=_log)
    if as_json:
        sys.stdout.write(table.to_json(orient="records", indent=2) + "\n")
        return
    for _, row in table.iterrows():
        _echo(f"  {row['method']:<10} ε={row['eps']:<6g} {row['accuracy']:.4f} "
              f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]")
    _echo(f"report: {folder / 'report.md'}, {folder / 'report.html'}")


def _bound_methods(method: str, norm: str, tolerance: float) -> list[str]:
    """``--method``'s bounds, once ``--method``, ``--norm`` and ``--tolerance`` are valid."""
    from robustkit.certify import BOUND_NORMS, METHODS

    methods = [m.strip() for m in method.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise RobustkitError(f"--method {method!r}: choose from {', '.join(METHODS)}")
    if norm not in BOUND_NORMS:
        raise RobustkitError(f"--norm {norm!r}: certification covers {', '.join(BOUND_NORMS)}")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise RobustkitError(f"--tolerance {tolerance:g}: give a positive width, e.g. 0.001")
    return methods


def _echo_certification(result: Certification, what: str, tolerance: float) -> None:
    """The certify command's table and the median certified radius."""
    import numpy as np

    from robustkit.certify.evaluate import BEST

    _echo(f"certified accuracy of {what} "
          "(certified ≤ true robust accuracy ≤ any attack's figure):")
    for _, row in result.table.iterrows():
        _echo(f"  {row['method']:<10} ε={row['eps']:<6g} {row['accuracy']:.4f} "
              f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]  width {row['width_median']:.3g}"
              f"  {row['seconds']:.1f} s")
    radius = result.radius(BEST)
    correct = radius[~np.isnan(radius)]
    if len(correct):
        _echo(f"  median certified radius of the {len(correct)} correctly classified images: "
              f"{float(np.median(correct)):.4g} (best of {', '.join(result.methods)}; "
              f"bisected to {tolerance:g} between the swept ε, at most the largest)")


@app.command(epilog=_examples(
    "robustkit report reports/mnist_mlp reports/mnist_cnn --out reports/compare"))
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Evaluation folders to put on one report.")],  # noqa: E501
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Report folder (default: the only RUN_DIR).")] = None,  # noqa: E501, UP045
    title: Annotated[Optional[str], typer.Option("--title", help="Report title.")] = None,  # noqa: UP045
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace another experiment's results or report in --out.")] = False,  # noqa: E501
) -> None:
    """Build one HTML + Markdown + CSV report from one or more evaluation folders."""
    from robustkit.reporting.build import publish_report
    from robustkit.reporting.load import load_runs
    from robustkit.reporting.tables import comparability_notes

    if out_dir is None:
        if len(run_dirs) != 1:
            raise RobustkitError("several RUN_DIRs need --out DIR for the combined report")
        out_dir = run_dirs[0]
    _check_out(out_dir, "--out")
    _on_interrupt(f"the report in {out_dir} is left as it was (reports are swapped in whole); "
                  "run the same command again to rebuild it")
    paths, replaced = publish_report(list(run_dirs), out_dir, title=title, overwrite=overwrite)
    for kind, path in paths.items():
        out.print(f"{kind}: {path}")
    if replaced:
        _log(replaced)
    for note in comparability_notes(load_runs(list(run_dirs))):
        _log(f"warning: {note}")


def _rank_prefix() -> str:
    """``[rank R] `` on ranks other than 0 of a torchrun launch."""
    rank = os.environ.get("RANK", "0")
    return f"[rank {rank}] " if rank != "0" and os.environ.get("WORLD_SIZE", "1") != "1" else ""


def _leave_process_group() -> None:
    """Leave the torch.distributed group a torchrun launch joined (only if one was joined)."""
    module = sys.modules.get("robustkit.distributed")  # not imported: nothing to leave
    if module is not None:
        module.cleanup()


# What an interrupted command leaves behind and how to go on; each command sets it once it
# knows its folders (the default covers parsing and loading, before anything is written).
_interrupt_note = "nothing was written"


def _on_interrupt(note: str) -> None:
    global _interrupt_note
    _interrupt_note = note


def _say_error(message: str) -> None:
    """One ``error:`` line on stderr, printed literally (no rich markup, no wrapping)."""
    text = " ".join(str(message).split())  # one line, whatever the message holds
    sys.stderr.write(f"{_rank_prefix()}error: {text}\n")
    sys.stderr.flush()


def main() -> None:
    """Console-script entry point: every user error is one ``error: …`` line and exit code 2;
    Ctrl-C is one ``interrupted: …`` line and exit code 130."""
    try:
        code = _main()
    finally:
        _leave_process_group()
    sys.exit(code)


def _interrupted() -> int:
    sys.stderr.write(f"\n{_rank_prefix()}interrupted: {_interrupt_note}\n")
    sys.stderr.flush()
    return 130


def _main() -> int:
    """Run the app and turn every way it can end into an exit code.

    Usage errors are recognised by their shape (``exit_code`` and ``format_message``), not by
    importing click: typer vendors its own copy of click, and click need not be installed.
    Typer turns Ctrl-C into a returned 130 (older versions: ``Abort``); both are reported.
    """
    try:
        result = app(standalone_mode=False, prog_name="robustkit")
    except RobustkitError as exc:
        _say_error(str(exc))
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:  # click's (and old typer's) form of Ctrl-C
        return _interrupted()
    except OSError as exc:  # a full disk, an unwritable or vanished folder
        where = f" {exc.filename}" if exc.filename else ""
        _say_error(f"cannot use{where}: {exc.strerror or exc}: check the folder exists, is "
                   "writable and has free space, or choose another --out")
        return 2
    except Exception as exc:
        message = getattr(exc, "format_message", None)
        if not callable(message) or not isinstance(getattr(exc, "exit_code", None), int):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare ``robustkit``: show the help
            sys.stderr.write(str(message()) + "\n")
            return 2
        ctx = getattr(exc, "ctx", None)
        command = getattr(ctx, "command_path", None) or "robustkit"
        _say_error(f"{message()} (see {command} --help)")
        return 2
    if result == 130:  # typer's answer to KeyboardInterrupt
        return _interrupted()
    return result if isinstance(result, int) else 0  # a command's typer.Exit(n) comes back as n


if __name__ == "__main__":
    main()
