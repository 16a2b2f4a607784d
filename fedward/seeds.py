"""Seeds derived from the run's seed: pure functions, so a resumed run replays them exactly."""

from __future__ import annotations

import numpy as np


def derived_seed(run_seed: int, round: int, name: str) -> int:
    """The seed of one party's randomness in one round (training, sampling a background)."""
    entropy = [run_seed, round, *name.encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])
