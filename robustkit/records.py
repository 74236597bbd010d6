"""The run folder's two JSON records as typed values: ``settings.json`` and ``manifest.json``.

:class:`RunSettings` is what an evaluation evaluated and how (its fingerprint decides whether
a sweep may resume); :class:`Manifest` is who made a folder, when, with which code, data and
weights. Each keeps the whole object as written in ``record`` (the report shows it, the guard
re-hashes it) and offers the fields code reads as typed attributes: a field that is absent,
or whose stored value has the wrong type, reads as None (older folders lack newer fields).

Both are built by :meth:`from_record` from a JSON object, or read with :meth:`read` through
:func:`robustkit.storage.read_json`, the one JSON reader. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustkit.storage import read_json, read_json_if_any

SETTINGS = "settings.json"
MANIFEST = "manifest.json"


def _text(record: Mapping[str, Any], key: str) -> str | None:
    value = record.get(key)
    return value if isinstance(value, str) else None


def _count(record: Mapping[str, Any], key: str) -> int | None:
    value = record.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _numbers(record: Mapping[str, Any], key: str) -> tuple[float, ...] | None:
    """A list of numbers as floats; None when absent or not a list of numbers."""
    value = record.get(key)
    if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return tuple(float(v) for v in value)


def _object(record: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = record.get(key)
    return value if isinstance(value, dict) else None


def _objects(record: Mapping[str, Any], key: str) -> tuple[Mapping[str, Any], ...]:
    value = record.get(key)
    return tuple(v for v in value if isinstance(v, dict)) if isinstance(value, list) else ()


def _texts(record: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    value = record.get(key)
    return tuple(str(v) for v in value) if isinstance(value, list) else None


@dataclass(frozen=True)
class RunSettings:
    """``settings.json``: ``experiment`` (``run``) or ``model`` (``attack``), the data
    (``dataset``, ``split``, ``n``, ``classes`` beyond the built-in sets), the sweep (``eps``;
    ``attacks``, one record per attack as :func:`robustkit.runs.attack_records` writes it),
    ``normalize``, a preprocessing ``defence`` and ``transforms``, and ``config_hash``."""

    record: Mapping[str, Any] = field(default_factory=dict)
    experiment: str | None = None
    model: str | None = None
    dataset: str | None = None
    split: str | None = None
    n: int | None = None
    eps: tuple[float, ...] | None = None
    attacks: tuple[Mapping[str, Any], ...] = ()
    classes: tuple[str, ...] | None = None
    normalize: str | None = None
    defence: Mapping[str, Any] | None = None
    transforms: Mapping[str, Any] | None = None
    config_hash: str | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunSettings:
        return cls(
            record=record, experiment=_text(record, "experiment"), model=_text(record, "model"),
            dataset=_text(record, "dataset"), split=_text(record, "split"),
            n=_count(record, "n"), eps=_numbers(record, "eps"),
            attacks=_objects(record, "attacks"), classes=_texts(record, "classes"),
            normalize=_text(record, "normalize"), defence=_object(record, "defence"),
            transforms=_object(record, "transforms"), config_hash=_text(record, "config_hash"))

    @classmethod
    def of(cls, settings: RunSettings | Mapping[str, Any]) -> RunSettings:
        """``settings`` as a record: a :class:`RunSettings` as it is, a mapping (the settings
        a job builds before writing them) read by :meth:`from_record`."""
        return settings if isinstance(settings, RunSettings) else cls.from_record(settings)

    @classmethod
    def read(cls, folder: Path) -> RunSettings:
        """``folder``'s ``settings.json``; :class:`~robustkit.storage.UnreadableJsonError`
        when it is missing or damaged."""
        return cls.from_record(read_json(folder / SETTINGS, "run the evaluation again"))

    @classmethod
    def read_if_any(cls, folder: Path) -> RunSettings | None:
        """``folder``'s ``settings.json``, None when it is missing or damaged."""
        record = read_json_if_any(folder / SETTINGS)
        return None if record is None else cls.from_record(record)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: the ``command`` (run, attack, train, report) and its
    ``command_line``, the ``owner`` record (see :class:`robustkit.outputs.Owner`), the code
    (``robustkit`` version, ``git_commit``), the settings' ``config_hash`` / sweep
    ``fingerprint``, the ``checks`` level, ``notes``, the evaluated checkpoint
    (``checkpoint_epoch``, ``checkpoint_selected_by``) and released weights (``weights_file``,
    ``weights_sha256``, ``sidecar_sha256``) and the data's ``data_sha256`` and ``data_resize``."""

    record: Mapping[str, Any] = field(default_factory=dict)
    command: str | None = None
    command_line: str | None = None
    owner: Mapping[str, Any] | None = None
    robustkit: str | None = None
    git_commit: str | None = None
    config_hash: str | None = None
    fingerprint: str | None = None
    checks: str | None = None
    notes: tuple[str, ...] = ()
    checkpoint_epoch: int | None = None
    checkpoint_selected_by: str | None = None
    weights_file: str | None = None
    weights_sha256: str | None = None
    sidecar_sha256: str | None = None
    data_sha256: str | None = None
    data_resize: str | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Manifest:
        return cls(
            record=record, command=_text(record, "command"),
            command_line=_text(record, "command_line"), owner=_object(record, "owner"),
            robustkit=_text(record, "robustkit"), git_commit=_text(record, "git_commit"),
            config_hash=_text(record, "config_hash"), fingerprint=_text(record, "fingerprint"),
            checks=_text(record, "checks"), notes=_texts(record, "notes") or (),
            checkpoint_epoch=_count(record, "checkpoint_epoch"),
            checkpoint_selected_by=_text(record, "checkpoint_selected_by"),
            weights_file=_text(record, "weights_file"),
            weights_sha256=_text(record, "weights_sha256"),
            sidecar_sha256=_text(record, "sidecar_sha256"),
            data_sha256=_text(record, "data_sha256"), data_resize=_text(record, "data_resize"))

    @classmethod
    def read_if_any(cls, folder: Path) -> Manifest | None:
        """``folder``'s ``manifest.json``, None when it is missing or damaged."""
        record = read_json_if_any(folder / MANIFEST)
        return None if record is None else cls.from_record(record)
