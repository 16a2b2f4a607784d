"""Privacy accounting: every epsilon fedward reports comes from dp-accounting's PLD accountant.

Both DP-SGD (patients inside a hospital) and DP-FedAvg (hospitals in the federation) are runs of
Poisson-subsampled Gaussian mechanism steps, so one record type, `GaussianSteps`, describes
what either spent, and one function turns a history of them into (epsilon, delta).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING

from fedward.errors import ConfigError

if TYPE_CHECKING:
    import dp_accounting
    from dp_accounting import mechanism_calibration

# 1e-3 keeps an epsilon of hundreds of steps near 0.1 s, within 1e-4 (relative) of the 1e-4
# default; the PLD is a pessimistic estimate at either interval, so epsilon is never understated.
VALUE_DISCRETIZATION_INTERVAL = 1e-3
ACCOUNTANT = (
    f"dp-accounting {version('dp-accounting')} PLDAccountant (add-or-remove-one neighbours, "
    f"value_discretization_interval={VALUE_DISCRETIZATION_INTERVAL}) over Poisson-subsampled Gaussian steps"
)

# Calibration searches noise multipliers in this range: below it the PLD of one step is huge and
# slow to build, and no sensible budget needs less noise; above it training learns nothing.
NOISE_RANGE = (0.125, 2.0**20)


@dataclass(frozen=True)
class GaussianSteps:
    """`steps` Gaussian mechanism steps, each on a Poisson sample of rate `sample_rate`
    (1.0: everyone, e.g. hospital-level DP-FedAvg, one step per round)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self):
        if not (self.noise_multiplier > 0 and 0 < self.sample_rate <= 1 and self.steps >= 0):
            raise ConfigError(
                f"Gaussian steps need noise_multiplier > 0, sample_rate in (0, 1] and steps >= 0; got {self}"
            )

    def event(self) -> dp_accounting.DpEvent:
        import dp_accounting  # with its scipy.stats, 70 MB: loaded where epsilons are computed, not in every hospital

        step = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sample_rate < 1:
            step = dp_accounting.PoissonSampledDpEvent(self.sample_rate, step)
        return dp_accounting.SelfComposedDpEvent(step, self.steps)


def epsilon(history: Sequence[GaussianSteps], delta: float) -> float:
    """The epsilon at `delta` of all of `history` composed (0.0 when nothing was spent)."""
    # Composition commutes, so runs of the same mechanism merge into one self-composition:
    # the PLD is then built once per mechanism, however many rounds the history spans.
    counts: Counter[tuple[float, float]] = Counter()
    for run in history:
        counts[run.noise_multiplier, run.sample_rate] += run.steps
    merged = tuple(GaussianSteps(sigma, q, n) for (sigma, q), n in sorted(counts.items()) if n > 0)
    return _epsilon(merged, delta) if merged else 0.0


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple[GaussianSteps, ...], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL)
    accountant.compose(dp_accounting.ComposedDpEvent([run.event() for run in history]))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose `steps` steps at `sample_rate` spend at most `epsilon`."""
    what = f"epsilon={epsilon} at delta={delta} over {steps} steps at sample rate {sample_rate:.4g}"
    if steps < 1:
        raise ConfigError(f"cannot calibrate noise for {what}: there is no step to add noise to")
    from dp_accounting import mechanism_calibration
    from dp_accounting.pld import PLDAccountant

    bracket = _bracket(lambda sigma: _spent(sigma, sample_rate, steps, delta) - epsilon, what)
    try:
        return mechanism_calibration.calibrate_dp_mechanism(
            lambda: PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL),
            lambda sigma: GaussianSteps(sigma, sample_rate, steps).event(),
            epsilon,
            delta,
            bracket_interval=bracket,
            tol=1e-4,
        )
    except ValueError as e:  # brentq found no sign change inside the bracket
        raise ConfigError(f"cannot calibrate noise for {what}: {e}") from None


# Calibration's `epsilon` parameter hides the function of that name.
def _spent(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    return epsilon([GaussianSteps(sigma, sample_rate, steps)], delta)


def _bracket(gap: Callable[[float], float], what: str) -> mechanism_calibration.ExplicitBracketInterval:
    # dp-accounting's own search starts at its lower endpoint, where the PLD is slowest to build;
    # this one starts at 1 and doubles or halves, so typical budgets never touch tiny noise.
    low, high = 0.5, 1.0
    while NOISE_RANGE[0] <= low and high <= NOISE_RANGE[1]:
        if gap(high) > 0:
            low, high = high, 2 * high
        elif gap(low) <= 0:
            low, high = low / 2, low
        else:
            from dp_accounting import mechanism_calibration

            return mechanism_calibration.ExplicitBracketInterval(low, high)
    raise ConfigError(
        f"{what} needs a noise multiplier outside {NOISE_RANGE[0]}..{NOISE_RANGE[1]:.0f}; choose a budget "
        "in a sensible range (epsilon about 0.1 to 50) or give noise_multiplier directly"
    )
