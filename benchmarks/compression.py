"""What update compression saves on the wire and what it costs in accuracy, on the demos.

Each demo (EHR tables and DICOM images, three hospitals) runs FedAvg for its configured rounds
with updates sent as they are, as int8 codes, and as the top 10 % and 1 % of entries with error
feedback. Printed per demo and compression: the bytes one hospital sends per round (its pickled
update, as Ray sends it; mean over hospitals and rounds), their ratio to uncompressed, and the
final pooled AUROC on the hospitals' held-out patients (mean over seeds) with its paired
difference to uncompressed.

    python benchmarks/compression.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = {"none": {"kind": "none"}, "int8": {"kind": "int8"}, "top 10%": {"kind": "top_k", "top_k_fraction": 0.1},
         "top 1%": {"kind": "top_k", "top_k_fraction": 0.01}}


def run(config_path: Path, data: Path, runs: Path, name: str, seed: int, compression: dict) -> tuple[float, float]:
    from fedward.config import load_config
    from fedward.pipelines.run import Pipeline

    hospitals = ", ".join(f"{{name: {h}, data: {data / h}, work_dir: {runs / 'sites' / h}}}" for h in ("hospital_a", "hospital_b", "hospital_c"))
    settings = [f"hospitals=[{hospitals}]", f"run.root={runs}", f"run.name={name}", f"run.seed={seed}", "explain.enabled=false",
                "subgroups.sex=null", "subgroups.age=null", f"compression={json.dumps(compression)}"]
    pipeline = Pipeline(load_config(config_path, settings), progress=False, log=lambda _: None)
    pipeline.run()
    records = [json.loads(line) for line in (pipeline.run_dir / "metrics.jsonl").read_text().splitlines()]
    sent = [b for r in records for b in r["privacy"]["sent_bytes"].values()]
    return statistics.mean(sent), records[-1]["pooled"]["auroc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from fedward.data_adapters.demo import write_demo_data

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    print(f"the demos' three hospitals, FedAvg, seeds {args.seeds}")
    print(f"{'demo':<8}{'compression':<13}{'bytes/hospital/round':>22}{'ratio':>8}{'AUROC':>8}{'vs none':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_demo_data(tmp / "data")
        for demo, config in (("ehr", ROOT / "configs" / "demo_ehr.yaml"), ("images", ROOT / "configs" / "demo_images.yaml")):
            results = {kind: [run(config, tmp / "data", tmp / "runs", f"{demo}-{kind.replace(' ', '').replace('%', '')}-{seed}", seed, settings)
                              for seed in args.seeds] for kind, settings in KINDS.items()}
            plain = results["none"]
            for kind, figures in results.items():
                sent = statistics.mean(b for b, _ in figures)
                aurocs = [a for _, a in figures]
                paired = [a - p for (_, a), (_, p) in zip(figures, plain)]
                spread = statistics.stdev(paired) if len(paired) > 1 else 0.0
                print(f"{demo:<8}{kind:<13}{sent:>22,.0f}{sent / statistics.mean(b for b, _ in plain):>8.3f}{statistics.mean(aurocs):>8.3f}"
                      f"{statistics.mean(paired):>+11.3f} ± {spread:.3f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
