"""The models a config can name: the two built-in families (an MLP for tables, a small CNN for
images) or a study's own factory (`model.target`).

The normalization layer is a config option because later strategies need specific ones: FedBN
keeps BatchNorm statistics local, DP-SGD (Opacus) cannot use BatchNorm and wants GroupNorm.
Every model outputs the task's `output_size` values per sample (one logit for a binary task).
"""

from __future__ import annotations

from torch import nn

from fedward.components import load_component
from fedward.config import ModelConfig
from fedward.errors import ConfigError


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
    `output_size` the task's. A `model.target` factory is called as
    `factory(input_shape=..., output_size=..., **model.args)` and must return a torch.nn.Module."""
    if config.kind == "mlp":
        return mlp(config, input_shape[0], output_size)
    if config.kind == "cnn":
        return cnn(config, input_shape, output_size)
    factory = load_component(config.target, "model.target", study_dir)
    try:
        model = factory(input_shape=tuple(input_shape), output_size=output_size, **config.args)
    except TypeError as e:  # its arguments do not fit the factory's signature
        raise ConfigError(f"model.target: {config.target}(input_shape=..., output_size=..., **model.args) failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.target: {config.target} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model
