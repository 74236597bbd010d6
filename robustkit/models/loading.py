"""Bring-your-own models: load any supported model file as an ``nn.Module`` with the pixel contract.

Accepted model specs:

* a robustkit checkpoint: ``model.safetensors`` (or its stem) with its ``.json`` sidecar;
* ``zoo:NAME``: the weights released with the report ``reports/NAME`` (:mod:`robustkit.released`);
* a TorchScript file (``torch.jit.save``), only with ``trust=True``;
* a ``torch.export`` program (``.pt2``), only with ``trust=True``;
* ``package.module:factory`` plus ``weights`` (a state dict: ``.safetensors``, or a torch file
  read with ``weights_only=True`` and mapped to the chosen device).

``normalize=(mean, std)`` wraps a model that expects normalised input, so ε stays in pixel
units. :func:`check_logits` rejects models whose outputs are not ``[N, classes]`` logits.

Safety: a checkpoint is data (safetensors tensors and JSON) and loading it runs no code from
the file; ``--weights`` torch files go through torch's ``weights_only`` unpickler. TorchScript
and ``.pt2`` files are programs: ``torch.jit.load`` runs the archive's TorchScript code, and
``torch.export.load`` unpickles payloads (sample inputs, pickled weights and constants), hands
shape expressions to ``sympy.sympify`` (which evaluates Python) and calls whatever ``torch.*``
or ``operator`` function a graph node names. A file from someone else can therefore run code
on this machine, so these formats load only when the user says they trust the file
(``--trust-model-file``).
"""

from __future__ import annotations

import contextlib
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustkit.attacks.losses import logits_problem, probability_rows
from robustkit.checkpoint import (
    PICKLE_SUFFIXES,
    checkpoint_paths,
    load_checkpoint_tensors,
    load_tensors,
    read_sidecar,
)
from robustkit.errors import RobustkitError
from robustkit.models.factory import (
    FACTORY_ARCH,
    add_app_dir,
    build_network,
    call_factory,
    describe_output,
    pick_logits,
    spec_shape,
)
from robustkit.models.randomness import BatchEffect, batch_effect, describe_comparison
from robustkit.models.zoo import Normalized
from robustkit.released import ZOO_PREFIX, release_mismatch, resolve_zoo


def parse_normalize(text: str) -> tuple[list[float], list[float]]:
    """``"0.1307,0.3081"`` or ``"0.485/0.456/0.406,0.229/0.224/0.225"`` → (mean, std)."""
    try:
        mean_text, std_text = text.split(",")
        mean = [float(v) for v in mean_text.split("/")]
        std = [float(v) for v in std_text.split("/")]
    except ValueError:
        raise RobustkitError(
            f"--normalize {text!r}: expected MEAN,STD (e.g. 0.1307,0.3081; per channel "
            "0.485/0.456/0.406,0.229/0.224/0.225)"
        ) from None
    if len(mean) != len(std):
        raise RobustkitError(f"--normalize {text!r}: mean and std need the same number of values")
    return mean, std


def _load_state_dict(weights: Path, device: torch.device) -> dict[str, Tensor]:
    if not weights.is_file():
        raise RobustkitError(f"weights file {weights} not found: check --weights")
    if weights.suffix == ".safetensors":
        return load_tensors(weights, device)
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
    except Exception as exc:  # torch's weights_only unpickler fails on garbage in many ways
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RobustkitError(
            f"{weights} cannot be read as a plain state dict ({first[:200]}): save it with "
            "torch.save(model.state_dict(), path) or safetensors"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RobustkitError(f"{weights} holds a {type(state).__name__}, not a state dict")
    return state


def _from_factory(spec: str, weights: Path | None, device: torch.device,
                  app_dir: str | Path | None, output: str | None) -> nn.Module:
    """``spec`` called with no arguments, or with the arguments a robustkit checkpoint given
    as ``weights`` recorded for this same factory, then loaded with ``weights``; its logits
    picked by ``output``, else by the output that checkpoint recorded."""
    recorded = _recorded(spec, weights)
    model = call_factory(spec, dict(recorded.get("factory_args") or {}), app_dir=app_dir)
    output = output if output is not None else recorded.get("output")
    if output is not None:
        pick_logits(model, str(output))
    if weights is not None:
        try:
            model.load_state_dict(_load_state_dict(weights, device))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise RobustkitError(f"{weights} does not fit {spec}: {first}") from None
    return model.to(device)


def _recorded(spec: str, weights: Path | None) -> dict[str, Any]:
    """The sidecar beside ``weights`` when it records the factory the user named (``spec``):
    the user chose the code, the sidecar only its keyword arguments and output; else {}."""
    if weights is None or weights.suffix != ".safetensors":
        return {}
    if not weights.with_suffix(".json").is_file():
        return {}
    info = read_sidecar(weights)
    fits = info.get("factory") == spec and isinstance(info.get("factory_args") or {}, dict)
    return info if fits else {}


class ExportedModel(nn.Module):
    """A ``torch.export`` program as a module; its train/eval behaviour was fixed at export.

    The graph is held outside the module tree, so ``eval()`` (which exported graphs refuse)
    only flips this wrapper's flag.
    """

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "graph", graph)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.graph(x)  # type: ignore[operator]
        return out


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry their code (``<name>/code/``); torch.save archives do not."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


TRUST_HINT = (
    "it is a program, and loading it can run code the file's author chose (pickled payloads, "
    "TorchScript code, evaluated shape expressions); if you trust whoever made it, pass "
    "--trust-model-file, else ask for a robustkit checkpoint (.safetensors + .json) or a "
    "state dict to load with --model package.module:factory --weights FILE"
)


@contextlib.contextmanager
def _quiet_torch_loggers() -> Iterator[None]:
    """torch.export.load logs a traceback before raising; robustkit says what went wrong."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    before = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, state in zip(loggers, before, strict=True):
            logger.disabled = state


def _load_exported(path: Path, device: torch.device) -> nn.Module:
    if not _is_zip(path):
        raise RobustkitError(f"{path} is not a torch.export archive (not a zip file): export "
                             "it with torch.export.save")
    try:
        with _quiet_torch_loggers():
            program = torch.export.load(str(path))
        graph = program.module().to(device)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RobustkitError(f"{path} is not a loadable torch.export program ({first})"
                             ) from None
    return ExportedModel(graph)



def load_checkpoint(stem: Path | str, device: torch.device | str = "cpu", *,
                    factory: str | None = None, app_dir: str | Path | None = None,
                    trust: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network the sidecar names and load the checkpoint's weights into it, in
    eval mode on ``device`` (no unpickling). A sidecar naming a factory is rebuilt only as
    :func:`sidecar_network` allows (``factory``, ``app_dir``, ``trust``)."""
    state, info = load_checkpoint_tensors(stem, device)
    network = sidecar_network(info, Path(stem), factory=factory, app_dir=app_dir, trust=trust)
    model = build_network(network, int(info.get("num_classes", 10)))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        weights, _ = checkpoint_paths(Path(stem))
        raise RobustkitError(
            f"{weights} does not fit architecture {info.get('arch')}: {first}"
        ) from None
    return model.to(device).eval(), info


def sidecar_network(info: dict[str, Any], stem: Path, *, factory: str | None = None,
                    app_dir: str | Path | None = None, trust: bool = False) -> dict[str, Any]:
    """The network spec a checkpoint's sidecar ``info`` may be rebuilt from.

    A sidecar is data that anyone can edit, so what it names must run no code of its
    choosing. It may name a built-in architecture. A ``factory`` (a module to import and a
    callable to call with the sidecar's arguments) is honoured only when the user names the
    same factory (``factory``: ``model.factory`` of their config, or ``--model
    package.module:factory``) or trusts the file (``trust``: ``--trust-model-file``); else the
    load is refused with what to pass. The sidecar's ``app_dir`` is never put on the import
    path: the module is looked up in the caller's ``app_dir``, the current folder and
    ``sys.path``. The recorded ``in_shape`` must be a sane image shape (:func:`spec_shape`).
    """
    spec_shape(info)
    named = info.get("factory")
    if not named and info.get("arch") != FACTORY_ARCH:
        return {k: v for k, v in info.items() if k != "app_dir"}
    if not isinstance(named, str) or not isinstance(info.get("factory_args") or {}, dict):
        raise RobustkitError(f"{checkpoint_paths(stem)[1]} names no factory as "
                             "package.module:callable with an object of arguments: the "
                             "checkpoint is damaged")
    if named != factory and not trust:
        weights, sidecar = checkpoint_paths(stem)
        raise RobustkitError(
            f"{sidecar} names the factory {named[:100]!r}, code that rebuilding the network "
            f"would import and run: if you trust it, pass --model {named[:100]} --weights "
            f"{weights} (with --app-dir DIR for its module), or --trust-model-file")
    return {**info, "app_dir": str(app_dir) if app_dir is not None else None}


def load_model(
    spec: str | Path,
    *,
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    normalize: tuple[list[float], list[float]] | None = None,
    trust: bool = False,
    app_dir: str | Path | None = None,
    output: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model from any accepted spec; returns (model in eval mode, description).

    ``trust`` allows the formats that can run code when loaded (TorchScript, ``.pt2``); see
    the module docstring. ``package.module:factory`` (and a checkpoint of a factory-built
    network) imports from ``app_dir``, then the current folder, then ``sys.path``.
    ``output``: the index or key of the logits in a model whose forward returns a tuple, a
    list, a dict or an object (:func:`~robustkit.models.factory.pick_logits`); a checkpoint
    records the one it was trained with.
    """
    device = torch.device(device)
    add_app_dir(app_dir)
    text = _model_text(spec)
    weights_path = Path(weights) if weights is not None else None
    model, found = _load_by_kind(text, weights_path, device, trust, app_dir, output)
    recorded = (found.get("checkpoint") or {}).get("output")
    if output is not None and recorded is None and found["kind"] != "factory":
        pick_logits(model, output)
    info: dict[str, Any] = {"model": str(spec), **found,
                            **({"output": output or recorded} if output or recorded else {})}
    if normalize is not None:
        model = Normalized(model, *normalize).to(device)
        info["normalize"] = {"mean": normalize[0], "std": normalize[1]}
    model.eval()
    return model, info


#: The hint of the errors for files that are not a model robustkit can load.
_FACTORY_HINT = "--model package.module:factory --weights FILE"


def _model_text(spec: str | Path) -> str:
    """``spec`` as text, ``zoo:NAME`` resolved to the released weights' path; an empty spec
    or one holding a NUL byte is a user error."""
    text = str(spec)
    if not text.strip() or "\0" in text:
        raise RobustkitError(
            f"--model {text!r} is not a model: pass a checkpoint, a TorchScript or .pt2 file, "
            "or package.module:factory"
        )
    return str(resolve_zoo(text)) if text.startswith(ZOO_PREFIX) else text


def _names_factory(text: str, path: Path) -> bool:
    """Whether ``text`` is ``package.module:factory``: it has a colon, is no existing file and
    no explicit path (``/…``, ``./…``)."""
    return ":" in text and not path.exists() and not text.startswith(("/", "."))


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` names a robustkit checkpoint: by its suffix, or as a stem whose
    ``.safetensors`` and ``.json`` files both exist."""
    if path.suffix in {".safetensors", ".json"}:
        return True
    weights, sidecar = checkpoint_paths(path)
    return sidecar.is_file() and weights.is_file()


def _load_by_kind(text: str, weights: Path | None, device: torch.device, trust: bool,
                  app_dir: str | Path | None, output: str | None
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """The model ``text`` names and what describes it (``kind`` first), tried in order:
    a factory, a ``.pt2`` program, a checkpoint, a TorchScript file; else a user error."""
    path = Path(text)
    if _names_factory(text, path):
        return _from_factory(text, weights, device, app_dir, output), {"kind": "factory"}
    if weights is not None:
        raise RobustkitError(f"--weights {weights}: only --model package.module:factory takes "
                             f"separate weights; {text} carries its own, so drop --weights")
    if path.suffix == ".pt2":
        return _load_exported_file(path, device, trust), {"kind": "torch.export"}
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors")
                       if p.with_suffix(".json").is_file())  # checkpoints only
        raise RobustkitError(
            f"--model {text} is a folder: pass a model file in it"
            + (f" (it holds {', '.join(found[:3])})" if found else "")
        )
    if _is_checkpoint(path):
        model, meta = load_checkpoint(path, device, app_dir=app_dir, trust=trust)
        weights_file = checkpoint_paths(path)[0]
        mismatch = release_mismatch(weights_file)
        return model, {"kind": "checkpoint", "arch": meta.get("arch"), "checkpoint": meta,
                       "path": str(weights_file),
                       **({"release_mismatch": mismatch} if mismatch else {})}
    if path.is_file():
        return _load_torchscript_file(path, device, trust), {"kind": "torchscript"}
    raise RobustkitError(
        f"model {text} not found: pass a checkpoint, a TorchScript or .pt2 file, or "
        "package.module:factory with --weights"
    )


def _load_exported_file(path: Path, device: torch.device, trust: bool) -> nn.Module:
    """A ``.pt2`` program: the file must exist and be trusted (loading it can run code)."""
    if not path.is_file():
        raise RobustkitError(f"model file {path} not found: check --model")
    if not trust:
        raise RobustkitError(f"{path} is a torch.export program: {TRUST_HINT}")
    return _load_exported(path, device)


def _load_torchscript_file(path: Path, device: torch.device, trust: bool) -> nn.Module:
    """A file that is not a checkpoint must be a trusted TorchScript archive (loading it runs
    its code); a pickle or state dict is refused with the factory hint, never unpickled."""
    if not _is_zip(path):
        raise RobustkitError(
            f"{path} is neither a checkpoint, TorchScript nor torch.export file"
            + (f" (it looks like a pickle, which robustkit never loads): pass {_FACTORY_HINT}"
               if path.suffix in PICKLE_SUFFIXES else "")
        )
    not_torchscript = (f"{path} is not a TorchScript file (a state dict or pickled model?): "
                       f"pass {_FACTORY_HINT}")
    if not _is_torchscript(path):
        raise RobustkitError(not_torchscript)
    if not trust:
        raise RobustkitError(f"{path} is a TorchScript file: {TRUST_HINT}")
    try:
        model: nn.Module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError):
        raise RobustkitError(not_torchscript) from None
    return model


def _forward(model: nn.Module, x: Tensor) -> Any:
    try:
        with torch.no_grad():
            return model(x)
    except Exception as exc:  # a user's model can fail in any way; say where
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        hint = (" (a torch.export program needs a dynamic batch dimension: export with "
                "dynamic_shapes={'x': {0: torch.export.Dim('batch')}})"
                if isinstance(model, ExportedModel) or _wraps_exported(model) else "")
        raise RobustkitError(
            f"the model failed on a batch of {x.shape[0]} images {list(x.shape)}: {first}{hint}"
        ) from None


def _wraps_exported(model: nn.Module) -> bool:
    """A ``Normalized`` wrapper around an exported program."""
    return isinstance(getattr(model, "model", None), ExportedModel)


def check_logits(model: nn.Module, x: Tensor, num_classes: int) -> None:
    """Reject a model whose outputs are not ``[N, num_classes]`` logits
    (:func:`~robustkit.attacks.losses.logits_problem`), are not finite, depend on the rest of
    the batch (:func:`~robustkit.models.randomness.batch_effect`: a random model is not
    refused, its randomness is held fixed for the comparison; the checks describe it) or are
    probabilities (:func:`~robustkit.attacks.losses.probability_rows`), with a message saying
    why."""
    out = _forward(model, x)
    richer = describe_output(out)
    if richer is not None:
        raise RobustkitError(richer)
    part = _forward(model, x[:3])  # attacks shrink the batch as samples break: sizes must be free
    problem = logits_problem(out, x.shape[0], num_classes)
    if problem:
        raise RobustkitError(
            f"{problem} (input is [N, {', '.join(map(str, x.shape[1:]))}] pixels in [0, 1])")
    if not torch.isfinite(out).all():
        raise RobustkitError("the model returns non-finite outputs (nan or inf) on clean images")
    if isinstance(part, Tensor) and part.shape == out[:3].shape and len(x) > 3:
        effect = batch_effect(model, x, 3)
        if effect.dependent:
            _refuse_batch_statistics(effect, len(x))
    if bool(probability_rows(out).all()):
        raise RobustkitError(
            "the model returns probabilities (rows in [0, 1] summing to 1), not logits: remove "
            "the final softmax; attacks on probabilities mask gradients and overstate robustness"
        )


def _refuse_batch_statistics(effect: BatchEffect, n: int) -> None:
    held = describe_comparison(effect)
    raise RobustkitError(
        "the model's outputs for the same images change with the other images in the batch "
        f"(up to {effect.difference:.3g} between two batches of {n} that share their first "
        f"{effect.shared} images{', ' + held if held else ''}): it normalises with batch "
        "statistics (BatchNorm saved in train mode in a torch.export or TorchScript file, where "
        "eval() changes nothing), so every number would depend on the batch; export the model "
        "after model.eval()"
    )
