"""The allocator thresholds the CLI sets (robustkit.allocator): they cut the page faults of
repeated attack steps, the CLI sets them, and a user's own setting wins."""

from __future__ import annotations

import ctypes.util
import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import robustkit_env, run

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "libc" not in (ctypes.util.find_library("c") or ""),
    reason="glibc's mallopt is Linux-only")

#: Ten input-gradient steps of a PGD-AT-sized CNN on 180 images, after one warm-up step; prints
#: the minor page faults of the ten.
STEPS = textwrap.dedent("""
    import resource, sys, torch
    from torch import nn
    from robustkit.allocator import tune_allocator
    print(tune_allocator() if sys.argv[1] == "tuned" else "untouched")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(3136, 1024), nn.ReLU(),
                        nn.Linear(1024, 10)).requires_grad_(False)
    x = torch.rand(180, 1, 28, 28)
    def step():
        z = x.clone().requires_grad_(True)
        net(z).logsumexp(1).sum().backward()
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def steps(mode: str, **env: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                          env={**robustkit_env(), **env}, check=True)
    answer, faults = done.stdout.split()
    return answer, int(faults)


#: glibc's starting thresholds, fixed: set by the user, glibc no longer moves them as blocks
#: are freed, so the baseline is the same every run (left alone, it is not: 22k to 98k faults
#: for the same ten steps, as the first mmapped block freed happens to raise the threshold).
GLIBC_START = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def test_raised_thresholds_cut_the_page_faults_of_attack_steps() -> None:
    answer, tuned = steps("tuned")
    assert answer == "True"
    _, fixed = steps("untouched", **GLIBC_START)
    assert tuned * 20 < fixed, (tuned, fixed)  # measured: 4.4k-9.9k against 518k


@pytest.mark.parametrize(("env", "described"), [
    ({"ROBUSTKIT_ALLOCATOR": "default"},
     "the C library's own thresholds (ROBUSTKIT_ALLOCATOR=default)"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "the user's MALLOC_TRIM_THRESHOLD_=131072")])
def test_a_users_own_setting_wins(env: dict[str, str], described: str) -> None:
    answer, _ = steps("tuned", **env)
    assert answer == "False"
    done = subprocess.run(
        [sys.executable, "-c", "from robustkit.allocator import tune_allocator as t, "
         "allocator_description as d; print(t(), d(), sep='|')"],
        capture_output=True, text=True, env={**robustkit_env(), **env}, check=True)
    assert done.stdout.strip() == f"False|{described}"


def test_the_cli_sets_them(tmp_path: Path, mnist_root: Path) -> None:
    """The CLI raises the thresholds and its manifest says so. With glibc's thresholds fixed at
    their starting values by the user, the same attack makes far more page faults. (Left to
    itself glibc moves them as blocks are freed, so an untuned run faults anywhere between the
    two: no baseline to test against.)"""
    command = ("attack", "--model", "zoo:mnist_cnn_pgd_at", "--attack", "apgd", "--steps", "20",
               "--eps", "0,0.3", "--n", "200", "--checks", "off", "-q", "--json")

    def faults(out: str, **env: str) -> tuple[int, str]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        done = run(*command, "--out", out, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr
        manifest = json.loads((tmp_path / out / "manifest.json").read_text(encoding="utf-8"))
        spent = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
        return spent, manifest["allocator"]

    (tuned, tuned_record), (fixed, fixed_record) = faults("tuned"), faults("fixed", **GLIBC_START)
    assert tuned_record == ("glibc, mmap threshold 32 MiB and trim threshold 1 GiB "
                            "(robustkit.allocator)")
    assert fixed_record == "the user's MALLOC_MMAP_THRESHOLD_=131072, MALLOC_TRIM_THRESHOLD_=131072"
    assert tuned * 3 < fixed, (tuned, fixed)  # measured: 158k-161k against 915k-917k
