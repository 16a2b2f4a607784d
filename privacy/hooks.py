"""How updates travel from hospitals into one aggregate: the `AggregationHook` phases.

Masking and encryption need a protocol, not a function, so a hook has phases, each run where
its name says:

1. `setup` (driver, before the round): one set-up message per hospital (keys, contexts).
2. `encode` (each hospital): turn its `Update` into what may leave the hospital.
3. `combine` (driver): join what arrived.
4. `finish` (driver): turn the combination into plain `Update`s for the strategy. It knows which
   hospitals dropped out, and may `ask` the survivors for their part (unmasking shares after
   dropouts, partial decryptions): each request is answered at a hospital by `respond`.

A hook that sums (masking, encryption) returns one `Update` named `AGGREGATE` holding the
example-weighted mean, so a weighted-mean strategy gives back the same vector; strategies that need
each update in the clear (median, Krum) cannot run behind such a hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedward.types import Update

AGGREGATE = "<aggregate>"

# ask({hospital: request}) -> {hospital: response}; hospitals that fail to answer are left out.
Ask = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class AggregationHook(ABC):
    name: str
    reveals_individual_updates: bool  # False for hooks whose driver only sees a sum

    def setup(self, round: int, hospitals: Sequence[str]) -> Mapping[str, Any]:
        return {h: None for h in hospitals}

    @abstractmethod
    def encode(self, update: Update, setup: Any) -> Update: ...

    @abstractmethod
    def combine(self, round: int, encoded: Sequence[Update]) -> Any: ...

    @abstractmethod
    def finish(self, round: int, combined: Any, dropped: Mapping[str, str], ask: Ask) -> Sequence[Update]: ...

    def respond(self, round: int, request: Any) -> Any:
        raise NotImplementedError(f"the {self.name} hook asks nothing of hospitals")


class PlaintextHook(AggregationHook):
    """Updates travel as they are; the driver sees each one."""

    name = "plaintext"
    reveals_individual_updates = True

    def encode(self, update: Update, setup: Any) -> Update:
        return update

    def combine(self, round: int, encoded: Sequence[Update]) -> Sequence[Update]:
        return list(encoded)

    def finish(self, round: int, combined: Sequence[Update], dropped: Mapping[str, str], ask: Ask) -> Sequence[Update]:
        return combined


HOOKS: dict[str, type[AggregationHook]] = {PlaintextHook.name: PlaintextHook}


def build_hook(name: str) -> AggregationHook:
    return HOOKS[name]()
