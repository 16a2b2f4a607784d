"""What a hospital's answer must be to enter the aggregate.

Every answer is checked before a privacy hook or a strategy sees it: an update in the form the
run's hook (or compression) expects, from the hospital that was asked, for this round, in the
layout of that hospital's model, with the example count it joined with and finite values. Its
aggregation weight is not taken from it: the driver derives it from that count. One that fails
is dropped and its hospital counts as failed in the round, with the reason in the run log and
the round's record: a buggy or hostile hospital costs its own update, never the aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedward.config import FedwardConfig
from fedward.types import CompressedUpdate, Layout, SealedUpdate, Update
from fedward.models.flat import layout_of
from fedward.models.networks import build_model
from fedward import compression
from fedward.strategies.base import Strategy


def model_layouts(config: FedwardConfig, shape: tuple[int, ...], layout: Layout, output_size: int, personal: frozenset[str]) -> dict[str, Layout]:
    """The shared layout each hospital's model holds: the global one, or its narrower model's."""
    return {h.name: layout if h.model.get("width", 1.0) == 1 else layout_of(build_model(config.model_for(h.name), shape, output_size), personal)
            for h in config.hospitals}


def expected_layouts(config: FedwardConfig, strategy: Strategy, shape: tuple[int, ...], layout: Layout, output_size: int, personal: frozenset[str]) -> dict[str, Layout]:
    """The layout each hospital's update must have: its model's, plus what the strategy appends."""
    return {h: strategy.update_layout(sub) for h, sub in model_layouts(config, shape, layout, output_size, personal).items()}


def admitted(round: int, hospital: str, answer: Any, layout: Layout, form: str, examples: int) -> Update | SealedUpdate:
    """`answer` as it enters round `round`'s aggregate as `hospital`'s update (a compressed change
    restored); raises `Refused` saying why it cannot. `form` is how updates travel ("plain",
    "compressed", "masked", "encrypted"); `examples` the hospital's training examples as it
    reported them when it joined."""
    try:
        return _admitted(round, hospital, answer, layout, form, examples)
    except Refused:
        raise
    except Exception as e:  # whatever a hostile answer holds, checking it must not stop the round
        raise Refused(f"rejected: its update cannot be checked ({type(e).__name__})") from None


class Refused(Exception):
    pass


WIRE_TYPES = {"plain": Update, "compressed": CompressedUpdate, "masked": SealedUpdate, "encrypted": SealedUpdate}


def _admitted(round: int, hospital: str, answer: Any, layout: Layout, form: str, examples: int) -> Update | SealedUpdate:
    expected = WIRE_TYPES[form]
    if type(answer) is not expected or (expected is SealedUpdate and answer.form != form):
        raise Refused(f"rejected: sent a {type(answer).__name__}, not a {form} update")
    if answer.hospital != hospital:
        raise Refused(f"rejected: its update is labelled as from {str(answer.hospital)[:40]!r}")
    if answer.round != round:
        raise Refused(f"rejected: its update is for round {answer.round}, not {round} (late or replayed)")
    if answer.layout != layout:
        raise Refused(f"rejected: its update's layout ({answer.layout.size} values in {len(answer.layout.names)} entries) is not its model's ({layout.size} in {len(layout.names)})")
    if answer.num_examples != examples:
        raise Refused(f"rejected: its update claims {answer.num_examples!r} training examples, not the {examples} it joined with")
    if not isinstance(answer.metrics, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in answer.metrics.values()):
        raise Refused("rejected: its training metrics are not finite numbers")
    if expected is SealedUpdate:
        return answer  # the hook checks its own payload
    if expected is CompressedUpdate:
        try:
            answer = compression.restore(answer, layout.size)
        except ValueError as e:
            raise Refused(f"rejected: {e}") from None
    delta = answer.delta
    if not isinstance(delta, np.ndarray) or delta.dtype != np.float32 or delta.shape != (layout.size,):
        raise Refused(f"rejected: its change is not {layout.size} float32 values")
    # One BLAS pass at memory speed for every change; the exact count only for the rare one that
    # fails it (a huge finite value's square overflows too).
    with np.errstate(over="ignore", invalid="ignore"):
        squares = float(np.dot(delta, delta))
    if not math.isfinite(squares) and (bad := int((~np.isfinite(delta)).sum())):
        raise Refused(f"rejected: its change holds {bad} NaN or infinite values")
    return answer


def admit(round: int, answers: Mapping[str, Any], layouts: Mapping[str, Layout], form: str, examples: Mapping[str, int]) -> tuple[dict[str, Any], dict[str, str]]:
    """The answers that may enter the aggregate, and the reason for each one that may not."""
    taken, refused = {}, {}
    for hospital, answer in answers.items():
        try:
            if hospital not in layouts:
                raise Refused("rejected: not a hospital of this run")
            taken[hospital] = admitted(round, hospital, answer, layouts[hospital], form, examples[hospital])
        except Refused as e:
            refused[hospital] = str(e)
    return taken, refused
