"""A scan of a run directory for released cells that count fewer patients than the release floor,
written apart from the code that releases them: it reads every JSON file the way a reader of the
run directory would, and names each count below the floor by file and path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Fields that count patients or their samples, wherever they appear.
COUNTS = {"n", "positives", "negatives", "count", "train_examples", "holdout_examples", "train_patients", "holdout_patients"}
# Tables of counts: every entry is a cell.
TABLES = ("_bins", "_hist", "confusion", "calibration")
# Counts per value or per reason.
PER_NAME = {"targets", "skipped"}


def small_cells(value: Any, floor: int, where: str) -> list[str]:
    found = []
    if isinstance(value, dict):
        for key, v in value.items():
            here = f"{where}.{key}"
            if key in COUNTS and _count(v) and v < floor:
                found.append(f"{here} = {v}")
            elif key.endswith(TABLES) and isinstance(v, list):
                found += [f"{here} holds {c}" for c in _flat(v) if _count(c) and c < floor]
            elif key in PER_NAME and isinstance(v, dict):
                found += [f"{here}.{k} = {c}" for k, c in v.items() if _count(c) and c < floor]
            found += small_cells(v, floor, here)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += small_cells(v, floor, f"{where}[{i}]")
    return found


def scan(run_dir: Path, floor: int) -> tuple[list[str], int]:
    """Every count below `floor` in the run directory's JSON files, and how many files were read."""
    found, files = [], 0
    for path in sorted(run_dir.rglob("*")):
        if path.suffix == ".json":
            found += small_cells(json.loads(path.read_text()), floor, path.name)
        elif path.suffix == ".jsonl":
            for i, line in enumerate(path.read_text().splitlines()):
                found += small_cells(json.loads(line), floor, f"{path.name}:{i + 1}")
        else:
            continue
        files += 1
    return found, files


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _flat(v: Any) -> list:
    return [c for item in v for c in _flat(item)] if isinstance(v, list) else [v]
