"""A hospital's data report: every input that was not used, with why.

The full report names files, rows and fields, which can identify patients, so it is written only
into the hospital's own area; only `counts()` (reason -> number) leaves the hospital.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from fedward.files import atomic_write_json


@dataclass(frozen=True)
class Skipped:
    source: str  # file or folder path relative to the data folder, or "TABLE row N"
    field: str  # the DICOM attribute or column at fault, or "file" / "folder"
    reason: str  # a short stable key, counted across hospitals, e.g. "unreadable_dicom"
    detail: str  # what was expected and what was found


class DataReport:
    def __init__(self, hospital: str):
        self.hospital = hospital
        self.skipped: list[Skipped] = []
        self.used = 0
        self.notes: dict[str, str] = {}  # field -> a problem that costs no sample (e.g. an optional column)

    def skip(self, source: str, field: str, reason: str, detail: str) -> None:
        self.skipped.append(Skipped(str(source), field, reason, detail))

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))

    def write(self, path: Path) -> None:
        atomic_write_json(path, {
            "hospital": self.hospital,
            "used": self.used,
            "skipped_counts": self.counts(),
            "skipped": [asdict(s) for s in self.skipped],
            "notes": self.notes,
        })
