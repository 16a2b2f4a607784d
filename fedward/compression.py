"""Smaller updates on the wire: 8-bit stochastic quantization and top-k sparsification.

int8 (QSGD-style): each block of `block` entries is sent as int8 codes and one float32 scale, the
block's largest magnitude / 127. An entry x becomes floor(x / scale + u) with u uniform in [0, 1),
so its expected value is x: the mean over hospitals stays unbiased, and about 4x fewer bytes leave.

top_k: only the `top_k_fraction` largest-magnitude entries leave, with their positions. Dropping the
rest biases the mean, so each hospital keeps what it did not send (its residual) and adds it to its
next change (error feedback; Stich et al. 2018): every entry is sent eventually.

A compressed change is restored at the driver before admission reads it; DP-FedAvg's clipping
and noise, robust rules and strategies then see a plain `Update`. Masked or encrypted changes are
not compressed (see `declaration`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedward.config import CompressionConfig
from fedward.declarations import CLEAR, Declaration
from fedward.types import CompressedDelta, CompressedUpdate, Layout, Update

INT8_LEVELS = 127


def declaration(config: CompressionConfig) -> Declaration:
    # Masked ring elements and ciphertexts are the model's size whatever their values: nothing to save.
    return Declaration(f"compression.kind: {config.kind}", needs={CLEAR: "saves bytes by rounding or dropping the values of a change sent in the clear"})


def compress(update: Update, config: CompressionConfig, seed: int, residual: np.ndarray | None, exact: np.ndarray) -> tuple[CompressedUpdate, np.ndarray | None]:
    """The update as it travels, and the residual the hospital keeps for its next one (top_k).
    Entries at `exact` (running statistics such as BatchNorm's, see `statistics`) travel as they
    are: they are no gradient steps, and a residual replayed into them later overshoots."""
    delta = update.delta.copy()
    kept = delta[exact]
    delta[exact] = 0.0
    if config.kind == "int8":
        payload, residual = _quantized(delta, config.block, np.random.default_rng(seed)), None
    else:
        payload, residual = _top_k(delta, config.top_k_fraction, residual)
    indices = np.concatenate([payload.indices, exact.astype(np.uint32)])
    order = np.argsort(indices, kind="stable")
    payload = dataclasses.replace(payload, indices=indices[order], values=np.concatenate([payload.values, kept])[order])
    return CompressedUpdate(**{**_fields(update), "delta": payload}), residual


def statistics(layout: Layout, buffers: set[str]) -> np.ndarray:
    """Positions in `layout` of the model's buffers (running statistics), which travel exactly."""
    at = layout.slices()
    return np.concatenate([np.arange(at[n].start, at[n].stop, dtype=np.uint32) for n in layout.names if n in buffers] or [np.zeros(0, np.uint32)])


def restore(sent: CompressedUpdate, size: int) -> Update:
    """The plain update of `size` values a compressed one stands for; raises ValueError on a
    malformed payload, before allocating anything it claims."""
    payload = sent.delta
    if not isinstance(payload, CompressedDelta):
        raise ValueError(f"its compressed change is a {type(payload).__name__}")
    if payload.size != size:
        raise ValueError(f"its compressed change holds {payload.size!r} values, not its model's {size}")
    if payload.kind not in ("int8", "top_k"):
        raise ValueError(f"its change is compressed as {str(payload.kind)[:20]!r}, not int8 or top_k")
    delta = _dequantized(payload) if payload.kind == "int8" else np.zeros(size, np.float32)
    _scatter(payload, delta)
    return Update(**{**_fields(sent), "delta": delta})


def _fields(update: Update | CompressedUpdate) -> dict:
    return {f.name: getattr(update, f.name) for f in dataclasses.fields(update)}


def _quantized(delta: np.ndarray, block: int, rng: np.random.Generator) -> CompressedDelta:
    blocks = math.ceil(delta.size / block)
    padded = np.zeros(blocks * block, np.float32)
    padded[: delta.size] = delta
    padded = padded.reshape(blocks, block)
    scales = (np.abs(padded).max(axis=1) / INT8_LEVELS).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    codes = np.floor(padded / safe + rng.random(padded.shape, dtype=np.float32))
    codes = np.clip(codes, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)  # float rounding may reach 128 at the block's maximum
    none = np.zeros(0, np.uint32)
    return CompressedDelta("int8", delta.size, block=block, codes=codes.ravel()[: delta.size], scales=scales, indices=none, values=none.astype(np.float32))


def _dequantized(payload: CompressedDelta) -> np.ndarray:
    codes, scales, size, block = payload.codes, payload.scales, payload.size, payload.block
    if not (isinstance(codes, np.ndarray) and codes.dtype == np.int8 and codes.shape == (size,)):
        raise ValueError(f"its int8 change does not hold {size} int8 codes")
    if not (isinstance(block, int) and block >= 1 and isinstance(scales, np.ndarray) and scales.dtype == np.float32
            and scales.shape == (math.ceil(size / block),)):
        raise ValueError("its int8 change's scales do not match its blocks")
    with np.errstate(over="ignore"):  # a forged scale may overflow; admission refuses what is not finite
        return codes.astype(np.float32) * np.repeat(scales, block)[:size]


def _top_k(delta: np.ndarray, fraction: float, residual: np.ndarray | None) -> tuple[CompressedDelta, np.ndarray]:
    full = delta if residual is None or residual.size != delta.size else delta + residual
    k = max(1, math.ceil(fraction * full.size))
    indices = np.argpartition(np.abs(full), full.size - k)[full.size - k:].astype(np.uint32)
    values = full[indices].astype(np.float32)
    left = full.copy()
    left[indices] = 0.0
    return CompressedDelta("top_k", delta.size, indices=indices, values=values), left


def _scatter(payload: CompressedDelta, delta: np.ndarray) -> None:
    """Writes the entries sent exactly into `delta`."""
    indices, values, size = payload.indices, payload.values, payload.size
    if not (isinstance(indices, np.ndarray) and indices.dtype == np.uint32 and isinstance(values, np.ndarray)
            and values.dtype == np.float32 and indices.ndim == values.ndim == 1 and indices.shape == values.shape):
        raise ValueError("its change does not hold matching uint32 positions and float32 values")
    if indices.size and (int(indices[-1]) >= size or not (np.diff(indices.astype(np.int64)) > 0).all()):
        raise ValueError(f"its positions are not ascending, distinct and below {size}")
    delta[indices] = values
