"""Checkpoints: safetensors round trip, atomic writes, refusal of pickles, resume state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustkit.checkpoint import load_state, save_checkpoint, save_state
from robustkit.errors import RobustkitError
from robustkit.models import build_model, load_model
from robustkit.models.loading import load_checkpoint
from robustkit.storage import write_text


def test_round_trip_restores_identical_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("cnn")
    save_checkpoint(tmp_path / "m", model, {"arch": "cnn", "seed": 3})
    loaded, info = load_checkpoint(tmp_path / "m")
    assert info["seed"] == 3
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded(x))
    assert not loaded.training


def test_pickle_files_are_refused(tmp_path: Path) -> None:
    model = build_model("mlp")
    path = tmp_path / "model.pt"
    torch.save(model, path)  # a whole pickled module: never loaded
    with pytest.raises(RobustkitError, match="pickle"):
        load_checkpoint(path)
    with pytest.raises(RobustkitError, match=r"package\.module:factory --weights"):
        load_model(path)


def test_wrong_architecture_is_reported(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "m", build_model("mlp"), {"arch": "cnn"})
    with pytest.raises(RobustkitError, match="does not fit architecture cnn"):
        load_checkpoint(tmp_path / "m")


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    write_text(target, "old")

    class BoomError(Exception):
        pass

    from robustkit.storage import write_atomic

    def explode(handle):  # type: ignore[no-untyped-def]
        handle.write("partial")
        raise BoomError

    with pytest.raises(BoomError):
        write_atomic(target, explode)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_resume_state_round_trip(tmp_path: Path) -> None:
    model = build_model("softmax")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 1, 28, 28)).sum().backward()
    opt.step()
    g = torch.Generator().manual_seed(5)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": g.get_state(),
             "epoch": 2, "rows": [{"a": 1.5}], "order": None, "t": (1, 2)}
    save_state(tmp_path, state)
    save_state(tmp_path, state)  # replacing keeps exactly one tensor file
    assert len(list(tmp_path.glob("state-*.safetensors"))) == 1
    back = load_state(tmp_path)
    assert back is not None
    assert back["epoch"] == 2 and back["rows"] == [{"a": 1.5}] and back["t"] == (1, 2)
    opt2 = torch.optim.SGD(build_model("softmax").parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(back["optimizer"])
    buf = opt2.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(buf, opt.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(back["rng"], g.get_state())


def test_copied_tree_names_its_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without .git, the commit comes from $ROBUSTKIT_SOURCE_COMMIT, marked as a copy."""
    import robustkit.runtime as runtime

    fake = tmp_path / "robustkit" / "runtime.py"
    fake.parent.mkdir()
    fake.write_text("")
    monkeypatch.setattr(runtime, "__file__", str(fake))
    monkeypatch.delenv(runtime.SOURCE_COMMIT_ENV, raising=False)
    assert runtime.git_commit() is None
    monkeypatch.setenv(runtime.SOURCE_COMMIT_ENV, "abc123")
    assert runtime.git_commit() == "abc123+copied"


def test_leftovers_of_a_killed_write_are_removed_and_the_live_state_kept(tmp_path: Path) -> None:
    from robustkit.checkpoint import remove_leftovers

    save_state(tmp_path, {"step": 3, "w": torch.ones(2)})
    live = {p.name for p in tmp_path.iterdir()}
    (tmp_path / "state-1-2.safetensors").write_bytes(b"orphan: state.json never named it")
    (tmp_path / ".metrics.csv.abc123.tmp").write_text("half")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    remove_leftovers(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == live | {"notes.tmp"}
    assert load_state(tmp_path)["step"] == 3  # type: ignore[index]
