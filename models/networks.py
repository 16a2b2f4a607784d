"""The models a config can name: the two built-in families (an MLP for tables, a small CNN for
images) or a study's own factory (`model.target`).

The normalization layer is a config option because later strategies need specific ones: FedBN
keeps BatchNorm statistics local, DP-SGD (Opacus) cannot use BatchNorm and wants GroupNorm.
Every model outputs the task's `output_size` values per sample (one logit for a binary task).
"""

from __future__ import annotations

import inspect

from torch import nn

from fedward.components import load_component
from fedward.config import ModelConfig
from fedward.declarations import SAMPLES_APART, Declaration
from fedward.errors import ConfigError


def declaration(config: ModelConfig) -> Declaration | None:
    """What the built-in networks' normalization takes from other settings."""
    if config.norm == "batch":
        return Declaration("model.norm: batch", breaks={SAMPLES_APART: "normalizes each sample with its batch's statistics, so samples mix"})
    return None


def _norm(kind: str, width: int, groups: int, dims: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width) if dims == 1 else nn.BatchNorm2d(width)
    if kind == "group":
        return nn.GroupNorm(groups, width)
    return nn.Identity()


def mlp(config: ModelConfig, in_features: int, output_size: int) -> nn.Module:
    layers: list[nn.Module] = []
    width_in = in_features
    for width in config.hidden:
        layers += [nn.Linear(width_in, width), _norm(config.norm, width, config.groups, 1), nn.ReLU()]
        if config.dropout:
            layers.append(nn.Dropout(config.dropout))
        width_in = width
    layers.append(nn.Linear(width_in, output_size))
    return nn.Sequential(*layers)


def cnn(config: ModelConfig, input_shape: tuple[int, ...], output_size: int) -> nn.Module:
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    width_in = in_channels
    for channels in config.channels:
        layers += [
            nn.Conv2d(width_in, channels, 3, padding=1),
            _norm(config.norm, channels, config.groups, 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        width_in = channels
    # Global max pooling, so a finding anywhere in the image counts the same; spelled as a MaxPool2d
    # over the whole final map because SHAP's DeepExplainer has rules for it (not for the adaptive one).
    final = (height >> len(config.channels), width >> len(config.channels))
    if min(final) < 1:
        raise ConfigError(f"model.channels: {len(config.channels)} pooling blocks need images of at least {1 << len(config.channels)} pixels")
    layers += [nn.MaxPool2d(final), nn.Flatten()]
    if config.dropout:
        layers.append(nn.Dropout(config.dropout))
    layers.append(nn.Linear(width_in, output_size))
    return nn.Sequential(*layers)


def build_model(config: ModelConfig, input_shape: tuple[int, ...], output_size: int = 1, study_dir: str | None = None) -> nn.Module:
    """`input_shape` is one sample's shape: (features,) for tables, (channels, H, W) for images;
    `output_size` the task's. A `model.target` factory is given them with `model.args` (see
    `factory_arguments`) and must return a torch.nn.Module."""
    if config.kind == "mlp":
        return mlp(config, input_shape[0], output_size)
    if config.kind == "cnn":
        return cnn(config, input_shape, output_size)
    factory = load_component(config.target, "model.target", study_dir)
    given = factory_arguments(factory, config.target, tuple(input_shape), output_size)
    clash = sorted(set(given) & set(config.args))
    if clash:
        raise ConfigError(f"model.args: {clash} come from the data and the task ({given}); leave them out")
    try:
        model = factory(**given, **config.args)
    except TypeError as e:  # its arguments do not fit the factory's signature
        raise ConfigError(f"model.target: {config.target}({', '.join(given)}, **model.args) failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.target: {config.target} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def factory_arguments(factory, target: str, input_shape: tuple[int, ...], output_size: int) -> dict[str, object]:
    """What fedward passes a factory, by the names its signature uses (see `check_factory`)."""
    if check_factory(factory, target) == "shape":
        return {"input_shape": input_shape, "output_size": output_size}
    given: dict[str, object] = {"in_channels": input_shape[0], "out_channels": output_size}
    if "spatial_dims" in inspect.signature(factory).parameters:
        given["spatial_dims"] = len(input_shape) - 1
    return given


def check_factory(factory, target: str) -> str:
    """How a factory takes what fedward gives it: `input_shape` and `output_size` ("shape"), or
    MONAI's `in_channels` and `out_channels` ("channels", with `spatial_dims` from the input's shape
    when it takes one), so `monai.networks.nets:DenseNet121` is a target as it is."""
    try:
        names = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        names = {}
    if "input_shape" in names or "output_size" in names:
        return "shape"
    if "in_channels" in names and "out_channels" in names:
        return "channels"
    raise ConfigError(
        f"model.target: {target} takes neither input_shape and output_size nor in_channels and out_channels; "
        f"fedward passes one of these pairs from the data and the task"
    )
