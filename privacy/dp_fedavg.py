"""Hospital-level differential privacy: DP-FedAvg (McMahan et al. 2018).

Each hospital's change is clipped to L2 norm `clip_norm` and counts once in the mean, so adding or
removing one hospital moves the sum by at most `clip_norm`; Gaussian noise of standard deviation
`noise_multiplier * clip_norm` on the sum then makes every round a Gaussian mechanism over
hospitals. Where the driver sees each update (plaintext) it adds the noise itself. Behind masking
or encryption it must never see an un-noised sum, so each hospital adds a share of the noise,
sized so that the fewest hospitals that can complete a round, less the one whose privacy is at
stake and less the colluders the hospital's own policy assumes (`colluders`), still sum to the
full noise. The ledger reports ε as a function of how many actually collude.

Noise comes from the operating system's entropy, never from the run seed the driver knows: a DP
run is not bit-for-bit reproducible, and its ledger says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from fedward.config import FedwardConfig
from fedward.errors import ConfigError
from fedward.declarations import ACCOUNTED, EVERY_LAYER_SUMMED, MEAN, SAME_ROUND, WHOLE_SHAPE, Declaration
from fedward.types import Update
from fedward.privacy.accounting import GaussianSteps, calibrate_noise_multiplier, epsilon
from fedward.privacy.hooks import AGGREGATE


DECLARATION = Declaration(
    "privacy.dp_fedavg",
    needs={
        ACCOUNTED: "bounds only what the global model's changes reveal",
        MEAN: "calibrates its noise to the sensitivity of the mean of clipped changes",
        WHOLE_SHAPE: "clips and noises changes of the global model's shape",
        SAME_ROUND: "accounts each round's changes to that round",
        EVERY_LAYER_SUMMED: "splits its noise into shares that cover a layer only inside the protected sum",
    },
)


def aggregation_weight(config: FedwardConfig, num_examples: int) -> float:
    """A hospital's weight in the mean: its example count, or 1 when its influence must be bounded."""
    return 1.0 if config.privacy.dp_fedavg.enabled else float(num_examples)


def noise_multiplier(config: FedwardConfig) -> float:
    dp = config.privacy.dp_fedavg
    return dp.noise_multiplier if dp.noise_multiplier is not None else _calibrated(dp.epsilon, dp.delta, config.run.rounds)


@lru_cache(maxsize=16)
def _calibrated(epsilon: float, delta: float, rounds: int) -> float:
    return calibrate_noise_multiplier(epsilon, delta, sample_rate=1.0, steps=rounds)


def round_steps(config: FedwardConfig) -> GaussianSteps:
    """One round as the accountant sees it, for a hospital taking part. Hospitals are chosen by
    the driver, not by Poisson sampling, so no amplification by sampling is claimed."""
    return GaussianSteps(noise_multiplier=noise_multiplier(config), sample_rate=1.0, steps=1)


def _gaussian(size: int, std: float) -> np.ndarray:
    return np.random.default_rng().normal(0.0, std, size)  # seeded from OS entropy


def noise_shares(config: FedwardConfig, fewest: int, colluders: int = 0, *, quorum: int | None = None) -> int:
    """Into how many shares each hospital's noise is cut, when at least `fewest` hospitals (and
    never fewer than `quorum`, by default the run's min_hospitals) complete a round. Removing a
    hospital from a round also removes its share, and each of `colluders` hospitals that tell the
    driver their own shares takes its share out too: the others must still carry the full variance.
    A hospital passes its own `quorum`: the run's min_hospitals is the driver's word."""
    least = max(config.run.min_hospitals if quorum is None else quorum, fewest)
    honest = least - 1 - colluders
    if colluders and honest < 1:
        raise ConfigError(
            f"privacy.dp_fedavg: with as few as {least} hospitals in a round, {colluders} colluding "
            f"with the driver leave no other hospital's noise to hide one update; ask for more hospitals per round "
            f"(run.min_hospitals, privacy.masking.dropout_tolerance) or assume fewer colluders"
        )
    return max(1, honest)


def epsilon_by_colluders(config: FedwardConfig, fewest: int, assumed: int, rounds: int) -> dict[int, float]:
    """ε after `rounds` rounds of distributed noise sized for `assumed` colluders, as a function of
    how many hospitals of a round of `fewest` actually collude with the driver: colluders take
    their own shares out of the sum, and the hospital whose update is at stake has none to hide it.
    With every other hospital colluding nothing hides it (inf)."""
    shares = noise_shares(config, fewest, assumed)
    others = max(config.run.min_hospitals, fewest) - 1
    out = {}
    for colluders in range(others + 1):
        honest = max(1, others) - colluders
        if honest < 1:
            out[colluders] = float("inf")
            continue
        steps = GaussianSteps(noise_multiplier=noise_multiplier(config) * np.sqrt(honest / shares), sample_rate=1.0, steps=rounds)
        out[colluders] = epsilon([steps], config.privacy.dp_fedavg.delta)
    return out


def add_noise_share(update: Update, config: FedwardConfig, shares: int) -> Update:
    """This hospital's part of the noise: any `shares` such parts sum to the full variance."""
    std = noise_multiplier(config) * config.privacy.dp_fedavg.clip_norm / np.sqrt(shares)
    return dataclasses.replace(update, delta=(update.delta + _gaussian(update.delta.size, std)).astype(np.float32))


def noised_mean(updates: Sequence[Update], config: FedwardConfig) -> Update:
    """The driver's noised mean of clipped, unweighted updates (plaintext transport)."""
    total = sum(u.delta.astype(np.float64) for u in updates)
    std = noise_multiplier(config) * config.privacy.dp_fedavg.clip_norm
    noised = (total + _gaussian(total.size, std)) / len(updates)
    return Update(
        round=updates[0].round,
        hospital=AGGREGATE,
        delta=noised.astype(np.float32),
        layout=updates[0].layout,
        num_examples=sum(u.num_examples for u in updates),
        weight=float(len(updates)),
    )
