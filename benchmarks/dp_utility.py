"""What patient-level DP costs in AUROC: a demo config trained without DP and at each budget.

Each run goes through the real pipeline on an embedded Ray with DP-SGD calibrated so that the
config's rounds spend exactly the budget (explanations off); the figures are the last round's
pooled and per-hospital AUROC and the epsilon the ledger reports.

    python benchmarks/dp_utility.py configs/demo_ehr.yaml --epsilons 8 1
    python benchmarks/dp_utility.py configs/demo_images.yaml --epsilons 8 1 --set model.norm=group
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedward.config import load_config  # noqa: E402
from fedward.pipelines.run import Pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 1.0])
    parser.add_argument("--set", action="append", default=[], help="more config settings, as for fedward simulate")
    args = parser.parse_args()
    print(f"{args.config}: patient-level DP-SGD against none, {' '.join(args.set) or 'as configured'}")
    print(f"{'epsilon':>8} {'spent':>6} {'noise':>6} {'pooled AUROC':>13} {'worst hospital':>15} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as runs:
        for eps in [None, *args.epsilons]:
            name = "none" if eps is None else f"eps{eps:g}"
            settings = [f"run.name=dp-{name}", f"run.root={runs}", "explain.enabled=false", *args.set]
            if eps is not None:
                settings += ["privacy.dp_sgd.enabled=true", f"privacy.dp_sgd.epsilon={eps}"]
            config = load_config(args.config, settings).with_paths_from(ROOT)
            began = time.monotonic()
            Pipeline(config, progress=False).run()
            seconds = time.monotonic() - began
            last = json.loads((config.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
            dp = json.loads((config.run_dir / "privacy.json").read_text())["differential_privacy"].get("patient_level")
            worst = min(m["auroc"] for m in last["hospitals"].values())
            noise = last["privacy"]["dp_sgd"] if dp else {}
            sigma = max((s["noise_multiplier"] for s in noise.values()), default=0.0)
            spent = f"{dp['spent_epsilon_max']:.2f}" if dp else "—"
            print(f"{'none' if eps is None else f'{eps:g}':>8} {spent:>6} {sigma:>6.2f} {last['pooled']['auroc']:>13.3f} {worst:>15.3f} {seconds:>8.0f}")


if __name__ == "__main__":
    main()
