"""Fixtures shared across the suite: small demo hospitals and one real Ray for end-to-end tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from fedward.data_adapters.demo import write_demo_data

# Ray 2.60 turns token authentication on for local clusters; every test process agrees on it.
os.environ.setdefault("RAY_AUTH_MODE", "token")

HOSPITALS = ("hospital_a", "hospital_b", "hospital_c")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """Three small demo hospitals, written once per session; tests copy before changing them."""
    out = tmp_path_factory.mktemp("demo")
    # Larger than the demo's 120-image site: ~30 held-out images make one site's AUROC too noisy to assert on.
    write_demo_data(out, hospitals=3, seed=0, images_per_hospital=(360, 300, 420))
    return out


def copy_hospitals(demo: Path, dest: Path) -> Path:
    for name in HOSPITALS:
        shutil.copytree(demo / name, dest / name, ignore=shutil.ignore_patterns(".fedward"))
    return dest


def ehr_config(data_root: Path, run_root: Path, name: str = "ehr", rounds: int = 5, **run) -> dict:
    return {
        "run": {"name": name, "root": str(run_root), "seed": 0, "rounds": rounds, "min_hospitals": 2, **run},
        "data": {
            "kind": "table",
            "min_samples": 50,
            "table": yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo_ehr.yaml").read_text())["data"]["table"],
        },
        "model": {"kind": "mlp", "hidden": [32, 16]},
        "train": {"local_epochs": 2, "batch_size": 32, "lr": 0.05},
        "hospitals": [{"name": h, "data": str(data_root / h), "work_dir": str(run_root / "sites" / h)} for h in HOSPITALS],
    }


def image_config(data_root: Path, run_root: Path, name: str = "images", rounds: int = 4) -> dict:
    demo = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo_images.yaml").read_text())
    return {
        "run": {"name": name, "root": str(run_root), "seed": 0, "rounds": rounds, "min_hospitals": 2},
        "data": {**demo["data"], "min_samples": 40},
        "model": demo["model"],
        "train": demo["train"],
        "explain": demo["explain"],
        "hospitals": [{"name": h, "data": str(data_root / h), "work_dir": str(run_root / "sites" / h)} for h in HOSPITALS],
    }


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for every end-to-end test, offering each demo hospital's resource."""
    import ray

    ray.init(
        address="local",  # never another test's `ray start` cluster
        num_cpus=2,
        resources={h: 1 for h in (*HOSPITALS, "hospital_d")},
        include_dashboard=False,
        object_store_memory=300 * 1024**2,
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
