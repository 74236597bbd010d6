"""Output folders: hash stability, the folder guard, staging and the atomic swap."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from robustkit import config as config_module
from robustkit import outputs
from robustkit.config import TrainConfig, config_from_dict, config_hash, load_config, training_hash
from robustkit.errors import RobustkitError
from robustkit.outputs import Owner, guard_folder, inspect_folder, prepare_staging, swap_in

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- hash stability


def test_hashed_fields_name_real_fields() -> None:
    classes = {c.__name__: c for c in (
        config_module.ExperimentConfig, config_module.DataConfig, config_module.ModelConfig,
        config_module.TrainConfig, config_module.AdversarialConfig, config_module.AttackConfig,
        config_module.EvaluateConfig, config_module.ReferenceConfig)}
    for name, listed in config_module.HASHED_FIELDS.items():
        assert listed <= {f.name for f in dataclasses.fields(classes[name])}, name


def test_fields_added_with_their_default_would_have_kept_the_quickstart_hash(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # precision, amp_attacks and compile were added after reports/quickstart was made; the
    # manifest of that report (commit 5af984b) recorded config hash 0a08b9a4e26d300f. Had they
    # been added under today's rule (unlisted: hashed only when set), the hash would not have
    # moved, and the README's first command would not have been locked out of its folder.
    train = config_module.HASHED_FIELDS["TrainConfig"]
    monkeypatch.setitem(config_module.HASHED_FIELDS, "TrainConfig",
                        train - {"precision", "amp_attacks", "compile"})
    cfg = load_config(REPO / "experiments" / "quickstart.toml")
    assert config_hash(cfg) == "0a08b9a4e26d300f"
    assert config_hash(load_config(REPO / "experiments" / "quickstart.toml",
                                   ["train.precision=bf16"])) != "0a08b9a4e26d300f"


def test_a_new_field_counts_in_the_hashes_only_when_set() -> None:
    # a release adds train.new_option = 3 (keeping the old behaviour): nothing moves
    newer = dataclasses.make_dataclass(
        "TrainConfig", [("new_option", int, dataclasses.field(default=3))], bases=(TrainConfig,),
        frozen=True)
    cfg = load_config(REPO / "experiments" / "mnist_cnn_pgd_at.toml")
    fields = {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(TrainConfig)}
    same = dataclasses.replace(cfg, train=newer(**fields, new_option=3))
    changed = dataclasses.replace(cfg, train=newer(**fields, new_option=4))
    assert config_hash(same) == config_hash(cfg)
    assert training_hash(same, 0) == training_hash(cfg, 0)
    assert config_hash(changed) != config_hash(cfg)
    assert training_hash(changed, 0) != training_hash(cfg, 0)


def test_every_listed_field_counts_at_any_value() -> None:
    base = config_from_dict({})
    assert config_hash(base) != config_hash(config_from_dict({"train": {"precision": "bf16"}}))
    assert config_hash(base) != config_hash(config_from_dict({"evaluate": {"seed": 1}}))
    assert config_hash(base) == config_hash(config_from_dict({"train": {"precision": "fp32"}}))


# --------------------------------------------------------------------------- the guard


def _folder(path: Path, manifest: dict[str, object] | None, **files: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if manifest is not None:
        (path / "manifest.json").write_text(json.dumps(manifest))
    for name, text in files.items():
        (path / name.replace("__", ".")).write_text(text)
    return path


RUN = Owner("run", "quickstart", "experiments/quickstart.toml")


def test_new_or_empty_folders_are_free(tmp_path: Path) -> None:
    assert guard_folder(tmp_path / "absent", RUN) is None
    (tmp_path / "empty" / "sweep-state").mkdir(parents=True)  # robustkit's scratch only
    assert guard_folder(tmp_path / "empty", RUN) is None


def test_an_earlier_run_of_the_same_experiment_is_replaced_with_a_line(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "q", {"command": "run", "owner": RUN.record()})
    line = guard_folder(folder, RUN, changes=lambda held: "config hash a → b")
    assert line == (f"replacing {folder}, written by an earlier run of the same experiment: "
                    "config hash a → b")
    elsewhere = Owner("run", "quickstart", "/home/u/clone/experiments/quickstart.toml")
    assert guard_folder(folder, elsewhere) is not None  # another clone, the same config file


def test_a_report_from_before_owners_were_recorded_is_read_from_its_command(
        tmp_path: Path) -> None:
    folder = _folder(tmp_path / "q", {
        "command": "run", "command_line": "robustkit run experiments/quickstart.toml -q "
                                          "--overwrite", "config_hash": "0a08b9a4e26d300f"},
        settings__json=json.dumps({"experiment": "quickstart"}))
    assert inspect_folder(folder).owner == RUN
    assert guard_folder(folder, RUN) is not None
    with pytest.raises(RobustkitError, match="experiment 'quickstart'"):
        guard_folder(folder, Owner("run", "mnist_cnn", "experiments/mnist_cnn.toml"))


@pytest.mark.parametrize("other", [
    Owner("run", "mnist_cnn", "experiments/mnist_cnn.toml"),  # another experiment
    Owner("run", "quickstart", "experiments/other.toml"),  # same name, another config file
    Owner("attack", "runs/quickstart/seed-0/model-best.safetensors"),  # another command
])
def test_another_experiments_folder_is_refused_without_overwrite(tmp_path: Path,
                                                                other: Owner) -> None:
    folder = _folder(tmp_path / "q", {"command": "run", "owner": RUN.record()})
    with pytest.raises(RobustkitError) as caught:
        guard_folder(folder, other)
    message = str(caught.value)
    assert "already holds experiment 'quickstart'" in message and "--overwrite" in message
    assert "replacing" in str(guard_folder(folder, other, overwrite=True))


def test_a_folder_of_files_robustkit_did_not_write_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "mine", None, results__csv="a,b\n", thesis__tex="x")
    with pytest.raises(RobustkitError, match=r"files robustkit did not write \(results.csv, "
                                             r"thesis.tex\)"):
        guard_folder(folder, RUN)
    assert guard_folder(folder, RUN, overwrite=True) is not None


def test_a_combined_report_of_unrecorded_origin_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "cmp", None, report__html="<html>",
                     report__md="# r\n\n*Generated by robustkit 0.1.0 from a, b.*\n")
    (folder / "figures").mkdir()
    with pytest.raises(RobustkitError, match="a report of unrecorded origin"):
        guard_folder(folder, Owner("report", "reports/a, reports/b"))


def test_a_training_folder_killed_before_its_manifest_belongs_to_its_config(
        tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m", None, config__toml='name = "mnist_cnn"\n',
                     state__json="{}", metrics__csv="epoch\n1\n")
    assert inspect_folder(folder).owner == Owner("train", "mnist_cnn")
    assert guard_folder(folder, Owner("train", "mnist_cnn", "experiments/mnist_cnn.toml")) \
        is not None
    with pytest.raises(RobustkitError, match="the training run of 'mnist_cnn'"):
        guard_folder(folder, Owner("train", "quickstart", "experiments/quickstart.toml"))


def test_the_working_folder_is_never_an_output_folder(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for out in (Path("."), tmp_path.parent):
        with pytest.raises(RobustkitError, match="is the working folder or contains it"):
            outputs.refuse_working_folder(out)
    outputs.refuse_working_folder(Path("reports/x"))


# --------------------------------------------------------------------------- staging and swap


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_replaces_the_folder_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    folder = _folder(tmp_path / "r", {"v": 1}, old__csv="old")
    work = prepare_staging(folder)
    assert work == tmp_path / ".r.partial" and not any(work.iterdir())
    _folder(work, {"v": 2}, new__csv="new")
    swap_in(work, folder)
    assert _tree(folder) == {"manifest.json": b'{"v": 2}', "new.csv": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_kill_between_the_fallback_renames_is_undone(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "r", {"v": 1}, old__csv="old")
    before = _tree(folder)
    (tmp_path / ".r.partial").mkdir()
    folder.rename(tmp_path / ".r.old")  # killed after the first of the two renames
    prepare_staging(folder)
    assert _tree(folder) == before


def test_staging_keeps_only_the_sweep_state_it_is_told_to(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    work = tmp_path / ".r.partial"
    _folder(work / "sweep-state", None, state__json="{}")
    _folder(work / "seed-3" / "sweep-state", None, state__json="{}")
    _folder(work, None, results__csv="half-written")
    prepare_staging(folder, keep=lambda p: p == work / "sweep-state")
    assert _tree(work) == {"sweep-state/state.json": b"{}"}


# --------------------------------------------------------------------------- atomic reports


class Killed(BaseException):
    """Stands for SIGKILL at a write: not an Exception, so no handler turns it into an error."""


def _faulty_writes(monkeypatch: pytest.MonkeyPatch, root: Path, fail_at: int | None
                   ) -> list[str]:
    """Count every write under ``root`` (file opened for writing, rename, exchange); raise
    :class:`Killed` at write number ``fail_at``. Returns the log of writes."""
    import builtins
    import io
    import os

    log: list[str] = []

    def hit(what: str, path: object) -> None:
        if str(root) not in os.path.abspath(str(path)):
            return
        if len(log) == fail_at:
            raise Killed(f"{what} {path}")
        log.append(f"{what} {Path(str(path)).name}")

    real_open, real_replace, real_rename = builtins.open, os.replace, os.rename
    real_exchange = outputs._exchange

    def fake_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, Path)) and any(c in mode for c in "wax+"):
            hit("open", file)
        return real_open(file, mode, *args, **kwargs)

    def fake_replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        hit("replace", dst)
        return real_replace(src, dst, *args, **kwargs)

    def fake_rename(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        hit("rename", dst)
        return real_rename(src, dst, *args, **kwargs)

    def fake_exchange(a: Path, b: Path) -> bool:
        hit("exchange", b)
        return real_exchange(a, b)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "replace", fake_replace)
    monkeypatch.setattr(os, "rename", fake_rename)
    monkeypatch.setattr(outputs, "_exchange", fake_exchange)
    return log


@pytest.mark.parametrize("in_place", [True, False])
def test_a_kill_at_any_write_of_a_report_leaves_the_old_report_or_the_new(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_place: bool) -> None:
    import shutil

    from robustkit.reporting.build import publish_report

    source = tmp_path / "quickstart"  # results and settings only: a quick report to build
    source.mkdir()
    for name in ("results.csv", "settings.json", "manifest.json", "per_sample.csv"):
        shutil.copy(REPO / "reports" / "quickstart" / name, source / name)
    out = source if in_place else tmp_path / "combined"
    monkeypatch.chdir(tmp_path)
    # patched where publish_report looks them up (build.py imports them by name)
    monkeypatch.setattr("robustkit.reporting.build.now_iso", lambda: "2026-01-01T00:00:00+00:00")
    monkeypatch.setattr("robustkit.reporting.build.git_commit", lambda: "abc1234")
    publish_report([source], out, title="old")
    old = _tree(out)
    publish_report([source], out, title="new")
    new = _tree(out)
    assert old != new
    shutil.rmtree(out)

    def restore_old() -> None:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        for name, data in old.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)

    restore_old()
    with monkeypatch.context() as patch:
        writes = _faulty_writes(patch, tmp_path, None)
        publish_report([source], out, title="new")
    assert _tree(out) == new
    assert len(writes) >= 10, writes  # figures, tables, html, md (and copies, in place)
    for k in range(len(writes)):
        restore_old()
        with monkeypatch.context() as patch, pytest.raises(Killed):
            _faulty_writes(patch, tmp_path, k)
            publish_report([source], out, title="new")
        assert _tree(out) in (old, new), f"killed at {writes[k]}"
        if k % 3 == 0 or k == len(writes) - 1:  # the next run finishes the job and tidies up
            publish_report([source], out, title="new")
            assert _tree(out) == new, f"after a kill at {writes[k]}"
            assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
                ["quickstart", "combined"] if not in_place else ["quickstart"])


TINY_RUN = """
name = "tiny"
device = "cpu"
[data]
val_size = 500
[model]
arch = "softmax"
[train]
epochs = 1
[[attacks]]
name = "fgsm"
[evaluate]
eps = [0.0, 0.1]
n = 100
"""


@pytest.mark.slow
def test_a_kill_at_any_write_of_robustkit_run_leaves_the_old_folder_or_the_new(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_root: Path) -> None:
    from robustkit.jobs.run import run_experiment

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(TINY_RUN)
    folder = tmp_path / "reports" / "tiny"

    def run(eps: str) -> None:
        run_experiment(Path("tiny.toml"), overrides=[f"evaluate.eps={eps}"], progress=False,
                       log=lambda m: None)

    run("[0.0, 0.2]")
    new_names = set(_tree(folder))
    new_results = (folder / "results.csv").read_bytes()
    with monkeypatch.context() as patch:
        writes = _faulty_writes(patch, folder.parent, None)
        run("[0.0, 0.1]")
    assert len(writes) >= 20, writes
    for k in range(len(writes)):
        old = _tree(folder)  # the folder holds a run of eps [0, 0.1]
        # each attempt from scratch: a killed run's staging folder keeps its finished cells
        # and checks, so the next run would resume with fewer writes and never reach write k
        shutil.rmtree(folder.parent / ".tiny.partial", ignore_errors=True)
        with monkeypatch.context() as patch, pytest.raises(Killed):
            _faulty_writes(patch, folder.parent, k)
            run("[0.0, 0.2]")
        now = _tree(folder)
        if now != old:  # the whole new folder, or the old one untouched
            assert set(now) == new_names and now["results.csv"] == new_results, writes[k]
            run("[0.0, 0.1]")  # back to the old settings for the next kill


def test_commit_is_dirty_only_when_the_code_changes(tmp_path: Path) -> None:
    """A regenerated report or an edited config leaves the recorded commit clean; an edit to
    the package marks it ``+dirty``."""
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "robustkit", tree / "robustkit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tree / "pyproject.toml")
    (tree / "reports").mkdir()
    (tree / "reports" / "results.csv").write_text("accuracy\n0.5\n")

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t",
                        *args], check=True, capture_output=True)

    def recorded() -> str:
        code = "from robustkit.runtime import git_commit; print(git_commit())"
        return subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True,
                              text=True, check=True, env={"PATH": os.environ["PATH"],
                                                          "PYTHONPATH": str(tree)}).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "x")
    clean = recorded()
    assert len(clean) == 40 and not clean.endswith("+dirty")
    (tree / "reports" / "results.csv").write_text("accuracy\n0.9\n")
    assert recorded() == clean
    with (tree / "robustkit" / "attacks" / "pgd.py").open("a") as file:
        file.write("\n# an edit\n")
    assert recorded() == clean + "+dirty"
