"""Width slicing (HeteroFL, Diao et al. 2021): nested sub-models of the global model.

A hospital with less compute trains a model whose every layer keeps only the leading share of the
global model's units (`hospitals.NAME.model.width`). Its tensors are then the leading corner of
the global tensors of the same name, so the global weights slice into the sub-model and the
sub-model's change goes back into the same places; the driver averages each entry over the
hospitals whose sub-model holds it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedward.declarations import WHOLE_SHAPE, Declaration
from fedward.errors import AggregationError
from fedward.types import Layout


def declaration(narrow: Sequence[str]) -> Declaration:
    """Hospitals training narrower sub-models; their changes are averaged entry by entry."""
    setting = ", ".join(f"hospitals.{h}.model.width" for h in narrow)
    return Declaration(setting, breaks={WHOLE_SHAPE: "makes those hospitals send changes of narrower sub-models"})


def _corners(sub: Layout, layout: Layout) -> list[tuple[slice, tuple[int, ...], tuple[slice, ...]]]:
    """For each entry of `sub`: where the global entry sits in the flat buffer, its shape, and the
    corner of it the sub-model holds."""
    at = dict(zip(layout.names, zip(layout.slices().values(), layout.shapes)))
    out = []
    for name, shape in zip(sub.names, sub.shapes):
        if name not in at or len(at[name][1]) != len(shape) or any(s > f for s, f in zip(shape, at[name][1])):
            raise AggregationError(
                f"entry {name} of shape {shape} is not nested in the global model's "
                f"{at[name][1] if name in at else 'layout, which has no such entry'}"
            )
        span, full = at[name]
        out.append((span, full, tuple(slice(0, s) for s in shape)))
    return out


def take(weights: np.ndarray, layout: Layout, sub: Layout) -> np.ndarray:
    """The sub-model's weights: the leading corner of each global tensor."""
    if sub == layout:
        return weights
    parts = [weights[span].reshape(full)[corner].ravel() for span, full, corner in _corners(sub, layout)]
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


def check_fills(values: np.ndarray, layout: Layout) -> None:
    """Refuse flat values that are not exactly one `layout`'s worth."""
    if values.shape != (layout.size,):
        raise AggregationError(f"{values.shape[0] if values.ndim == 1 else values.shape} values do not fill a layout of {layout.size}")


def put(values: np.ndarray, sub: Layout, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """A sub-model's flat values placed where they sit in the global layout, zero elsewhere, and
    which global entries they cover."""
    check_fills(values, sub)
    if sub == layout:
        return values, np.ones(layout.size, bool)
    placed = np.zeros(layout.size, values.dtype)
    for (span, full, corner), (_, own) in zip(_corners(sub, layout), sub.slices().items()):
        placed[span].reshape(full)[corner] = values[own].reshape(tuple(c.stop for c in corner))
    return placed, covered([sub], layout)


def covered(held: Sequence[Layout], layout: Layout) -> np.ndarray:
    """Which entries of `layout` at least one of the sub-model layouts `held` holds."""
    out = np.zeros(layout.size, bool)
    for sub in set(held):
        if sub == layout:
            return np.ones(layout.size, bool)
        for span, full, corner in _corners(sub, layout):
            out[span].reshape(full)[corner] = True
    return out
