"""Durable files: atomic writes and the per-round run checkpoint.

Everything is written to a temporary file, fsynced, renamed over the target and the folder
fsynced, so a crash at any instant leaves the old file or the new one, never half of one. A run
checkpoint also records its own sha256 in `latest.json`; a checkpoint that fails its hash is
reported and the one before it is used.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedward.errors import CheckpointError
from fedward.files import atomic_write, atomic_write_json
from fedward.types import Layout

KEEP = 3  # run checkpoints kept on disk: the newest and two fallbacks


@dataclass(frozen=True)
class RunCheckpoint:
    """Everything the driver needs to continue after `round`."""

    round: int
    weights: np.ndarray
    layout: Layout
    strategy_state: dict
    rng_state: dict  # numpy bit generator state of the driver's selection RNG
    config_hash: str


def save_checkpoint(run_dir: Path, ckpt: RunCheckpoint) -> Path:
    folder = Path(run_dir) / "checkpoints"
    path = folder / f"round_{ckpt.round:04d}.pt"
    body = {
        "round": ckpt.round,
        "weights": torch.from_numpy(ckpt.weights),
        "layout": {"names": list(ckpt.layout.names), "shapes": [list(s) for s in ckpt.layout.shapes]},
        "strategy_state": ckpt.strategy_state,
        "rng_state": json.dumps(ckpt.rng_state),
        "config_hash": ckpt.config_hash,
    }
    buffer = io.BytesIO()
    torch.save(body, buffer)
    data = buffer.getvalue()
    atomic_write(path, data)
    # A round redone after a resume replaces the entries from that round on.
    history = []
    for entry in _history(folder):
        if entry["round"] < ckpt.round:
            history.append(entry)
        elif entry["round"] > ckpt.round:
            (folder / entry["file"]).unlink(missing_ok=True)
    history.append({"round": ckpt.round, "file": path.name, "sha256": hashlib.sha256(data).hexdigest()})
    for old in history[:-KEEP]:
        (folder / old["file"]).unlink(missing_ok=True)
    atomic_write_json(folder / "latest.json", {"checkpoints": history[-KEEP:]})
    return path


def _history(folder: Path) -> list[dict]:
    index = folder / "latest.json"
    if not index.is_file():
        return []
    try:
        return json.loads(index.read_text())["checkpoints"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{index} is corrupt ({e}); move it away to start the run afresh") from None


def load_checkpoint(run_dir: Path, warn=print) -> RunCheckpoint | None:
    """The newest checkpoint whose hash verifies, or None when the run has none yet."""
    folder = Path(run_dir) / "checkpoints"
    for entry in reversed(_history(folder)):
        path = folder / entry["file"]
        data = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            warn(f"checkpoint {path} is missing or fails its sha256; using the one before it")
            continue
        body = torch.load(io.BytesIO(data), weights_only=True)
        return RunCheckpoint(
            round=body["round"],
            weights=body["weights"].numpy(),
            layout=Layout(tuple(body["layout"]["names"]), tuple(tuple(s) for s in body["layout"]["shapes"])),
            strategy_state=body["strategy_state"],
            rng_state=json.loads(body["rng_state"]),
            config_hash=body["config_hash"],
        )
    return None


def read_metrics(path: Path) -> list[dict]:
    """The records of `metrics.jsonl`; a torn last line (a crash mid-append) is not a record."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
