"""robustkit's certified bounds against auto_LiRPA's, margin by margin (an offline cross-check).

auto_LiRPA (Xu et al., 2020; github.com/Verified-Intelligence/auto_LiRPA) is the reference
implementation of IBP, CROWN and CROWN-IBP. It is not a dependency of robustkit and not in CI:
its current release pins torch < 2.9 and does not install from the registry beside torch 2.x,
but its source tree imports as it is (with ``appdirs``, ``tqdm``, ``pyyaml`` and ``graphviz``
installed). Point ``--lirpa-path`` (or ``$PYTHONPATH``) at a checkout's root; without it the
script prints one line saying it was skipped and exits 0.

For each model, ε, norm and method both sides bound the same specification: the margins
``z_y − z_j`` (``C`` with rows ``e_y − e_j``) of the first ``--n`` MNIST test images, in
float64, over the L∞ box clipped to [0, 1] (auto_LiRPA: ``PerturbationLpNorm(x_L, x_U)``) or
the L2 ball (auto_LiRPA bounds the ball alone; robustkit takes the better of the ball and the
clipped box). Two comparisons per cell: **like for like**, robustkit's bounds computed the
way auto_LiRPA computes them (:func:`textbook_bounds`: CROWN's intermediate bounds not
intersected with IBP's, L2 over the ball alone), whose largest difference ``|ours − theirs|``
over all margins is the cross-check; and robustkit's **default** bounds, whose difference from
auto_LiRPA's may have either sign (the IBP intersection tightens intermediate boxes, and with
CROWN's adaptive lower slope a tighter box can still give a looser final bound), with how many
samples each certifies.

In L2 on a padded convolution robustkit's bounds are tighter than auto_LiRPA's, by design:
auto_LiRPA's interval of a first-layer convolution over the L2 ball is ``ε‖W_c‖₂`` (the whole
filter) at every position, robustkit's ``ε‖A_i‖₂`` of each output's own row, which at the
padded border holds only the filter taps that meet the image. With no padding (the unpadded
CNN below) the two agree like the MLPs do. (Replacing robustkit's row norms by whole-filter
norms on a padded random CNN brought CROWN's largest difference from 1.7e-2 to 2.7e-5.)

    PYTHONPATH=/path/to/auto_LiRPA python benchmarks/certify_lirpa.py \\
        --json benchmarks/results/cpu_certify_lirpa.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _common import THREADS_HELP, default_data_dir, machine_line, print_table, set_threads
from torch import Tensor, nn

from robustkit.certify import margin_bounds
from robustkit.certify.bounds import (
    _crown_boxes,
    backward_bound,
    ibp_margins,
    input_box,
    interval_bounds,
    l2_ball,
    network_steps,
    specification,
)
from robustkit.data import Split, load_dataset
from robustkit.errors import RobustkitError
from robustkit.models import load_model
from robustkit.models.zoo import strided_cnn

#: auto_LiRPA's names of the methods.
LIRPA_METHOD = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN"}
#: Agreement asked for by issue #35.
TOLERANCE = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lirpa-path", type=Path, default=None,
                        help="root of an auto_LiRPA checkout (the folder holding auto_LiRPA/)")
    parser.add_argument("--n", type=int, default=100, help="test images per MLP (default 100)")
    parser.add_argument("--cnn-n", type=int, default=20,
                        help="test images per CNN (default 20: CROWN on a CNN is costly)")
    parser.add_argument("--train-batches", type=int, default=400,
                        help="SGD batches of 128 for the strided CNN (default 400)")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--json", type=Path, default=None, help="save the figures as JSON")
    return parser.parse_args(argv)


def import_lirpa(path: Path | None) -> Any:
    """The ``auto_LiRPA`` module, or None (with the reason printed) when it does not import."""
    if path is not None:
        sys.path.insert(0, str(path))
    try:
        import auto_LiRPA
    except Exception as error:  # ImportError, or a failing import inside the package
        print(f"auto_LiRPA is not importable ({type(error).__name__}: {error}): skipped; "
              "pass --lirpa-path to a checkout of github.com/Verified-Intelligence/auto_LiRPA")
        return None
    return auto_LiRPA


def trained_strided_cnn(train: Split, batches: int) -> nn.Module:
    """Wong et al.'s strided MNIST CNN (robustkit's ``strided-cnn``: no max pooling, so all
    three bounds apply), trained with plain SGD for ``batches`` batches (seed 0)."""
    torch.manual_seed(0)
    model = strided_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    for b in range(batches):
        index = order[(b * 128) % len(train):(b * 128) % len(train) + 128]
        loss = nn.functional.cross_entropy(model(train.images[index]), train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def unpadded_cnn() -> nn.Module:
    """The strided CNN without padding, at its random initialisation (seed 0): with no padded
    border, auto_LiRPA's L2 interval of the first layer is exact too (see the docstring)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 5 * 5, 100), nn.ReLU(),
                         nn.Linear(100, 10)).eval()


def lirpa_bounds(lirpa: Any, model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str,
                 method: str) -> Tensor:
    """auto_LiRPA's lower bounds of the margins ``[N, K − 1]``, in float64."""
    net = copy.deepcopy(model).double().eval()
    x = x.double()
    bounded = lirpa.BoundedModule(net, torch.zeros_like(x[:1]), device="cpu", verbose=False)
    if norm == "linf":
        lower, upper = input_box(x, eps)
        ptb = lirpa.PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=lower, x_U=upper)
    else:
        ptb = lirpa.PerturbationLpNorm(norm=2, eps=eps)
    with torch.no_grad():
        logits = net(x)
    spec = specification(logits.shape[1], y)
    lower_bound, _ = bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), C=spec,
                                            method=LIRPA_METHOD[method], bound_upper=False)
    result: Tensor = lower_bound.detach()
    return result


#: Half-width of the box that stands for "no box" in the like-for-like L2 bounds.
UNBOXED = 1e3


def textbook_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str,
                    method: str) -> Tensor:
    """robustkit's bounds computed as auto_LiRPA computes them: CROWN's intermediate bounds
    not intersected with IBP's, and in L2 the ball alone (the pixel box made too wide to
    bind). Same steps, relaxations and input terms as :func:`margin_bounds` otherwise."""
    steps = network_steps(model)
    x = x.double()
    lower, upper = input_box(x, eps) if norm == "linf" else (x - UNBOXED, x + UNBOXED)
    ball = l2_ball(x, eps) if norm == "l2" else None
    with torch.no_grad():
        if method == "ibp":
            return ibp_margins(steps, lower, upper, y, ball)
        boxes = interval_bounds(steps, lower, upper, ball)
        shapes = [tuple(lo.shape[1:]) for lo, _ in boxes[:-1]]
        if method == "crown":
            boxes = _crown_boxes(steps, shapes, boxes, lower, upper, ball, intersect=False)
        spec = specification(boxes[-1][0].shape[1], y)
        return backward_bound(steps, shapes, boxes[:-1], spec, lower, upper, ball)


def compare(lirpa: Any, name: str, model: nn.Module, split: Split, eps: float, norm: str,
            method: str) -> dict[str, Any]:
    """One cell: both sides' bounds, their largest difference, what each certifies."""
    x, y = split.images, split.labels
    row: dict[str, Any] = {"model": name, "norm": norm, "eps": eps, "method": method,
                           "n": len(y)}
    started = time.perf_counter()
    try:
        ours = margin_bounds(model, x, y, eps, method, norm).margins  # type: ignore[arg-type]
    except RobustkitError as error:
        return row | {"ours": f"refused: {error}"}
    row["ours_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    theirs = lirpa_bounds(lirpa, model, x, y, eps, norm, method)
    row["lirpa_seconds"] = time.perf_counter() - started
    like = textbook_bounds(model, x, y, eps, norm, method) - theirs
    difference = ours - theirs
    row |= {"max_abs_difference": float(like.abs().max()),
            "default_min_ours_minus_theirs": float(difference.min()),
            "default_max_ours_minus_theirs": float(difference.max()),
            "ours_certified": int((ours > 0).all(1).sum()),
            "lirpa_certified": int((theirs > 0).all(1).sum()),
            "mean_bound": float(ours.mean())}
    return row


def cells(models: dict[str, tuple[nn.Module, Split]]) -> list[tuple[str, float, str, str]]:
    """(model, ε, norm, method) of the comparison."""
    grid: list[tuple[str, float, str, str]] = []
    for name in models:
        linf = (0.01, 0.03) if "cnn" not in name else (0.005, 0.02)
        for method in LIRPA_METHOD:
            grid += [(name, e, "linf", method) for e in linf]
            grid += [(name, e, "l2", method) for e in (0.3, 1.0)]
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(argv) if argv is not None else None)
    set_threads(args.threads)
    lirpa = import_lirpa(args.lirpa_path)
    if lirpa is None:
        return 0
    data = load_dataset("mnist", args.data_dir, "cpu")
    test = data.test
    models: dict[str, tuple[nn.Module, Split]] = {
        "zoo:mnist_mlp": (load_model("zoo:mnist_mlp")[0], test.take(args.n)),
        "zoo:mnist_mlp_pgd_at": (load_model("zoo:mnist_mlp_pgd_at")[0], test.take(args.n)),
        "strided-cnn (SGD, seed 0)": (trained_strided_cnn(data.train, args.train_batches),
                                      test.take(args.cnn_n)),
        "zoo:mnist_cnn (max pooling)": (load_model("zoo:mnist_cnn")[0], test.take(args.cnn_n)),
        "unpadded strided-cnn (random, seed 0)": (unpadded_cnn(), test.take(args.cnn_n)),
    }
    rows = [compare(lirpa, name, *models[name], eps, norm, method)
            for name, eps, norm, method in cells(models)]
    print(machine_line())
    print(f"auto_LiRPA {getattr(lirpa, '__version__', '?')}, float64 both sides")
    table = []
    for r in rows:
        if "max_abs_difference" in r:
            table.append([r["model"], r["norm"], f"{r['eps']:g}", r["method"], r["n"],
                          f"{r['max_abs_difference']:.1e}",
                          f"{r['default_min_ours_minus_theirs']:.1e}",
                          f"{r['default_max_ours_minus_theirs']:.1e}",
                          r["ours_certified"], r["lirpa_certified"],
                          f"{r['ours_seconds']:.2f}", f"{r['lirpa_seconds']:.2f}"])
        else:
            table.append([r["model"], r["norm"], f"{r['eps']:g}", r["method"], r["n"],
                          "-", "-", "-", "refused", "-", "-", "-"])
    print("max|diff|: robustkit computed as auto_LiRPA does (CROWN's intermediate bounds not "
          "intersected with IBP's; L2: the ball alone) against auto_LiRPA. ours−lirpa: "
          "robustkit's default bounds (positive: tighter). cert: samples certified.")
    print_table(["model", "norm", "eps", "method", "n", "max|diff|", "min ours−lirpa",
                 "max ours−lirpa", "ours cert", "lirpa cert", "ours s", "lirpa s"], table)
    def padded_l2(row: dict[str, Any]) -> bool:
        return row["norm"] == "l2" and "unpadded" not in row["model"] and "cnn" in row["model"]

    for what, kept in (("like for like, L∞ and unpadded L2", lambda row: not padded_l2(row)),
                       ("like for like, L2 on padded convolutions", padded_l2)):
        compared = [r for r in rows if kept(r) and "max_abs_difference" in r]
        worst = max(r["max_abs_difference"] for r in compared)
        print(f"{what}: largest |ours − auto_LiRPA| over every margin {worst:.2e} "
              f"({'within' if worst <= TOLERANCE else 'ABOVE'} {TOLERANCE:g})")
    loosest = min(r["default_min_ours_minus_theirs"] for r in rows if "max_abs_difference" in r)
    print(f"robustkit's default bounds: ours − auto_LiRPA ≥ {loosest:.2e} on every margin "
          "(negative: looser somewhere)")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=2)
                             + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
