"""A study's own model: how a factory is called, its starting weights, its learning rate over rounds."""

from __future__ import annotations

import hashlib

import pytest
import safetensors.torch
import torch
from torch import nn

from fedward.config import InitWeights, ModelConfig, TrainConfig
from fedward.errors import ConfigError
from fedward.models.initial import load_initial_weights
from fedward.models.networks import build_model, factory_arguments


def monai_like(spatial_dims: int, in_channels: int, out_channels: int, width: int = 4) -> nn.Module:
    convolution = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.Sequential(convolution(in_channels, width, 3), nn.Flatten(1), nn.LazyLinear(out_channels))


def test_a_factory_is_given_the_input_and_output_by_the_names_its_signature_uses():
    assert factory_arguments(monai_like, "x:monai_like", (1, 32, 32, 16), 3) == {"in_channels": 1, "out_channels": 3, "spatial_dims": 3}
    assert factory_arguments(lambda input_shape, output_size: None, "x:f", (10,), 1) == {"input_shape": (10,), "output_size": 1}
    with pytest.raises(ConfigError, match="x:g takes neither input_shape and output_size nor in_channels and out_channels"):
        factory_arguments(lambda n_features: None, "x:g", (10,), 1)


def test_model_args_cannot_repeat_what_fedward_derives(tmp_path, monkeypatch):
    (tmp_path / "study_nets.py").write_text("from torch import nn\n\ndef net(input_shape, output_size, hidden=8):\n    return nn.Linear(input_shape[0], output_size)\n")
    model = build_model(ModelConfig(target="study_nets:net", args={"hidden": 4}), (6,), 3, str(tmp_path))
    assert isinstance(model, nn.Linear) and model.out_features == 3
    with pytest.raises(ConfigError, match=r"model.args: \['output_size'\] come from the data and the task"):
        build_model(ModelConfig(target="study_nets:net", args={"output_size": 2}), (6,), 3, str(tmp_path))
    with pytest.raises(ConfigError, match=r"'study_nets' .* has no 'missing'"):
        build_model(ModelConfig(target="study_nets:missing"), (6,), 3, str(tmp_path))


def pretrained(tmp_path, **extra) -> tuple[nn.Module, str]:
    torch.manual_seed(1)
    source = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    state = {k: v.clone() for k, v in source.state_dict().items()} | extra
    path = tmp_path / "pretrained.safetensors"
    safetensors.torch.save_file(state, path)
    return source, path.name


def test_initial_weights_load_by_name_and_shape_and_a_new_head_keeps_its_initialization(tmp_path):
    source, file = pretrained(tmp_path)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))  # another task: a new head of 3
    head = model[2].weight.detach().clone()
    digest = load_initial_weights(model, InitWeights(file=file, keep_initial=("2.weight", "2.bias")), tmp_path)
    assert digest == hashlib.sha256((tmp_path / file).read_bytes()).hexdigest()
    assert torch.equal(model[0].weight, source[0].weight) and torch.equal(model[0].bias, source[0].bias)
    assert torch.equal(model[2].weight, head)


def test_initial_weights_that_do_not_fit_are_refused_naming_every_entry(tmp_path):
    _, file = pretrained(tmp_path, extra=torch.zeros(3))
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ConfigError, match=r"in the file but not in the model: \['extra'\]; shapes differ: \['2.bias: model \(3,\), file \(2,\)', '2.weight: model \(3, 4\), file \(2, 4\)'\]"):
        load_initial_weights(model, InitWeights(file=file), tmp_path)
    smaller = nn.Sequential(nn.Linear(6, 4))
    bigger = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 1))
    with pytest.raises(ConfigError, match=r"missing from the file: \['3.bias', '3.weight'\]"):
        load_initial_weights(bigger, InitWeights(file=file, keep_initial=()), tmp_path)
    with pytest.raises(ConfigError, match=r"keep_initial: \['9.weight'\] are not entries of the model"):
        load_initial_weights(smaller, InitWeights(file=file, keep_initial=("9.weight",)), tmp_path)
    with pytest.raises(ConfigError, match="cannot read .*absent.safetensors"):
        load_initial_weights(smaller, InitWeights(file="absent.safetensors"), tmp_path)


def test_learning_rate_schedules_over_rounds():
    assert [TrainConfig(lr=0.1).lr_at(r, 5) for r in (1, 5)] == [0.1, 0.1]
    cosine = TrainConfig(lr=0.1, lr_schedule="cosine", lr_min=0.01)
    assert cosine.lr_at(1, 5) == pytest.approx(0.1) and cosine.lr_at(3, 5) == pytest.approx(0.055) and cosine.lr_at(5, 5) == pytest.approx(0.01)
    step = TrainConfig(lr=0.1, lr_schedule="step", lr_step_rounds=2, lr_gamma=0.5)
    assert [step.lr_at(r, 6) for r in range(1, 7)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    with pytest.raises(ConfigError, match=r"train.lr_min: expected a number in \[0, train.lr=0.1\)"):
        TrainConfig(lr=0.1, lr_min=0.2)


def test_each_round_plan_carries_the_scheduled_learning_rate(tmp_path):
    import numpy as np

    from fedward.config import parse_config
    from fedward.strategies import STRATEGIES
    from tests.conftest import ehr_config

    raw = ehr_config(tmp_path, tmp_path, rounds=4)
    raw["train"].update(lr_schedule="step", lr_step_rounds=1, lr_gamma=0.5)
    strategy = STRATEGIES["fedavg"](parse_config(raw))
    assert [strategy.configure_round(r, ["hospital_a"], np.random.default_rng(0))[0].lr for r in (1, 2, 4)] == pytest.approx([0.05, 0.025, 0.00625])
