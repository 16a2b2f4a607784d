"""Server optimizers, FedProx and the personalized strategies, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedward.config import TrainConfig, parse_config
from fedward.errors import ConfigError
from fedward.types import Layout, Update
from fedward.models import training
from fedward.models.flat import flatten
from fedward.checkpoint import RunCheckpoint, load_checkpoint, save_checkpoint
from fedward.strategies import STRATEGIES
from fedward.strategies.base import LocalRound
from fedward.models.networks import build_model
from tests.fedward.test_config import raw_config

LAYOUT = Layout(("w",), ((4,),))


def strategy(name, model=None, data=None, **settings):
    train = {"momentum": 0.0} if name == "scaffold" else {}
    raw = raw_config(strategy={"name": name, **settings}, train=train, **({"model": model} if model else {}))
    raw["hospitals"] = [{"name": "a", "data": "d/a"}, {"name": "b", "data": "d/b"}]
    if data:
        raw["data"] = data
    return STRATEGIES[name](parse_config(raw))


def updates(*deltas):
    return [Update(1, f"h{i}", np.asarray(d, np.float32), LAYOUT, 10, 10.0) for i, d in enumerate(deltas)]


def test_fedadam_first_step_follows_the_paper():
    s = strategy("fedadam", server_lr=0.5, beta1=0.9, beta2=0.99, tau=1e-3)
    current = np.zeros(4, np.float32)
    delta = np.array([0.2, -0.1, 0.0, 0.05])
    new = s.aggregate(1, current, updates(delta, delta), {})
    m = 0.1 * delta
    v = 0.99 * 1e-6 + 0.01 * delta**2
    np.testing.assert_allclose(new, 0.5 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    assert new.dtype == np.float32


def test_yogi_and_adagrad_moments_move_as_defined():
    delta = np.array([1.0, 0.0, 0.0, 0.0])
    yogi, adagrad = strategy("fedyogi", beta2=0.9, tau=0.1), strategy("fedadagrad", tau=0.1)
    for s in (yogi, adagrad):
        s.aggregate(1, np.zeros(4, np.float32), updates(delta), {})
    # From v = tau^2 = 0.01 with a squared change of 1: Yogi adds (1 - beta2) * 1, Adagrad all of it.
    np.testing.assert_allclose(yogi.v, [0.01 + 0.1, 0.01, 0.01, 0.01])
    np.testing.assert_allclose(adagrad.v, [1.01, 0.01, 0.01, 0.01])
    # Yogi lowers v only by a fixed fraction of the (smaller) squared change.
    yogi.aggregate(2, np.zeros(4, np.float32), updates(0.1 * delta), {})
    assert yogi.v[0] == pytest.approx(0.11 - 0.1 * 0.01)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_server_moments_survive_a_checkpoint_so_a_resume_steps_identically(name, tmp_path):
    rng = np.random.default_rng(0)
    rounds = [updates(rng.normal(size=4), rng.normal(size=4)) for _ in range(3)]
    uninterrupted, weights = strategy(name), np.zeros(4, np.float32)
    for r, u in enumerate(rounds, 1):
        weights = uninterrupted.aggregate(r, weights, u, {})
    first, resumed = strategy(name), np.zeros(4, np.float32)
    resumed = first.aggregate(1, resumed, rounds[0], {})
    save_checkpoint(tmp_path, RunCheckpoint(1, resumed, LAYOUT, first.state_dict(), {"s": 1}, "h"))
    second = strategy(name)
    ckpt = load_checkpoint(tmp_path)
    second.load_state_dict(ckpt.strategy_state)
    for r, u in enumerate(rounds[1:], 2):
        resumed = second.aggregate(r, resumed, u, {})
    assert np.array_equal(resumed, weights)
    with pytest.raises(ValueError, match="expected moments m and v"):
        strategy(name).load_state_dict({"m": torch.zeros(2)})


def _local(mu: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    start, _ = flatten(model)
    x, y = torch.randn(64, 5), (torch.rand(64) < 0.5).float()
    training.train(model, x, y, epochs=3, lr=0.1, seed=seed, config=TrainConfig(batch_size=16), proximal_mu=mu)
    return start, flatten(model)[0]


class Recording:
    """A hospital's training split as a strategy's hospital half sees it (`Trainer`), recording each call's options."""

    def __init__(self):
        self.calls = []

    def train(self, model, plan, **options):
        self.calls.append(options)
        return 0.5

    def steps(self, epochs):
        return epochs


def hospital_half_calls(s, model) -> list[dict]:
    trainer = Recording()
    weights, layout = flatten(model)
    plan = s.configure_round(1, ["a"], np.random.default_rng(0))[0]
    assert s.local().train(LocalRound(plan, weights, layout, model, trainer)) == {"train_loss": 0.5}
    return trainer.calls


def test_fedprox_hospitals_train_with_the_pull_of_their_own_config_and_it_keeps_them_closer():
    model = torch.nn.Linear(3, 1)
    assert hospital_half_calls(strategy("fedprox", proximal_mu=0.3), model) == [{"proximal_mu": 0.3}]
    assert hospital_half_calls(strategy("fedavg"), model) == [{}]
    start, plain = _local(0.0)
    _, prox = _local(1.0)
    assert np.linalg.norm(prox - start) < 0.9 * np.linalg.norm(plain - start)


def test_fedprox_with_mu_zero_gives_fedavgs_weights():
    _, with_zero = _local(0.0)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(64, 5), (torch.rand(64) < 0.5).float()
    training.train(model, x, y, epochs=3, lr=0.1, seed=0, config=TrainConfig(batch_size=16))
    assert np.array_equal(with_zero, flatten(model)[0])


IMAGES = {"kind": "dicom", "dicom": {"label": {"column": "finding"}, "image_size": 32}}


def test_fedbn_keeps_every_batchnorm_entry_and_fedper_the_output_layer():
    bn = strategy("fedbn", model={"kind": "cnn", "norm": "batch", "channels": [4, 8]}, data=IMAGES)
    batch_norm = build_model(bn.config.model, (1, 32, 32))
    assert bn.personal_keys(batch_norm) == {f"{i}.{k}" for i in (1, 5) for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    per = strategy("fedper", model={"kind": "mlp", "hidden": [6, 4]})
    assert per.personal_keys(build_model(per.config.model, (3,))) == {"6.weight", "6.bias"}  # Linear, norm, ReLU per hidden layer, then the head
    cnn = strategy("fedper", model={"kind": "cnn", "channels": [4, 8]}, data=IMAGES)
    assert cnn.personal_keys(build_model(cnn.config.model, (1, 32, 32))) == {"10.weight", "10.bias"}


def test_strategy_contradictions_fail_at_load():
    with pytest.raises(ConfigError, match="fedbn keeps BatchNorm layers at each hospital, but model.norm is 'none'"):
        strategy("fedbn")
    with pytest.raises(ConfigError, match="strategy.beta1, beta2"):
        strategy("fedadam", beta1=1.0)


def test_scaffold_moves_weights_by_the_mean_change_and_its_control_by_the_asked_share(tmp_path):
    from fedward.strategies.scaffold import CONTROL

    s = strategy("scaffold", fraction=0.5)
    model = torch.nn.Linear(3, 1)
    weights, layout = flatten(model)
    s.start(model, layout)
    assert len(s.configure_round(1, ["a", "b"], np.random.default_rng(0))) == 2  # the quorum asks both of 2 hospitals
    assert np.array_equal(s.broadcast(), np.zeros(4, np.float32))
    extended = Layout(layout.names + tuple(CONTROL + n for n in layout.names), layout.shapes * 2)
    change = [Update(1, f"h{i}", np.arange(8, dtype=np.float32) * (i + 1), extended, 10, 10.0) for i in range(2)]
    new = s.aggregate(1, weights, change, {})
    np.testing.assert_allclose(new, weights + 1.5 * np.arange(4))
    np.testing.assert_allclose(s.broadcast(), 1.0 * 1.5 * np.arange(4, 8))  # both of the 2 hospitals' changes arrived
    s.configure_round(2, ["a", "b"], np.random.default_rng(0))
    before = s.broadcast().copy()
    s.aggregate(2, new, change[:1], {"h1": "died"})
    np.testing.assert_allclose(s.broadcast(), before + 0.5 * np.arange(4, 8))  # 1 of 2 arrived
    again = strategy("scaffold")
    again.load_state_dict(s.state_dict())
    assert np.array_equal(again.broadcast(), s.broadcast())


def test_training_only_named_parameters_leaves_the_others_exactly_as_they_were():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(64, 5), (torch.rand(64) < 0.5).float()
    training.train(model, x, y, epochs=2, lr=0.1, seed=0, config=TrainConfig(batch_size=16), only=frozenset({"2.weight", "2.bias"}))
    after = model.state_dict()
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
    assert not torch.equal(after["2.weight"], before["2.weight"])


def test_fedrep_keeps_fedpers_head_and_trains_it_alone_first():
    s = strategy("fedrep", head_epochs=2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    assert s.personal_keys(model) == strategy("fedper").personal_keys(model) == {"2.weight", "2.bias"}
    seed = s.configure_round(1, ["a"], np.random.default_rng(0))[0].seed
    assert hospital_half_calls(s, model) == [
        {"epochs": 2, "seed": seed + 1, "only": frozenset({"2.weight", "2.bias"})},
        {"only": frozenset({"0.weight", "0.bias"})},
    ]
    assert hospital_half_calls(strategy("fedper"), model) == [{}]


def test_server_optimizers_step_parameters_and_average_buffers():
    s = strategy("fedadam", server_lr=0.5)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    weights, layout = flatten(model)
    s.start(model, layout)
    delta = np.full(layout.size, 1e-3)
    new = s.aggregate(1, weights, [Update(1, "h0", delta.astype(np.float32), layout, 10, 10.0)], {})
    at = layout.slices()
    np.testing.assert_allclose(new[at["1.running_var"]], weights[at["1.running_var"]] + 1e-3, rtol=1e-6)  # averaged
    assert np.all(new[at["0.weight"]] - weights[at["0.weight"]] > 0.01)  # an adaptive step, far larger than the change
