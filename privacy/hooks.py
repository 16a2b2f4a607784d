"""How updates travel from hospitals into one aggregate: the `AggregationHook` phases.

Masking and encryption need a protocol, not a function, so a hook has four phases, each run
where its name says:

1. `setup` (driver, before the round): one set-up message per hospital (keys, contexts).
2. `encode` (each hospital): turn its `Update` into what may leave the hospital.
3. `combine` (driver): join what arrived into what the strategy aggregates.
4. `finish` (driver, calling back into hospitals when the protocol needs them, e.g. to unmask
   after dropouts or to decrypt): turn the combination into plain `Update`s for the strategy.

A hook that sums (masking, encryption) returns one `Update` named `AGGREGATE` holding the
example-weighted mean, so a weighted-mean strategy gives back the same vector; strategies that need
each update in the clear (median, Krum) cannot run behind such a hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from fedward.types import Update

AGGREGATE = "<aggregate>"


class AggregationHook(ABC):
    name: str
    reveals_individual_updates: bool  # False for hooks whose driver only sees a sum

    def setup(self, round: int, hospitals: Sequence[str]) -> Mapping[str, Any]:
        return {h: None for h in hospitals}

    @abstractmethod
    def encode(self, update: Update, setup: Any) -> Update: ...

    @abstractmethod
    def combine(self, round: int, encoded: Sequence[Update]) -> Sequence[Update]: ...

    def finish(self, round: int, combined: Sequence[Update]) -> Sequence[Update]:
        return combined


class PlaintextHook(AggregationHook):
    """Updates travel as they are; the driver sees each one."""

    name = "plaintext"
    reveals_individual_updates = True

    def encode(self, update: Update, setup: Any) -> Update:
        return update

    def combine(self, round: int, encoded: Sequence[Update]) -> Sequence[Update]:
        return list(encoded)


HOOKS: dict[str, type[AggregationHook]] = {PlaintextHook.name: PlaintextHook}


def build_hook(name: str) -> AggregationHook:
    return HOOKS[name]()
