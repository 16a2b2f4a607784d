"""The run's audit manifest: which code, which packages, which config, which data.

Data is identified by counts and content hashes only, never by values or file names.
"""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from fedward.config import FedwardConfig
from fedward.types import DataCounts
from pipelines.checkpoint import atomic_write_json

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


def write_manifest(run_dir: Path, config: FedwardConfig, digest: str, counts: dict[str, DataCounts] | None = None) -> None:
    atomic_write_json(
        Path(run_dir) / "manifest.json",
        {
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version(),
            "python": platform.python_version(),
            "packages": package_versions(),
            "config_hash": digest,
            "data": {
                name: {
                    "fingerprint": c.fingerprint,
                    "split_fingerprint": c.split_fingerprint,
                    "train_examples": c.train_examples,
                    "holdout_examples": c.holdout_examples,
                    "skipped": c.skipped,
                }
                for name, c in sorted((counts or {}).items())
            },
        },
    )
