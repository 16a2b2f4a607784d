"""A federation in one process for testing hooks: a driver hook and one hook per hospital,
talking directly instead of through Ray, with everything hospitals send the driver recorded."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fedward.config import FedwardConfig, parse_config
from fedward.types import Layout, Update
from fedward.privacy.hooks import AggregationHook, Trust, build_hook


def config_with(privacy: dict, hospitals: int, min_hospitals: int = 2) -> FedwardConfig:
    """A minimal valid config with `hospitals` hospitals and the given privacy section."""
    return parse_config(
        {
            "run": {"name": "hooks", "rounds": 3, "min_hospitals": min_hospitals},
            "data": {"kind": "table", "table": {"file": "ehr.csv", "patient_id": "patient", "features": {"age": "numeric"}, "label": {"column": "y"}}},
            "model": {"kind": "mlp", "hidden": [4]},
            "hospitals": [{"name": f"h{i}", "data": f"/nonexistent/h{i}"} for i in range(hospitals)],
            "privacy": privacy,
        }
    )


def random_updates(config: FedwardConfig, round: int, size: int, seed: int = 0, scale: float = 0.1) -> dict[str, Update]:
    """One update per hospital of the config, in a two-tensor layout of `size` values."""
    rng = np.random.default_rng(seed)
    layout = Layout(("body.weight", "head.weight"), ((size - size // 4,), (size // 4,)))
    return {
        h.name: Update(
            round=round,
            hospital=h.name,
            delta=(rng.standard_normal(size) * scale).astype(np.float32),
            layout=layout,
            num_examples=int(n),
            weight=float(n),
            metrics={"train_loss": 0.5},
        )
        for h, n in zip(config.hospitals, rng.integers(20, 200, len(config.hospitals)))
    }


class Federation:
    def __init__(self, config: FedwardConfig, run_id: str = "test-run", trust: Mapping[str, Trust] | None = None):
        self.config = config
        self.driver = build_hook(config, None, run_id)
        trust = trust or {}
        self.hospitals: dict[str, AggregationHook] = {h.name: build_hook(config, h.name, run_id, trust.get(h.name)) for h in config.hospitals}
        self.received: list[tuple[str, Any]] = []  # (hospital, message) for everything sent to the driver
        self.silent: set[str] = set()  # hospitals that stopped answering
        self.current_round = 0

    def ask(self, requests: Mapping[str, Any]) -> dict[str, Any]:
        answers = {}
        for name, request in requests.items():
            if name in self.silent:
                continue
            answer = self.hospitals[name].respond(self.current_round, request)
            self.received.append((name, answer))
            answers[name] = answer
        return answers

    def start(self) -> None:
        self.current_round = 0
        self.driver.start(sorted(self.hospitals), self.ask)

    def round(self, round: int, updates: Mapping[str, Update], drop_after_setup: Collection[str] = (), start: str | None = None) -> Sequence[Update]:
        """One aggregation: set-up, encode at each hospital, combine and finish at the driver.
        Hospitals in `drop_after_setup` take part in set-up, then go silent before sending.
        Each hospital's own weight is its update's; `start` names the weights the updates were
        trained from (by default, one set per round number)."""
        self.current_round = round
        for name, update in updates.items():
            hook = self.hospitals[name]
            hook.trust = dataclasses.replace(hook.trust, weight=update.weight)
        setups = self.driver.setup(round, {h: u.weight for h, u in updates.items()}, self.ask)
        self.silent |= set(drop_after_setup)
        sent = []
        for name in sorted(setups):
            if name in self.silent:
                continue
            encoded = self.hospitals[name].encode(updates[name], setups[name], start or f"weights before round {round}")
            self.received.append((name, encoded))
            sent.append(encoded)
        dropped = {h: "went silent" for h in setups if h in self.silent}
        return self.driver.finish(round, self.driver.combine(round, sent), dropped, self.ask)


def weighted_mean(updates: Sequence[Update]) -> np.ndarray:
    """The plaintext aggregate a summing hook must reproduce."""
    total = sum(u.weight for u in updates)
    return sum((u.weight / total) * u.delta.astype(np.float64) for u in updates)


def leaves(message: Any) -> Iterator[bytes | np.ndarray]:
    """Every byte string and array inside a message."""
    if isinstance(message, (bytes, np.ndarray)):
        yield message
    elif dataclasses.is_dataclass(message):
        for f in dataclasses.fields(message):
            yield from leaves(getattr(message, f.name))
    elif isinstance(message, dict):
        for value in message.values():
            yield from leaves(value)
    elif isinstance(message, (list, tuple)):
        for value in message:
            yield from leaves(value)
