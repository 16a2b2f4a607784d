"""How many hospitals one machine can simulate: a thousand on a pool of one worker per core.

Each hospital is its own hospital (its own data folder, work area, split, model state) reading one
of the imaging demo's 26 sites' files, `--images` images each; FedAvg of the demo's CNN for
`--rounds` rounds, every hospital training and evaluated every round. Printed per run: wall time
from starting `fedward simulate` to its end, when the first round began, the median later round,
the peak PSS summed over every process of the run (Ray's own included), and how many hospitals a
worker kept in memory.

    python benchmarks/scale.py --hospitals 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from overhead import CONFIG, hospital_folders, timed_process  # noqa: E402  (this script's own folder)


def run(data: Path, names: list[str], runs: Path, rounds: int, resident: int) -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    config["run"].update(name="scale", root=str(runs), rounds=rounds, min_hospitals=len(names) // 2, resident_hospitals=resident)
    config["data"].update(min_samples=8, holdout_fraction=0.25)
    config["explain"]["enabled"] = False
    config["subgroups"] = {}
    config["hospitals"] = [{"name": h, "data": str(data / h), "work_dir": str(runs / "sites" / h)} for h in names]
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / "scale.yaml"
    path.write_text(yaml.safe_dump(config))
    started_at, whole, peak, _ = timed_process([sys.executable, "-m", "fedward.pipelines", "simulate", str(path), "--no-progress"],
                                               {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")})
    records = [json.loads(line) for line in (runs / "scale" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == rounds and all(len(r["participants"]) == len(names) for r in records), "hospitals were left out"
    return {"whole": whole, "first_round": records[0]["started"] - started_at, "steady": statistics.median(r["seconds"] for r in records[1:]),
            "peak_pss": peak, "auroc": records[-1]["pooled"]["auroc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hospitals", nargs="+", type=int, default=[1000])
    parser.add_argument("--images", type=int, default=40, help="images per hospital")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resident", type=int, default=64, help="run.resident_hospitals: hospitals a worker keeps in memory")
    args = parser.parse_args()

    from fedward.data_adapters.demo import write_demo_data

    print(f"{args.images} images of 64x64 per hospital, the imaging demo's CNN, {args.rounds} rounds, {os.cpu_count()} cores, "
          f"{args.resident} hospitals in memory per worker")
    print(f"{'hospitals':>9}{'whole s':>9}{'first round s':>15}{'steady round s':>16}{'peak PSS GB':>13}{'AUROC':>8}")
    for count in args.hospitals:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            sites = min(count, 26)
            write_demo_data(tmp / "data", hospitals=sites, images_per_hospital=[args.images] * sites, rows_per_hospital=[20] * sites)
            names = [f"hospital_{i:04d}" for i in range(count)]
            r = run(hospital_folders(tmp / "data", names), names, tmp / "runs", args.rounds, args.resident)
            print(f"{count:>9}{r['whole']:>9.1f}{r['first_round']:>15.1f}{r['steady']:>16.2f}{r['peak_pss'] / 1e9:>13.2f}{r['auroc']:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
