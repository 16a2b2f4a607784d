"""What train.precision costs in accuracy: a demo config run through the pipeline once per precision.

All runs in one invocation, on an embedded Ray, the same data and seed; prints each run's pooled
AUROC after the last round, its hospitals' AUROCs and the median round time. On a machine without a
GPU the reduced precisions run under CPU autocast, which gives their accuracy, not their speed.

    python benchmarks/precision.py                                   # the images demo, 6 rounds
    python benchmarks/precision.py --config configs/demo_ehr.yaml --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedward.config import load_config  # noqa: E402
from fedward.data_adapters.demo import write_demo_data  # noqa: E402
from fedward.pipelines.run import Pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo_images.yaml")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    print(f"{args.config.name}, {args.rounds} rounds per precision, demo data (seed 0)")
    print(f"{'precision':<10} {'pooled AUROC':>13} {'per hospital':>30} {'median round s':>15}")
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "demo"
        write_demo_data(data, hospitals=3, seed=0)
        hospitals = "hospitals=[" + ", ".join(f"{{name: {h.name}, data: {h}}}" for h in sorted(data.glob("hospital_*"))) + "]"
        for precision in args.precisions:
            settings = [f"run.name=precision-{precision}", f"run.root={folder}/runs", f"run.rounds={args.rounds}", "explain.enabled=false",
                        f"train.precision={precision}", hospitals]
            config = load_config(args.config, settings).with_paths_from(ROOT)
            Pipeline(config, progress=False).run()
            records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
            last = records[-1]
            each = ", ".join(f"{h[-1]} {v['auroc']:.3f}" for h, v in sorted(last["hospitals"].items()) if "auroc" in v)
            print(f"{precision:<10} {last['pooled']['auroc']:>13.3f} {each:>30} {statistics.median(r['seconds'] for r in records):>15.2f}")


if __name__ == "__main__":
    main()
