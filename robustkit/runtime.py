"""Where code runs and how a run is made reproducible: device choice, seeding, provenance.

torch is imported by the functions that use it, so the provenance text (``git_commit``,
``command_line``, ``now_iso``) serves reports and the folder guard without loading it."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from robustkit.allocator import allocator_description
from robustkit.errors import RobustkitError
from robustkit.version import __version__


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a usable device, or say why not.

    ``auto`` is the current CUDA device when one is present, else the CPU. CUDA devices always
    come back with their index (``cuda`` → ``cuda:0``, or the device a torchrun process was
    given), so they compare equal to the ``.device`` of tensors placed on them.
    """
    import torch

    text = str(spec).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise RobustkitError(
            f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RobustkitError(
                f"device {spec!r} asked for, but this torch build sees no CUDA GPU: "
                "use --device cpu (or auto)"
            )
        index = torch.cuda.current_device() if device.index is None else device.index
        device = torch.device("cuda", index)
        if index >= torch.cuda.device_count():
            raise RobustkitError(
                f"device {spec!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 … "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise RobustkitError(
            f"device {spec!r} asked for, but this machine has no usable Apple GPU (MPS): "
            "use --device cpu (or auto)"
        )
    elif device.type not in {"cpu", "mps"}:
        raise RobustkitError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG and return a CPU generator seeded the same way.

    robustkit draws all its own randomness (batch order, random starts) from explicit
    generators; the global seed covers weight initialisation.
    """
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def use_deterministic_algorithms() -> None:
    """Ask torch for deterministic kernels (bitwise-repeatable on CPU; warn-only on CUDA)."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


#: A copy of the source tree without its ``.git`` (as sent to a remote GPU machine) names the
#: commit it was copied from here, so results made there still trace to their code.
SOURCE_COMMIT_ENV = "ROBUSTKIT_SOURCE_COMMIT"


def git_commit() -> str | None:
    """The commit of the robustkit source tree, with ``+dirty`` when the code that computes
    results (the package and ``pyproject.toml``) has local changes; regenerated reports or
    edited configs elsewhere in the checkout do not count (configs are recorded by hash and
    copied into every run folder). Without a ``.git`` folder, ``$ROBUSTKIT_SOURCE_COMMIT``
    marked ``+copied`` (or None)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        named = os.environ.get(SOURCE_COMMIT_ENV, "").strip()
        return f"{named}+copied" if named else None
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
             "robustkit", "pyproject.toml"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def device_description(device: torch.device) -> str:
    """The device as a manifest records it. On the CPU: the processor model, the instruction set
    torch's kernels use and the thread count, the three things that decide whether a run
    reproduces another byte for byte (MKL and oneDNN pick their kernels by processor)."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return (f"cpu ({cpu_model()}, {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}"
            f", {threads} thread{'s' if threads != 1 else ''})")


def cpu_model() -> str:
    """The processor's model name (Linux's ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"


def provenance(device: torch.device, seed: int | None = None) -> dict[str, Any]:
    """Everything needed to trace a result back to the code, libraries and machine."""
    import numpy as np
    import torch

    return {
        "robustkit": __version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device": device_description(device),
        "allocator": allocator_description(),
        "seed": seed,
        "date": now_iso(),
        "command_line": command_line(),
    }


def command_line() -> str:
    """The command that is running, as a user would type it (``robustkit attack …``)."""
    args = list(sys.argv)
    if args and Path(args[0]).name in {"robustkit", "__main__.py", "cli.py"}:
        args[0] = "robustkit"
    return " ".join(shlex.quote(a) for a in args)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
