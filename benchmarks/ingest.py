"""DICOM ingest: images per second read, decoded and preprocessed on one core, first pass and cached.

Writes demo hospitals (one per scanner profile: 128x128 CT, 96x96 CT with rescale, 64x64 CR in
MONOCHROME1 with a VOI window), then loads each through the hospital's adapter
(data_adapters/dicom.load_dicom with the images demo config) twice: with an empty preprocessing
cache (first pass: every file parsed, decoded, rescaled, windowed and resized) and with the cache
it filled (the cache is keyed by each file's content hash, so the files are still read and hashed).
One process, torch and BLAS on one thread: per-core figures.

    python benchmarks/ingest.py
    python benchmarks/ingest.py --images 600 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and torch load their thread pools
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedward.data_adapters.demo import write_demo_data  # noqa: E402
from fedward.data_adapters.dicom import load_dicom  # noqa: E402
from fedward.data_adapters.report import DataReport  # noqa: E402
from fedward.config import load_config  # noqa: E402

SCANNERS = {"hospital_a": "CT 128x128", "hospital_b": "CT 96x96", "hospital_c": "CR 64x64 MONOCHROME1"}


def load(folder: Path, spec, cache: Path) -> tuple[float, int]:
    started = time.perf_counter()
    samples = load_dicom(folder, spec, DataReport(folder.name), cache_dir=cache)
    return time.perf_counter() - started, len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400, help="images per hospital")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = load_config(ROOT / "configs" / "demo_images.yaml").data.dicom
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_demo_data(data, hospitals=3, images_per_hospital=[args.images] * 3, rows_per_hospital=[20] * 3)
        print(f"images per second on one core ({args.images} images per hospital, median of {args.repeats}; "
              f"preprocessed to {spec.image_size}x{spec.image_size})")
        print(f"{'hospital':<12}{'scanner':<24}{'MB on disk':>11}{'first pass':>12}{'cached':>10}")
        for name, scanner in SCANNERS.items():
            folder = data / name
            megabytes = sum(p.stat().st_size for p in folder.rglob("*.dcm")) / 2**20
            first, cached = [], []
            for _ in range(args.repeats):
                cache = Path(tmp) / "cache"
                shutil.rmtree(cache, ignore_errors=True)
                seconds, count = load(folder, spec, cache)
                first.append(count / seconds)
                seconds, count = load(folder, spec, cache)
                cached.append(count / seconds)
            print(f"{name:<12}{scanner:<24}{megabytes:>11.1f}{statistics.median(first):>12.0f}{statistics.median(cached):>10.0f}", flush=True)


if __name__ == "__main__":
    main()
