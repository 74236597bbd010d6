"""The closed vocabularies of robustkit: each written once, as a :data:`typing.Literal` type.

The config dataclasses, the attacks' signatures and the CLI use these types, and every list of
allowed values (what validation accepts, what an error message offers) is derived from them
with :func:`typing.get_args`, so a new value is added in one place. This module imports nothing
of robustkit: every layer, ``attacks/`` included, may import it.
"""

from __future__ import annotations

from typing import Literal, get_args

#: The threat models (balls) the attacks support; ε is in pixel units in each (L1: the sum of
#: the absolute pixel changes).
Norm = Literal["linf", "l2", "l1"]
#: The objectives an attack maximises (see :mod:`robustkit.attacks.losses`).
Loss = Literal["ce", "margin", "dlr"]
#: The attacks a config's ``[[attacks]]`` entry or ``--attack`` names.
AttackName = Literal["fgsm", "pgd", "apgd", "apgd-t", "fab-t", "square", "autoattack"]
#: The built-in IDX data sets (any other data goes through ``data.source``).
DatasetName = Literal["mnist", "fashion-mnist"]
#: The architectures of the model zoo.
Arch = Literal["softmax", "mlp", "cnn", "madry-cnn", "strided-cnn", "dm-small", "dm-medium",
               "dm-large"]
#: Training methods: plain, PGD adversarial training, FGSM with random start, TRADES, and the
#: certified methods (a bound on the worst-case loss: interval bounds, CROWN-IBP).
TrainMethod = Literal["standard", "pgd-at", "fgsm-rs", "trades", "ibp", "crown-ibp"]
#: The certified training methods among :data:`TrainMethod`.
CertifiedMethod = Literal["ibp", "crown-ibp"]
#: How certified training ramps its ε from 0: a straight line, or Shi et al.'s (2021) smooth
#: ramp (polynomial, then its tangent line).
EpsRamp = Literal["linear", "smooth"]
#: The initialisation of a certified-trained network: Shi et al.'s (2021) IBP initialisation,
#: or PyTorch's default.
CertifiedInit = Literal["ibp", "default"]
OptimizerName = Literal["sgd", "adam", "adamw"]
#: Per-iteration learning-rate schedules.
Schedule = Literal["constant", "step", "cosine", "onecycle", "cyclic"]
#: Training precision: float32, or autocast to bfloat16 / float16.
Precision = Literal["fp32", "bf16", "fp16"]
#: The split an evaluation attacks.
SplitName = Literal["test", "val"]
#: Preprocessing defences ``g`` in front of a model, ``f(g(x))``.
Preprocess = Literal["bit-depth", "median", "noise"]
#: BPDA's backward-pass approximations of a preprocessing step.
Approximation = Literal["identity", "mean-filter"]
#: The verdict of a sanity check.
Status = Literal["pass", "warn", "fail"]
#: How much checking follows a sweep: every check at its own budget, every check that can
#: discredit a number at budgets scaled to the evaluation, or none.
ChecksLevel = Literal["full", "quick", "off"]
#: Certified bounds (:mod:`robustkit.certify`): interval bound propagation, CROWN over IBP's
#: intermediate bounds, and CROWN throughout.
CertifyMethod = Literal["ibp", "crown-ibp", "crown"]
#: Which adversarial examples a sweep writes to disk: every sample's, or the broken ones'.
SaveAdversarial = Literal["all", "broken"]

NORMS: tuple[Norm, ...] = get_args(Norm)
LOSSES: tuple[Loss, ...] = get_args(Loss)
ATTACK_NAMES: tuple[AttackName, ...] = get_args(AttackName)
PREPROCESSING: tuple[Preprocess, ...] = get_args(Preprocess)
APPROXIMATIONS: tuple[Approximation, ...] = get_args(Approximation)
STATUSES: tuple[Status, ...] = get_args(Status)
CHECKS_LEVELS: tuple[ChecksLevel, ...] = get_args(ChecksLevel)
CERTIFY_METHODS: tuple[CertifyMethod, ...] = get_args(CertifyMethod)
SAVE_ADVERSARIAL: tuple[SaveAdversarial, ...] = get_args(SaveAdversarial)
CERTIFIED_METHODS: tuple[CertifiedMethod, ...] = get_args(CertifiedMethod)
#: The architectures that pool by maximum, which CROWN does not bound (IBP does).
MAX_POOLING_ARCHS: tuple[Arch, ...] = ("cnn", "madry-cnn")
