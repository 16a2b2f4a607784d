"""The global model's starting weights from a local safetensors file (`model.init_weights`).

Loaded by name and shape into the freshly built model; the entries listed in `keep_initial` keep
the factory's initialization (a new head for another task). Nothing is ignored: an entry the
model has and the file lacks, or the file has and the model lacks, or a shape that differs, stops
the run before round 1 with the entries named. The file's sha256 goes into the run's manifest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from fedward.config import InitWeights
from fedward.errors import ConfigError


def load_initial_weights(model: nn.Module, spec: InitWeights, base: Path) -> str:
    """Load `spec.file` (relative to `base`) into `model`; returns the file's sha256."""
    path = (Path(base) / Path(spec.file).expanduser()).absolute()
    try:
        body = path.read_bytes()
        stored = safetensors.torch.load(body)
    except OSError as e:
        raise ConfigError(f"model.init_weights.file: cannot read {path}: {e.strerror or e}") from None
    except SafetensorError as e:
        raise ConfigError(f"model.init_weights.file: {path} is not a safetensors file: {e}") from None
    state = model.state_dict()
    keep = set(spec.keep_initial)
    unknown = sorted(keep - set(state))
    if unknown:
        raise ConfigError(f"model.init_weights.keep_initial: {unknown} are not entries of the model; its entries start {list(state)[:6]}")
    wanted = set(state) - keep
    missing, unexpected = sorted(wanted - set(stored)), sorted(set(stored) - set(state))
    shapes = sorted(f"{k}: model {tuple(state[k].shape)}, file {tuple(stored[k].shape)}" for k in wanted & set(stored) if stored[k].shape != state[k].shape)
    problems = [f"missing from the file: {missing}" if missing else "", f"in the file but not in the model: {unexpected}" if unexpected else "",
                f"shapes differ: {shapes}" if shapes else ""]
    if any(problems):
        raise ConfigError(
            f"model.init_weights: {path} does not fit {type(model).__name__}: {'; '.join(p for p in problems if p)}. "
            f"List entries that should keep their initial values (a new head) in model.init_weights.keep_initial"
        )
    with torch.no_grad():
        for name in sorted(wanted):
            state[name].copy_(stored[name].to(state[name].dtype))
    return hashlib.sha256(body).hexdigest()
