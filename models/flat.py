"""Packing a model's state into one flat float32 buffer and back.

Every floating-point tensor of the state dict travels, in state-dict order; integer buffers such
as BatchNorm's `num_batches_tracked` stay with the model, as averaging a counter means nothing.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from fedward.errors import AggregationError
from fedward.types import Layout


def layout_of(model: nn.Module, personal: frozenset[str] = frozenset()) -> Layout:
    """The shared part of the state: floating-point entries not kept personal by the strategy."""
    return _layout(model.state_dict(), personal)


def _layout(state: dict[str, torch.Tensor], personal: frozenset[str]) -> Layout:
    items = [(k, tuple(v.shape)) for k, v in state.items() if v.is_floating_point() and k not in personal]
    return Layout(tuple(k for k, _ in items), tuple(s for _, s in items))


def layout_digest(layout: Layout) -> str:
    """A short fingerprint of a layout's names and shapes, for comparing models across processes."""
    text = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in zip(layout.names, layout.shapes))
    return f"{len(layout.names)} entries, {layout.size} values, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def flatten(model: nn.Module, personal: frozenset[str] = frozenset()) -> tuple[np.ndarray, Layout]:
    state = model.state_dict()  # once: a deep model's state dict takes a while to gather
    layout = _layout(state, personal)
    if not layout.names:
        return np.zeros(0, np.float32), layout
    flat = torch.cat([state[name].detach().reshape(-1).to(torch.float32) for name in layout.names])
    return flat.cpu().numpy().copy(), layout  # the flat buffer leaves on the CPU, whatever device trained


def load_flat(model: nn.Module, weights: np.ndarray, layout: Layout, personal: frozenset[str] = frozenset()) -> None:
    expected = layout_of(model, personal)
    if expected != layout or weights.shape != (layout.size,) or weights.dtype != np.float32:
        raise AggregationError(
            f"weights do not fit the model: expected {expected.size} float32 values in layout "
            f"{list(expected.names)[:4]}..., got {weights.shape} {weights.dtype} in {list(layout.names)[:4]}..."
        )
    # Copies, since a buffer from Ray's object store is read-only.
    state = {name: torch.tensor(weights[s]).reshape(shape) for (name, s), shape in zip(layout.slices().items(), layout.shapes)}
    model.load_state_dict(state, strict=False)
