"""Networks by description: a built-in ``arch`` or a user's ``package.module:factory``.

``package.module:factory`` is resolved as uvicorn and gunicorn resolve ``module:app``: an
``--app-dir`` (``model.app_dir`` in a config) is searched first, then the current folder (so
``robustkit attack --model lenet5_module:LeNet5`` works beside ``lenet5_module.py``), then the
usual ``sys.path``. ``factory`` may be a function or a class returning an ``nn.Module``;
``args`` are passed as keyword arguments.

A checkpoint's sidecar describes its network with :func:`network_spec` (``arch``, or
``factory`` + ``factory_args``, and ``in_shape``), and :func:`build_network` rebuilds it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from robustkit.errors import RobustkitError
from robustkit.models.zoo import MNIST_SHAPE, Shape, build_model

FACTORY_ARCH = "factory"


def add_app_dir(app_dir: str | Path | None = None) -> None:
    """Put the current folder, then ``app_dir``, at the front of ``sys.path`` (once each), so
    ``app_dir`` is searched first, then the current folder, then the rest of ``sys.path``."""
    folders = [Path.cwd()]
    if app_dir is not None:
        folder = Path(app_dir).expanduser()
        if not folder.is_dir():
            raise RobustkitError(f"--app-dir {app_dir}: no such folder; pass the folder that "
                                 "holds your model's module")
        folders.append(folder)
    for folder in folders:
        text = str(folder.resolve())
        if text in sys.path:
            sys.path.remove(text)
        sys.path.insert(0, text)


def import_factory(spec: str, app_dir: str | Path | None = None, what: str = "--model") -> Any:
    """The object named by ``package.module:attribute`` (the attribute may be dotted)."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise RobustkitError(f"{what} {spec!r}: expected package.module:factory, e.g. "
                             "lenet5_module:LeNet5")
    add_app_dir(app_dir)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = f"{Path.cwd()}" + (f" or {app_dir}" if app_dir is not None else "")
        raise RobustkitError(
            f"cannot import {module_name!r} for {what} {spec} ({exc}): run robustkit from the "
            f"folder that holds it (searched {where}), pass --app-dir DIR, or put it on "
            "PYTHONPATH"
        ) from None
    except Exception as exc:  # a user's module can fail at import in any way; say how
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RobustkitError(
            f"importing {module_name!r} for {what} {spec} failed ({type(exc).__name__}: "
            f"{first}): fix the module so that `python -c 'import {module_name}'` works"
        ) from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise RobustkitError(f"{module_name!r} has no attribute {attr!r} ({what} {spec})")
        target = getattr(target, part)
    return target


def call_factory(spec: str, args: dict[str, Any] | None = None,
                 app_dir: str | Path | None = None, what: str = "--model") -> nn.Module:
    """Import ``spec`` and call it with ``args``; the result must be an ``nn.Module``."""
    factory = import_factory(spec, app_dir, what)
    if isinstance(factory, nn.Module):
        if args:
            raise RobustkitError(f"{what} {spec} is a module instance: it takes no arguments")
        return factory
    if not callable(factory):
        raise RobustkitError(f"{what} {spec} is a {type(factory).__name__}, not a function or "
                             "class returning an nn.Module")
    try:
        model = factory(**(args or {}))
    except Exception as exc:  # a user's factory can fail in any way; say which and how
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        takes = f"keyword arguments {args}" if args else "no arguments"
        raise RobustkitError(
            f"{what} {spec}: calling the factory failed ({type(exc).__name__}: {first}); it "
            f"must take {takes} and return an nn.Module"
        ) from None
    if not isinstance(model, nn.Module):
        raise RobustkitError(f"{what} {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def network_spec(arch: str, factory: str | None = None, args: dict[str, Any] | None = None,
                 app_dir: str | None = None, in_shape: Shape = MNIST_SHAPE,
                 output: str | None = None) -> dict[str, Any]:
    """What a checkpoint's sidecar records to rebuild its network (``output``: where the
    factory's network keeps its logits, see :func:`pick_logits`)."""
    spec: dict[str, Any] = {"arch": FACTORY_ARCH if factory else arch, "in_shape": list(in_shape)}
    if factory:
        spec.update(factory=factory, factory_args=dict(args or {}))
        if app_dir is not None:
            spec["app_dir"] = app_dir
        if output is not None:
            spec["output"] = output
    return spec


def build_network(spec: dict[str, Any], num_classes: int) -> nn.Module:
    """A freshly initialised network from a :func:`network_spec` (or an older sidecar).

    The spec is trusted: a ``factory`` in it is imported (from its ``app_dir``) and called.
    Specs from a config or the command line are the user's own; a checkpoint's sidecar goes
    through :func:`robustkit.models.loading.sidecar_network` first, which decides whether its
    factory may run."""
    if spec.get("factory"):
        model = call_factory(str(spec["factory"]), spec.get("factory_args") or {},
                             spec.get("app_dir"), what="model.factory")
        output = spec.get("output")
        return model if output is None else pick_logits(model, str(output))
    return build_model(str(spec.get("arch")), num_classes, spec_shape(spec))


def pick_logits(model: nn.Module, key: str) -> nn.Module:
    """``model``, its forward made to return only its logits, found in a richer output by
    ``key`` (:func:`pick_output`). A forward hook replaces the output, so the weights and
    their names stay the model's own (a state dict loads as before)."""

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        return pick_output(out, key)

    try:
        model.register_forward_hook(hook)
    except (RuntimeError, AttributeError, TypeError):
        raise RobustkitError(f"--output {key}: this model takes no Python hooks (TorchScript?); "
                             "script a wrapper that returns the logits") from None
    return model


def pick_output(out: Any, key: str) -> Any:
    """``out[int(key)]`` of a tuple or list, ``out[key]`` of a dict, else ``out.key`` (the
    ``logits`` attribute of many hub models' output objects)."""
    if isinstance(out, (tuple, list)):
        if not key.lstrip("-").isdigit() or not -len(out) <= int(key) < len(out):
            raise RobustkitError(f"--output {key}: the model returns a {type(out).__name__} "
                                 f"of {len(out)} items; pass an index from 0 to {len(out) - 1}")
        return out[int(key)]
    if isinstance(out, Mapping):
        if key not in out:
            raise RobustkitError(f"--output {key}: the model returns a dict with keys "
                                 f"{', '.join(map(str, list(out)[:8]))}; pass one of them")
        return out[key]
    if not hasattr(out, key):
        raise RobustkitError(f"--output {key}: the model's {type(out).__name__} output has no "
                             f"attribute {key!r}")
    return getattr(out, key)


def describe_output(out: Any) -> str | None:
    """For an output that holds more than logits, what it is and the ``--output`` that would
    pick them (one clause); None for anything else."""
    def shape(v: Any) -> str:
        return f"tensor {list(v.shape)}" if hasattr(v, "shape") else type(v).__name__

    if isinstance(out, (tuple, list)):
        items = ", ".join(f"[{i}] {shape(v)}" for i, v in enumerate(out[:6]))
        return (f"the model returns a {type(out).__name__} ({items}): pass --output INDEX "
                "(model.output in a config) to say which item holds the logits, e.g. "
                "--output 0")
    if isinstance(out, Mapping):
        items = ", ".join(f"{k!r} {shape(v)}" for k, v in list(out.items())[:6])
        first = next(iter(out), "logits")
        return (f"the model returns a dict ({items}): pass --output KEY (model.output in a "
                f"config), e.g. --output {first}")
    if hasattr(out, "logits") and not hasattr(out, "shape"):
        return (f"the model returns a {type(out).__name__} with a logits attribute: pass "
                "--output logits (model.output in a config)")
    return None


#: The largest image a sidecar may describe (C·H·W values): 16 Mi floats, 64 MiB per image.
MAX_IN_VALUES = 1 << 24


def spec_shape(spec: dict[str, Any]) -> Shape:
    """The spec's ``in_shape`` as (C, H, W), MNIST's when absent; a shape that is not three
    positive integers of at most :data:`MAX_IN_VALUES` values in all is a damaged sidecar."""
    shape = spec.get("in_shape") or list(MNIST_SHAPE)
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
            or shape[0] * shape[1] * shape[2] > MAX_IN_VALUES):
        raise RobustkitError(
            f"the checkpoint's in_shape {str(shape)[:80]} is not [channels, height, width] "
            f"with at most {MAX_IN_VALUES:,} values: the checkpoint is damaged; save it again "
            "with robustkit")
    c, h, w = shape
    return c, h, w
