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

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedward import aggregation, compression
from fedward.actors import attacks
from fedward.config import FedwardConfig
from fedward.declarations import Declaration
from fedward.errors import HospitalError
from fedward.privacy import dp_fedavg, masking
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
    start: str  # a digest of the weights the hospital trained from (its slice of the global ones)
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
    colluders: int  # how many of a round's hospitals the hospital's own policy assumes collude with the driver
    declaration = dp_fedavg.DECLARATION

    def apply(self, update: Update, sending: Sending) -> Update:
        update = aggregation.bounded(update, self.config.privacy.dp_fedavg.clip_norm, sending.size)
        if self.hook.reveals_individual_updates:  # the driver adds the whole noise to the mean it sees
            return update
        fewest = self.hook.contributors_agreed(sending.round)
        if self.config.privacy.masking.enabled:  # its larger share must not wrap the ring either
            masking.check_ring(self.config, sending.size, self.colluders)
        shares = dp_fedavg.noise_shares(self.config, fewest, self.colluders, quorum=fewest)
        update = dp_fedavg.add_noise_share(update, self.config, shares)
        return dataclasses.replace(update, metrics={**update.metrics, "dp_fedavg_colluders": self.colluders})


@dataclass(frozen=True)
class Encode:
    hook: AggregationHook
    colluders: int

    @property
    def declaration(self) -> Declaration | None:
        return self.hook.declaration()

    def apply(self, update: Update, sending: Sending) -> Update | SealedUpdate:
        if self.colluders and self.hook.form == "encrypted":
            raise HospitalError(f"its policy assumes {self.colluders} hospital(s) collude with the driver, and under CKKS every hospital "
                                f"holds the secret key: a colluding one would decrypt this change")
        if self.colluders and self.hook.form == "masked":
            # With as many survivors as the threshold, the others and the driver know the sum and
            # their own changes: colluders among them read this one unless another survivor is honest.
            fewest = self.hook.contributors_agreed(sending.round)
            if fewest < self.colluders + 2:
                raise HospitalError(
                    f"round {sending.round} can complete with {fewest} hospitals; its policy assumes {self.colluders} of them "
                    f"collude with the driver, who with the sum would read this change: it needs at least {self.colluders + 2}"
                )
        return self.hook.encode(update, sending.setup, sending.start)


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


def steps(config: FedwardConfig, hook: AggregationHook, hospital: str, colluders: int = 0) -> list[Step]:
    """The steps an update of `hospital` takes under `config`, in order; those the config leaves off are absent."""
    out: list[Step] = []
    if config.robust.norm_bound is not None and not hook.reveals_individual_updates:  # the driver cannot bound what it cannot see
        out.append(Bound(config.robust.norm_bound))
    if hospital in config.attack.hospitals:
        out.append(Tamper(config.attack))
    if config.privacy.dp_fedavg.enabled:
        out.append(PrivateNoise(config, hook, colluders))
    out.append(Encode(hook, colluders))
    if config.compression.kind != "none":
        out.append(Compress(config, hospital))
    return out


def send(update: Update, route: list[Step], sending: Sending) -> Outgoing:
    for step in route:
        update = step.apply(update, sending)
    return update
