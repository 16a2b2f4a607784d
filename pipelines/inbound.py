"""An update's way into the aggregate at the driver: the ordered steps after a hospital's outbound ones.

Each update is admitted as it arrives (form, layout, counts, finite values: pipelines/admission.py)
and handed to the privacy hook's `combine`; updates of earlier rounds that arrive late join too
(`run.stale_weight`). Then `steps` lists, in order, what turns the round's updates into the changes
the strategy aggregates (with its robust rule, fedward/aggregation.py):

0. `JoinLate`: the late updates join the round's own (only with `run.stale_weight` > 0);
1. `Weigh`: where changes arrive in the clear, each weighs what the hospital's example count gives
   (never what it claims), times stale_weight per round late, and is clipped to robust.norm_bound,
   or to DP-FedAvg's clip_norm, which its noise is calibrated to whatever a hospital sent;
2. `ChargedSteps`: under DP-SGD, each hospital's optimizer ran the mechanism it was charged for;
3. `Quorum`: enough hospitals answered;
4. `Unseal`: the hook's `finish` (unmasking, decryption);
5. `CentralNoise`: DP-FedAvg's noise on the mean, where the driver saw the changes;
6. `Trust`: FLTrust's weights, from each change's agreement with the driver's trusted change.

Like the outbound steps, each declares what it needs and breaks (fedward/declarations.py), and
pipelines/compatibility.py reads the list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedward import aggregation
from fedward.config import FedwardConfig
from fedward.declarations import Declaration
from fedward.errors import AggregationError, QuorumError
from fedward.privacy import dp_fedavg, dp_sgd
from fedward.privacy.hooks import AggregationHook, Ask
from fedward.privacy.ledger import dp_sgd_steps
from fedward.types import Layout, Update


@dataclass
class Arrived:
    """One round's updates at the driver, as the steps pass them on."""

    round: int
    weights: np.ndarray  # the global weights the round trained from
    layout: Layout
    updates: dict[str, Any]  # admitted, by hospital; a sealed one without its payload once combined
    arrived_late: dict[str, tuple[Update, int]]  # updates of earlier rounds admitted now, with their round
    combined: Any  # the hook's combination of the round's own updates
    failures: dict[str, str]  # hospitals asked but not counted, and why
    asked: set[str]  # hospitals that took part in the hook's set-up
    units: Mapping[str, int]  # DP-SGD: each hospital's privacy units, as it was charged for them
    ask: Ask  # the hook's channel to hospitals
    aggregated: list[Update] = field(default_factory=list)  # what the strategy aggregates
    trust: dict[str, float] = field(default_factory=dict)  # FLTrust's weight per hospital


class Step(Protocol):
    declaration: Declaration | None

    def apply(self, arrived: Arrived) -> None: ...


@dataclass(frozen=True)
class JoinLate:
    declaration = aggregation.LATE_UPDATES

    def apply(self, arrived: Arrived) -> None:
        arrived.updates.update({h: u for h, (u, _) in arrived.arrived_late.items()})


@dataclass(frozen=True)
class Weigh:
    config: FedwardConfig
    size: int  # the global model's shared values
    declaration = None

    def apply(self, arrived: Arrived) -> None:
        cfg = self.config
        bound = cfg.privacy.dp_fedavg.clip_norm if cfg.privacy.dp_fedavg.enabled else cfg.robust.norm_bound
        for h, u in arrived.updates.items():
            lateness = arrived.round - arrived.arrived_late[h][1] if h in arrived.arrived_late else 0
            u = dataclasses.replace(u, weight=dp_fedavg.aggregation_weight(cfg, u.num_examples) * cfg.run.stale_weight ** lateness)
            arrived.updates[h] = u if bound is None else aggregation.bounded(u, bound, self.size)
        arrived.combined = [arrived.updates[h] for h in sorted(arrived.updates)]


@dataclass(frozen=True)
class ChargedSteps:
    config: FedwardConfig
    declaration = None

    def apply(self, arrived: Arrived) -> None:
        for h, u in sorted(arrived.updates.items()):
            planned, reported = dp_sgd.plan_round(self.config, arrived.units[h]), dp_sgd_steps(u.metrics)
            if reported != planned:
                raise AggregationError(f"round {arrived.round}: {h} reports DP-SGD {reported}, but was charged for {planned}")


@dataclass(frozen=True)
class Quorum:
    needed: int
    declaration = None

    def apply(self, arrived: Arrived) -> None:
        if len(arrived.updates) < self.needed:
            raise QuorumError(arrived.round, self.needed, arrived.failures)


@dataclass(frozen=True)
class Unseal:
    hook: AggregationHook
    declaration = None  # the hook declares itself with its hospital half (actors/outbound.Encode)

    def apply(self, arrived: Arrived) -> None:
        dropped = {h: why for h, why in arrived.failures.items() if h in arrived.asked}
        arrived.aggregated = list(self.hook.finish(arrived.round, arrived.combined, dropped, arrived.ask))


@dataclass(frozen=True)
class CentralNoise:
    config: FedwardConfig
    declaration = None  # DP-FedAvg declares itself with its hospital half (actors/outbound.PrivateNoise)

    def apply(self, arrived: Arrived) -> None:
        arrived.aggregated = [dp_fedavg.noised_mean(arrived.aggregated, self.config)]


@dataclass(frozen=True)
class Trust:
    config: FedwardConfig
    trusted_change: Callable[[int, np.ndarray, Layout], np.ndarray] | None  # None where only declarations are read
    log: Callable[[str], None]

    @property
    def declaration(self) -> Declaration | None:
        return aggregation.rule_declaration(self.config.robust)

    def apply(self, arrived: Arrived) -> None:
        reference = self.trusted_change(arrived.round, arrived.weights, arrived.layout)
        arrived.aggregated, arrived.trust = aggregation.trust_weighted(arrived.aggregated, reference)
        if not arrived.aggregated:
            self.log(f"round {arrived.round}: FLTrust: no hospital's change points the way the trusted data's does; the weights stay")


@dataclass(frozen=True)
class Rule:
    """The robust rule, which the strategy applies as it aggregates: here for its declaration."""

    config: FedwardConfig

    @property
    def declaration(self) -> Declaration | None:
        return aggregation.rule_declaration(self.config.robust)

    def apply(self, arrived: Arrived) -> None:
        pass


def steps(config: FedwardConfig, hook: AggregationHook, size: int = 0,
          trusted_change: Callable[[int, np.ndarray, Layout], np.ndarray] | None = None,
          log: Callable[[str], None] = print) -> list[Step]:
    """The driver's steps under `config`, in order; those the config leaves off are absent."""
    clear = hook.reveals_individual_updates
    out: list[Step] = [JoinLate()] if config.run.stale_weight > 0 else []
    if clear:
        out.append(Weigh(config, size))
    if config.privacy.dp_sgd.enabled:
        out.append(ChargedSteps(config))
    out += [Quorum(config.run.min_hospitals), Unseal(hook)]
    if config.privacy.dp_fedavg.enabled and clear:
        out.append(CentralNoise(config))
    out.append(Trust(config, trusted_change, log) if config.robust.rule == "fltrust" else Rule(config))
    return out
