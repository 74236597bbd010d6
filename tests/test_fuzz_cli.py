"""Fuzzing the command line with bad configs and flag sets (issue #19, "Done when").

Each case is generated from a seeded random source: a valid base config (or flag set) with
random valid variations, plus one bad value from a catalogue, written into the TOML file or
passed as ``--set``. Every case must end the same way: exit code 2, exactly one line on stderr
and it starts with ``error:``, no traceback, and nothing written anywhere (the command runs in
an empty folder whose parent is checked too).

Most cases call the console-script function ``robustkit.cli.main`` in this process (one torch
import for all of them); a sample also goes through ``python -m robustkit`` in a child process.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SEED = 19


class Raw(str):
    """TOML text written as is (dates, nan, numbers TOML cannot hold, broken syntax)."""


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    files: dict[str, str]  # name → content, written beside the working folder
    what: str

    def __str__(self) -> str:
        return self.what


def toml_value(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(config: dict[str, Any]) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for section, values in config.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


def nested(depth: int) -> Raw:
    return Raw("[" * depth + "1" + "]" * depth)


# (key path, bad value); the path's last part is the key, the rest its table
BAD_CONFIG: list[tuple[str, Any]] = [
    ("name", "../escape"), ("name", ".."), ("name", ""), ("name", "/tmp/robustkit-fuzz-abs"),
    ("name", "a/b"), ("name", "n" * 101), ("name", Raw('"a\\u0000b"')), ("name", "$x$"),
    ("name", 5), ("seed", -1), ("seed", Raw("9223372036854775807")), ("seed", 2**32),
    ("seed", "zero"), ("seed", 1.5), ("seed", True), ("seed", Raw("1979-05-27")),
    ("seed", Raw("18446744073709551616")), ("seeds", [-1]), ("seeds", []), ("seeds", [1, "a"]),
    ("seeds", [0, 2**40]), ("device", "tpu"), ("device", "mps"), ("device", "cuda:-1"),
    ("device", ""), ("device", 5), ("device", "cuda:99"), ("description", nested(12)),
    ("description", Raw("07:32:00")), ("nmae", "x"),
    ("data.dataset", "cifar"), ("data.val_size", -1), ("data.val_size", 60000),
    ("data.split_seed", -1), ("data.dir", Raw("1979-05-27T07:32:00Z")), ("data.extra", 1),
    ("model.arch", "resnet"), ("model.arch", 3), ("model.depth", 3),
    ("train.epochs", 0), ("train.epochs", -1), ("train.lr", Raw("nan")),
    ("train.lr", Raw("inf")), ("train.lr", Raw("-inf")), ("train.lr", 0), ("train.lr", "fast"),
    ("train.momentum", 2), ("train.momentum", Raw("nan")), ("train.method", "magic"),
    ("train.batch_size", 0), ("train.optimizer", "lbfgs"), ("train.schedule", 1),
    ("train.ema_decay", 1.0), ("train.ema_decay", 0), ("train.ema_decay", Raw("nan")),
    ("train.label_smoothing", 1.5), ("train.precision", "fp8"), ("train.epocs", 3),
    ("train.adversarial", {"eps": 1.5}), ("train.adversarial", {"eps": Raw("nan")}),
    ("train.adversarial", {"steps": 0}), ("train.adversarial", {"steps": 10**9}),
    ("train.adversarial", {"beta": 0}), ("train.adversarial", {"step_size": 0}),
    ("train.adversarial", 3),
    ("attacks", [{"name": "cw"}]), ("attacks", [{"name": "pgd", "restarts": 0}]),
    ("attacks", [{"name": "pgd", "restarts": 1001}]),
    ("attacks", [{"name": "pgd", "restarts": 10**12}]),
    ("attacks", [{"name": "pgd", "steps": 0}]), ("attacks", [{"name": "pgd", "steps": 10**9}]),
    ("attacks", [{"name": "pgd", "norm": "l1"}]), ("attacks", [{"name": "pgd", "loss": "hinge"}]),
    ("attacks", [{"name": "pgd", "label": "$\\alpha$"}]),
    ("attacks", [{"name": "pgd", "label": "any"}]), ("attacks", [{"name": "pgd", "label": ""}]),
    ("attacks", [{"name": "pgd", "label": "[/x]"}]),
    ("attacks", [{"name": "apgd", "step_size": 0.01}]),
    ("attacks", [{"name": "pgd"}, {"name": "pgd"}]), ("attacks", "pgd"), ("attacks", [1]),
    ("attacks", [{"name": "pgd", "step_size": Raw("inf")}]),
    ("evaluate.eps", []), ("evaluate.eps", [0]), ("evaluate.eps", [0, -0.1]),
    ("evaluate.eps", [0, 2]), ("evaluate.eps", [Raw("nan")]), ("evaluate.eps", "0.3"),
    ("evaluate.n", 0), ("evaluate.batch_size", 0), ("evaluate.split", "train"),
    ("evaluate.seed", -1), ("evaluate.seed", 2**40),
    ("reference", {"attack": "fgsm", "eps": 2}), ("reference", {"error": Raw("nan")}),
    ("reference", {"sauce": "x"}),
]

VALID_VARIATIONS: list[tuple[str, Any]] = [
    ("train.epochs", 2), ("train.lr", 0.05), ("model.arch", "mlp"), ("model.arch", "cnn"),
    ("seeds", [0, 1]), ("evaluate.n", 100), ("description", "fuzz"), ("seed", 7),
    ("train.optimizer", "adam"), ("evaluate.eps", [0.0, 0.1]), ("data.val_size", 1000),
    ("attacks", [{"name": "fgsm"}]), ("train.method", "fgsm-rs"), ("evaluate.seed", 3),
]


def place(config: dict[str, Any], path: str, value: Any) -> None:
    *tables, key = path.split(".")
    node = config
    for table in tables:
        node = node.setdefault(table, {})
    node[key] = value


def config_case(rng: random.Random, index: int) -> Case:
    config: dict[str, Any] = {"model": {"arch": "softmax"}, "train": {"epochs": 1}}
    bad_path, bad_value = BAD_CONFIG[index % len(BAD_CONFIG)]
    for path, value in rng.sample(VALID_VARIATIONS, rng.randint(0, 4)):
        if path != bad_path and path.split(".")[0] != bad_path.split(".")[0]:
            place(config, path, value)  # valid noise away from the bad key's table
    command = rng.choice(["train", "run"])
    as_override = rng.random() < 0.4 and not isinstance(bad_value, (list, dict))
    args = [command, "../configs/c.toml"]
    if as_override:
        args += ["--set", f"{bad_path}={toml_value(bad_value)}"]
    else:
        place(config, bad_path, bad_value)
    if rng.random() < 0.3:
        args.append("-q")
    how = "--set" if as_override else "file"
    return Case(tuple(args), {"c.toml": to_toml(config)},
                f"{command} {bad_path}={toml_value(bad_value)[:40]} ({how})")


BAD_FLAGS: list[list[str]] = [
    ["--eps", "0"], ["--eps", ""], ["--eps", ","], ["--eps", "0,nan"], ["--eps", "0,inf"],
    ["--eps", "0,-0.1"], ["--eps", "0,2"], ["--eps", "a,b"], ["--eps", "0;0.1"],
    ["--attack", "cw"], ["--attack", ""], ["--attack", ","], ["--attack", "[/x]"],
    ["--norm", "l1"], ["--norm", ""], ["--loss", "hinge"], ["--steps", "0"], ["--steps", "-1"],
    ["--steps", str(10**9)], ["--steps", "x"], ["--restarts", "0"], ["--restarts", "1001"],
    ["--restarts", str(10**12)], ["--restarts", "1.5"], ["--step-size", "0"],
    ["--step-size", "-1"], ["--step-size", "nan"], ["--step-size", "inf"], ["--seed", "-1"],
    ["--seed", str(2**63)], ["--seed", str(2**32)], ["--n", "0"], ["--n", "-5"],
    ["--batch-size", "0"], ["--normalize", "a,b"], ["--normalize", "1"],
    ["--normalize", "0.1,0.2,0.3"], ["--device", "mps"], ["--device", "tpu"],
    ["--device", "cuda:99"], ["--model", ""], ["--model", "   "], ["--model", "nomodule:x"],
    ["--model", "torch.nn:Linear"], ["--model", "/nonexistent/m.pt2"],
    ["--model", "/nonexistent/m.safetensors"], ["--model", "torch.nn:NoSuchThing"],
    ["--bogus"], ["--eps"], ["--out", "../configs/afile"], ["--model", "../configs/m.pt2"],
    ["--model", "../configs/m.json"], ["--model", "../configs/m.pt"],
    ["--weights", "../configs/afile"], ["--weights", "../configs/m.pt"],
    ["--weights", "/nonexistent/w.safetensors"],
]
VALID_FLAGS: list[list[str]] = [
    ["--n", "10"], ["--steps", "5"], ["--attack", "fgsm"], ["--attack", "pgd,apgd"],
    ["--loss", "margin"], ["--targeted"], ["--batch-size", "64"], ["-q"], ["--seed", "4"],
    ["--norm", "linf"], ["--norm", "l2"],
]
FLAG_FILES = {"afile": "a file where a folder should be", "m.pt2": "not an archive",
              "m.json": "[1, 2]", "m.pt": "\x80\x04pickle"}


def flag_case(rng: random.Random, index: int) -> Case:
    bad = BAD_FLAGS[index % len(BAD_FLAGS)]
    flags: list[str] = []
    for extra in rng.sample(VALID_FLAGS, rng.randint(0, 4)):
        clash = extra[0] == bad[0] or (extra[0] == "--norm" and bad[0] == "--eps") or (
            extra[0] == "--attack" and bad[0] == "--step-size")
        if not clash:
            flags += extra
    model = [] if bad[0] == "--model" else ["--model", "torch.nn:Identity"]
    args = ["attack", *model, *flags, *bad] if bad != ["--eps"] else ["attack", *model, *bad]
    return Case(tuple(args), dict(FLAG_FILES), " ".join(bad)[:50] or "(empty)")


def cases() -> list[Case]:
    rng = random.Random(SEED)
    generated = [config_case(rng, i) for i in range(2 * len(BAD_CONFIG))]
    generated += [flag_case(rng, i) for i in range(2 * len(BAD_FLAGS))]
    return generated


CASES = cases()


def test_the_fuzzer_makes_enough_cases() -> None:
    assert len(CASES) >= 100
    assert len({c.args for c in CASES}) >= 100  # distinct command lines


def _prepare(root: Path, case: Case) -> Path:
    configs, work = root / "configs", root / "work"
    configs.mkdir()
    work.mkdir()
    for name, text in case.files.items():
        (configs / name).write_text(text, encoding="utf-8")
    return work


def _check(result: subprocess.CompletedProcess[str], root: Path, case: Case) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (case, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)
    assert "Traceback" not in result.stderr, case
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                     if not str(p.relative_to(root)).startswith("configs"))
    assert written == ["work"], (case, written)
    assert not Path("/tmp/robustkit-fuzz-abs").exists()


def test_fuzzed_configs_and_flags_fail_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    from robustkit.cli import main

    for i, case in enumerate(CASES):
        root = tmp_path / f"case-{i}"
        root.mkdir()
        monkeypatch.chdir(_prepare(root, case))
        stderr, real = io.StringIO(), sys.stderr
        monkeypatch.setattr(sys, "argv", ["robustkit", *case.args])
        sys.stderr = stderr
        try:
            main()
            code: int = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stderr = real
        _check(subprocess.CompletedProcess(case.args, code, "", stderr.getvalue()), root, case)


@pytest.mark.parametrize("index", [0, 7, len(BAD_CONFIG) * 2 + 3, len(CASES) - 1])
def test_fuzzed_cases_through_python_m_robustkit(index: int, tmp_path: Path) -> None:
    case = CASES[index]
    work = _prepare(tmp_path, case)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "robustkit", *case.args], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    _check(result, tmp_path, case)
