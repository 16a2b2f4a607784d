"""A hospital's own policy: the protection it requires of every run on its data, read only there.

The driver never ships it and learns of it only what a refusal says. A hospital reads it from the
file that FEDWARD_POLICY names on its node, or else from `policy.yaml` in its work area (a
simulation keeps one per hospital there); without either, the defaults below hold.

    release_floor: 10      # no released cell may count fewer patients
    budget:                # the privacy budget of this hospital's patients, across every run on its data
      epsilon: 3.0
      delta: 1.0e-5
      unit: patient        # or sample
    colluders: 0           # hospitals of a round it assumes tell the driver their DP-FedAvg noise shares

A run's config may ask for more protection than the policy, never less: a hospital refuses, before
it reads any data, a config that would release cells smaller than its floor (subgroups.min_count,
explain.min_bin_count), train on its data outside DP-SGD when it has a budget, protect rows where
it protects patients, or account at a larger delta; and it refuses each round that would take its
patients' spend, over all runs so far (`SPEND_LOG` in its work area), past its budget. Its share
of DP-FedAvg's distributed noise is sized so that the other hospitals of the smallest round, less
its assumed colluders, still carry the full noise (privacy/dp_fedavg.py); where no such hospital
is left, it refuses to train.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from fedward.config import FedwardConfig
from fedward.errors import ConfigError, HospitalError

POLICY_ENV = "FEDWARD_POLICY"
SPEND_LOG = "privacy_spend.jsonl"  # in the hospital's work area: every run's patient-level spend on its data


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float = 1e-5
    unit: Literal["patient", "sample"] = "patient"


@dataclass(frozen=True)
class HospitalPolicy:
    release_floor: int = 10
    budget: Budget | None = None
    colluders: int = 0
    source: str = "the default policy"  # where it was read from, for messages

    def refusals(self, config: FedwardConfig) -> list[str]:
        """What in `config` asks for less protection than this policy, each naming the setting."""
        out = []
        floors = (("subgroups.min_count", config.subgroups.min_count, bool(config.subgroups.attributes)),
                  ("explain.min_bin_count", config.explain.min_bin_count, config.explain.enabled))
        for setting, value, used in floors:
            if used and value < self.release_floor:
                out.append(f"{setting}={value} is below its release floor of {self.release_floor} patients")
        budget, dp = self.budget, config.privacy.dp_sgd
        if budget is not None:
            if not dp.enabled:
                out.append(f"privacy.dp_sgd is off, but its patients' privacy is spent only under DP-SGD (budget epsilon {budget.epsilon:g})")
            else:
                if budget.unit == "patient" and dp.unit == "sample":
                    out.append("privacy.dp_sgd.unit=sample protects rows, but it protects patients (budget.unit: patient)")
                if dp.delta > budget.delta:
                    out.append(f"privacy.dp_sgd.delta={dp.delta:g} is above its budget's delta {budget.delta:g}")
        return out

    def require(self, config: FedwardConfig, hospital: str) -> None:
        refused = self.refusals(config)
        if refused:
            raise HospitalError(f"{hospital}: the run asks for less protection than its policy ({self.source}): " + "; ".join(refused))


def policy_file(work_dir: Path) -> Path:
    return Path(os.environ.get(POLICY_ENV) or work_dir / "policy.yaml").expanduser()


def load_policy(path: Path) -> HospitalPolicy:
    """The policy in `path`, or the defaults when there is no such file."""
    if not path.is_file():
        return HospitalPolicy(source=f"the default policy (no {path})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the hospital's policy: {e}") from None
    where = str(path)
    _fields(raw, {"release_floor", "budget", "colluders"}, where)
    floor = _whole(raw.get("release_floor", HospitalPolicy.release_floor), 1, f"{where}: release_floor", "patients")
    colluders = _whole(raw.get("colluders", HospitalPolicy.colluders), 0, f"{where}: colluders", "hospitals")
    budget = None
    if raw.get("budget") is not None:
        b = raw["budget"]
        _fields(b, {"epsilon", "delta", "unit"}, f"{where}: budget")
        budget = Budget(
            epsilon=_positive(b.get("epsilon"), f"{where}: budget.epsilon"),
            delta=_positive(b.get("delta", Budget.delta), f"{where}: budget.delta", below_one=True),
            unit=b.get("unit", Budget.unit),
        )
        if budget.unit not in ("patient", "sample"):
            raise ConfigError(f"{where}: budget.unit: expected 'patient' or 'sample', got {budget.unit!r}")
    return HospitalPolicy(release_floor=floor, budget=budget, colluders=colluders, source=where)


def _whole(value: Any, least: int, where: str, of: str) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
        raise ConfigError(f"{where}: expected a whole number of {of} >= {least}, got {value!r}")
    return value


def _fields(raw: Any, known: set[str], where: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {sorted(known)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected {sorted(known)}")


def _positive(value: Any, where: str, below_one: bool = False) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0 and (not below_one or value < 1)):
        raise ConfigError(f"{where}: expected a number {'in (0, 1)' if below_one else '> 0'}, got {value!r}")
    return float(value)
