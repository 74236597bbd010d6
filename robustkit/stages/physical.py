"""Robustness under transformation as a stage: ``physical.csv``, ``.json``, ``.safetensors``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from robustkit.config import AttackConfig, TransformConfig, to_dict
from robustkit.physical import (
    build_transform,
    transformation_robustness,
    wants_physical,
    write_physical,
)
from robustkit.stages.base import SweepDone


@dataclass(frozen=True)
class PhysicalWorld:
    """:mod:`robustkit.physical` when there is a ``[transforms]`` table, or a randomised model
    attacked with EOT; nothing otherwise."""

    attacks: Sequence[AttackConfig]
    transforms: TransformConfig | None
    eps: Sequence[float]
    title: str = "the physical-world evaluation"

    def run(self, done: SweepDone) -> SweepDone:
        config = wants_physical(done.model, self.attacks, self.transforms)
        if config is None:
            return done
        physical = transformation_robustness(
            done.model, done.split, self.attacks, config, self.eps, batch_size=done.batch_size,
            seed=done.seed, progress=done.progress)
        write_physical(done.folder, physical, {"transforms": to_dict(config),
                                               "transform": build_transform(config).describe()})
        done.log(f"robustness under transformation written to {done.shown / 'physical.csv'}")
        return done
