"""Hostile storage (issue #31): two robustkit processes writing one folder at once, a kill at
any write of a checkpoint, a full disk while a report is written."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from robustkit import outputs
from robustkit.checkpoint import remove_leftovers
from robustkit.errors import RobustkitError
from robustkit.outputs import Owner, guard_folder, staging_path
from tests.conftest import REPO, assert_user_error, robustkit_env, run, tiny_config


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """``robustkit ARGS`` started in ``cwd``, not waited for."""
    return subprocess.Popen([sys.executable, "-m", "robustkit", *args], cwd=cwd,
                            env=robustkit_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- 2: two writers


BUSY = "is being written by another robustkit process (pid "


def test_a_second_writer_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    with outputs.writing([(folder, "--out")]):
        assert outputs.lock_path(folder).is_file()
        with pytest.raises(RobustkitError) as caught, outputs.writing([(folder, "--out")]):
            pass  # pragma: no cover
        assert str(caught.value) == (f"{folder} {BUSY}{os.getpid()}); wait for it or choose "
                                     "another --out")
        assert not folder.exists()  # the refused writer touched nothing
    assert not outputs.lock_path(folder).exists()  # the lock file goes with the lock
    with outputs.writing([(folder, "--runs")]):
        pass


def test_a_lock_dies_with_its_process_and_a_stale_lock_file_blocks_nothing(tmp_path: Path
                                                                           ) -> None:
    folder = tmp_path / "out"
    outputs.lock_path(folder).write_text("12345\n")  # left by a process killed long ago
    with outputs.writing([(folder, "--out")]):
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from robustkit.outputs import writing
            with writing([(Path({str(folder)!r}), "--out")]):
                print("held", flush=True)
                time.sleep(600)
        """)], env=robustkit_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(RobustkitError, match=re.escape(f"{BUSY}{holder.pid})")), \
                outputs.writing([(folder, "--out")]):
            pass  # pragma: no cover
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert outputs.lock_path(folder).exists()  # a SIGKILL leaves the file, but not the lock
    with outputs.writing([(folder, "--out")]):
        pass


#: The tiny experiment with 59,000 validation images: 1,000 left to train on, seconds per run.
TINY = tiny_config(val_size=59000)

NET = """
import torch


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
"""


def _two_at_once(tmp_path: Path, args: list[str]) -> tuple[subprocess.CompletedProcess[str],
                                                           subprocess.CompletedProcess[str]]:
    """Start ``robustkit ARGS`` twice at the same moment; the finished (winner, loser)."""
    first, second = start(*args, cwd=tmp_path), start(*args, cwd=tmp_path)
    results = sorted((finish(first), finish(second)), key=lambda r: r.returncode)
    assert [r.returncode for r in results] == [0, 2], [r.stderr for r in results]
    return results[0], results[1]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "attack"])
def test_two_commands_into_one_folder_at_once(tmp_path: Path, mnist_root: Path,
                                              command: str) -> None:
    (tmp_path / "tiny.toml").write_text(TINY)
    (tmp_path / "tinynet.py").write_text(NET)
    args = (["run", "tiny.toml", "--out", "o", "-q"] if command == "run" else
            ["attack", "--model", "tinynet:net", "--attack", "fgsm,pgd", "--steps", "5",
             "--eps", "0,0.1,0.2", "--n", "300", "--out", "o", "-q"])
    winner, loser = _two_at_once(tmp_path, args)
    assert "error:" not in winner.stderr, winner.stderr
    assert_user_error(loser, f"o {BUSY}", "wait for it or choose another --out")
    folder = tmp_path / "o"
    for name in ("results.csv", "per_sample.csv", "timings.csv", "checks.csv",
                 "settings.json", "manifest.json", "report.html", "report.md"):
        assert (folder / name).is_file(), (name, _entries(folder))
    if command == "run":
        assert (folder / "model.safetensors").is_file()
    assert not staging_path(folder).exists() and not outputs.lock_path(folder).exists()
    assert not any(p.name.startswith(".") for p in folder.iterdir()), _entries(folder)
    again = run(*args, cwd=tmp_path)  # the same command again: no --overwrite needed
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("command", ["train", "run", "report"])
def test_every_writing_command_waits_for_no_one(tmp_path: Path, command: str) -> None:
    """``train`` (its checkpoint folder), ``run`` (its report folder, then each seed's
    checkpoint folder under --runs) and ``report`` are refused while another process writes
    there, before they touch anything."""
    (tmp_path / "tiny.toml").write_text(TINY)
    (tmp_path / "src").mkdir()
    held, flag, args = {
        "train": (tmp_path / "ckpt", "--out", ["train", "tiny.toml", "--out", "ckpt", "-q"]),
        "run": (tmp_path / "runs" / "tiny" / "seed-0", "--runs", ["run", "tiny.toml", "-q"]),
        "report": (tmp_path / "rep", "--out", ["report", "src", "--out", "rep"]),
    }[command]
    with outputs.writing([(held, flag)]):
        refused = run(*args, cwd=tmp_path)
    assert_user_error(refused, f"{held.relative_to(tmp_path)} {BUSY}{os.getpid()}); wait for it "
                      f"or choose another {flag}")
    assert _entries(tmp_path) == ["src", "tiny.toml"]  # nothing written, the lock file gone


# --------------------------------------------------------------------------- 3: kill at a write


def test_a_safetensors_temporary_file_from_a_killed_run_blocks_no_resume(tmp_path: Path
                                                                          ) -> None:
    """Checkpoints written by safetensors' ``save_file`` (robustkit before issue #31) left
    ``.tmpXXXXXX`` files when killed; the guard takes them for robustkit's scratch and a new
    training run removes them."""
    folder = tmp_path / "k"
    folder.mkdir()
    (folder / "config.toml").write_text('name = "q"\n')
    (folder / "model-last.safetensors").write_bytes(b"")
    (folder / ".tmpBadGmO").write_bytes(b"half a checkpoint")
    (folder / ".model-last.json.g1nd67jn.tmp").write_text("{")
    assert guard_folder(folder, Owner("train", "q"), announce_same=False) is None  # not refused
    remove_leftovers(folder)
    assert _entries(folder) == ["config.toml", "model-last.safetensors"]


def _strace() -> str:
    exe = shutil.which("strace")
    if exe is None:
        pytest.skip("strace is not installed")
    probe = subprocess.run([exe, "-f", "-qq", "-o", os.devnull, "-e", "trace=write", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()[:200]}")
    return exe


def _folder_writes(log: Path, folder: Path) -> list[tuple[int, str]]:
    """The write(2) calls into ``folder`` in an ``strace -f -y`` log: (number among all the
    write calls of the process that made them, as ``-e inject=write:when=N`` counts, file)."""
    calls = [(found[1], found[2]) for found in
             re.finditer(r"^(\d+)\s+write\(\d+<([^>]*)>", log.read_text(), re.MULTILINE)]
    writer = next(pid for pid, path in calls if path.startswith(f"{folder}/"))
    ours = [path for pid, path in calls if pid == writer]  # not those of helper processes
    return [(n, Path(path).name) for n, path in enumerate(ours, 1)
            if path.startswith(f"{folder}/")]


def _killed_at(log: Path) -> dict[str, str]:
    """Where each process killed in an ``strace -f -y`` log was writing: folder → file."""
    text = log.read_text()
    killed = set(re.findall(r"^(\d+)\s+\+\+\+ killed by SIGKILL", text, re.MULTILINE))
    last: dict[str, Path] = {}
    for pid, path in re.findall(r"^(\d+)\s+write\(\d+<([^>]*)>", text, re.MULTILINE):
        if pid in killed:
            last[pid] = Path(path)
    return {path.parent.name: _target(path.name) for path in last.values()}


def _target(temporary: str) -> str:
    """The file a temporary file stands for: ``.state-1-2.safetensors.x1y2z3.tmp`` →
    ``state-*.safetensors`` (``.tmpXXXXXX`` for one of safetensors' own)."""
    name = re.sub(r"^\.(.+)\.[^.]+\.tmp$", r"\1", temporary)
    return re.sub(r"^state-\d+-\d+", "state-*", re.sub(r"^\.tmp\w{6}$", ".tmpXXXXXX", name))


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    """600 training and 100 test images of the real MNIST: a training run in a second."""
    from robustkit.data import load_dataset

    mnist = load_dataset("mnist", mnist_root, "cpu", val_size=0)

    def as_bytes(images: object) -> np.ndarray:
        return (np.asarray(images)[:, 0] * 255).round().astype(np.uint8)

    path = tmp_path_factory.mktemp("small") / "small.npz"
    np.savez(path, train_images=as_bytes(mnist.train.images[:600]),
             train_labels=mnist.train.labels[:600].numpy(),
             test_images=as_bytes(mnist.test.images[:100]),
             test_labels=mnist.test.labels[:100].numpy())
    return path


#: Forks training runs from one warm process (torch imported, one run done), so that each kill
#: and each resume costs a training run, not a Python start: ``driver.py MODE LAST OUT POINTS
#: -- ARGS``. A child that should die at its N-th write first makes LAST - N writes to
#: /dev/null: strace counts writes per process and kills every process at its LAST-th.
DRIVER = """
import os
import sys
from pathlib import Path

import torch

from robustkit.cli import main


def child(argv, dummy):
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            for _ in range(dummy):
                os.write(null, b"")
            sys.argv = ["robustkit", *argv]
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


torch.set_num_threads(1)
mode, last, out, points = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
args = sys.argv[sys.argv.index("--") + 1:]
sys.argv = ["robustkit", *args, "--out", out + "-warm"]
try:  # lazy imports and caches, in the driver: every child starts from them
    main()
except SystemExit:
    pass
if mode == "reference":
    outcomes = [f"reference {child([*args, '--out', out], 0)}"]
else:
    outcomes = []
    for n in points.split(","):
        killed = child([*args, "--out", f"{out}-{n}"], last - int(n))
        outcomes.append(f"{n} {killed} {child([*args, '--out', f'{out}-{n}'], 0)}")
Path(out + ".txt").write_text("\\n".join(outcomes))
"""


def _drive(strace: list[str], tmp_path: Path, mode: str, last: int, out: Path, points: str,
           args: list[str]) -> list[list[str]]:
    """Run :data:`DRIVER` under ``strace``; its outcome lines, split."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = robustkit_env(env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                             "OPENBLAS_NUM_THREADS": "1"})
    done = subprocess.run([*strace, sys.executable, str(driver), mode, str(last), str(out),
                           points, "--", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line.split() for line in Path(f"{out}.txt").read_text().splitlines()]


@pytest.mark.slow
def test_a_kill_at_any_write_of_a_training_run_resumes_to_the_same_weights(
        tmp_path: Path, small_npz: Path) -> None:
    """SIGKILL (strace's syscall injection) before each write(2) into the output folder of a
    two-epoch training, then the same command again: it resumes, finishes with the weights of
    an uninterrupted run, byte for byte, and leaves no temporary file or resume state."""
    strace = [_strace(), "-f", "-qq", "-e", "trace=write"]
    args = ["train", str(REPO / "experiments" / "quickstart.toml"), "--set", "train.epochs=2",
            "--set", f"data.source='{small_npz}'", "--set", "data.val_size=100", "-q"]
    reference, log = tmp_path / "reference", tmp_path / "writes.log"
    assert _drive([*strace, "-y", "-o", str(log)], tmp_path, "reference", 0, reference, "-",
                  args) == [["reference", "0"]]
    writes = _folder_writes(log, reference)
    assert len(writes) >= 12, writes  # two epochs of weights, sidecars and resume state
    last = max(n for n, _ in writes) + 200  # beyond any run's writes: only the aimed kills
    kills = tmp_path / "kills.log"
    outcomes = _drive([*strace, "-y", "-o", str(kills), "-e",
                       f"inject=write:signal=KILL:when={last}"], tmp_path, "kill", last,
                      tmp_path / "k", ",".join(str(n) for n, _ in writes), args)
    assert _killed_at(kills) == {f"k-{n}": _target(name) for n, name in writes}
    weights = {name: (reference / name).read_bytes()
               for name in ("model-best.safetensors", "model-last.safetensors")}
    failures = []
    for (number, name), (n, killed, resumed) in zip(writes, outcomes, strict=True):
        folder = tmp_path / f"k-{n}"
        left = [e for e in _entries(folder) if e.startswith((".", "state"))]
        same = all((folder / w).is_file() and (folder / w).read_bytes() == data
                   for w, data in weights.items())
        if killed != str(int(signal.SIGKILL)) or resumed != "0" or left or not same:
            failures.append(f"write {number} ({name}): child status {killed}, resumed with exit "
                            f"{resumed}, left {left}, same weights: {same}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- 9: full disk


def _limit_file_size(limit: int) -> Callable[[], None]:
    def limit_it() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # a "full disk"

    return limit_it


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    """A finished ``robustkit run`` of the tiny config: ``reports/tiny`` in its folder."""
    folder = tmp_path_factory.mktemp("finished")
    (folder / "tiny.toml").write_text(TINY)
    done = run("run", "tiny.toml", "-q", cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "reports" / "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("in_place", [False, True])
def test_a_report_on_a_full_disk_leaves_the_old_report_and_no_staging_folder(
        tmp_path: Path, finished_run: Path, in_place: bool) -> None:
    source = tmp_path / "tiny"
    shutil.copytree(finished_run, source)
    out = source if in_place else tmp_path / "combined"
    first = run("report", str(source), "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr  # (and matplotlib's font cache is written)
    before = _tree(out)
    full = run("report", str(source), "--out", str(out), cwd=tmp_path,
               preexec=_limit_file_size(20_000))
    assert_user_error(full, f"cannot write {out}/", "File too large", "free space")
    assert _tree(out) == before
    assert not staging_path(out).exists()
    assert [e for e in _entries(tmp_path) if e.startswith(".")] == []


@pytest.mark.slow
def test_a_run_on_a_full_disk_names_the_file_it_could_not_write(tmp_path: Path,
                                                                mnist_root: Path) -> None:
    fgsm = TINY.replace('[[attacks]]\nname = "pgd"\nsteps = 5\n', "").replace("300", "100")
    (tmp_path / "tiny.toml").write_text(fgsm)  # every file but the report's under 100 kB
    full = run("run", "tiny.toml", "-q", "--out", "full", cwd=tmp_path,
               preexec=_limit_file_size(100_000))
    assert full.returncode == 2, full.stderr
    line = full.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "free space" in line, full.stderr
    named = re.search(r"(\.?full(\.partial)?/[\w./-]+\.\w+)", line)  # a file, not a folder
    assert named is not None, line
