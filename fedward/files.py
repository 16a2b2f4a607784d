"""Durable writes: a crash at any instant leaves the old file or the new one, never half of one.

Write to a temporary file beside the target, fsync it, rename it over the target, fsync the
folder. Used for everything fedward writes that a later run or an auditor reads back.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import torch

from fedward.errors import CheckpointError


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from e


def atomic_write_json(path: Path, body: object) -> None:
    atomic_write(path, json.dumps(json_safe(body), indent=2, sort_keys=True, allow_nan=False).encode())


def atomic_torch_save(obj: object, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def append_lines(path: Path, lines: list[str]) -> None:
    """Append whole lines to a log, synced before returning: what was appended survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def json_safe(value):
    """NaN and infinities as null, since strict JSON readers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
