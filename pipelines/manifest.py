"""The run's audit manifest: which code, which packages, which config, which data.

Written when the run begins; every later invocation (a resume, a re-run of a finished run) is
appended, never rewritten, so the record of what produced each checkpoint survives. Data is
identified by counts and content hashes only, never by values or file names.
"""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from fedward.errors import CheckpointError
from fedward.files import atomic_write_json
from fedward.types import DataCounts

PACKAGES = ("fedward", "ray", "torch", "numpy", "pyarrow", "pydicom", "shap", "scikit-learn")


def code_version() -> str:
    """The git commit of the code when run from a checkout, else the installed version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return metadata.version("fedward")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _read(run_dir: Path) -> dict:
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        return {"invocations": [], "data": {}}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is corrupt ({e}); restore it from a backup") from None


def record_invocation(run_dir: Path, digest: str, start_round: int) -> None:
    """Append who ran the run now: code and packages, and the round it starts after."""
    manifest = _read(run_dir)
    manifest.setdefault("config_hash", digest)
    manifest["invocations"].append(
        {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "after_round": start_round,
            "code_version": code_version(),
            "python": platform.python_version(),
            "packages": package_versions(),
        }
    )
    atomic_write_json(Path(run_dir) / "manifest.json", manifest)


def record_data(run_dir: Path, counts: dict[str, DataCounts]) -> None:
    """The data each hospital joined with, kept from the first validation on."""
    manifest = _read(run_dir)
    for name, c in sorted(counts.items()):
        manifest["data"].setdefault(
            name,
            {
                "fingerprint": c.fingerprint,
                "split_fingerprint": c.split_fingerprint,
                "train_examples": c.train_examples,
                "holdout_examples": c.holdout_examples,
                "skipped": c.skipped,
            },
        )
    atomic_write_json(Path(run_dir) / "manifest.json", manifest)


def record_builds(run_dir: Path, versions: dict) -> None:
    """What the model of each invocation was built with, every hospital agreeing; a resume with
    other code (an edited study file, another fedward or torch) is refused: its rounds would not
    be the run's."""
    manifest = _read(run_dir)
    first = next((i["model_built_with"] for i in manifest["invocations"] if "model_built_with" in i), None)
    if first is not None and first != versions:
        changed = "; ".join(f"{k}: {first.get(k)} -> {versions.get(k)}" for k in sorted(set(first) | set(versions)) if first.get(k) != versions.get(k))
        raise CheckpointError(f"{run_dir}: the run began with other code ({changed}); restore it, or start a new run (another run.name)")
    manifest["invocations"][-1]["model_built_with"] = versions
    atomic_write_json(Path(run_dir) / "manifest.json", manifest)


def record_initial_weights(run_dir: Path, file: str, sha256: str) -> None:
    manifest = _read(run_dir)
    manifest["invocations"][-1]["init_weights"] = {"file": file, "sha256": sha256}
    atomic_write_json(Path(run_dir) / "manifest.json", manifest)
