"""The torch-free storage wing: the one JSON reader, the typed run records, and a report that
is built from committed runs without loading torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from robustkit.defence_specs import RANDOM_STEPS, describe_step
from robustkit.records import Manifest, RunSettings
from robustkit.reporting.load import load_run
from robustkit.storage import UnreadableJsonError, read_json, read_json_if_any, write_json
from robustkit.vocabulary import PREPROCESSING
from tests.conftest import REPO, robustkit_env

#: Committed runs that take every torch-free path of the report: a preprocessing defence with
#: BPDA, physical-world robustness with EOT, and a plain run.
RUNS = ("mnist_cnn_bitdepth_bpda", "mnist_cnn_pgd_at_eot", "quickstart")


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=cwd, env=robustkit_env(), timeout=300)


def test_importing_the_report_builder_loads_no_torch(tmp_path: Path) -> None:
    done = _python("""
        import sys
        import robustkit.reporting.build
        import robustkit.reporting
        import robustkit.checks
        import robustkit.outputs, robustkit.records, robustkit.storage, robustkit.runtime
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print(f"torch modules: {loaded}")
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch modules: []"


@pytest.mark.slow
def test_robustkit_report_on_committed_runs_loads_no_torch_and_changes_no_number(
        tmp_path: Path) -> None:
    """``robustkit report`` rebuilds committed runs in place and combines them, exit 0, without
    torch ever imported; the results it reads stay byte for byte as committed."""
    for name in RUNS:
        shutil.copytree(REPO / "reports" / name, tmp_path / name)
    done = _python(f"""
        import sys
        from robustkit.cli import main
        for argv in [*([name] for name in {list(RUNS)!r}), [*{list(RUNS)!r}, "--out", "all"]]:
            sys.argv = ["robustkit", "report", *argv]
            try:
                main()
            except SystemExit as exc:
                print(f"exit {{exc.code}}")
        print(f"torch imported: {{'torch' in sys.modules}}")
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "torch imported: False", done.stdout + done.stderr
    assert [line for line in lines if line.startswith("exit")] == ["exit 0"] * (len(RUNS) + 1)
    for name in RUNS:
        for file in ("results.csv", "per_sample.csv"):
            assert (tmp_path / name / file).read_bytes() == \
                (REPO / "reports" / name / file).read_bytes()
    combined = (tmp_path / "all" / "report.md").read_text(encoding="utf-8")
    assert "The model is defended: bit-depth reduction to 3 bits" in combined
    assert "Physical-world robustness" in combined


# --------------------------------------------------------------------------- the JSON reader


@pytest.mark.parametrize(("text", "reason"), [
    (None, "missing"),
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes"),
    ("[1, 2]", "a JSON list, not an object"),
    ("\"text\"", "a JSON str, not an object"),
])
def test_read_json_names_the_file_and_the_fault(tmp_path: Path, text: str | None,
                                                reason: str) -> None:
    path = tmp_path / "settings.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(UnreadableJsonError) as caught:
        read_json(path, "run the evaluation again")
    assert caught.value.reason.startswith(reason)
    assert str(caught.value).startswith(f"{path} is {reason}")
    assert str(caught.value).endswith(": run the evaluation again")
    assert read_json_if_any(path) is None


def test_read_json_gives_back_what_write_json_wrote(tmp_path: Path) -> None:
    record = {"eps": [0.0, 0.1], "attacks": [{"name": "pgd"}], "n": 3}
    write_json(tmp_path / "a.json", record)
    assert read_json(tmp_path / "a.json") == record
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(UnreadableJsonError, match="is not readable"):
        read_json(tmp_path / "latin.json")


def test_a_damaged_settings_file_is_skipped_and_named_by_the_report(tmp_path: Path) -> None:
    shutil.copytree(REPO / "reports" / "quickstart", tmp_path / "run")
    (tmp_path / "run" / "settings.json").write_text("[]", encoding="utf-8")
    run = load_run(tmp_path / "run")
    assert run.problems == ["settings.json skipped: a JSON list, not an object"]
    assert run.settings == RunSettings.from_record({})
    assert run.manifest.command == "run"


# --------------------------------------------------------------------------- the records


def test_settings_fields_are_typed_and_a_wrong_type_reads_as_absent() -> None:
    settings = RunSettings.from_record({
        "experiment": "x", "n": 300, "eps": [0, 0.1], "attacks": [{"name": "pgd"}, "junk"],
        "classes": ["a", 2], "defence": {"preprocess": "median"}, "split": 7,
        "transforms": [1], "model": None})
    assert settings.experiment == "x" and settings.n == 300
    assert settings.eps == (0.0, 0.1)
    assert settings.attacks == ({"name": "pgd"},)
    assert settings.classes == ("a", "2")
    assert settings.defence == {"preprocess": "median"}
    assert settings.split is None and settings.transforms is None and settings.model is None
    assert RunSettings.from_record({"n": True, "eps": [0.1, "x"]}).n is None
    assert RunSettings.from_record({"eps": [0.1, "x"]}).eps is None
    assert RunSettings.of({"n": 5}) == RunSettings.from_record({"n": 5})
    assert RunSettings.of(settings) is settings


def test_every_committed_record_reads_into_its_typed_fields() -> None:
    """Each committed settings.json and manifest.json: the typed fields hold what the file
    says, so a report built from them reads the same values the dictionaries held."""
    folders = sorted({p.parent for p in (REPO / "reports").glob("**/settings.json")})
    assert len(folders) >= 10
    for folder in folders:
        raw = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
        settings = RunSettings.read(folder)
        assert settings.record == raw
        assert list(settings.eps or ()) == raw["eps"]
        assert [dict(a) for a in settings.attacks] == raw["attacks"]
        assert (settings.dataset, settings.n) == (raw["dataset"], raw["n"])
        assert settings.defence == raw.get("defence")
        manifest = Manifest.read_if_any(folder)
        assert manifest is not None
        record = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        assert (manifest.command, manifest.command_line) == ("run", record["command_line"])
        assert manifest.config_hash == record["config_hash"] == settings.config_hash
        assert manifest.checkpoint_epoch == record.get("checkpoint_epoch")
        assert manifest.notes == tuple(record.get("notes", ()))


def test_the_torch_free_defence_description_is_the_defence_modules() -> None:
    from robustkit.models.defences import build_preprocessing

    for kind in PREPROCESSING:
        step = build_preprocessing(kind)
        assert describe_step(kind) == step.describe()
        assert (kind in RANDOM_STEPS) == step.random
    assert describe_step("median", size=5) == build_preprocessing("median", size=5).describe()


def test_the_finished_checks_of_an_interrupted_job_are_read_back_only_for_its_settings(
        tmp_path: Path) -> None:
    from robustkit.checks import Check
    from robustkit.runs import CHECKS_STATE, STATE_DIR, load_checks, save_check

    check = Check("forward_deterministic", "pass", 0.0, "0", "same logits twice")
    save_check(tmp_path, "abc", "quick", check)
    assert load_checks(tmp_path, "abc", "quick") == {"forward_deterministic": check}
    assert load_checks(tmp_path, "abc", "full") == {}
    assert load_checks(tmp_path, "other", "quick") == {}
    (tmp_path / STATE_DIR / CHECKS_STATE).write_text("{damaged", encoding="utf-8")
    assert load_checks(tmp_path, "abc", "quick") == {}
