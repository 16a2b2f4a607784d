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
    sources:               # budgets per data source instead, each across every export of the source
      ehr-warehouse:
        exports: ["/data/exports/ehr-*"]   # folders holding exports of it (relative: to this file's folder)
        budget: {epsilon: 3.0, delta: 1.0e-5, unit: patient}
    spend_log: /var/lib/fedward/privacy_spend.jsonl   # where every run's spend is kept (default: the work area)
    consortium:            # cross-site mode: the hospital checks every peer itself (docs/deploy.md)
      identity: /etc/fedward/identity   # its key and certificate (fedward request), ca.crt and crl.pem
      roster: [hospital_a, hospital_b, hospital_c]   # the hospitals it federates with
      fewest_hospitals: 3  # the fewest hospitals a round may complete with, and its noise share's size
      updates: masked      # how its updates may leave: masked (the default), or plain to a driver it trusts with them

A run's config may ask for more protection than the policy, never less: a hospital refuses, before
it reads any data, a config that would release cells smaller than its floor (subgroups.min_count,
explain.min_bin_count), train on its data outside DP-SGD when it has a budget, protect rows where
it protects patients, or account at a larger delta; and it refuses each round that would take its
patients' spend, over all runs so far on the same source (`spend_log`, or `SPEND_LOG` in its work
area), past its budget: a new export of a source, in a new folder, inherits the source's spend. Its share
of DP-FedAvg's distributed noise is sized so that the other hospitals of the smallest round, less
its assumed colluders, still carry the full noise (privacy/dp_fedavg.py); where no such hospital
is left, it refuses to train.
"""

from __future__ import annotations

import fnmatch
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
class Consortium:
    """Cross-site mode: whom the hospital federates with and how it proves who it is."""

    identity: Path  # folder of NAME.key, NAME.crt, ca.crt and crl.pem
    roster: frozenset[str]
    fewest_hospitals: int
    updates: Literal["masked", "plain"] = "masked"


@dataclass(frozen=True)
class HospitalPolicy:
    release_floor: int = 10
    budget: Budget | None = None
    colluders: int = 0
    source: str = "the default policy"  # where it was read from, for messages
    data_source: str = "its data"  # the source whose budget holds for the data folder it was read for
    spend_log: Path | None = None  # None: the hospital's work area's
    consortium: Consortium | None = None  # None: one trust domain with the driver

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
        if self.consortium is not None and self.consortium.updates == "masked" and not config.privacy.masking.enabled:
            out.append("privacy.masking is off, but in cross-site mode its updates leave only masked (consortium.updates: masked)")
        return out

    def require(self, config: FedwardConfig, hospital: str) -> None:
        refused = self.refusals(config)
        if refused:
            raise HospitalError(f"{hospital}: the run asks for less protection than its policy ({self.source}): " + "; ".join(refused))


@dataclass(frozen=True)
class Source:
    name: str
    exports: tuple[str, ...]  # absolute glob patterns of the folders that hold exports of it
    budget: Budget

    def holds(self, data_dir: Path) -> bool:
        return any(fnmatch.fnmatch(str(data_dir.resolve()), pattern) for pattern in self.exports)


def policy_file(work_dir: Path) -> Path:
    return Path(os.environ.get(POLICY_ENV) or work_dir / "policy.yaml").expanduser()


def load_policy(path: Path, data_dir: Path | None = None) -> HospitalPolicy:
    """The policy in `path`, or the defaults when there is no such file; its budget the one of the
    source whose exports hold `data_dir`, else the policy's own `budget`."""
    if not path.is_file():
        return HospitalPolicy(source=f"the default policy (no {path})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the hospital's policy: {e}") from None
    where = str(path)
    _fields(raw, {"release_floor", "budget", "colluders", "sources", "spend_log", "consortium"}, where)
    floor = _whole(raw.get("release_floor", HospitalPolicy.release_floor), 1, f"{where}: release_floor", "patients")
    colluders = _whole(raw.get("colluders", HospitalPolicy.colluders), 0, f"{where}: colluders", "hospitals")
    budget = _budget(raw["budget"], f"{where}: budget") if raw.get("budget") is not None else None
    sources = _sources(raw.get("sources") or {}, path.parent.resolve(), where)
    spend_log = raw.get("spend_log")
    if spend_log is not None and not isinstance(spend_log, str):
        raise ConfigError(f"{where}: spend_log: expected a file path, got {spend_log!r}")
    held = next((s for s in sources if data_dir is not None and s.holds(data_dir)), None)
    return HospitalPolicy(
        release_floor=floor, budget=held.budget if held else budget, colluders=colluders, source=where,
        data_source=held.name if held else HospitalPolicy.data_source,
        spend_log=None if spend_log is None else path.parent.resolve() / Path(spend_log).expanduser(),
        consortium=_consortium(raw["consortium"], path.parent.resolve(), f"{where}: consortium") if raw.get("consortium") is not None else None,
    )


def _consortium(raw: Any, folder: Path, where: str) -> Consortium:
    _fields(raw, {"identity", "roster", "fewest_hospitals", "updates"}, where)
    if raw.get("updates", "masked") not in ("masked", "plain"):
        raise ConfigError(f"{where}.updates: expected 'masked' or 'plain', got {raw['updates']!r}")
    identity, roster = raw.get("identity"), raw.get("roster")
    if not isinstance(identity, str):
        raise ConfigError(f"{where}.identity: expected the folder of its key, certificate, ca.crt and crl.pem, got {identity!r}")
    if not (isinstance(roster, list) and len(roster) >= 2 and all(isinstance(r, str) and r for r in roster) and len(set(roster)) == len(roster)):
        raise ConfigError(f"{where}.roster: expected a list of at least two distinct hospital names, got {roster!r}")
    fewest = _whole(raw.get("fewest_hospitals"), 2, f"{where}.fewest_hospitals", "hospitals")
    if fewest > len(roster):
        raise ConfigError(f"{where}.fewest_hospitals: {fewest} is more than the {len(roster)} hospitals of its roster")
    return Consortium(folder / Path(identity).expanduser(), frozenset(roster), fewest, raw.get("updates", "masked"))


def _budget(b: Any, where: str) -> Budget:
    _fields(b, {"epsilon", "delta", "unit"}, where)
    budget = Budget(
        epsilon=_positive(b.get("epsilon"), f"{where}.epsilon"),
        delta=_positive(b.get("delta", Budget.delta), f"{where}.delta", below_one=True),
        unit=b.get("unit", Budget.unit),
    )
    if budget.unit not in ("patient", "sample"):
        raise ConfigError(f"{where}.unit: expected 'patient' or 'sample', got {budget.unit!r}")
    return budget


def _sources(raw: Any, folder: Path, where: str) -> list[Source]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: sources: expected a mapping of source names, got {type(raw).__name__}")
    out = []
    for name, body in raw.items():
        here = f"{where}: sources.{name}"
        _fields(body, {"exports", "budget"}, here)
        exports = body.get("exports")
        if not (isinstance(exports, list) and exports and all(isinstance(e, str) for e in exports)):
            raise ConfigError(f"{here}.exports: expected a list of folder patterns, got {exports!r}")
        if body.get("budget") is None:
            raise ConfigError(f"{here}.budget: missing; a source is named for its budget")
        out.append(Source(str(name), tuple(str(folder / Path(e).expanduser()) for e in exports), _budget(body["budget"], f"{here}.budget")))
    return out


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
