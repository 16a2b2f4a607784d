"""What a run records of each round in metrics.jsonl, and how it is read back.

A hospital's entry holds what it released in the clear (fedward/release.py): its figures, named by
its task, and the cells they come from, each counting at least its release floor in patients.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fedward.checkpoint import read_metrics
from fedward.errors import CheckpointError
from fedward.files import append_lines, atomic_write, json_safe
from fedward.types import Evaluation


def figures(e: Evaluation) -> dict[str, Any]:
    """What a record holds of an evaluation's own figures, named by its task, or why it holds none."""
    if e.held_back is not None:
        return {"n": e.num_examples, "held_back": e.held_back}
    return {"n": e.num_examples, **e.figures}


def evaluation_record(e: Evaluation, train_loss: float | None) -> dict[str, Any]:
    """A hospital's entry in a round's record: its figures, then the cells they come from (the
    report's calibration plots read these, never patients' scores)."""
    return {**figures(e), "train_loss": train_loss, **{k: v.tolist() for k, v in e.statistics.items()}}


def figures_of_record(entry: dict) -> dict[str, Any]:
    """A hospital's figures from its entry in a round's record: all but its statistics."""
    return {k: v for k, v in entry.items() if k != "train_loss" and not isinstance(v, list)}


def own_view(metrics: list[dict], hospital: str) -> list[dict]:
    """The metric records as one hospital may see them: its own figures and the pooled ones."""
    return [{**r, "hospitals": {k: v for k, v in r["hospitals"].items() if k == hospital}} for r in metrics]


def append_metrics(run_dir: Path, record: dict) -> None:
    """Add a round's record to metrics.jsonl, synced before the round's checkpoint, so a
    checkpointed round always has its line."""
    path = run_dir / "metrics.jsonl"
    try:
        append_lines(path, [json.dumps(json_safe(record), allow_nan=False)])
    except OSError as e:  # the round is not checkpointed: a resume redoes it
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}; round {record['round']} will be redone when the run is resumed") from e


def truncate_metrics(run_dir: Path, last_round: int) -> None:
    """Drop metric lines of rounds after the checkpoint, which the resumed run will redo."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        kept = [r for r in read_metrics(path) if r["round"] <= last_round]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def check_space(run_dir: Path, min_free_mb: float, before: str) -> None:
    """Stop before work whose results could not be saved, not after."""
    free = shutil.disk_usage(run_dir).free / 2**20
    if free < min_free_mb:
        raise CheckpointError(
            f"{run_dir}: {free:.0f} MiB free, below run.min_free_mb={min_free_mb:g}; stopped {before}. "
            f"Checkpointed rounds are kept: free space and run again to resume"
        )
