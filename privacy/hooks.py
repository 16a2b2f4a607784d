"""How updates travel from hospitals into one aggregate: the `AggregationHook` phases.

Masking and encryption need a protocol, not a function, so a hook has phases, each run where
its name says. One instance lives at the driver (`hospital` None) and one in each hospital.

1. `start` (driver, once per run invocation): set-up among hospitals that lasts the run (keys).
2. `setup` (driver, before a round): one set-up message per hospital asked to train.
3. `encode` (each hospital): turn its `Update` into what may leave the hospital.
4. `combine` (driver): join updates one by one as they arrive, in one pass: a hook that sums
   holds the sum and one update, never all of them.
5. `finish` (driver): turn the combination into plain `Update`s for the strategy. It knows which
   set-up hospitals dropped out, and may `ask` the others for their part (unmasking shares,
   decryption): each request is answered at a hospital by `respond`.

`start` and `setup` reach hospitals through the same `ask` as `finish`. A hook that sums
(masking, encryption) returns one `Update` named `AGGREGATE` holding the weighted mean of the
deltas that arrived, with their summed weight and counts, so a weighted-mean strategy gives back
the same vector; strategies that need each update in the clear (median, Krum) cannot run behind
such a hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedward.certificates import Identity
from fedward.config import FedwardConfig
from fedward.declarations import CLEAR, SAME_ROUND, WHOLE_SHAPE, Declaration
from fedward.types import SealedUpdate, Update

AGGREGATE = "<aggregate>"

# ask({hospital: request}) -> {hospital: response}; hospitals that fail to answer are left out.
Ask = Callable[[Mapping[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True)
class Trust:
    """What a hospital's half of a protocol relies on: its own node's settings and identity, never
    the driver's word. Without an identity and a roster the hospital is in one trust domain with
    the driver, which relays keys faithfully; in cross-site mode it checks every peer itself."""

    weight: float = 1.0  # its weight in the mean, derived from its own data
    colluders: int = 0  # hospitals of a round its policy assumes tell the driver what they hold
    fewest: int | None = None  # the fewest hospitals its policy lets a round complete with
    roster: frozenset[str] | None = None  # the hospitals its policy federates with; None: whoever the driver relays
    identity: Identity | None = None  # signs its protocol messages and checks its peers'; None: unsigned
    record: Path | None = None  # where it keeps, across restarts, which sums it helped unmask

    @property
    def cross_site(self) -> bool:
        return self.identity is not None


class AggregationHook(ABC):
    name: str
    form: str  # how an update leaves a hospital: "plain", "masked" or "encrypted"
    reveals_individual_updates: bool  # False for hooks whose driver only sees a sum

    def __init__(self, config: FedwardConfig, hospital: str | None, run_id: str, trust: Trust | None = None):
        self.config = config
        self.hospital = hospital  # None at the driver
        self.run_id = run_id
        self.trust = trust or Trust()  # the driver's is never read

    def start(self, hospitals: Sequence[str], ask: Ask) -> None:
        """Set-up that lasts the run (driver); hospitals that fail it are left out of rounds."""

    def setup(self, round: int, weights: Mapping[str, float], ask: Ask) -> Mapping[str, Any]:
        """Set-up messages for the hospitals asked this round, keyed by hospital; `weights` are
        their aggregation weights. A hospital missing from the result sits the round out."""
        return {h: None for h in weights}

    @abstractmethod
    def encode(self, update: Update, setup: Any, start: str) -> Update | SealedUpdate:
        """`start`: a digest of the weights the update was trained from (the hospital's slice of the global ones)."""

    @abstractmethod
    def combine(self, round: int, received: Iterable[Update | SealedUpdate]) -> Any: ...

    @abstractmethod
    def finish(self, round: int, combined: Any, dropped: Mapping[str, str], ask: Ask) -> Sequence[Update]: ...

    def respond(self, round: int, request: Any) -> Any:
        raise NotImplementedError(f"the {self.name} hook asks nothing of hospitals")

    def fewest_contributors(self, planned: int) -> int:
        """The fewest hospitals whose updates can complete a round of `planned`: hospital-level DP
        noise is split into this many shares, so no completed round has less than the full noise."""
        return 1

    def contributors_agreed(self, round: int) -> int:
        """At a hospital: the fewest contributors to `round` it relies on (1: none agreed). A
        hospital sizes its noise share from this, which its own policy bounds."""
        return 1

    def describe(self) -> dict[str, Any]:
        """The protocol's parameters, for the privacy ledger."""
        return {"hook": self.name, "form": self.form}

    def declaration(self) -> Declaration | None:
        """What the protocol needs of the run and takes from it (None: it changes nothing)."""
        if self.reveals_individual_updates:
            return None
        return Declaration(
            f"privacy.{self.name}",
            needs={WHOLE_SHAPE: "sums changes of the global model's shape, entry by entry",
                   SAME_ROUND: "sets up each round's sum among the hospitals asked in it"},
            breaks={CLEAR: f"sends each change {self.form}, the model's size whatever its values, and shows the driver only their sum"},
        )


class PlaintextHook(AggregationHook):
    """Updates travel as they are; the driver sees each one."""

    name = "plaintext"
    form = "plain"
    reveals_individual_updates = True

    def encode(self, update: Update, setup: Any, start: str) -> Update:
        return update

    def combine(self, round: int, received: Iterable[Update]) -> Sequence[Update]:
        return list(received)

    def finish(self, round: int, combined: Sequence[Update], dropped: Mapping[str, str], ask: Ask) -> Sequence[Update]:
        return combined


def build_hook(config: FedwardConfig, hospital: str | None, run_id: str, trust: Trust | None = None) -> AggregationHook:
    """The hook the config asks for, at the driver (`hospital` None) or at a hospital, which
    relies on `trust`."""
    # Imported here: each pulls in its crypto library, needed only when configured.
    if config.privacy.masking.enabled:
        from fedward.privacy.masking import MaskingHook

        return MaskingHook(config, hospital, run_id, trust)
    if config.privacy.encryption.enabled:
        from fedward.privacy.ckks import CkksHook

        return CkksHook(config, hospital, run_id, trust)
    return PlaintextHook(config, hospital, run_id, trust)
