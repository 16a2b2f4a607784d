"""DeepExplainer attributions of the project's real models, checked against their own outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedward.explain.attribution import deep_shap, unsupported_layers
from fedward.config import ModelConfig, TrainConfig
from fedward.errors import HospitalError
from fedward.models.networks import build_model
from fedward.models.training import train


def trained(config: ModelConfig, x: torch.Tensor) -> nn.Module:
    """A model of the project's architecture, trained briefly so BatchNorm holds real running statistics."""
    torch.manual_seed(0)
    model = build_model(config, tuple(x.shape[1:]))
    y = (x.flatten(1).mean(1) > x.flatten(1).mean()).float()
    train(model, x, y, epochs=2, lr=0.05, seed=0, config=TrainConfig(batch_size=16))
    return model


def logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x)[:, 0].double().numpy()


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_mlp_attributions_add_up_to_the_logit(norm):
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(120, 12)).astype(np.float32))
    model = trained(ModelConfig(kind="mlp", norm=norm, hidden=(16, 8)), x)
    attr = deep_shap(model, x[:40], x[40:70])
    expected = logits(model, x[40:70])
    assert attr.values.shape == (30, 12) and attr.values.dtype == np.float64
    np.testing.assert_allclose(attr.outputs, expected, rtol=1e-6)
    assert attr.base_value == pytest.approx(logits(model, x[:40]).mean(), abs=1e-6)
    reference = np.abs(attr.base_value + attr.values.sum(axis=1) - expected).max()
    assert attr.additivity_error == pytest.approx(reference, abs=1e-9)
    assert attr.additivity_error <= 1e-3


def test_cnn_with_batch_norm_attributions_add_up_to_the_logit():
    x = torch.from_numpy(np.random.default_rng(1).random((48, 1, 16, 16), dtype=np.float32))
    model = trained(ModelConfig(kind="cnn", norm="batch", channels=(4, 8)), x)
    attr = deep_shap(model, x[:12], x[40:46])
    assert attr.values.shape == (6, 1, 16, 16)
    expected = logits(model, x[40:46])
    assert np.abs(attr.base_value + attr.values.sum(axis=(1, 2, 3)) - expected).max() <= 1e-3
    assert attr.additivity_error <= 1e-3


def test_a_linear_model_gets_weight_times_distance_from_the_background_mean():
    # For f(x) = w.x + b the exact SHAP value of column j is w_j (x_j - mean of the background's x_j).
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 1))
    rng = np.random.default_rng(3)
    background = torch.from_numpy(rng.normal(size=(25, 5)).astype(np.float32))
    samples = torch.from_numpy(rng.normal(size=(7, 5)).astype(np.float32))
    attr = deep_shap(model, background, samples)
    w = model[0].weight.detach().double().numpy()[0]
    reference = w * (samples.double().numpy() - background.double().numpy().mean(axis=0))
    np.testing.assert_allclose(attr.values, reference, atol=1e-5)


def test_the_callers_model_is_left_as_it_was():
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(60, 6)).astype(np.float32))
    model = trained(ModelConfig(kind="mlp", norm="batch", hidden=(8,)), x)
    model.train().zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deep_shap(model, x[:20], x[20:30])
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_group_norm_is_refused_up_front_naming_the_layer():
    model = build_model(ModelConfig(kind="mlp", norm="group", hidden=(8,), groups=2), (6,))
    assert unsupported_layers(model) == ["GroupNorm"]
    with pytest.raises(HospitalError, match="cannot explain: GroupNorm"):
        deep_shap(model, torch.zeros(4, 6), torch.zeros(2, 6))


def test_a_model_with_several_outputs_is_refused():
    with pytest.raises(HospitalError, match=r"one logit per sample.*\(2, 3\)"):
        deep_shap(nn.Sequential(nn.Linear(4, 3)), torch.zeros(5, 4), torch.zeros(2, 4))


def test_nothing_to_explain_is_refused():
    with pytest.raises(HospitalError, match="got 5 and 0"):
        deep_shap(nn.Sequential(nn.Linear(4, 1)), torch.zeros(5, 4), torch.zeros(0, 4))
