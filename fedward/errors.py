"""One hierarchy for everything fedward refuses, so callers can catch by concern.

Messages say what was expected, what arrived and how to fix it. They may name hospitals,
files and fields, never patients' values.
"""


class FedwardError(Exception):
    """Base of every error fedward raises on purpose."""


class ConfigError(FedwardError, ValueError):
    """A configuration value is missing, of the wrong type or contradicts another."""


class DataError(FedwardError):
    """A hospital's data cannot be used as configured (missing folder, too few samples, ...)."""


class DeploymentError(FedwardError):
    """The cluster does not hold what the run needs where it needs it (a hospital's node or its data)."""


class HospitalError(FedwardError):
    """A hospital failed while doing its part of a round."""


class AggregationError(FedwardError):
    """Updates could not be combined into a global model."""


class QuorumError(FedwardError):
    """Fewer hospitals than `min_hospitals` took part; lists why each missing one failed."""

    def __init__(self, round_number: int, needed: int, failures: dict[str, str], ending: str = ""):
        self.round_number = round_number
        self.needed = needed
        self.failures = dict(failures)
        lines = "\n".join(f"  - {name}: {why}" for name, why in sorted(self.failures.items()))
        super().__init__(
            f"round {round_number}: quorum not met, needed {needed} hospitals; failures:\n{lines}" + (f"\n{ending}" if ending else "")
        )


class CheckpointError(FedwardError):
    """A run directory or checkpoint cannot be used (corrupt, other config, unwritable)."""


def released_reason(error: BaseException) -> str:
    """What the driver may learn of a hospital's failure.

    fedward's own errors are written to name files and fields, never patients' values; any other
    exception text (a library's message may quote a row) stays in the hospital's own log.
    """
    if isinstance(error, FedwardError):
        return f"{type(error).__name__}: {error}"
    return f"{type(error).__name__} (details in the hospital's log)"
