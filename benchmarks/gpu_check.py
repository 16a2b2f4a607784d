"""The GPU checks of docs/gpus.md in one prepared script, for a machine with a GPU (8 minutes).

1. Every strategy's hospital half on the GPU: the EHR demo for 2 rounds under FedAvg in fp16,
   SCAFFOLD in bf16, FedProx, Ditto and FedRep, and DP-SGD (which must stay fp32), its hospitals in
   the driver's process. Each must finish with finite weights.
2. The images demo for 2 rounds with every hospital on the GPU (`hospitals[].gpus`, a share each),
   in fp32: its pooled AUROC, and the time of round 2 (round 1 includes CUDA's start-up).
3. The same run killed after round 1 (the driver's whole process group) and resumed: its final
   weights compared bit for bit with run 2's.
4. The same run in bf16: its pooled AUROC and round-2 time against fp32's.
5. `benchmarks/gpu.py` (DenseNet121 at 224 px through fedward against a plain loop), with its own
   time limit, so that what came before is printed whatever it does.

Every figure is printed with the device's name. `--cpu` runs the same checks on the CPU, to check
the script itself on a machine without a GPU.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --cpu --images 40   # the script, checked on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from fedward.checkpoint import load_checkpoint  # noqa: E402
from fedward.config import parse_config  # noqa: E402
from fedward.data_adapters.demo import write_demo_data  # noqa: E402
from fedward.pipelines.run import Pipeline  # noqa: E402


def demo(kind: str, data: Path, runs: Path, name: str, hosting: str, gpus: float, train: dict, **sections) -> dict:
    """configs/demo_KIND.yaml for 2 rounds on the hospitals in `data`, explanations off, with
    `train` and whole `sections` in place of the demo's."""
    raw = yaml.safe_load((ROOT / "configs" / f"demo_{kind}.yaml").read_text())
    raw["run"].update({"name": name, "root": str(runs), "rounds": 2, "hosting": hosting})
    raw["train"].update(train)
    raw.update({"explain": {"enabled": False}, **sections})
    raw["hospitals"] = [{"name": h.name, "data": str(h), "gpus": gpus} for h in sorted(data.glob("hospital_*"))]
    return raw


def images(data: Path, runs: Path, name: str, precision: str, gpus: float) -> dict:
    raw = demo("images", data, runs, name, "per_hospital", gpus, {"precision": precision})
    raw["data"]["min_samples"] = 20
    return raw


# Each strategy's hospital half, and DP-SGD, in the precision it may use on a GPU.
VARIANTS = {
    "fedavg, fp16": ({"name": "fedavg"}, "fp16", {}),
    "scaffold, bf16": ({"name": "scaffold"}, "bf16", {}),
    "fedprox": ({"name": "fedprox"}, "fp32", {}),
    "ditto": ({"name": "ditto"}, "fp32", {}),
    "fedrep": ({"name": "fedrep"}, "fp32", {}),
    "dp_sgd": ({"name": "fedavg"}, "fp32", {"dp_sgd": {"enabled": True, "noise_multiplier": 1.0, "epsilon": 10.0}}),
}


def figures(run_dir: Path) -> tuple[float, float]:
    """The last round's pooled AUROC, and its seconds: round 1 also pays for CUDA's start-up."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["pooled"]["auroc"], records[-1]["seconds"]


def killed_after_round_1(raw: dict, folder: Path) -> None:
    """`fedward simulate` on `raw`, its process group killed once round 1 is checkpointed."""
    config_file = folder / f"{raw['run']['name']}.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    log = folder / f"{raw['run']['name']}.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "fedward.pipelines", "simulate", str(config_file), "--no-progress"], cwd=ROOT,
                                  start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    run_dir = parse_config(raw).run_dir
    try:
        deadline = time.monotonic() + 300
        while (load_checkpoint(run_dir) is None or load_checkpoint(run_dir).round < 1) and time.monotonic() < deadline:
            if driver.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    stopped = load_checkpoint(run_dir)
    # Killed anywhere else, the "resume" below would test something else (or nothing: a fresh run).
    assert stopped is not None and stopped.round == 1, f"the driver was to be killed after round 1; its log:\n{log.read_text()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the checks on the CPU (to check this script)")
    parser.add_argument("--images", type=int, default=360, help="images per demo hospital")
    parser.add_argument("--gpu-py-limit", type=float, default=240, help="seconds benchmarks/gpu.py may take")
    args = parser.parse_args()
    gpus = 0 if args.cpu else 1 / 3  # three hospitals share one GPU
    where = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    print(f"GPU checks on {where}; torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_demo_data(root / "demo", hospitals=3, seed=0, images_per_hospital=(args.images,) * 3)
        for i, (name, (strategy, precision, privacy)) in enumerate(VARIANTS.items()):
            raw = demo("ehr", root / "demo", root / "runs", f"ehr{i}", "in_process", 1 if gpus else 0, {"precision": precision, "momentum": 0.0},
                       strategy=strategy, privacy=privacy, subgroups={})
            config = parse_config(raw)
            weights = Pipeline(config, progress=False).run()
            assert np.isfinite(weights).all(), name
            print(f"1. EHR, {name}: 2 rounds, pooled AUROC {figures(config.run_dir)[0]:.3f}", flush=True)

        reference = parse_config(images(root / "demo", root / "runs", "fp32", "fp32", gpus))
        Pipeline(reference, progress=False).run()
        auroc, seconds = figures(reference.run_dir)
        print(f"2. images, fp32, 2 rounds: pooled AUROC {auroc:.3f}, round 2 took {seconds:.2f} s", flush=True)

        resumed_raw = images(root / "demo", root / "runs", "resumed", "fp32", gpus)
        killed_after_round_1(resumed_raw, root)
        weights = Pipeline(parse_config(resumed_raw), progress=False).run()
        expected = load_checkpoint(reference.run_dir).weights
        same = np.array_equal(weights, expected)
        print(f"3. killed after round 1, resumed: final weights {'bit for bit the same' if same else 'DIFFER'} "
              f"(largest difference {float(np.abs(weights - expected).max()):.3g})", flush=True)

        bf16 = parse_config(images(root / "demo", root / "runs", "bf16", "bf16", gpus))
        Pipeline(bf16, progress=False).run()
        bf16_auroc, bf16_seconds = figures(bf16.run_dir)
        print(f"4. images, bf16, 2 rounds: pooled AUROC {bf16_auroc:.3f} (fp32 {auroc:.3f}), round 2 took {bf16_seconds:.2f} s "
              f"(fp32 {seconds:.2f} s)", flush=True)

    size = ["--images", "48", "--size", "64", "--repeats", "1"] if args.cpu else []
    print("5. benchmarks/gpu.py:", flush=True)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *size], check=True, timeout=args.gpu_py_limit)

if __name__ == "__main__":
    main()
