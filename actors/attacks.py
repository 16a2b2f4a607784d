"""Simulated hostile or faulty hospitals, for testing defences (config `attack`); a test bench,
never a run meant for patients. The named hospitals:

- `label_flip`: train on flipped targets (as the task defines a flip), as a hospital with poisoned data would;
- `sign_flip`: send their change reversed;
- `scale`: send their change times `scale`, to replace the model with their own;
- `noise`: send Gaussian noise of standard deviation `sigma` instead of a change;
- `slow`: send their change `delay_s` seconds late, as a straggler does.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from fedward.config import AttackConfig
from fedward.tasks import Task
from fedward.types import Update


def training_targets(attack: AttackConfig, hospital: str, y: torch.Tensor, task: Task) -> torch.Tensor:
    """The targets a hospital trains on: flipped as its task defines a flip, for a label-flipping attacker."""
    return task.flipped(y) if attack.kind == "label_flip" and hospital in attack.hospitals else y


def tampered(attack: AttackConfig, update: Update, seed: int) -> Update:
    """The update as an attacking hospital sends it; `seed` makes its noise reproducible."""
    if update.hospital not in attack.hospitals or attack.kind == "label_flip":
        return update
    if attack.kind == "slow":
        time.sleep(attack.delay_s)
        return update
    if attack.kind == "sign_flip":
        delta = -update.delta
    elif attack.kind == "scale":
        delta = update.delta * attack.scale
    else:
        delta = np.random.default_rng(seed).normal(0.0, attack.sigma, update.delta.size)
    return dataclasses.replace(update, delta=delta.astype(np.float32))
