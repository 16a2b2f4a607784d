"""The driver's calls to hospitals: each answer as it arrives, and a reason for each that does not.

A hospital that fails or stays silent costs its own answer, never the call: the caller decides
whether enough answered (a round's quorum).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ray

from fedward.config import FedwardConfig
from fedward.errors import HospitalError, QuorumError, released_reason
from fedward import pooling
from fedward.types import Evaluation, Failure


def gather(futures: Mapping[str, ray.ObjectRef], timeout: float, late: dict[str, ray.ObjectRef] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Results of the hospitals that answered in time, and a reason for each that did not. With
    `late`, an answer not in time is left to arrive and put there; otherwise it is cancelled."""
    failures: dict[str, str] = {}
    return dict(arrivals(futures, timeout, failures, late)), failures


def arrivals(futures: Mapping[str, ray.ObjectRef], timeout: float, failures: dict[str, str], late: dict[str, ray.ObjectRef] | None = None) -> Iterator[tuple[str, Any]]:
    """(hospital, result) in the order they arrive within `timeout`; a reason for each that does
    not goes into `failures`, as for `gather`. A result is fetched only when it is taken."""
    deadline = time.monotonic() + timeout
    waiting = {ref: name for name, ref in futures.items()}
    try:
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)  # and whatever else is in
            for ref in ready:
                name = waiting.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    failures[name] = released_reason(e.cause)
                    continue
                except ray.exceptions.RayError as e:
                    failures[name] = f"{type(e).__name__}: the hospital's actor is gone"
                    continue
                if isinstance(result, Failure):  # a hospital in the driver's process (run.hosting: in_process)
                    failures[name] = result.reason
                    continue
                yield name, result
    finally:  # also when the taker stops early: what is still out is cancelled or left to arrive late
        for ref, name in waiting.items():
            failures[name] = f"no answer within {timeout:.0f} s" + ("; it counts, weighed down, when it arrives" if late is not None else "")
            if late is None:
                ray.cancel(ref)
            else:
                late[name] = ref


def require_quorum(config: FedwardConfig, round: int, answered: Mapping[str, Any], failures: Mapping[str, str]) -> None:
    """Stop a stage (round 0) or a round that fewer hospitals than run.min_hospitals answered, saying why each did not."""
    if len(answered) < config.run.min_hospitals:
        raise QuorumError(round, config.run.min_hospitals, failures)


def opener(hospitals: Mapping[str, Any], method: str, timeout: float) -> Callable[[str, pooling.PaddedSum], dict]:
    """A padded sum opened at a named hospital by its actor's `method`; its failure raised."""

    def open_at(name: str, summed: pooling.PaddedSum) -> dict:
        answers, failures = gather({name: getattr(hospitals[name], method).remote(summed)}, timeout)
        if name in failures:
            raise HospitalError(failures[name])
        return answers[name]

    return open_at


def pooled_figures(hospitals: Mapping[str, Any], evaluations: Mapping[str, Evaluation], timeout: float) -> dict[str, Any]:
    """The pooled figures of these evaluations: their padded statistics added up here and opened at
    a hospital that contributed (fedward/pooling.py)."""
    return pooling.pooled([e.padded for e in evaluations.values()], opener(hospitals, "open_pooled", timeout))


def deal_evaluation_key(hospitals: Mapping[str, Any], names: Sequence[str], timeout: float) -> dict[str, str]:
    """The hospitals' evaluation key for this driver session, set up through their actors; each
    hospital left without it, and why."""

    def call(method: str, arguments: Mapping[str, tuple]) -> tuple[dict[str, Any], dict[str, str]]:
        return gather({h: getattr(hospitals[h], method).remote(*a) for h, a in arguments.items()}, timeout)

    return pooling.deal(names, call)
