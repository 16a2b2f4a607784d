"""Kill the driver (SIGKILL, with its embedded Ray) at random points, resume, compare weights.

Runs a config once uninterrupted for reference, then `--kills` times: starts `fedward simulate`
in its own process group, waits until a random number of rounds (0 to all) is checkpointed, then
kills the group up to one round's time later, so kills land in start-up, rounds, checkpoint
writes and the finishing stage alike however fast the machine is (a draw that lands after the
run ended is drawn again). It then runs the same command again until it finishes and checks the
final weights are `torch.equal` to the reference's. Prints one line per kill and the count that
matched.

    python benchmarks/resume_check.py configs/demo_ehr.yaml --kills 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedward.checkpoint import load_checkpoint  # noqa: E402


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


def simulate(path: Path) -> float:
    """Run `fedward simulate` to the end; returns its seconds."""
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "fedward.pipelines", "simulate", str(path), "--no-progress"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - began


def kill_after(path: Path, run_dir: Path, rounds: int, wait: float) -> tuple[int, bool]:
    """Start `fedward simulate`, and SIGKILL its process group `wait` seconds after `rounds`
    rounds are checkpointed. Returns the rounds checkpointed at the kill and whether it ran to the end first."""
    driver = subprocess.Popen([sys.executable, "-m", "fedward.pipelines", "simulate", str(path), "--no-progress"], cwd=ROOT,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while driver.poll() is None and checkpointed(run_dir) < rounds:
        time.sleep(0.02)
    time.sleep(wait)
    finished = driver.poll() is not None
    if not finished:
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    return checkpointed(run_dir), finished


def checkpointed(run_dir: Path) -> int:
    ckpt = load_checkpoint(run_dir)
    return ckpt.round if ckpt else 0


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
        records = [json.loads(line) for line in (root / "reference" / "metrics.jsonl").read_text().splitlines()]
        rounds, round_seconds = len(records), statistics.mean(r["seconds"] for r in records)
        print(f"{args.config}: reference run {total:.1f} s, {rounds} rounds of {round_seconds:.1f} s; killing at random points within it")
        matched = k = 0
        while k < args.kills:
            name = f"killed{k}"
            path = config_file(args.config, root, name, settings)
            after_rounds, wait = draw.randint(0, rounds), draw.uniform(0.0, 1.0) * round_seconds
            done_at_kill, finished = kill_after(path, root / name, after_rounds, wait)
            if finished:  # it ended before the kill: not a kill point, draw another
                shutil.rmtree(root / name)
                continue
            simulate(path)
            equal = torch.equal(torch.from_numpy(load_checkpoint(root / name).weights), torch.from_numpy(expected))
            matched += equal
            k += 1
            print(f"kill {k}: {wait:4.1f} s after round {after_rounds} was checkpointed ({done_at_kill} rounds checkpointed at the kill); "
                  f"resumed weights equal: {equal}", flush=True)
        print(f"{matched} of {args.kills} resumed runs ended with weights torch.equal to the uninterrupted run")


if __name__ == "__main__":
    main()
