"""The two model families: an MLP for tables and a small CNN for images.

The normalization layer is a config option because later strategies need specific ones: FedBN
keeps BatchNorm statistics local, DP-SGD (Opacus) cannot use BatchNorm and wants GroupNorm.
Both models output one logit per sample.
"""

from __future__ import annotations

from torch import nn

from fedward.config import ModelConfig


def _norm(kind: str, width: int, groups: int, dims: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width) if dims == 1 else nn.BatchNorm2d(width)
    if kind == "group":
        return nn.GroupNorm(groups, width)
    return nn.Identity()


def mlp(config: ModelConfig, in_features: int) -> nn.Module:
    layers: list[nn.Module] = []
    width_in = in_features
    for width in config.hidden:
        layers += [nn.Linear(width_in, width), _norm(config.norm, width, config.groups, 1), nn.ReLU()]
        if config.dropout:
            layers.append(nn.Dropout(config.dropout))
        width_in = width
    layers.append(nn.Linear(width_in, 1))
    return nn.Sequential(*layers)


def cnn(config: ModelConfig, in_channels: int) -> nn.Module:
    layers: list[nn.Module] = []
    width_in = in_channels
    for width in config.channels:
        layers += [
            nn.Conv2d(width_in, width, 3, padding=1),
            _norm(config.norm, width, config.groups, 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        width_in = width
    # Global max pooling: a finding anywhere in the image should count the same.
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
    if config.dropout:
        layers.append(nn.Dropout(config.dropout))
    layers.append(nn.Linear(width_in, 1))
    return nn.Sequential(*layers)


def build_model(config: ModelConfig, input_shape: tuple[int, ...]) -> nn.Module:
    """`input_shape` is one sample's shape: (features,) for tables, (channels, H, W) for images."""
    if config.kind == "mlp":
        return mlp(config, input_shape[0])
    return cnn(config, input_shape[0])
