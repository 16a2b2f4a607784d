"""DICOM ingest: images per second read, decoded and preprocessed on one core, against a reference.

Writes demo hospitals (one per scanner profile: 128x128 CT, 96x96 CT with rescale, 64x64 CR in
MONOCHROME1 with a VOI window) and two folders at clinical matrix sizes (512x512 CT slices,
2048x2048 CR radiographs in MONOCHROME1 with a VOI window), then, per folder and in one process:
- asserts that fedward's tensors (data_adapters/dicom.load_dicom with the images demo config)
  equal those of `reference` below, the few lines anyone would write, over the same files in the
  same order (allclose, 1e-6);
- times, interleaved and `--repeats` times each, the reference and fedward's first pass (an empty
  preprocessing cache: every file read, hashed, parsed, checked, decoded, rescaled, windowed,
  resized and cached) and prints the medians and their ratio;
- times fedward's second pass, served by the cache it filled (files still read and hashed).
torch and BLAS run on one thread: per-core figures.

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

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ComputedRadiographyImageStorage, CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fedward.data_adapters.demo import write_demo_data  # noqa: E402
from fedward.data_adapters.dicom import load_dicom  # noqa: E402
from fedward.data_adapters.report import DataReport  # noqa: E402
from fedward.config import load_config  # noqa: E402

SCANNERS = {"hospital_a": "CT 128x128", "hospital_b": "CT 96x96", "hospital_c": "CR 64x64 MONOCHROME1"}
CLINICAL = {"ct_512": ("CT 512x512", 512, CTImageStorage), "cr_2048": ("CR 2048x2048 MONOCHROME1", 2048, ComputedRadiographyImageStorage)}


def write_clinical(folder: Path, count: int, size: int, sop_class: str, seed: int) -> None:
    """`count` 12-bit images of `size` x `size`, smooth noise, and their label table: CT with a
    rescale to Hounsfield units, CR in MONOCHROME1 with a VOI window."""
    rng, ct, rows = np.random.default_rng(seed), sop_class == CTImageStorage, []
    coarse = rng.integers(0, 4096, (count, size // 32, size // 32)).astype(np.float32)
    for i in range(count):
        pixels = F.interpolate(torch.from_numpy(coarse[i])[None, None], size=(size, size), mode="bilinear")[0, 0].numpy().astype(np.uint16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = sop_class, generate_uid(), f"P{i // 2}"
        ds.set_pixel_data(pixels, "MONOCHROME2" if ct else "MONOCHROME1", 12)
        if ct:
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        else:
            ds.WindowCenter, ds.WindowWidth = 2150, 3700
        ds.save_as(folder / "images" / f"{i:04d}.dcm", enforce_file_format=True)
        rows.append(f"{ds.SOPInstanceUID},{'mass' if i % 2 else 'normal'}")
    (folder / "labels.csv").write_text("SOPInstanceUID,finding\n" + "\n".join(rows) + "\n")


def reference(paths: list[Path], size: int) -> np.ndarray:
    """Classic single-frame grayscale images as float32 (N, size, size), as fedward preprocesses them."""
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        x = ds.pixel_array.astype(np.float32) * np.float32(ds.get("RescaleSlope", 1)) + np.float32(ds.get("RescaleIntercept", 0))
        if "WindowCenter" in ds:  # PS3.3 C.11.2.1.2.1, LINEAR, onto [0, 1]
            centre, width = np.float32(ds.WindowCenter), np.float32(ds.WindowWidth)
            x = np.clip((x - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
        else:
            x = (x - x.min()) / (x.max() - x.min())
        if ds.PhotometricInterpretation == "MONOCHROME1":
            x = 1 - x
        h, w = x.shape
        nh, nw = max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))
        t = F.interpolate(torch.from_numpy(x)[None, None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (size - nh) // 2, (size - nw) // 2
        out.append(F.pad(t, (left, size - nw - left, top, size - nh - top))[0, 0].clamp_(0, 1).numpy())
    return np.stack(out)


def fedward(folder: Path, spec, cache: Path):
    return load_dicom(folder, spec, DataReport(folder.name), cache_dir=cache)


def timed(work) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400, help="images per demo hospital")
    parser.add_argument("--clinical", type=int, default=40, help="images per folder at clinical sizes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = load_config(ROOT / "configs" / "demo_images.yaml").data.dicom
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        write_demo_data(data, hospitals=3, images_per_hospital=[args.images] * 3, rows_per_hospital=[20] * 3)
        folders = dict(SCANNERS)
        for seed, (name, (scanner, size, sop_class)) in enumerate(CLINICAL.items()):
            (data / name / "images").mkdir(parents=True)
            write_clinical(data / name, args.clinical, size, sop_class, seed)
            folders[name] = scanner
        print(f"images per second on one core ({args.images} images per demo hospital, {args.clinical} per clinical folder; "
              f"medians of {args.repeats} interleaved runs; preprocessed to {spec.image_size}x{spec.image_size})")
        print(f"{'hospital':<12}{'scanner':<24}{'MB':>8}{'reference':>11}{'fedward':>9}{'ratio':>7}{'cached':>8}")
        for name, scanner in folders.items():
            folder = data / name
            samples = fedward(folder, spec, None)
            paths = [folder / sample for sample in samples.sample_ids]
            np.testing.assert_allclose(samples.features[:, 0], reference(paths, spec.image_size), atol=1e-6, rtol=0)
            first, cached, ref = [], [], []
            for _ in range(args.repeats):
                shutil.rmtree(cache, ignore_errors=True)
                ref.append(len(paths) / timed(lambda: reference(paths, spec.image_size))[0])
                first.append(len(paths) / timed(lambda: fedward(folder, spec, cache))[0])
                cached.append(len(paths) / timed(lambda: fedward(folder, spec, cache))[0])
            megabytes = sum(p.stat().st_size for p in paths) / 2**20
            ratio = statistics.median(first) / statistics.median(ref)
            print(f"{name:<12}{scanner:<24}{megabytes:>8.1f}{statistics.median(ref):>11.0f}{statistics.median(first):>9.0f}"
                  f"{ratio:>7.2f}{statistics.median(cached):>8.0f}", flush=True)


if __name__ == "__main__":
    main()
