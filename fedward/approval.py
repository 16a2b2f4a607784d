"""Code approval: a hospital in cross-site mode runs only study code its operator approved.

A study's own code is what `model.target`, `task.target` and `strategy.target` name. Before
importing any of it, the hospital computes the code's digest itself from what it would import:
every Python source file of the study folder (a study module may import any of them), or an
installed package's name and version. Nothing the driver sends enters the digest except the names.
Its operator approves a digest with `fedward approve DIGEST`, which records it in
`approved_code.jsonl` beside the hospital's policy. A run whose digest is not recorded is refused
before any data is read, naming the digest and the files it covers; once imported, each component
must have come from the files or package the digest covers, as they were when it was computed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fedward.components import distributions_of, provenance
from fedward.config import FedwardConfig
from fedward.errors import ConfigError, HospitalError
from fedward.files import append_lines, atomic_write_json

APPROVALS = "approved_code.jsonl"
COMPILED = ("*.pyc", "*.pyo", "*.so", "*.pyd")  # code Python imports that no reviewer reads


@dataclass(frozen=True)
class StudyCode:
    """The study code a run names, as this hospital finds it on its own disk."""

    digest: str  # "sha256:" + hex, over `covers`
    covers: dict[str, Any]  # setting -> target, and its files (path -> sha256) or package and version

    def describe(self) -> str:
        parts = []
        for setting, source in self.covers.items():
            where = f"{len(source['files'])} file(s) of the study folder" if "files" in source else f"{source['package']} {source['version']}"
            parts.append(f"{setting} {source['target']!r} ({where})")
        return ", ".join(parts)


def study_code(config: FedwardConfig, study_dir: str | None) -> StudyCode | None:
    """The digest of the study code `config` names, computed without importing any of it; None
    when the run uses only fedward's own components."""
    named = {s: t for s, t in (("model.target", config.model.target), ("task.target", config.task.target),
                               ("strategy.target", config.strategy.target)) if t is not None}
    if not named:
        return None
    covers = {setting: {"target": target, **_source(target, setting, study_dir)} for setting, target in sorted(named.items())}
    digest = hashlib.sha256(json.dumps(covers, sort_keys=True).encode()).hexdigest()
    return StudyCode(f"sha256:{digest}", covers)


def _source(target: str, setting: str, study_dir: str | None) -> dict[str, Any]:
    """Where `target`'s module would be imported from, found as the import system would look (the
    study folder first, where `load_component` puts it), without running any of it."""
    top = target.partition(":")[0].split(".")[0]
    study = Path(study_dir).resolve() if study_dir else None
    if study is not None and ((study / top).is_dir() or (study / f"{top}.py").is_file()):
        return {"files": _study_files(study)}
    packages = distributions_of(top)
    if packages:
        record = metadata.distribution(packages[0]).read_text("RECORD")  # its files' hashes: another build of the version differs
        return {"package": packages[0], "version": metadata.version(packages[0]),
                "record": hashlib.sha256(record.encode()).hexdigest() if record else None}
    raise ConfigError(f"{setting}: {target!r} is neither in the study folder {study_dir} nor an installed package; "
                      "a hospital approves only code it can find before running it")


def _study_files(study: Path) -> dict[str, str]:
    """Every Python source of the study folder by its hash. Compiled code is refused: Python would
    import it, and no reviewer reads it. Bytecode caches are never read (`keep_bytecode_out`)."""
    compiled = sorted(p.relative_to(study).as_posix() for pattern in COMPILED for p in study.rglob(pattern) if "__pycache__" not in p.parts)
    if compiled:
        raise ConfigError(f"{study}: holds compiled code {compiled[:5]}; a hospital approves only source it can read: remove it")
    files = {}
    for path in sorted(study.rglob("*.py")):
        relative = path.relative_to(study)
        if not any(part.startswith(".") or part == "__pycache__" for part in relative.parts[:-1]):  # not importable
            files[relative.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def keep_bytecode_out(cache: Path) -> None:
    """Compiled bytecode read from and written to `cache`, never the study folder's __pycache__,
    which could hold bytecode whose source a reviewer never saw."""
    sys.pycache_prefix = str(cache)


def approvals_file(policy: Path) -> Path:
    return policy.parent / APPROVALS


def approve(policy: Path, digest: str, note: str = "") -> Path:
    """Record the operator's approval of `digest` beside the hospital's policy file."""
    if not (digest.startswith("sha256:") and len(digest) == 71 and all(c in "0123456789abcdef" for c in digest[7:])):
        raise ConfigError(f"fedward approve: expected a digest as a refused run names it, sha256: and 64 hex digits, got {digest!r}")
    path = approvals_file(policy)
    append_lines(path, [json.dumps({"digest": digest, "approved": dt.datetime.now(dt.timezone.utc).isoformat(), "note": note})])
    return path


def approved(policy: Path) -> set[str]:
    path = approvals_file(policy)
    if not path.is_file():
        return set()
    out = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            out.add(json.loads(line)["digest"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}, line {n}: not an approval as `fedward approve` writes it") from None
    return out


def require_approved(code: StudyCode | None, policy: Path, hospital: str, record: Path) -> None:
    """Refuse, before anything of the study is imported, code whose digest its operator has not
    approved; what the digest covers is written to `record` for the operator to review."""
    if code is None or code.digest in approved(policy):
        return
    atomic_write_json(record, {"digest": code.digest, "covers": code.covers})
    raise HospitalError(
        f"{hospital}: refuses to run study code its operator has not approved: {code.describe()} digest to {code.digest} "
        f"(what it covers: {record}); its operator approves it with `fedward approve {code.digest} --policy {policy}`"
    )


def check_imported(code: StudyCode | None, study_dir: str | None, hospital: str) -> None:
    """Refuse components that were not imported from what the approved digest covers, as it was."""
    for setting, source in (code.covers if code else {}).items():
        imported = provenance(source["target"], setting, study_dir)
        if "files" in source:
            same = imported.get("sha256") is not None and source["files"].get(imported.get("file")) == imported["sha256"]
        else:
            same = (imported.get("package"), imported.get("version")) == (source["package"], source["version"])  # RECORD: as approved, found before import
        if not same:
            module = sys.modules.get(source["target"].partition(":")[0])
            raise HospitalError(f"{hospital}: {setting} {source['target']!r} was imported from {getattr(module, '__file__', imported)}, "
                                "not from the approved code as it was when approved")
