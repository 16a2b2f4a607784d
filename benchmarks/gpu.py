"""A hospital's training speed through fedward against a plain PyTorch loop, on one device.

Both sides train MONAI's DenseNet121 (`monai.networks.nets:DenseNet121`, as a study names it) on
the same synthetic DICOM images at `--size` pixels, with the same batch size, epochs, optimizer and
precision, on the same device (the GPU when torch sees one, else the CPU), data loading included:
- fedward: a `Hospital` reads, checks, decodes and preprocesses its DICOM folder from an empty
  cache, prepares its model and trains one round (`load`, `prepare`, `fit`);
- plain: `pydicom.dcmread`, slope and intercept, the window, the same resize (benchmarks/ingest.py's
  reference), labels from the same CSV, then the classic loop over shuffled batches, with torch's
  defaults (fedward's deterministic algorithms on a GPU count among its costs).
The script asserts that both sides take the same number of optimizer steps (counted by a global
optimizer hook), then prints each side's median images per second over `--repeats` interleaved
runs after one untimed run of each (imports and kernels loaded, as in a long-lived hospital), and
their ratio.

    python benchmarks/gpu.py                                  # 512 images at 224 px, fp32
    python benchmarks/gpu.py --precision bf16
    python benchmarks/gpu.py --images 64 --size 64 --repeats 1   # a quick look on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import pydicom  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

from fedward.actors.hospital import Hospital  # noqa: E402
from fedward.config import parse_config  # noqa: E402
from fedward.data_adapters.demo import write_demo_data  # noqa: E402
from fedward.models import device as devices  # noqa: E402
from fedward.models.flat import flatten  # noqa: E402
from fedward.models.networks import build_model  # noqa: E402
from fedward.tasks import binary_task  # noqa: E402
from fedward.types import RoundPlan  # noqa: E402
from ingest import reference  # noqa: E402

STEPS = [0]
register_optimizer_step_post_hook(lambda *_: STEPS.__setitem__(0, STEPS[0] + 1))


def config_for(data: Path, work: Path, args) -> dict:
    demo = yaml.safe_load((ROOT / "configs" / "demo_images.yaml").read_text())
    return {
        "run": {"name": "gpu-bench", "root": str(work), "seed": 0, "rounds": 1, "min_hospitals": 1},
        "data": {**demo["data"], "min_samples": 8, "dicom": {**demo["data"]["dicom"], "image_size": args.size}},
        "model": {"target": "monai.networks.nets:DenseNet121"},
        "train": {"local_epochs": args.epochs, "batch_size": args.batch, "lr": 1e-3, "optimizer": "adam", "precision": args.precision},
        "explain": {"enabled": False},
        "hospitals": [{"name": "hospital_a", "data": str(data), "work_dir": str(work / "site"), "gpus": 1 if torch.cuda.is_available() else 0}],
    }


def through_fedward(raw: dict) -> tuple[float, int, int]:
    """Seconds, optimizer steps and training images of one round at a hospital, from an empty cache."""
    config = parse_config(raw)
    STEPS[0] = 0
    began = time.perf_counter()
    hospital = Hospital("hospital_a", config, "gpu-bench")
    hospital.load()
    shape = hospital.prepare(None)
    weights, layout = flatten(build_model(config.model, shape, 1))
    hospital.fit(RoundPlan(1, "hospital_a", seed=1, local_epochs=config.train.local_epochs, lr=config.train.lr), weights, layout)
    if hospital.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began, STEPS[0], len(hospital.train_idx) * config.train.local_epochs


@contextlib.contextmanager
def torch_defaults() -> Iterator[None]:
    """torch's defaults, as a plain loop has them: fedward's deterministic algorithms are its own cost."""
    mode = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode[0], warn_only=mode[1])


def plain(raw: dict, data: Path, images: int) -> tuple[float, int]:
    """Seconds and optimizer steps of the classic loop over `images` training images of the folder."""
    config = parse_config(raw)
    spec = config.data.dicom
    STEPS[0] = 0
    began = time.perf_counter()
    with open(data / spec.labels) as f:
        findings = {row[spec.key_column]: row[spec.label.column] for row in csv.DictReader(f)}
    paths, labels = [], []
    for path in sorted((data / spec.images).rglob("*.dcm")):
        finding = findings.get(str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID))
        if finding in (*spec.label.positive_values, *spec.label.negative_values):
            paths.append(path)
            labels.append(float(finding in spec.label.positive_values))
    x = torch.from_numpy(reference(paths[:images], spec.image_size))[:, None]
    y = torch.tensor(labels[:images])
    device = torch.device("cuda", 0) if config.hospitals[0].gpus else torch.device("cpu")
    with torch_defaults():
        torch.manual_seed(0)
        model = build_model(config.model, tuple(x.shape[1:]), 1).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=config.train.lr)
        scaler, loss_of = devices.grad_scaler(device, config.train.precision), binary_task().loss
        order = torch.Generator().manual_seed(1)
        model.train()
        for _ in range(config.train.local_epochs):
            perm = torch.randperm(len(y), generator=order)
            for start in range(0, len(y), config.train.batch_size):
                batch = perm[start : start + config.train.batch_size]
                if len(batch) < 2:
                    continue
                opt.zero_grad()
                with devices.autocast(device, config.train.precision):
                    loss = loss_of(model(x[batch].to(device)), y[batch].to(device))
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - began, STEPS[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"DenseNet121 at {args.size} px, batch {args.batch}, {args.epochs} epoch(s), {args.precision}, on {where}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_demo_data(root / "demo", hospitals=1, seed=0, images_per_hospital=(args.images,), rows_per_hospital=(60,))
        data = next((root / "demo").glob("hospital_*"))
        ours, theirs = [], []
        # Warm: a hospital's process is long-lived, its imports and the device's kernels loaded once.
        through_fedward(config_for(data, root / "warm-fedward", args))
        plain(config_for(data, root / "warm-plain", args), data, args.batch)
        for run in range(args.repeats):
            seconds, steps, trained = through_fedward(config_for(data, root / f"fedward-{run}", args))
            ours.append(trained / seconds)
            plain_seconds, plain_steps = plain(config_for(data, root / f"plain-{run}", args), data, trained // args.epochs)
            assert plain_steps == steps, f"the plain loop took {plain_steps} optimizer steps, fedward {steps}"
            theirs.append(trained / plain_seconds)
            print(f"  run {run + 1}: fedward {trained / seconds:.1f} images/s, plain {trained / plain_seconds:.1f} images/s, {steps} steps each")
    print(f"median images/s: fedward {statistics.median(ours):.1f}, plain {statistics.median(theirs):.1f}, "
          f"ratio {statistics.median(ours) / statistics.median(theirs):.2f}")


if __name__ == "__main__":
    main()
