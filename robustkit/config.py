"""Experiment configs: TOML → frozen, validated dataclasses.

A config file has top-level keys (``name``, ``seed``/``seeds``, ``device``) and the sections
``[data]``, ``[model]``, ``[train]`` (with ``[train.adversarial]``), ``[[attacks]]`` and
``[evaluate]``. Loading checks every key: an unknown key (with a did-you-mean), a wrong type or
an out-of-range value raises :class:`RobustkitError` naming its key path, before any work starts.
``--set section.key=value`` overrides are applied to the raw TOML first, so they are validated the
same way. The resolved config serialises back to TOML and has a stable hash.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from robustkit.attack_specs import (
    OPTIONS,
    SPECS,
    attack_names,
    attack_spec,
    running_in,
    transferable,
)
from robustkit.budgets import eps_bound, sweep_eps_bound
from robustkit.errors import RobustkitError
from robustkit.results import ANY
from robustkit.vocabulary import (
    CERTIFIED_METHODS,
    MAX_POOLING_ARCHS,
    Approximation,
    Arch,
    CertifiedInit,
    CertifyMethod,
    ChecksLevel,
    DatasetName,
    EpsRamp,
    Loss,
    Norm,
    OptimizerName,
    Precision,
    Preprocess,
    SaveAdversarial,
    Schedule,
    SplitName,
    TrainMethod,
)

SEED_MAX = 2**32 - 1  # seeds are unsigned 32-bit: numpy's limit, and room for derived seeds
MAX_RESTARTS = 1000  # restarts run one after another: memory does not grow with the count
MAX_STEPS = 100_000
MAX_NESTING = 8  # tables and lists inside each other; real configs use three levels
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}")
LABEL_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+@() -]{0,63}")
#: The image shape (C, H, W) of the built-in data sets, MNIST and Fashion-MNIST.
BUILTIN_IMAGE = (1, 28, 28)


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Any:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}


@dataclass(frozen=True)
class DataConfig:
    dataset: DatasetName = "mnist"
    # any other data (robustkit.sources): a torchvision name (cifar10, svhn, ...), a .npz or
    # .safetensors file, or an image folder; replaces `dataset` when set
    source: str | None = None
    # resize every image to [H, W] (or [S] for S×S); images keep their size when unset
    resize: tuple[int, ...] | None = field(default=None, metadata=_range(1))
    dir: str | None = None
    val_size: int = field(default=5000, metadata=_range(0, 59_999))
    split_seed: int = field(default=0, metadata=_range(0, SEED_MAX))


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch = "mlp"
    # your own network: "package.module:function" (or a class) called with `args` as keyword
    # arguments, imported from app_dir, then the current folder; arch is then not used
    factory: str | None = None
    args: dict[str, Any] | None = None
    app_dir: str | None = None
    # where the factory's network keeps its logits when forward returns more: an index of a
    # tuple or list, a key of a dict, or an attribute ("logits")
    output: str | None = None
    # fine-tuning: the weights training starts from instead of a random initialisation, a
    # released model ("zoo:NAME") or a .safetensors file of this network (a robustkit
    # checkpoint or a bare state dict); the file's sha256 is part of the training hash
    pretrained: str | None = None


@dataclass(frozen=True)
class AdversarialConfig:
    """The inner attack of adversarial training (all ε in [0,1] pixel units, L∞)."""

    eps: float = field(default=0.3, metadata=_range(0, 1))
    steps: int = field(default=40, metadata=_range(1, MAX_STEPS))
    step_size: float | None = field(default=None, metadata=_range(0, 1, lo_open=True))
    random_start: bool = True
    warmup_epochs: int = field(default=0, metadata=_range(0))
    clean_fraction: float = field(default=0.0, metadata=_range(0, 1))
    beta: float = field(default=6.0, metadata=_range(0, lo_open=True))
    val_steps: int = field(default=20, metadata=_range(1, MAX_STEPS))
    val_n: int = field(default=1000, metadata=_range(1))


@dataclass(frozen=True)
class CertifiedConfig:
    """``[train.certified]``: certified training (``train.method`` ``ibp`` or ``crown-ibp``), L∞,
    ε in [0, 1] pixel units. At iteration t the loss is
    κ_t·CE(f(x), y) + (1 − κ_t)·CE(−m̲_t, y) over the margin lower bounds m̲_t at ε_t, with
    m̲ = β_t·CROWN-IBP + (1 − β_t)·IBP for crown-ibp (:mod:`robustkit.training.certified`).
    ε_t is 0 for ``start_epochs`` epochs, ramps (``ramp``) to ``train_eps`` over
    ``ramp_epochs`` epochs, then stays; κ and β go linearly from their start to their end value
    over the same ramp."""

    eps: float = field(default=0.3, metadata=_range(0, 1, lo_open=True))  # the target ε
    # the ε the ramp ends at, above the target (published: 0.4 for 0.3, 0.2 for 0.1); None: eps
    train_eps: float | None = field(default=None, metadata=_range(0, 1, lo_open=True))
    start_epochs: int = field(default=1, metadata=_range(0))
    ramp_epochs: int = field(default=10, metadata=_range(0))  # 0: fine-tuning only
    ramp: EpsRamp = "smooth"
    kappa_start: float = field(default=1.0, metadata=_range(0, 1))
    kappa_end: float = field(default=0.5, metadata=_range(0, 1))
    beta_start: float = field(default=1.0, metadata=_range(0, 1))
    beta_end: float = field(default=0.0, metadata=_range(0, 1))
    init: CertifiedInit = "ibp"
    # validation samples bounded (certified accuracy at eps) and attacked (PGD) after each epoch
    val_n: int = field(default=1000, metadata=_range(1))

    @property
    def final_eps(self) -> float:
        """The ε the ramp ends at: ``train_eps``, or the target ``eps`` when unset."""
        return self.train_eps if self.train_eps is not None else self.eps


@dataclass(frozen=True)
class TrainConfig:
    method: TrainMethod = "standard"
    epochs: int = field(default=3, metadata=_range(1))
    batch_size: int = field(default=128, metadata=_range(1))
    optimizer: OptimizerName = "sgd"
    lr: float = field(default=0.1, metadata=_range(0, lo_open=True))
    momentum: float = field(default=0.9, metadata=_range(0, 1))
    nesterov: bool = False
    weight_decay: float = field(default=0.0, metadata=_range(0))
    schedule: Schedule = "constant"
    lr_step_epochs: int = field(default=1, metadata=_range(1))
    lr_gamma: float = field(default=0.1, metadata=_range(0, 1, lo_open=True))
    label_smoothing: float = field(default=0.0, metadata=_range(0, 1))
    precision: Precision = "fp32"
    amp_attacks: bool = False
    compile: bool = False
    # weight averaging: validate and save the bias-corrected EMA of the weights with decay d;
    # None trains without it
    ema_decay: float | None = field(default=None,
                                    metadata=_range(0, 1, lo_open=True, hi_open=True))
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    # certified training's settings (train.method "ibp" or "crown-ibp"; None: the defaults)
    certified: CertifiedConfig | None = None
    # clip the gradient's global L2 norm to this before each step; None: no clipping
    grad_clip: float | None = field(default=None, metadata=_range(0, lo_open=True))

    @property
    def certified_settings(self) -> CertifiedConfig:
        """``certified``, or the defaults when the table is left out."""
        return self.certified if self.certified is not None else CertifiedConfig()


#: What a transfer attack's title starts with (a label may not contain the colon).
TRANSFER_PREFIX = "transfer:"

#: Steps per start of an attack that declares none (FGSM, Square): they take no steps, but the
#: field keeps the value it always had, so configs hash as before.
NO_STEPS = 40


@dataclass(frozen=True)
class AttackConfig:
    """One attack of an evaluation, ``name`` one of :mod:`robustkit.attack_specs`; only the
    settings its spec declares apply. ``step_size`` None means 2.5·ε/steps (PGD only: APGD
    sets its own step). ``steps`` left out (0) means the attack's default (its spec's).
    ``targets``: APGD-T's number of target classes (None: 9, AutoAttack's).
    ``queries`` and ``p_init``: Square's query budget per sample and initial square fraction
    (None: 5000 and 0.8, AutoAttack's), for ``square`` and the ``autoattack`` ensemble."""

    name: str = field(default="pgd", metadata={"choices": attack_names})
    norm: Norm = "linf"
    steps: int = field(default=0, metadata=_range(1, MAX_STEPS))
    step_size: float | None = field(default=None, metadata=_range(0, lo_open=True))
    restarts: int = field(default=1, metadata=_range(1, MAX_RESTARTS))
    loss: Loss = "ce"
    random_start: bool = True
    targeted: bool = False
    label: str | None = None
    targets: int | None = field(default=None, metadata=_range(1))
    queries: int | None = field(default=None, metadata=_range(1, 1_000_000))
    p_init: float | None = field(default=None, metadata=_range(0, 1, lo_open=True))

    # EOT (PGD/APGD): each step's gradient is the mean over this many draws of [transforms]
    # (the identity when there is no [transforms] table: for a randomised model); None: plain
    eot_samples: int | None = field(default=None, metadata=_range(1))
    # BPDA through the [defence] preprocessing: its backward pass becomes this approximation's
    bpda: Approximation | None = None
    # a transfer attack: craft the examples on this model (zoo:NAME, a checkpoint, or
    # "package.module:factory" with source_weights) and judge them on the evaluated one
    source: str | None = None
    source_weights: str | None = None

    def __post_init__(self) -> None:
        if self.steps == 0:
            spec = SPECS.get(self.name)
            object.__setattr__(self, "steps", spec.steps if spec and spec.steps else NO_STEPS)

    @property
    def title(self) -> str:
        """A short unique-ish name for tables, e.g. ``pgd40-margin``; a transfer attack's is
        ``transfer:`` and its attack's (``transfer:pgd40``)."""
        return (TRANSFER_PREFIX if self.source is not None else "") + self._own_title()

    def _own_title(self) -> str:
        if self.label:
            return self.label
        family = attack_spec(self.name).family
        if family == "single-step":
            return self.name + self._norm_tag
        if family in ("gradient-free", "ensemble"):
            return self._recipe_title()
        return self._iterative_title()

    @property
    def _norm_tag(self) -> str:
        """``-l2`` for L2, nothing for the default L∞."""
        return f"-{self.norm}" if self.norm != "linf" else ""

    def _recipe_title(self) -> str:
        """Square or the AutoAttack ensemble, then each setting that is not AutoAttack's."""
        ensemble = attack_spec(self.name).family == "ensemble"
        parts = [self.name if ensemble else f"{self.name}{self.queries or 5000}"]
        if ensemble:
            if self.steps != 100:
                parts.append(f"apgd{self.steps}")
            if self.queries not in (None, 5000):
                parts.append(f"square{self.queries}")
        if self.targets:
            parts.append(f"{self.targets}targets")
        if self.p_init is not None:
            parts.append(f"p{self.p_init:g}")
        if self.norm != "linf":
            parts.append(self.norm)
        return "-".join(parts)

    def _iterative_title(self) -> str:
        """PGD or APGD(-T): steps, restarts when several, then each setting off the default."""
        tag = f"{self.name}{self.steps}" + (f"x{self.restarts}" if self.restarts > 1 else "")
        if "loss" not in attack_spec(self.name).options:  # APGD-T: its objective is fixed
            return tag + (f"-{self.targets}targets" if self.targets else "") + self._norm_tag
        return tag + "".join(self._variant_tags())

    def _variant_tags(self) -> list[str]:
        """The loss, norm, targeting, EOT and BPDA tags of a PGD or APGD title, in that order."""
        tags = [f"-{self.loss}" if self.loss != "ce" else "", self._norm_tag,
                "-targeted" if self.targeted else ""]
        if self.eot_samples is not None:
            tags.append(f"-eot{self.eot_samples}")
        if self.bpda is not None:
            tags.append(f"-bpda-{self.bpda}" if self.bpda != "identity" else "-bpda")
        return tags


def _default_attacks() -> tuple[AttackConfig, ...]:
    return ATTACK_PRESETS["standard"]


#: Named attack lists (``--attack NAME`` in the CLI). ``standard``, the default: FGSM and the
#: AutoAttack-style ensemble. ``apgd-ce-margin``: the cheaper APGD-100 with the CE and the margin
#: loss (the gradient-free sanity check still runs Square on what they leave robust).
#: ``fgsm-pgd``: FGSM and PGD-40, the quick look that overstates robustness.
ATTACK_PRESETS: dict[str, tuple[AttackConfig, ...]] = {
    "standard": (AttackConfig(name="fgsm"), AttackConfig(name="autoattack")),
    "apgd-ce-margin": (AttackConfig(name="apgd"), AttackConfig(name="apgd", loss="margin")),
    "fgsm-pgd": (AttackConfig(name="fgsm"), AttackConfig(name="pgd")),
}
#: What a preset's ``autoattack`` becomes under EOT (``--eot-samples``): AutoAttack's own
#: configuration for randomised defences (Croce & Hein's ``version="rand"``: APGD-CE and
#: APGD-DLR, each step averaged over the EOT draws); its APGD-T and Square take no EOT.
EOT_ENSEMBLE: tuple[AttackConfig, ...] = (AttackConfig(name="apgd"),
                                          AttackConfig(name="apgd", loss="dlr"))


@dataclass(frozen=True)
class EvaluateConfig:
    eps: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
    n: int | None = field(default=None, metadata=_range(1))
    batch_size: int = field(default=1000, metadata=_range(1))
    split: SplitName = "test"
    seed: int = field(default=0, metadata=_range(0, SEED_MAX))
    # the sanity checks after the sweep: "full" (every check at its own budget), "quick"
    # (budgets scaled to the evaluation, reusing its outcomes) or "off"
    checks: ChecksLevel = "full"
    # certified lower bounds after the sweep, at the same ε: any of "ibp", "crown-ibp", "crown"
    certify: tuple[CertifyMethod, ...] = ()
    # write each (attack, ε) cell's adversarial examples to adversarial/: "all" or "broken"
    save_adversarial: SaveAdversarial | None = None


@dataclass(frozen=True)
class TransformConfig:
    """``[transforms]``: the distribution EOT attacks average over and robustness under
    transformation is measured with (ranges are ``[low, high]``, sampled uniformly)."""

    rotate: float = field(default=0.0, metadata=_range(0, 180))  # ± degrees
    translate: float = field(default=0.0, metadata=_range(0, 28))  # ± pixels
    scale: tuple[float, ...] = field(default=(1.0, 1.0), metadata=_range(0, 10, lo_open=True))
    brightness: tuple[float, ...] = field(default=(0.0, 0.0), metadata=_range(-1, 1))
    contrast: tuple[float, ...] = field(default=(1.0, 1.0), metadata=_range(0, 10))
    noise: float = field(default=0.0, metadata=_range(0, 1))  # σ, pixel units
    blur: tuple[float, ...] = field(default=(0.0, 0.0), metadata=_range(0, 5))  # σ, pixels
    # robustness under transformation: M fresh draws per image, at these ε (default: the sweep's)
    eval_samples: int = field(default=100, metadata=_range(1))
    eps: tuple[float, ...] | None = None
    examples: int = field(default=6, metadata=_range(1, 32))  # draws shown in the report
    seed: int = field(default=0, metadata=_range(0))


#: The ``[transforms]`` keys that describe the distribution (the rest say how to measure).
TRANSFORM_KEYS = ("rotate", "translate", "scale", "brightness", "contrast", "noise", "blur")


@dataclass(frozen=True)
class DefenceConfig:
    """``[defence]``: a preprocessing step in front of the trained model, ``f(g(x))``."""

    preprocess: Preprocess = "bit-depth"
    bits: int | None = field(default=None, metadata=_range(1, 16))  # bit-depth (default 3)
    size: int | None = field(default=None, metadata=_range(1, 27))  # median (odd, default 3)
    sigma: float | None = field(default=None, metadata=_range(0, 1))  # noise (default 0.3)


@dataclass(frozen=True)
class ReferenceConfig:
    """A published figure to put beside robustkit's: the error rate of ``attack`` at ``eps``."""

    source: str = ""
    attack: str = "fgsm"
    eps: float = field(default=0.25, metadata=_range(0, 1))
    error: float = field(default=0.0, metadata=_range(0, 1))
    note: str = ""


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    description: str = ""
    seed: int = field(default=0, metadata=_range(0, SEED_MAX))
    seeds: tuple[int, ...] | None = field(default=None, metadata=_range(0, SEED_MAX))
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attacks: tuple[AttackConfig, ...] = field(default_factory=_default_attacks)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    reference: ReferenceConfig | None = None
    transforms: TransformConfig | None = None
    defence: DefenceConfig | None = None

    @property
    def all_seeds(self) -> tuple[int, ...]:
        return self.seeds if self.seeds else (self.seed,)


# --------------------------------------------------------------------------- validation


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    if origin in (tuple, list):
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "table"
    return getattr(hint, "__name__", str(hint))


def _fail(path: str, message: str) -> typing.NoReturn:
    raise RobustkitError(f"config error at {path}: {message}")


def _convert(value: Any, hint: Any, path: str, meta: Any) -> Any:
    """``value`` from TOML as the type ``hint`` asks for, checked against the range in ``meta``
    (a field's :func:`_range` metadata); raises at ``path`` when it does not fit."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return None if value is None else _convert(value, _optional_of(hint), path, meta)
    if origin is Literal:
        return _choice(value, typing.get_args(hint), path)
    if meta and "choices" in meta:  # a closed list read when the config is: the attack names
        return _choice(_scalar(value, hint, path), tuple(meta["choices"]()), path)
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), _table(value, path, _type_of), path)
    if origin in (tuple, list):
        return _sequence(value, typing.get_args(hint)[0], path, meta)
    if origin is dict:
        val_hint = typing.get_args(hint)[1]
        return {k: _convert(v, val_hint, f"{path}.{k}", None)
                for k, v in _table(value, path, repr).items()}
    if hint is bool:  # a boolean has no range
        return _scalar(value, bool, path)
    value = _scalar(value, hint, path)
    _check_range(value, path, meta)
    return value


def _optional_of(hint: Any) -> Any:
    """``T`` of ``T | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0]


def _choice(value: Any, choices: tuple[Any, ...], path: str) -> Any:
    """``value`` when it is one of ``choices``; otherwise the error names the closest."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        _fail(path, f"{value!r} is not one of {', '.join(map(repr, choices))}{hint_text}")
    return value


def _table(value: Any, path: str, shown: Callable[[Any], str]) -> dict[str, Any]:
    """``value`` when it is a TOML table; the error quotes anything else as ``shown(value)``."""
    if not isinstance(value, dict):
        _fail(path, f"expected a table, got {shown(value)}")
    return value


def _type_of(value: Any) -> str:
    return type(value).__name__


def _sequence(value: Any, item_hint: Any, path: str, meta: Any) -> tuple[Any, ...]:
    """A TOML list as a tuple of ``item_hint``; a field's range applies to each plain item."""
    if not isinstance(value, list):
        _fail(path, f"expected a list of {_type_name(item_hint)}, got {value!r}")
    item_meta = None if dataclasses.is_dataclass(item_hint) else meta
    return tuple(_convert(v, item_hint, f"{path}[{i}]", item_meta) for i, v in enumerate(value))


def _scalar(value: Any, hint: Any, path: str) -> Any:
    """A boolean, integer, number (as a finite float) or string; other hints pass as they are."""
    check = _SCALARS.get(hint)
    return value if check is None else check(value, path)


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        _fail(path, f"expected true or false, got {value!r}")
    return value


def _integer(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # TOML's true is no integer
        _fail(path, f"expected an integer, got {value!r}")
    return value


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(path, f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        _fail(path, f"{number!r} is not a finite number: give a value such as 0.1")
    return number


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, f"expected a string, got {value!r}")
    return value


#: The check and conversion of each plain TOML type a config field can have.
_SCALARS: dict[Any, Callable[[Any, str], Any]] = {
    bool: _boolean, int: _integer, float: _number, str: _string}


def _check_range(value: Any, path: str, meta: Any) -> None:
    if not meta or not isinstance(value, (int, float)):
        return
    lo, hi, lo_open, hi_open = meta["lo"], meta["hi"], meta["lo_open"], meta["hi_open"]
    if lo is not None and (value <= lo if lo_open else value < lo):
        _fail(path, f"{value!r} is out of range: must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        _fail(path, f"{value!r} is out of range: must be {'<' if hi_open else '<='} {hi}")


def _build(cls: type, raw: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            where = f"{path}.{key}" if path else key
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(where, f"unknown key{hint}; allowed keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            where = f"{path}.{name}" if path else name
            kwargs[name] = _convert(raw[name], hints[name], where, f.metadata or None)
    return cls(**kwargs)


def _check_plain(value: Any, path: str, depth: int = 0) -> None:
    """Only what configs are made of: tables, lists, strings without NUL, numbers, booleans,
    nested at most ``MAX_NESTING`` deep (TOML dates and times are refused here)."""
    where = path or "the config"
    if depth > MAX_NESTING:
        _fail(where, f"nested more than {MAX_NESTING} levels deep: configs use at most three")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(item, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{path}[{i}]", depth + 1)
    elif isinstance(value, (datetime.date, datetime.time)):
        _fail(where, f"a date or time ({value}) is not a config value: write a number or a "
              "quoted string")
    elif isinstance(value, str) and "\0" in value:
        _fail(where, "contains a NUL character: remove it")


def check_name(name: str, what: str = "name") -> None:
    """An experiment name is one safe folder name: it picks ``runs/NAME`` and
    ``reports/NAME``, so it may not be empty, ``..``, absolute or contain a separator."""
    if not NAME_PATTERN.fullmatch(name):
        shown = name if len(name) <= 60 else name[:57] + "..."
        _fail(what, f"{shown!r} is not a usable experiment name: use 1 to 100 letters, digits, "
              "'_', '.', '+' or '-', starting with a letter, digit or '_' (it becomes a folder "
              "name under runs/ and reports/)")


def _check_consistency(config: ExperimentConfig) -> None:
    """The rules that span several keys, in this order; each raises at the key to change."""
    check_name(config.name)
    _check_eps_given(config)
    _check_resize(config.data)
    _check_eps_range(config)
    _check_model(config.model)
    _check_seeds(config.seeds)
    _check_validation(config)
    _check_certified(config)
    for i, attack in enumerate(config.attacks):
        _check_attack(attack, f"attacks[{i}]", config.defence)
    _check_transforms(config.transforms)
    _check_defence(config.defence)
    _check_titles(config.attacks)
    _check_reference(config)
    _check_certify(config)


def _check_certify(config: ExperimentConfig) -> None:
    """Certified bounds cover the L∞ or the L2 ball: the attacks beside them share one."""
    norms = {a.norm for a in config.attacks}
    if config.evaluate.certify and not (len(norms) == 1 and norms <= {"linf", "l2"}):
        _fail("evaluate.certify", "bounds the L∞ or the L2 ball: certify beside attacks that "
              "all use one of those norms (or leave certify out)")


def _input_pixels(data: DataConfig) -> int | None:
    """The values per image the model sees when the config fixes them: a built-in data set's
    C·H·W (H×W as ``resize`` says); None for any other source, known once it is loaded."""
    if data.source is not None:
        return None
    channels, height, width = BUILTIN_IMAGE
    if data.resize:
        height, width = data.resize[0], data.resize[-1]
    return channels * height * width


def _check_eps_given(config: ExperimentConfig) -> None:
    """At least one ε above 0, unless ``transforms.eps`` gives the attacks their budgets."""
    measured_elsewhere = config.transforms is not None and bool(config.transforms.eps)
    if not config.evaluate.eps or (all(e == 0 for e in config.evaluate.eps)
                                   and not measured_elsewhere):
        _fail("evaluate.eps", "needs at least one budget above 0 (0 alone is clean accuracy "
              "only), e.g. [0, 0.1, 0.2, 0.3]")


def _check_resize(data: DataConfig) -> None:
    if data.resize is not None and len(data.resize) not in (1, 2):
        _fail("data.resize", f"{list(data.resize)}: give [H, W] or [S]")


def _check_eps_range(config: ExperimentConfig) -> None:
    """Every ε within the largest budget of the attacks' norms (:func:`sweep_eps_bound`)."""
    pixels = _input_pixels(config.data)
    upper = sweep_eps_bound((a.norm for a in config.attacks), pixels)
    l2 = (f"at most √d = {eps_bound('l2', pixels):g} for d = {pixels} values per image; L1 "
          f"budgets at most d = {pixels}" if pixels is not None else
          "at most √d and L1 budgets at most d, d = values per image")
    for i, eps in enumerate(config.evaluate.eps):
        if not 0.0 <= eps <= upper:
            _fail(f"evaluate.eps[{i}]", f"{eps} is out of range: ε is in [0, {upper:g}] pixel "
                  f"units (L∞ budgets are at most 1; L2 budgets {l2})")


def _check_model(model: ModelConfig) -> None:
    if model.factory is not None and (":" not in model.factory or model.factory.startswith(":")
                                      or model.factory.endswith(":")):
        _fail("model.factory", f"{model.factory!r}: expected \"package.module:function\"")
    unused = [k for k in ("args", "app_dir", "output") if getattr(model, k) is not None]
    if model.factory is None and unused:
        _fail(f"model.{unused[0]}", "only used with model.factory = \"package.module:function\"")
    if model.pretrained is not None and not (
            (model.pretrained.startswith("zoo:") and model.pretrained[4:].strip())
            or model.pretrained.strip().endswith(".safetensors")):
        _fail("model.pretrained", f"{model.pretrained!r}: name a released model (\"zoo:NAME\", "
              "robustkit zoo lists them) or a .safetensors file of this network")


def _check_seeds(seeds: tuple[int, ...] | None) -> None:
    if seeds is not None and len(seeds) == 0:
        _fail("seeds", "must list at least one seed, or be left out")
    if seeds is not None and len(set(seeds)) != len(seeds):
        _fail("seeds", f"{list(seeds)} lists a seed twice: list each seed once")


def _check_validation(config: ExperimentConfig) -> None:
    """What needs validation images has them."""
    if config.data.val_size == 0 and config.evaluate.split == "val":
        _fail("evaluate.split", "'val' needs validation images: set data.val_size > 0")
    if config.data.val_size == 0 and config.train.method != "standard":
        _fail("data.val_size", f"{config.train.method} training selects its checkpoint on "
              "validation data: set data.val_size > 0")


def _check_certified(config: ExperimentConfig) -> None:
    """Certified training's settings fit the run: a ramp within the epochs, a training ε not
    below the target, float32 bounds (never autocast), CROWN-IBP only on a network it bounds."""
    train, certified = config.train, config.train.certified_settings
    if train.method not in CERTIFIED_METHODS:
        if train.certified is not None:
            _fail("train.certified", "only used with train.method = \"ibp\" or \"crown-ibp\"")
        return
    if certified.ramp_epochs == 0 and config.model.pretrained is None:
        _fail("train.certified.ramp_epochs", "0 starts at full ε, which only a pretrained "
              "network survives (from a random start the interval bounds explode): ramp over "
              "at least 1 epoch, or fine-tune (model.pretrained)")
    ramp_end = certified.start_epochs + certified.ramp_epochs
    if ramp_end > train.epochs:
        _fail("train.certified.ramp_epochs", f"the ε ramp ends after epoch {ramp_end} "
              f"(start_epochs {certified.start_epochs} + ramp_epochs {certified.ramp_epochs}), "
              f"past the run's {train.epochs} epochs: shorten the ramp or raise train.epochs")
    if certified.final_eps < certified.eps:
        _fail("train.certified.train_eps", f"{certified.final_eps} is below the target ε "
              f"{certified.eps}: train at the target or above (0.4 for 0.3 is the usual choice)")
    if train.precision != "fp32" or train.compile:
        key = "train.precision" if train.precision != "fp32" else "train.compile"
        _fail(key, f"{train.method} training computes its bounds in float32 on the model "
              "itself: use precision = \"fp32\" and compile = false")
    if (train.method == "crown-ibp" and config.model.factory is None
            and config.model.arch in MAX_POOLING_ARCHS):
        _fail("model.arch", f"{config.model.arch} pools by maximum, which CROWN-IBP cannot "
              "bound: choose a strided network (dm-small, dm-medium, dm-large, strided-cnn) "
              "or train.method = \"ibp\"")


def _check_attack(attack: AttackConfig, where: str, defence: DefenceConfig | None) -> None:
    _check_label(attack.label, where)
    _check_norm(attack, where)
    _check_apgd(attack, where)
    _check_square(attack, where)
    _check_eot_bpda(attack, where, defence)
    _check_options(attack, where)
    _check_transfer(attack, where)


def _check_norm(attack: AttackConfig, where: str) -> None:
    """The attack runs in its norm (L1: APGD, APGD-T and the ensemble only)."""
    spec = attack_spec(attack.name)
    if attack.norm not in spec.norms:
        _fail(f"{where}.norm", f"{attack.name} does not run in {attack.norm}: {attack.norm} "
              f"attacks are {', '.join(running_in(attack.norm))}")


def _check_options(attack: AttackConfig, where: str) -> None:
    """Every setting away from its default must be one the attack's spec declares."""
    spec = attack_spec(attack.name)
    defaults = AttackConfig(name=attack.name)
    for key in OPTIONS:
        if key not in spec.options and getattr(attack, key) != getattr(defaults, key):
            takes = ", ".join(sorted(spec.options)) or "no settings but norm and label"
            _fail(f"{where}.{key}", f"{key} is not a setting of {attack.name} (it takes "
                  f"{takes})")


def _check_label(label: str | None, where: str) -> None:
    if label is not None and (not LABEL_PATTERN.fullmatch(label) or label == ANY):
        _fail(f"{where}.label", f"{label[:60]!r} is not a usable label: use 1 to "
              f"64 letters, digits, spaces or _ . + - @ ( ), not {ANY!r} (it names table "
              "columns and figure legends)")


def _check_apgd(attack: AttackConfig, where: str) -> None:
    """APGD sets its own step; APGD-T fixes its objective."""
    spec = attack_spec(attack.name)
    if spec.iterative and "step_size" not in spec.options and attack.step_size is not None:
        _fail(f"{where}.step_size", "APGD adapts its own step size (it starts at 2ε); "
              "remove step_size, or use name = \"pgd\"")
    if spec.iterative and "loss" not in spec.options and (attack.targeted or
                                                            attack.loss != "ce"):
        _fail(where, "apgd-t is untargeted and always uses the targeted DLR loss "
              "towards each of its target classes; remove targeted and loss")
    if attack.targets is not None and "targets" not in attack_spec(attack.name).options:
        _fail(f"{where}.targets", f"targets is an apgd-t setting, not {attack.name}'s")


def _check_square(attack: AttackConfig, where: str) -> None:
    """Square's settings only on Square; the fixed recipes take no PGD options."""
    spec = attack_spec(attack.name)
    for key in ("queries", "p_init"):
        if getattr(attack, key) is not None and key not in spec.options:
            _fail(f"{where}.{key}", f"{key} is a Square setting (square, autoattack), "
                  f"not {attack.name}'s")
    if spec.family in ("gradient-free", "ensemble"):
        changed = [k for k, default in (("loss", "ce"), ("targeted", False), ("restarts", 1),
                                        ("step_size", None), ("random_start", True))
                   if getattr(attack, k) != default]
        if changed:
            _fail(where, f"{attack.name} runs a fixed recipe; remove "
                  f"{', '.join(changed)} (it takes norm, steps, targets, queries, p_init)")


def _check_eot_bpda(attack: AttackConfig, where: str, defence: DefenceConfig | None) -> None:
    if attack.eot_samples is not None and attack_spec(attack.name).family == "single-step":
        _fail(f"{where}.eot_samples", "EOT averages the gradients of an iterative "
              "attack's steps: use name = \"pgd\" or \"apgd\"")
    if attack.bpda is not None and defence is None:
        _fail(f"{where}.bpda", "BPDA replaces the backward pass of a preprocessing "
              "defence: declare one (a defence table in the config, --defence on the command "
              "line), or remove bpda")


def _check_transfer(attack: AttackConfig, where: str) -> None:
    """A transfer attack runs blind on its source: an attack that can (FGSM, PGD, APGD), on
    the plain source (no EOT, no BPDA); its weights only with a source."""
    if attack.source is None:
        if attack.source_weights is not None:
            _fail(f"{where}.source_weights", "only used with source = \"package.module:"
                  "factory\" (the model a transfer attack crafts on)")
        return
    if not attack.source.strip():
        _fail(f"{where}.source", "is empty: name the model to craft on (zoo:NAME, a "
              "checkpoint, or package.module:factory with source_weights)")
    if attack.name not in transferable():
        _fail(f"{where}.source", f"{attack.name} is not transferred (it stops on success or "
              f"searches by it): transfer {', '.join(transferable())}")
    for key in ("eot_samples", "bpda"):
        if getattr(attack, key) is not None:
            _fail(f"{where}.{key}", f"a transfer attack crafts on its source model as it is: "
                  f"remove {key}, or source")


def _check_titles(attacks: tuple[AttackConfig, ...]) -> None:
    titles = [a.title for a in attacks]
    duplicates = {t for t in titles if titles.count(t) > 1}
    if duplicates:
        _fail("attacks", f"two attacks share the name {sorted(duplicates)[0]!r}: give one a label")


def _check_reference(config: ExperimentConfig) -> None:
    """The reference names a results row of this config: checked now, not after the sweep."""
    reference = config.reference
    if reference is None:
        return
    titles = [a.title for a in config.attacks]
    rows = titles + ([ANY] if len(titles) > 1 else [])
    if reference.attack not in rows:
        _fail("reference.attack", f"{reference.attack!r} is not an attack of this config: "
              f"choose one of {', '.join(map(repr, rows))}")
    if not any(abs(e - reference.eps) < 1e-9 for e in config.evaluate.eps):
        _fail("reference.eps", f"{reference.eps:g} is not in evaluate.eps: add it there")


def _check_transforms(transforms: TransformConfig | None) -> None:
    if transforms is None:
        return
    for key in ("scale", "brightness", "contrast", "blur"):
        pair = getattr(transforms, key)
        if len(pair) != 2 or pair[0] > pair[1]:
            _fail(f"transforms.{key}", f"expected a range of two numbers, low <= high, got "
                  f"{list(pair)}")
    for i, eps in enumerate(transforms.eps or ()):
        if not 0.0 < eps <= eps_bound("linf"):
            _fail(f"transforms.eps[{i}]", f"{eps} is out of range: ε is in "
                  f"(0, {eps_bound('linf'):g}] (L∞ pixel units)")


def _check_defence(defence: DefenceConfig | None) -> None:
    if defence is None:
        return
    own = {"bit-depth": "bits", "median": "size", "noise": "sigma"}[defence.preprocess]
    for key in ("bits", "size", "sigma"):
        if key != own and getattr(defence, key) is not None:
            _fail(f"defence.{key}", f"does not apply to preprocess = {defence.preprocess!r} "
                  f"(it takes {own})")
    if defence.size is not None and defence.size % 2 == 0:
        _fail("defence.size", f"{defence.size} is even: a median window needs an odd size")


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.epochs=5`` → (["train", "epochs"], 5); values are TOML, bare words are strings."""
    if "=" not in text:
        raise RobustkitError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=5")
    key, value_text = text.split("=", 1)
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise RobustkitError(f"--set {text!r}: the key {key!r} has an empty part")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = value_text.strip()
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise RobustkitError(f"--set {text!r}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    _check_plain(raw, "")
    raw = apply_overrides(json.loads(json.dumps(raw)), overrides or [])
    _check_plain(raw, "")
    config = typing.cast(ExperimentConfig, _build(ExperimentConfig, raw, ""))
    _check_consistency(config)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read and validate an experiment TOML file."""
    path = Path(path)
    if not path.is_file():
        raise RobustkitError(f"config file {path} not found: check the path (see experiments/)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RobustkitError(f"{path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise RobustkitError(f"{path} is nested too deeply to be a config: configs use at "
                             "most three levels of tables and lists") from None
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, overrides)


# --------------------------------------------------------------------------- output


def to_dict(config: Any) -> Any:
    """A JSON/TOML-ready view: tuples become lists, None values are dropped."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)
                if getattr(config, f.name) is not None}
    if isinstance(config, (tuple, list)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


#: The fields that count in every hash at any value: the schema as it stood when the hashes of
#: the committed reports and checkpoints were made (robustkit 0.1.0). A field added since counts
#: only when it holds something other than its default, so a new field whose default keeps the
#: old behaviour moves no hash and orphans no result folder or checkpoint. (Hence: never change
#: the default of a field that is not listed here; add a new field instead.) None never counts.
HASHED_FIELDS: dict[str, frozenset[str]] = {
    "ExperimentConfig": frozenset({"name", "description", "seed", "seeds", "device", "data",
                                   "model", "train", "attacks", "evaluate", "reference"}),
    "DataConfig": frozenset({"dataset", "dir", "val_size", "split_seed"}),
    "ModelConfig": frozenset({"arch"}),
    "TrainConfig": frozenset({"method", "epochs", "batch_size", "optimizer", "lr", "momentum",
                              "nesterov", "weight_decay", "schedule", "lr_step_epochs",
                              "lr_gamma", "label_smoothing", "precision", "amp_attacks",
                              "compile", "ema_decay", "adversarial"}),
    "AdversarialConfig": frozenset({"eps", "steps", "step_size", "random_start",
                                    "warmup_epochs", "clean_fraction", "beta", "val_steps",
                                    "val_n"}),
    "AttackConfig": frozenset({"name", "norm", "steps", "step_size", "restarts", "loss",
                               "random_start", "targeted", "label"}),
    "EvaluateConfig": frozenset({"eps", "n", "batch_size", "split", "seed"}),
    "ReferenceConfig": frozenset({"source", "attack", "eps", "error", "note"}),
}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def hash_view(value: Any) -> Any:
    """What a hash covers: :func:`to_dict`, less the fields added after the hashed schema
    (:data:`HASHED_FIELDS`) that hold their default."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        always = HASHED_FIELDS.get(type(value).__name__, frozenset())
        view = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None or (f.name not in always and item == _default(f)):
                continue
            view[f.name] = hash_view(item)
        return view
    if isinstance(value, (tuple, list)):
        return [hash_view(v) for v in value]
    if isinstance(value, dict):
        return {k: hash_view(v) for k, v in value.items()}
    return value


def digest(value: Any) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON encoding of :func:`hash_view`."""
    text = json.dumps(hash_view(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_hash(config: ExperimentConfig) -> str:
    """The hash of everything in the config that can change a result (see :func:`hash_view`)."""
    return digest(dataclasses.replace(config, description=""))


def training_hash(config: ExperimentConfig, seed: int, pretrained_sha256: str | None = None
                  ) -> str:
    """The hash of what determines a trained model: data, model, train settings and seed, and
    for fine-tuning the sha256 of the weights it starts from (``pretrained_sha256``, required
    with ``model.pretrained``) in place of their file's name: the same bytes under another
    name are the same training, other bytes under the same name another."""
    if (config.model.pretrained is None) != (pretrained_sha256 is None):
        raise ValueError("pretrained_sha256 goes with model.pretrained, and only with it")
    model = dataclasses.replace(config.model, pretrained=pretrained_sha256)
    return digest({"data": config.data, "model": model, "train": config.train,
                   "seed": seed, "device": config.device})


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(config: ExperimentConfig) -> str:
    """The resolved config as TOML that :func:`load_config` reads back to an equal config."""
    lines: list[str] = []

    def table(prefix: str, values: dict[str, Any], header: str | None) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)
                   and not (isinstance(v, list) and v and isinstance(v[0], dict))}
        if header:
            lines.extend(["", header])
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{prefix}{k}.", v, f"[{prefix}{k}]")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    table(f"{prefix}{k}.", item, f"[[{prefix}{k}]]")

    table("", to_dict(config), None)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command-line specs


def parse_transform_spec(text: str) -> dict[str, Any]:
    """``rotate=15,translate=2,scale=0.9:1.1,noise=0.05`` → a raw ``[transforms]`` table.

    A range is ``low:high``; a single number means ``±b`` for brightness, ``[0, b]`` for blur
    and ``[b, b]`` for scale and contrast; ``eps=0.1:0.2:0.3`` lists the ε to measure at.
    Keys and values are validated like the config's.
    """
    raw: dict[str, Any] = {}
    ranges = {f.name for f in dataclasses.fields(TransformConfig)
              if f.name in TRANSFORM_KEYS and isinstance(f.default, tuple)}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise RobustkitError(f"--transform {text!r}: expected key=value pairs, e.g. "
                                 "rotate=15,translate=2,scale=0.9:1.1,noise=0.05")
        try:
            numbers = [float(v) for v in value.split(":")]
        except ValueError:
            raise RobustkitError(f"--transform {text!r}: {value!r} is not a number or "
                                 "low:high range") from None
        if key == "eps":  # the ε list of the measurement: eps=0.1:0.2:0.3
            raw[key] = numbers
        elif key in ranges:
            if len(numbers) == 1:
                b = numbers[0]
                numbers = {"brightness": [-b, b], "blur": [0.0, b]}.get(key, [b, b])
            raw[key] = numbers
        elif len(numbers) != 1:
            raise RobustkitError(f"--transform {text!r}: {key} takes one number, not a range")
        else:
            integer = key in ("eval_samples", "examples", "seed") and numbers[0].is_integer()
            raw[key] = int(numbers[0]) if integer else numbers[0]
    return raw


def parse_defence_spec(text: str) -> dict[str, Any]:
    """``bit-depth:3``, ``median:3``, ``noise:0.3`` (or the name alone) → a raw ``[defence]``."""
    kind, _, value = text.strip().partition(":")
    raw: dict[str, Any] = {"preprocess": kind}
    if value:
        key = {"bit-depth": "bits", "median": "size", "noise": "sigma"}.get(kind, "bits")
        try:
            raw[key] = float(value) if key == "sigma" else int(value)
        except ValueError:
            raise RobustkitError(f"--defence {text!r}: {value!r} is not a number "
                                 "(e.g. bit-depth:3, median:3, noise:0.3)") from None
    return raw
