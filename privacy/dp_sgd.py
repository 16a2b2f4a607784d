"""Patient-level DP-SGD inside a hospital, with Opacus.

The privacy unit is a patient: each step Poisson-samples patients (not rows), and a patient's
rows contribute one summed gradient that is clipped as a whole, so the guarantee covers
everything a patient brought, however many images or visits. With unit "sample" every row is
its own unit and the guarantee is per row only.

Sampling and noise draw from OS entropy, never from the run's seed: whoever knows the seed
(the driver, anyone reading the config) could otherwise subtract the noise.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedward.config import FedwardConfig, TrainConfig
from fedward.declarations import ACCOUNTED, DRIVER_TRAINS_FREELY, PLAIN_EPOCHS, SAME_ROUND, SAMPLES_APART, Declaration
from fedward.errors import ConfigError
from fedward.tasks import Task, binary_task
from fedward.models.device import device_of
from fedward.models.training import make_optimizer
from fedward.privacy.accounting import GaussianSteps, calibrate_noise_multiplier

# opacus loads where private training happens: every hospital process imports this module, and
# opacus costs each of them about a second and its memory even when no one trains privately.
if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer


DECLARATION = Declaration(
    "privacy.dp_sgd",
    needs={
        ACCOUNTED: "bounds only what the models trained by its accounted steps reveal",
        PLAIN_EPOCHS: "accounts for clipped, noised steps of plain local epochs",
        SAMPLES_APART: "clips each patient's gradient apart from the others'",
        SAME_ROUND: "charges each round's training to that round",
    },
    breaks={DRIVER_TRAINS_FREELY: "would train every model under DP-SGD, charged to a budget"},
)


def check_model(model: nn.Module) -> None:
    """Refuse a model whose per-sample gradients Opacus cannot compute or clip."""
    from opacus.validators import ModuleValidator

    # Opacus explains each problem at length; its first sentence names it.
    problems = sorted({str(p).split(". ")[0] for p in ModuleValidator.validate(model, strict=False)})
    if problems:
        raise ConfigError(
            f"privacy.dp_sgd: the model cannot be clipped per sample: {'; '.join(problems)}. "
            "Set model.norm to 'group' or 'none'"
        )


def plan_round(config: FedwardConfig, units: int) -> GaussianSteps:
    """The mechanism one hospital with `units` patients (or samples) runs in one round.

    Deterministic, so the driver predicts a hospital's spending from the same numbers the hospital
    trains with.
    """
    dp, train = config.privacy.dp_sgd, config.train
    if units < 1:
        raise ConfigError(f"privacy.dp_sgd: a hospital needs at least one {dp.unit} to train, got {units}")
    sample_rate = min(1.0, train.batch_size / units)
    steps = train.local_epochs * math.ceil(units / train.batch_size)
    noise = dp.noise_multiplier
    if noise is None:
        try:
            noise = calibrate_noise_multiplier(dp.epsilon, dp.delta, sample_rate, steps * config.run.rounds)
        except ConfigError as e:
            raise ConfigError(f"privacy.dp_sgd ({units} {dp.unit}s, {config.run.rounds} rounds): {e}") from None
    return GaussianSteps(noise, sample_rate, steps)


@dataclass(frozen=True)
class PrivateTraining:
    """What one round of DP-SGD did, as counted by the optimizer."""

    loss: float  # mean over steps of the batch's mean loss; nan if every batch was empty
    steps: int
    sample_rate: float
    noise_multiplier: float
    units: int
    expected_batch_units: float

    @property
    def spent(self) -> GaussianSteps:
        return GaussianSteps(self.noise_multiplier, self.sample_rate, self.steps)


def train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    units: np.ndarray,
    plan: GaussianSteps,
    *,
    lr: float,
    config: TrainConfig,
    max_grad_norm: float,
    task: Task | None = None,
) -> PrivateTraining:
    """`plan.steps` DP-SGD steps on the task's loss; `units[i]` names the unit (patient) row i belongs to."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    task = task or binary_task()
    if not (len(x) == len(y) == len(units) > 0):
        raise ConfigError(f"privacy.dp_sgd: expected as many inputs ({len(x)}), labels ({len(y)}) and unit ids ({len(units)}), at least one")
    model.train()
    check_model(model)
    rows_of = _rows_per_unit(units)
    generator = torch.Generator().manual_seed(secrets.randbits(64))  # Poisson sampling, on the CPU where the data is
    sampled = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    optimizer = DPOptimizer(
        make_optimizer(model, lr, config),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=plan.sample_rate * len(rows_of),
        # The noise is drawn where the gradients are: a CUDA model needs a CUDA generator.
        generator=torch.Generator(device=device_of(model)).manual_seed(secrets.randbits(64)),
        secure_mode=True,  # noise robust to floating-point attacks on its low bits
    )
    taken = 0

    def count_step(_: DPOptimizer) -> None:
        nonlocal taken
        taken += 1

    optimizer.attach_step_hook(count_step)
    losses = []
    try:
        for _ in range(plan.steps):
            chosen = torch.nonzero(torch.rand(len(rows_of), generator=generator) < plan.sample_rate).squeeze(1)
            loss = _step(sampled, optimizer, task, x, y, [rows_of[u] for u in chosen.tolist()])
            if loss is not None:
                losses.append(loss)
    finally:
        optimizer.zero_grad(set_to_none=True)
        _unwrap(sampled)
    return PrivateTraining(
        loss=float(np.mean(losses)) if losses else float("nan"),
        steps=taken,
        sample_rate=plan.sample_rate,
        noise_multiplier=optimizer.noise_multiplier,
        units=len(rows_of),
        expected_batch_units=optimizer.expected_batch_size,
    )


def _step(sampled: GradSampleModule, optimizer: DPOptimizer, task: Task, x: torch.Tensor, y: torch.Tensor, units: list[torch.Tensor]) -> float | None:
    """One DP-SGD step on the rows of the sampled units; their mean loss, None if none was sampled."""
    optimizer.zero_grad(set_to_none=True)
    if not units:  # Poisson sampling may pick no one; the step still adds noise, as Opacus does
        for p in optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        optimizer.step()
        return None
    rows = torch.cat(units)
    device = optimizer.params[0].device  # the model's: the data may stay on the CPU
    # Summed, so each row's gradient arrives unscaled by the batch size.
    loss = task.loss(sampled(x[rows].to(device)), y[rows].to(device), reduction="sum")
    with warnings.catch_warnings():
        # The first layer's backward hook sees no input gradient, as the data needs none.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    owner = torch.repeat_interleave(torch.arange(len(units), device=device), torch.tensor([len(u) for u in units], device=device))
    for p in optimizer.params:  # one gradient per unit: DPOptimizer clips a patient as a whole
        p.grad_sample = p.grad_sample.new_zeros((len(units), *p.shape)).index_add_(0, owner, p.grad_sample)
    optimizer.step()
    return loss.item() / len(rows)


def _unwrap(sampled: GradSampleModule) -> None:
    """Leave the model as it came, a plain module: the caller flattens and explains it."""
    model = sampled.to_standard_module()  # removes hooks and per-parameter grad samples
    for p in model.parameters():
        if hasattr(p, "summed_grad"):  # DPOptimizer's; absent when training failed before a step
            del p.summed_grad
    for module in model.modules():  # the activations lists Opacus's hooks leave, emptied
        for name in ("activations", "max_batch_len"):
            if hasattr(module, name):
                delattr(module, name)


def _rows_per_unit(units: np.ndarray) -> list[torch.Tensor]:
    _, unit_of_row, counts = np.unique(units, return_inverse=True, return_counts=True)
    order = np.argsort(unit_of_row, kind="stable")
    return [torch.from_numpy(rows) for rows in np.split(order, np.cumsum(counts)[:-1])]
