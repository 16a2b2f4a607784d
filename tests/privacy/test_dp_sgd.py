"""Patient-level DP-SGD: what Opacus's optimizer actually does matches what is reported and accounted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedward.config import ModelConfig, TrainConfig
from fedward.errors import ConfigError
from fedward.models.flat import flatten
from fedward.models.networks import mlp
from fedward.privacy.accounting import GaussianSteps, epsilon
from fedward.privacy.dp_sgd import plan_round, train_private
from tests.privacy.federation import config_with

FEATURES = 5
PLAIN_SGD = TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0)


def patients(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """1-3 visits per patient around the patient's own profile; the outcome follows feature 0."""
    rng = np.random.default_rng(seed)
    profile = rng.standard_normal((n, FEATURES))
    unit = np.repeat(np.arange(n), rng.integers(1, 4, n))
    x = profile[unit] + 0.3 * rng.standard_normal((len(unit), FEATURES))
    y = (profile[unit, 0] > 0).astype(np.float32)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y), unit


def model() -> nn.Module:
    return mlp(ModelConfig(kind="mlp", hidden=(8,), norm="none"), FEATURES, 1)


class OptimizerSpy:
    """Watches the optimizer Opacus wraps, just before each of its steps: how many units were
    sampled, and the noise DPOptimizer added (its noisy mean times the expected batch, minus
    the clipped sum)."""

    def __init__(self, expected_batch: float):
        self.expected_batch = expected_batch
        self.sampled: list[int] = []
        self.noise: list[torch.Tensor] = []

    def __enter__(self):
        self.handle = register_optimizer_step_pre_hook(self.see)
        return self

    def __exit__(self, *_):
        self.handle.remove()

    def see(self, optimizer, args, kwargs):
        params = optimizer.param_groups[0]["params"]
        self.sampled.append(params[0].grad_sample.shape[0])
        self.noise.append(torch.cat([(p.grad * self.expected_batch - p.summed_grad).reshape(-1) for p in params]))


def test_steps_sampling_and_noise_are_what_the_optimizer_did():
    x, y, unit = patients(60, seed=0)
    plan = GaussianSteps(noise_multiplier=0.7, sample_rate=0.25, steps=150)
    with OptimizerSpy(expected_batch=0.25 * 60) as spy:
        done = train_private(model(), x, y, unit, plan, lr=0.05, config=PLAIN_SGD, max_grad_norm=0.5)
    assert done.steps == len(spy.sampled) == 150
    assert (done.units, done.sample_rate, done.noise_multiplier) == (60, 0.25, 0.7)
    assert done.expected_batch_units == pytest.approx(15.0)
    assert done.spent == plan
    # Patients, not rows, are sampled: 15 of 60 per step on average (the rows number about 120).
    assert np.mean(spy.sampled) == pytest.approx(15.0, abs=1.2)  # 4 standard errors
    noise = torch.cat(spy.noise)  # 150 steps x 57 weights
    assert noise.std().item() == pytest.approx(0.7 * 0.5, rel=0.05)
    assert abs(noise.mean().item()) < 0.02
    assert np.isfinite(done.loss)


def clipped_sum_norm(unit: np.ndarray, max_grad_norm: float) -> float:
    """One patient's three identical, badly predicted visits; one step with everyone sampled and
    negligible noise. Returns the norm of the clipped gradient sum the step applied."""
    torch.manual_seed(0)
    net = model()
    x = torch.full((3, FEATURES), 4.0)
    y = (net(x).squeeze(1) < 0).float()  # the label the model gets most wrong
    before, _ = flatten(net)
    done = train_private(net, x, y, unit, GaussianSteps(1e-6, 1.0, 1), lr=1.0, config=PLAIN_SGD, max_grad_norm=max_grad_norm)
    after, _ = flatten(net)
    return float(np.linalg.norm(after - before)) * done.expected_batch_units


def test_a_patient_is_clipped_as_one_unit_and_a_sample_as_one_row():
    # each visit alone has a gradient norm well above 0.1, so clipping binds
    assert clipped_sum_norm(np.zeros(3, int), max_grad_norm=0.1) == pytest.approx(0.1, rel=1e-3)
    assert clipped_sum_norm(np.arange(3), max_grad_norm=0.1) == pytest.approx(0.3, rel=1e-3)


def test_sample_units_are_rows():
    x, y, _ = patients(40, seed=1)
    done = train_private(model(), x, y, np.arange(len(y)), GaussianSteps(1.0, 0.1, 3), lr=0.05, config=PLAIN_SGD, max_grad_norm=1.0)
    assert done.units == len(y) and done.expected_batch_units == pytest.approx(0.1 * len(y))


def test_plan_calibrates_the_run_to_the_budget():
    config = config_with({"dp_sgd": {"enabled": True, "epsilon": 3.0, "delta": 1e-5}}, hospitals=2)
    config = dataclasses.replace(config, train=TrainConfig(batch_size=16, local_epochs=2))
    plan = plan_round(config, units=60)
    assert (plan.sample_rate, plan.steps) == (pytest.approx(16 / 60), 2 * 4)
    assert plan_round(config, units=60) == plan
    spent = epsilon([plan] * config.run.rounds, 1e-5)
    assert 0.99 * 3.0 <= spent <= 3.0
    assert plan_round(config, units=10).sample_rate == 1.0

    fixed = dataclasses.replace(config.privacy, dp_sgd=dataclasses.replace(config.privacy.dp_sgd, noise_multiplier=1.3))
    assert plan_round(dataclasses.replace(config, privacy=fixed), units=60).noise_multiplier == 1.3
    with pytest.raises(ConfigError, match="at least one"):
        plan_round(config, units=0)


def test_batchnorm_is_refused():
    net = mlp(ModelConfig(kind="mlp", hidden=(8,), norm="batch"), FEATURES, 1)
    x, y, unit = patients(20, seed=2)
    with pytest.raises(ConfigError, match="BatchNorm.*model.norm"):
        train_private(net, x, y, unit, GaussianSteps(1.0, 0.5, 2), lr=0.05, config=PLAIN_SGD, max_grad_norm=1.0)


def test_learns_an_easy_task_under_moderate_noise():
    x, y, unit = patients(300, seed=3)
    x_test, y_test, _ = patients(200, seed=4)
    net = model()
    plan = GaussianSteps(noise_multiplier=1.0, sample_rate=0.1, steps=100)
    train_private(net, x, y, unit, plan, lr=0.5, config=PLAIN_SGD, max_grad_norm=1.0)
    net.eval()
    with torch.no_grad():
        scores = net(x_test).squeeze(1).numpy()
    assert roc_auc_score(y_test.numpy(), scores) > 0.75


def test_noise_is_not_reproducible_from_the_run_seed_and_empty_batches_still_step():
    x, y, unit = patients(3, seed=5)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        net = model()
        done = train_private(net, x, y, unit, GaussianSteps(1.0, 0.01, 20), lr=0.05, config=PLAIN_SGD, max_grad_norm=1.0)
        assert done.steps == 20  # mostly nobody sampled, yet every step added noise
        weights.append(flatten(net)[0])
    assert not np.array_equal(weights[0], weights[1])


def test_the_model_is_a_plain_module_afterwards():
    x, y, unit = patients(30, seed=6)
    net = model()
    keys, layout = list(net.state_dict()), flatten(net)[1]
    train_private(net, x, y, unit, GaussianSteps(1.0, 0.3, 5), lr=0.05, config=TrainConfig(optimizer="adam"), max_grad_norm=1.0)
    assert list(net.state_dict()) == keys and flatten(net)[1] == layout
    for p in net.parameters():
        assert p.grad is None
        assert not any(hasattr(p, a) for a in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"))
    for module in net.modules():
        assert not (module._forward_hooks or module._backward_hooks or module._forward_pre_hooks)
        assert not any(hasattr(module, a) for a in ("activations", "max_batch_len", "autograd_grad_sample_hooks"))
