"""The KD-backdoor matrix: attacks × distillation methods × defenses × seeds, run as one sweep.

A matrix file (YAML)::

    name: digits
    config: {data: {dataset: digits}, teacher: {arch: small-cnn}}   # the base experiment (inline)
    base: some-experiment.yaml           # or a file, relative to the matrix file (config merges over it)
    attacks:                             # name -> dotted-key overrides of the base
      badnets: {teacher.backdoor: {trigger: badnets-square, rate: 0.1}}
      backweak: {teacher.backweak: {}}
    methods:
      dataset-kd: {distill.method: dataset, distill.kd.kd_lambda: 1.0}
      zskt: {distill.method: zskt, distill.data_free: {iterations: 200}}
    defenses:
      none: {}
      nad: {distill.defense: nad}
    seeds: [0, 1, 2]
    max_acc_cost: 0.05                   # the leaderboard's "best defense" may cost at most this ACC

Every combination is one experiment run (``kdbackdoor.experiment.runner``), labelled with its
attack, method, defense and seed. A defense that does not apply to a method (``DEFENSES``)
leaves its cells out and says so. The runs go through ``run_sweep``: locally or on Ray,
skipping complete runs, so calling the matrix again continues it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdbackdoor.errors import KDBackdoorError
from kdbackdoor.experiment.config import (DEFENSES, apply_overrides, describe_errors, parse_overrides, read_yaml,
                                          validate_config)
from kdbackdoor.experiment.sweep import SweepRun, SweepSpec, _merge

AXES = ("attack", "method", "defense")


class MatrixSpec(BaseModel):
    """A matrix file's contents."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(..., min_length=1, description="the matrix's name (its sweep's name)")
    base: Optional[str] = Field(None, description="experiment config file, relative to the matrix file")
    config: dict[str, Any] = Field(default_factory=dict, description="inline experiment config, merged over base")
    attacks: dict[str, dict[str, Any]] = Field(..., min_length=1, description="attack name -> dotted-key overrides")
    methods: dict[str, dict[str, Any]] = Field(..., min_length=1, description="method name -> dotted-key overrides")
    defenses: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"none": {}},
                                                description="defense name -> overrides; one named `none` (no "
                                                "defense) is the reference of each defense's cost")
    seeds: list[int] = Field([0], min_length=1, description="one run per seed and cell (sets `seed`)")
    max_acc_cost: float = Field(0.05, ge=0, le=1, description="largest mean ACC drop (share) against the "
                                "undefended cell at which a defense can be a cell's best")

    @model_validator(mode="after")
    def _reference(self) -> "MatrixSpec":
        if "none" not in self.defenses:
            raise ValueError("defenses: include `none: {}` (the undefended reference of every cell)")
        return self


@dataclass
class Matrix:
    """An expanded matrix: its runs (labels: attack, method, defense, seed) and the cells left out."""

    spec: MatrixSpec
    runs: list[SweepRun]
    skipped: list[str] = field(default_factory=list)

    def sweep_spec(self) -> SweepSpec:
        return SweepSpec(name=self.spec.name)


def load_matrix(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Matrix:
    """Read and expand a matrix file; ``overrides`` (``key=value``) apply to every run."""
    path = Path(path)
    try:
        spec = MatrixSpec(**read_yaml(path))
    except ValidationError as exc:
        raise KDBackdoorError(f"{path}: {describe_errors(exc, MatrixSpec)}") from None
    base = read_yaml(path.parent / spec.base) if spec.base else {}
    return expand_matrix(spec, _merge(base, spec.config), parse_overrides(overrides), str(path))


def expand_matrix(spec: MatrixSpec, base: dict, overrides: dict[str, Any] | None = None,
                  source: str = "matrix") -> Matrix:
    """Every valid cell × seed as a run, in the order attack, method, defense, seed (fastest).

    Raises ``KDBackdoorError`` naming the cell of the first invalid config, except for a
    defense that does not apply to a method: that cell is listed in ``skipped``.
    """
    runs, skipped = [], []
    for (attack, a), (method, m), (defense, d) in itertools.product(
            spec.attacks.items(), spec.methods.items(), spec.defenses.items()):
        cell = apply_overrides(apply_overrides(apply_overrides(base, a), m), d)
        cell = apply_overrides(cell, {"name": f"{spec.name}/{attack}/{method}/{defense}", **(overrides or {})})
        method_name = (cell.get("distill") or {}).get("method", "dataset")
        defense_name = (cell.get("distill") or {}).get("defense", "none")
        if defense_name in DEFENSES and method_name not in DEFENSES[defense_name]:
            skipped.append(f"{attack} × {method} × {defense}: defense {defense_name} does not apply to {method_name}")
            continue
        for seed in spec.seeds:
            config = validate_config(apply_overrides(cell, {"seed": seed}),
                                     f"{source} (cell {attack} × {method} × {defense}, seed {seed})")
            runs.append(SweepRun(config, {"attack": attack, "method": method, "defense": defense, "seed": seed}))
    return Matrix(spec, runs, skipped)
