"""An update's way out of a hospital: an ordered list of steps, each declaring itself.

Once the strategy's hospital half has made the update (`LocalTraining.finish`), `steps` lists what
happens to it before it leaves, in this order:

1. `Bound`: robust.norm_bound, applied here when the driver will see only a sum and cannot bound it;
2. `Tamper`: a simulated attacker's change (config `attack`), made after the bound an honest
   hospital would apply, as a hostile one would skip it;
3. `PrivateNoise`: DP-FedAvg's clip, and the hospital's share of the noise when the driver sees only the sum;
4. `Encode`: the privacy hook's form of the update (as it is, masked or encrypted);
5. `Compress`: int8 or top-k, for changes that leave in the clear.

A step's `declaration` says what it needs of the rest of the run and what it takes from it
(fedward/declarations.py); the driver reads the same list to check a config before round 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedward import aggregation, compression
from fedward.actors import attacks
from fedward.config import FedwardConfig
from fedward.declarations import Declaration
from fedward.privacy import dp_fedavg
from fedward.privacy.hooks import AggregationHook
from fedward.seeds import derived_seed
from fedward.types import CompressedUpdate, SealedUpdate, Update

Outgoing = Update | SealedUpdate | CompressedUpdate


@dataclass
class Sending:
    """One round's sending at one hospital: what the steps read, and the state they carry on."""

    round: int
    seed: int  # the round plan's seed (a simulated attacker's noise)
    setup: Any  # the privacy hook's set-up message for this round
    size: int  # the global model's shared values; a SCAFFOLD control change follows them
    buffers: frozenset[str]  # the model's running statistics, which compression sends exactly
    residual: np.ndarray | None = None  # top-k's error feedback, kept by the hospital from round to round


class Step(Protocol):
    declaration: Declaration | None

    def apply(self, update: Outgoing, sending: Sending) -> Outgoing: ...


@dataclass(frozen=True)
class Bound:
    bound: float
    declaration = None

    def apply(self, update: Update, sending: Sending) -> Update:
        return aggregation.bounded(update, self.bound, sending.size)


@dataclass(frozen=True)
class Tamper:
    attack: Any  # AttackConfig
    declaration = None

    def apply(self, update: Update, sending: Sending) -> Update:
        return attacks.tampered(self.attack, update, sending.seed)


@dataclass(frozen=True)
class PrivateNoise:
    config: FedwardConfig
    hook: AggregationHook
    declaration = dp_fedavg.DECLARATION

    def apply(self, update: Update, sending: Sending) -> Update:
        update = aggregation.bounded(update, self.config.privacy.dp_fedavg.clip_norm, sending.size)
        if self.hook.reveals_individual_updates:  # the driver adds the whole noise to the mean it sees
            return update
        shares = dp_fedavg.noise_shares(self.config, self.hook.contributors_agreed(sending.round))
        return dp_fedavg.add_noise_share(update, self.config, shares)


@dataclass(frozen=True)
class Encode:
    hook: AggregationHook

    @property
    def declaration(self) -> Declaration | None:
        return self.hook.declaration()

    def apply(self, update: Update, sending: Sending) -> Update | SealedUpdate:
        return self.hook.encode(update, sending.setup)


@dataclass(frozen=True)
class Compress:
    config: FedwardConfig
    hospital: str

    @property
    def declaration(self) -> Declaration:
        return compression.declaration(self.config.compression)

    def apply(self, update: Update, sending: Sending) -> CompressedUpdate:
        seed = derived_seed(self.config.run.seed, sending.round, f"{self.hospital}/compression")
        exact = compression.statistics(update.layout, sending.buffers)
        sent, sending.residual = compression.compress(update, self.config.compression, seed, sending.residual, exact)
        return sent


def steps(config: FedwardConfig, hook: AggregationHook, hospital: str) -> list[Step]:
    """The steps an update of `hospital` takes under `config`, in order; those the config leaves off are absent."""
    out: list[Step] = []
    if config.robust.norm_bound is not None and not hook.reveals_individual_updates:  # the driver cannot bound what it cannot see
        out.append(Bound(config.robust.norm_bound))
    if hospital in config.attack.hospitals:
        out.append(Tamper(config.attack))
    if config.privacy.dp_fedavg.enabled:
        out.append(PrivateNoise(config, hook))
    out.append(Encode(hook))
    if config.compression.kind != "none":
        out.append(Compress(config, hospital))
    return out


def send(update: Update, route: list[Step], sending: Sending) -> Outgoing:
    for step in route:
        update = step.apply(update, sending)
    return update
