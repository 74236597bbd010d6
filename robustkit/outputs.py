"""Output folders: who owns one, when robustkit may replace it, and replacing it atomically.

Every folder robustkit writes records its **owner** in ``manifest.json``: the command
(``run``, ``attack``, ``train``, ``report``), the experiment (config name, model, or the report's
sources) and, for configs, the config file. Before any work, :func:`guard_folder` decides:

- empty or absent: write it;
- the same owner (a re-run of the same experiment): replace it, and say what changed;
- another owner: refuse unless ``--overwrite``;
- files without robustkit's manifest: refuse unless ``--overwrite`` (never write over a user's
  files).

Reports are built in a staging folder beside the target (``.NAME.partial``, which also holds a
resumable sweep state) and swapped in by one atomic rename (``renameat2(RENAME_EXCHANGE)`` on
Linux), so a killed process leaves the old report or the new one, never a mix.

One process at a time writes a folder: :func:`writing` holds an advisory lock (``flock`` on
``.NAME.lock`` beside it) for the whole job, taken before anything is read or written, so a
second robustkit process aiming at the same folder is refused before it touches anything.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustkit.errors import RobustkitError
from robustkit.records import MANIFEST, Manifest, RunSettings
from robustkit.runtime import git_commit
from robustkit.storage import TEMPORARY
from robustkit.version import __version__

if TYPE_CHECKING:
    from robustkit.distributed import Context

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if sys.platform != "win32":
    import fcntl

STAGING_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
LOCK_SUFFIX = ".lock"
#: Files a report-only folder (``robustkit report --out``) holds.
REPORT_ENTRIES = frozenset({"report.html", "report.md", "figures", "tables", MANIFEST})
#: robustkit's own scratch entries (sweep state, temporary files of atomic writes, the locks of
#: sub-folders): never a reason to refuse a folder.
SCRATCH = re.compile(rf"^(sweep-state|\..+\{LOCK_SUFFIX}|{TEMPORARY.pattern})$")
#: What a training folder holds before its manifest exists (a run killed before its end).
TRAINING_ENTRIES = re.compile(r"^(config\.toml|metrics\.csv|model-(best|last)\.(json|safetensors)"
                              r"|state\.json|state-.+\.safetensors)$")


@dataclass(frozen=True)
class Owner:
    """What wrote a folder: ``command`` and ``name`` (experiment, model, or report sources);
    ``config_file`` is the config's path as given (None when not known)."""

    command: str
    name: str
    config_file: str | None = None

    def same_as(self, other: Owner) -> bool:
        """The same experiment: command and name match, and the config file's name when both
        are known (clones and working folders differ; the file is the same)."""
        if (self.command, self.name) != (other.command, other.name):
            return False
        if self.config_file and other.config_file:
            return Path(self.config_file).name == Path(other.config_file).name
        return True

    def describe(self) -> str:
        what = {"run": "experiment", "train": "the training run of",
                "attack": "the attack on model", "report": "the report of"}.get(
                    self.command, self.command)
        text = f"{what} {self.name!r}"
        return text + (f" ({self.config_file})" if self.config_file else "")

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def checkpoint_folder(runs_dir: Path, name: str, seed: int) -> Path:
    """Where ``robustkit train`` and ``robustkit run`` keep the checkpoint of experiment
    ``name`` for one seed: ``runs_dir/NAME/seed-S`` (so a run reuses what train made)."""
    return runs_dir / name / f"seed-{seed}"


def config_file_label(path: Path) -> str:
    """A config's path as recorded: relative to the working folder when inside it."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


# --------------------------------------------------------------------------- reading a folder


def _config_name(path: Path) -> str | None:
    try:
        name = tomllib.loads(path.read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return name if isinstance(name, str) else None


def command_config(command_line: str | None) -> str | None:
    """The config argument of a recorded ``robustkit run|train CONFIG …`` command line."""
    try:
        args = shlex.split(command_line or "")
    except ValueError:
        return None
    if len(args) < 3 or args[1] not in {"run", "train"}:
        return None
    return next((a for a in args[2:] if a.endswith(".toml") and not a.startswith("-")), None)


def _command_model(command_line: str | None) -> str | None:
    try:
        args = shlex.split(command_line or "")
    except ValueError:
        return None
    for i, arg in enumerate(args[:-1]):
        if arg in {"--model", "-m"}:
            return args[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return None


def recorded_owner(folder: Path, manifest: Manifest) -> Owner | None:
    """The owner a manifest names, or, for manifests written before owners were recorded,
    the one its command line, settings and config describe."""
    owner = manifest.owner or {}
    if isinstance(owner.get("command"), str) and isinstance(owner.get("name"), str):
        config_file = owner.get("config_file")
        return Owner(owner["command"], owner["name"],
                     config_file if isinstance(config_file, str) else None)
    command, line = manifest.command, manifest.command_line
    if command == "run":
        name = _settings(folder).experiment or _config_name(folder / "config.toml")
        return Owner("run", name, command_config(line)) if name else None
    if command == "train":
        name = _config_name(folder / "config.toml")
        return Owner("train", name, command_config(line)) if name else None
    if command == "attack":
        model = _command_model(line) or _settings(folder).model
        return Owner("attack", model) if model else None
    return None


def _settings(folder: Path) -> RunSettings:
    return RunSettings.read_if_any(folder) or RunSettings()


@dataclass(frozen=True)
class Holder:
    """What an existing folder holds: ``owner`` (None when unknown), its ``manifest`` (empty
    when none), and ``foreign`` entries robustkit did not write."""

    owner: Owner | None
    manifest: Manifest
    foreign: tuple[str, ...]
    empty: bool


def inspect_folder(folder: Path) -> Holder:
    """Read who owns ``folder`` (which may be absent)."""
    if not folder.exists():
        return Holder(None, Manifest(), (), True)
    if not folder.is_dir():
        raise RobustkitError(f"{folder} is a file, not a folder: choose a folder for --out")
    entries = sorted(p.name for p in folder.iterdir() if not SCRATCH.match(p.name))
    if not entries:
        return Holder(None, Manifest(), (), True)
    manifest = Manifest.read_if_any(folder)
    if manifest is not None:
        return Holder(recorded_owner(folder, manifest), manifest, (), False)
    seeds = sorted(folder.glob("seed-*/" + MANIFEST))
    if seeds:  # a several-seed run folder written before it had a manifest of its own
        child = Manifest.read_if_any(seeds[0].parent) or Manifest()
        return Holder(recorded_owner(seeds[0].parent, child), child, (), False)
    if all(TRAINING_ENTRIES.match(e) for e in entries) and "config.toml" in entries:
        name = _config_name(folder / "config.toml")  # training killed before its manifest
        if name:
            return Holder(Owner("train", name), Manifest(), (), False)
    if set(entries) <= REPORT_ENTRIES and _robustkit_report(folder):
        return Holder(None, Manifest(), (), False)  # a report from before report manifests
    return Holder(None, Manifest(), tuple(entries), False)


def _robustkit_report(folder: Path) -> bool:
    try:
        text = (folder / "report.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return "*Generated by robustkit " in text


# --------------------------------------------------------------------------- the guard


def guard_folder(folder: Path, owner: Owner, overwrite: bool = False,
                 changes: Callable[[Holder], str] | None = None,
                 flag: str = "--overwrite", announce_same: bool = True) -> str | None:
    """Raise :class:`RobustkitError` unless ``owner`` may write ``folder``.

    Returns None for a new or empty folder, else one line saying what will be replaced:
    an earlier run of the same experiment (``changes(holder)`` says what differs; None when
    not ``announce_same``), or, with ``overwrite``, another experiment's folder.
    """
    holder = inspect_folder(folder)
    if holder.empty:
        return None
    if holder.owner is not None and holder.owner.same_as(owner):
        if not announce_same:
            return None
        detail = changes(holder) if changes else ""
        return (f"replacing {folder}, written by an earlier run of the same "
                f"{_kind(owner)}{': ' + detail if detail else ''}")
    if holder.foreign:
        listed = ", ".join(holder.foreign[:4]) + (", …" if len(holder.foreign) > 4 else "")
        if overwrite:
            return f"replacing {folder}, which held files robustkit did not write ({listed})"
        raise RobustkitError(
            f"{folder} holds files robustkit did not write ({listed}): choose another --out, or "
            f"pass {flag} to replace the folder"
        )
    held = holder.owner.describe() if holder.owner else "a report of unrecorded origin"
    if overwrite:
        return f"replacing {folder}, which held {held}"
    raise RobustkitError(
        f"{folder} already holds {held}, not {owner.describe()}: choose another --out, or "
        f"pass {flag} to replace it"
    )


def _kind(owner: Owner) -> str:
    return {"run": "experiment", "attack": "attack", "train": "training run",
            "report": "report"}.get(owner.command, "command")


def version_change(manifest: Manifest) -> str:
    """``robustkit 0.1.0 (5af984b) → 0.1.0 (d2516ee)``, from a manifest and the running code."""
    def label(version: str | None, commit: str | None) -> str:
        short = str(commit)[:7] + ("+dirty" if str(commit).endswith("+dirty") else "")
        return f"{version or '?'}" + (f" ({short})" if commit else "")

    return (f"robustkit {label(manifest.robustkit, manifest.git_commit)} → "
            f"{label(__version__, git_commit())}")


def hash_change(what: str, old: str | None, new: str, rehashed: str | None = None) -> str:
    """``config hash a → b``; ``rehashed`` is the old record hashed under today's scheme."""
    if old is None:
        return f"{what} ? → {new}"
    if old == new:
        return f"{what} {new} unchanged"
    if rehashed == new:
        return (f"{what} {old} → {new} (the same settings: the recorded config hashes to {new} "
                "under this version)")
    return f"{what} {old} → {new}"


# --------------------------------------------------------------------------- one writer at a time


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder``: ``.NAME.lock`` beside it (beside its staging folder)."""
    folder = folder.resolve()
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


@contextmanager
def writing(folders: Sequence[tuple[Path, str]], dist: Context | None = None) -> Iterator[None]:
    """Hold the right to write each ``(folder, flag)`` (and its staging folder) for the block.

    Each folder's lock is an exclusive ``flock`` on :func:`lock_path`, taken in order before
    anything of the folder is read or written; under torchrun rank 0 alone holds them. When
    another process holds one, :class:`RobustkitError` names its pid and ``flag`` (the option
    that chose the folder) on every rank, and nothing is touched. The lock dies with its
    process, so a killed run blocks nothing (its leftover file is taken over); a released lock
    removes its file.
    """
    distinct: dict[Path, tuple[Path, str]] = {}
    for folder, flag in folders:
        distinct.setdefault(lock_path(folder), (folder, flag))  # each folder once, in order
    with ExitStack() as held:
        for folder, flag in distinct.values():
            def take(folder: Path = folder, flag: str = flag) -> None:
                held.enter_context(_folder_lock(folder, flag))

            _on_main(take, dist)
        yield


def _on_main(fn: Callable[[], None], dist: Context | None) -> None:
    """``fn()`` on rank 0 of ``dist`` (:func:`robustkit.distributed.on_main`, imported only
    under torchrun, so a single process never loads torch for a lock)."""
    if dist is None:
        fn()
        return
    from robustkit.distributed import on_main

    on_main(fn, dist)


@contextmanager
def _folder_lock(folder: Path, flag: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; the folders made for its lock file go with it
    when nothing else came into them (a refused writer leaves no empty ``reports/``)."""
    if sys.platform == "win32":  # pragma: no cover  (no flock: one writer is the user's care)
        yield
        return
    path = lock_path(folder)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        fd = _take_lock(path, folder, flag)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: a waiting opener sees it gone
            os.close(fd)
    finally:
        for made in created:
            try:
                made.rmdir()
            except OSError:
                break


def _take_lock(path: Path, folder: Path, flag: str) -> int:
    """Open and lock ``path``; retry when its holder removed it (or its folder) between our
    open and lock."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            os.close(fd)
            pid = f" (pid {holder})" if holder else ""
            raise RobustkitError(f"{folder} is being written by another robustkit process{pid}; "
                                 f"wait for it or choose another {flag}") from None
        if _is_current(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _holder_pid(fd: int) -> str | None:
    """The pid the holder of the lock file ``fd`` wrote into it (it writes it just after
    locking, so an instant's wait covers a lock taken a moment ago); None when unreadable."""
    for _ in range(10):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return None


def _is_current(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one at ``path`` (not removed or replaced)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


# --------------------------------------------------------------------------- staging and swap


def refuse_working_folder(folder: Path) -> None:
    """The output folder is replaced as a whole: never the working folder or one above it."""
    here, target = Path.cwd().resolve(), folder.resolve()
    if target == here or target in here.parents:
        raise RobustkitError(
            f"--out {folder} is the working folder or contains it: robustkit replaces its output "
            "folder as a whole; choose a sub-folder such as reports/NAME"
        )


def staging_path(folder: Path) -> Path:
    folder = folder.resolve()
    return folder.parent / f".{folder.name}{STAGING_SUFFIX}"


def _old_path(folder: Path) -> Path:
    folder = folder.resolve()
    return folder.parent / f".{folder.name}{OLD_SUFFIX}"


def recover(folder: Path) -> None:
    """Finish or undo a swap that a kill interrupted (only where RENAME_EXCHANGE is missing):
    put the old folder back if the new one never arrived, and remove a leftover old copy."""
    old = _old_path(folder)
    if not old.exists():
        return
    if not folder.exists():
        os.rename(old, folder)
    else:
        shutil.rmtree(old, ignore_errors=True)


def prepare_staging(folder: Path, keep: Callable[[Path], bool] = lambda p: False) -> Path:
    """The empty staging folder of ``folder``; entries for which ``keep`` is true (a sweep
    state to resume) survive from an interrupted run, everything else is removed."""
    recover(folder)
    work = staging_path(folder)
    if work.is_dir():
        _prune(work, keep)
    elif work.exists():
        work.unlink()
    work.mkdir(parents=True, exist_ok=True)
    return work


def remove_empty(*folders: Path) -> None:
    """Remove each folder in turn while it is empty (a staging folder a failed run left
    nothing in, then the parents made for it); stop at the first that holds something."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _prune(folder: Path, keep: Callable[[Path], bool]) -> bool:
    """Remove everything under ``folder`` but ``keep``'s entries; True when something stayed."""
    kept = False
    for path in list(folder.iterdir()):
        if keep(path):
            kept = True
        elif path.is_dir() and not path.is_symlink():
            if _prune(path, keep):
                kept = True
            else:
                path.rmdir()
        else:
            path.unlink()
    return kept


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with RENAME_EXCHANGE); False where the
    system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in {22, 38, 95}:  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def swap_in(work: Path, folder: Path) -> None:
    """Put the finished staging folder ``work`` at ``folder`` in one step; drop the old one."""
    folder = folder.resolve()
    if not folder.exists():
        os.rename(work, folder)
        return
    if _exchange(work, folder):
        shutil.rmtree(work, ignore_errors=True)  # it now holds the old folder
        return
    old = _old_path(folder)  # fallback: two renames; recover() repairs a kill between them
    os.rename(folder, old)
    os.rename(work, folder)
    shutil.rmtree(old, ignore_errors=True)
