"""Kill the driver (SIGKILL, with its embedded Ray) at random points, resume, compare weights.

Runs a config once uninterrupted for reference, then `--kills` times: starts `fedward simulate`
in its own process group, kills the group after a random share of the reference's wall time (so
kills land in start-up, rounds, checkpoint writes and the finishing stages alike), runs the same
command again until it finishes, and checks the final weights are `torch.equal` to the
reference's. Prints one line per kill point and the count that matched.

    python benchmarks/resume_check.py configs/demo_ehr.yaml --kills 10
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.checkpoint import load_checkpoint  # noqa: E402


def config_file(source: Path, root: Path, name: str, settings: dict) -> Path:
    raw = yaml.safe_load(source.read_text())
    raw["run"] = {**raw["run"], "name": name, "root": str(root)}
    for hospital in raw["hospitals"]:  # the hospitals' folders, wherever this runs from
        hospital["data"] = str((ROOT / hospital["data"]).absolute())
        hospital["work_dir"] = str(root / "sites" / name / hospital["name"])
    for section, value in settings.items():
        raw[section] = {**raw.get(section, {}), **value}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def simulate(path: Path, kill_after: float | None = None) -> float:
    """Run `fedward simulate`; with `kill_after`, SIGKILL its process group then. Returns seconds."""
    began = time.monotonic()
    driver = subprocess.Popen([sys.executable, "-m", "pipelines", "simulate", str(path), "--no-progress"], cwd=ROOT,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        driver.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    else:
        if driver.returncode != 0:
            raise RuntimeError(f"{path.name}: fedward simulate exited with {driver.returncode}")
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="draws the kill points")
    args = parser.parse_args()
    draw = random.Random(args.seed)
    settings = {"explain": {"enabled": False}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference = config_file(args.config, root, "reference", settings)
        total = simulate(reference)
        expected = load_checkpoint(root / "reference").weights
        print(f"{args.config}: reference run {total:.1f} s; killing at random points within it")
        matched = 0
        for k in range(args.kills):
            name = f"killed{k}"
            path = config_file(args.config, root, name, settings)
            at = draw.uniform(0.05, 1.0) * total
            simulate(path, kill_after=at)
            ckpt = load_checkpoint(root / name)
            done_at_kill = ckpt.round if ckpt else 0
            simulate(path)
            equal = torch.equal(torch.from_numpy(load_checkpoint(root / name).weights), torch.from_numpy(expected))
            matched += equal
            print(f"kill {k + 1}: after {at:5.1f} s, {done_at_kill} rounds checkpointed; resumed weights equal: {equal}", flush=True)
        print(f"{matched} of {args.kills} resumed runs ended with weights torch.equal to the uninterrupted run")


if __name__ == "__main__":
    main()
