"""Local training and evaluation of one model on one set of tensors.

Shared by the hospital (a round of local training) and the demo's baselines (central and
local-only training on the same budget), so the comparison trains exactly the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedward.config import TrainConfig
from fedward.declarations import PLAIN_SGD, Declaration
from fedward.errors import HospitalError
from fedward.models import device as devices
from fedward.tasks import Task, binary_task
from fedward.tasks.base import batch_outputs


def optimizer_declaration(config: TrainConfig) -> Declaration | None:
    """An optimizer whose steps are not plain SGD's."""
    if config.optimizer != "sgd":
        return Declaration(f"train.optimizer: {config.optimizer}", breaks={PLAIN_SGD: "adapts each step to the gradients seen before"})
    if config.momentum:
        return Declaration(f"train.momentum: {config.momentum:g}", breaks={PLAIN_SGD: "adds the previous steps' momentum to each step"})
    return None


def precision_declaration(config: TrainConfig) -> Declaration | None:
    """float16's loss scaling, whose skipped steps are not plain SGD's."""
    if config.precision == "fp16":
        return Declaration("train.precision: fp16", breaks={PLAIN_SGD: "skips any step whose loss-scaled gradients overflow"})
    return None


def make_optimizer(model: nn.Module, lr: float, config: TrainConfig, only: frozenset[str] | None = None) -> torch.optim.Optimizer:
    """A fresh optimizer each round, shared by private and non-private training so they compare;
    `only` names the parameters it may change (all when None)."""
    params = [p for n, p in model.named_parameters() if only is None or n in only]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def local_steps(n: int, epochs: int, batch_size: int) -> int:
    """The optimizer steps `train` takes on `n` samples: batches of one are skipped."""
    return epochs * sum(1 for start in range(0, n, batch_size) if min(batch_size, n - start) >= 2)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    config: TrainConfig,
    proximal_mu: float = 0.0,
    anchor: Sequence[torch.Tensor] | None = None,
    correction: Mapping[str, torch.Tensor] | None = None,
    only: frozenset[str] | None = None,
    task: Task | None = None,
) -> float:
    """Minibatch training with a fresh optimizer; returns the mean training loss (without the
    proximal term).

    All randomness (shuffling, dropout) comes from `seed`, so the same call gives the same weights.
    With `proximal_mu` > 0 the loss adds mu/2 * ||w - anchor||^2: anchored at the start (FedProx,
    Li et al. 2020) it keeps a hospital's weights near the global ones it started from; anchored at
    the global weights (Ditto) it keeps a personal model near the global one. `correction` (SCAFFOLD) is
    added to each named parameter's gradient before every step. `only` trains just the named
    parameters (FedRep alternates between the head and the body); the others stay as they are.
    The loss is the task's (binary cross-entropy when None); a non-finite loss stops training.
    The model trains on its own device, in `config.precision`; `x` and `y` may stay on the CPU.
    """
    task = task or binary_task()
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, lr, config, only)
    device = devices.device_of(model)
    scaler = devices.grad_scaler(device, config.precision)
    if proximal_mu > 0 and anchor is None:
        anchor = [p.detach().clone() for p in model.parameters()]
    anchor = list(anchor) if proximal_mu > 0 else []
    correction = {name: c.to(device) for name, c in (correction or {}).items()}  # moved once, added every step
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        epoch = []  # kept on the device, read once an epoch: reading each step would wait for the GPU every step
        perm = torch.randperm(len(y), generator=order)
        for start in range(0, len(y), config.batch_size):
            batch = perm[start : start + config.batch_size]
            if len(batch) < 2:  # BatchNorm cannot normalise a batch of one
                continue
            opt.zero_grad()
            with devices.autocast(device, config.precision):
                loss = task.loss(model(x[batch].to(device)), y[batch].to(device))
            objective = loss
            if anchor:
                objective = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            scaler.scale(objective).backward()
            if correction:
                scaler.unscale_(opt)  # the correction is in the gradients' own units
                for name, p in model.named_parameters():
                    if name in correction:
                        p.grad.add_(correction[name])
            scaler.step(opt)
            scaler.update()
            epoch.append(loss.detach())
        done = len(losses)
        losses += torch.stack(epoch).tolist() if epoch else []
        if bad := [i for i in range(done, len(losses)) if not np.isfinite(losses[i])]:
            raise HospitalError(f"training: the model's loss is {losses[bad[0]]} at step {bad[0] + 1}; check the model's outputs, train.lr and the inputs")
    return float(np.mean(losses)) if losses else float("nan")


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs for `x`, checked: a model that gives NaN or infinity is refused here,
    where it shows, not as a meaningless figure later."""
    out = batch_outputs(model, x)
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).any(dim=1).sum()) if out.dim() > 1 else int((~torch.isfinite(out)).sum())
        raise HospitalError(f"the model gives non-finite outputs (NaN or infinity) for {bad} of {len(x)} samples")
    return out
