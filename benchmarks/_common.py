"""Helpers shared by the benchmark scripts: data location, torchvision folder, table printing."""

from __future__ import annotations

import gzip
import os
import platform
import shutil
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import torch

from robustkit.data import DATA_ENV, FILE_NAMES


def default_data_dir() -> str | None:
    """``$ROBUSTKIT_DATA`` when set; otherwise robustkit's own search order applies."""
    return os.environ.get(DATA_ENV) or None


THREADS_HELP = (
    "torch intra-op threads (default 1). On a 2-core machine shared with other jobs, 2 OpenMP "
    "threads spin-wait on each other and a step can take up to 30x longer; with an idle "
    "machine, or OMP_WAIT_POLICY=PASSIVE set, --threads 2 is fine. Both sides of a comparison "
    "use the same."
)


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, n))


def torchvision_mnist_root(source: Path, root: Path) -> Path:
    """Lay out ``root/MNIST/raw`` the way ``torchvision.datasets.MNIST(root, download=False)``
    wants it.

    torchvision with ``download=False`` only accepts the *uncompressed* IDX files (it extracts
    ``.gz`` files only inside its download step), so the ``.gz`` files are symlinked and
    decompressed next to their links; uncompressed sources are symlinked as they are.
    """
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILE_NAMES.values():
        packed, plain = source / f"{name}.gz", source / name
        if packed.is_file():
            (raw / f"{name}.gz").symlink_to(packed.resolve())
            with gzip.open(packed, "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            (raw / name).symlink_to(plain.resolve())
    return root


def source_version() -> str:
    """robustkit's git commit (``+dirty`` with uncommitted changes), or its package version."""
    try:
        from robustkit.runtime import git_commit

        commit = git_commit()
    except ImportError:
        commit = None
    if commit:
        sha, _, dirty = commit.partition("+")
        return f"robustkit {sha[:12]}{'+' + dirty if dirty else ''}"
    import robustkit

    return f"robustkit {robustkit.__version__}"


def machine_line() -> str:
    return (f"{date.today().isoformat()}  {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), python {platform.python_version()}, "
            f"{source_version()}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table: first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))
