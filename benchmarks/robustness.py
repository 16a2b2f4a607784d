"""What attacking hospitals do to the model under each aggregation rule.

Runs a demo config through the real pipeline on an embedded Ray once per attack (none, and each
kind of the simulator in `actors/attacks.py`) and robust rule, with the first `--attackers`
hospitals of `--data` attacking, and prints the final round's pooled AUROC over every hospital's
held-out patients (their labels are true: a label-flipping hospital poisons only its training).

    fedward demo-data --out /tmp/demo8 --hospitals 8
    python benchmarks/robustness.py configs/demo_ehr.yaml --data /tmp/demo8 --attackers 2
    fedward demo-data --out /tmp/trusted --hospitals 1 --seed 1
    python benchmarks/robustness.py configs/demo_ehr.yaml --data /tmp/demo8 --rules fltrust --trusted /tmp/trusted/hospital_a
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedward.config import load_config  # noqa: E402
from fedward.pipelines.run import Pipeline  # noqa: E402

ATTACKS = ["none", "label_flip", "sign_flip", "scale", "noise"]
RULES = {
    "mean": [],
    "median": ["robust.rule=median"],
    "trimmed_mean": ["robust.rule=trimmed_mean", "robust.trim=0.3"],
    "krum": ["robust.rule=krum"],
    "multi_krum": ["robust.rule=multi_krum"],
    "mean+norm_bound": ["robust.norm_bound=1.0"],
    "fltrust": ["robust.rule=fltrust"],  # with --trusted
}


def pooled_auroc(config_path: Path, root: str, name: str, settings: list[str]) -> float:
    config = load_config(config_path, [f"run.name={name}", f"run.root={root}", "explain.enabled=false", *settings])
    Pipeline(config, progress=False).run()
    last = (config.run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["pooled"]["auroc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="a demo-data folder (fedward demo-data --hospitals 8)")
    parser.add_argument("--attackers", type=int, default=2)
    parser.add_argument("--byzantine", type=int, default=2, help="Krum's f")
    parser.add_argument("--attacks", nargs="+", default=ATTACKS)
    parser.add_argument("--rules", nargs="+", default=[r for r in RULES if r != "fltrust"])
    parser.add_argument("--trusted", type=Path, help="fltrust: the driver's trusted data folder, e.g. a hospital of another demo-data seed")
    parser.add_argument("--set", action="append", default=[], help="more config settings, as for fedward simulate")
    args = parser.parse_args()
    hospitals = sorted(p.name for p in args.data.iterdir() if p.name.startswith("hospital_"))
    every = "hospitals=[" + ", ".join(f"{{name: {h}, data: {args.data.absolute() / h}}}" for h in hospitals) + "]"
    attackers = "[" + ", ".join(hospitals[: args.attackers]) + "]"
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for rule in args.rules:
            for attack in args.attacks:
                # A round must have all but one hospital: Krum's and the trimmed mean's guarantees hold for the fewest a round may have.
                settings = [every, f"run.min_hospitals={len(hospitals) - 1}", f"robust.byzantine={args.byzantine}", *RULES[rule], *args.set]
                if rule == "fltrust":
                    settings.append(f"robust.trusted_data={args.trusted.absolute()}")
                if attack != "none":
                    settings += [f"attack.hospitals={attackers}", f"attack.kind={attack}"]
                results.setdefault(rule, {})[attack] = pooled_auroc(args.config, root, f"{rule}-{attack}".replace("+", "-"), settings)
                print(f"done: {rule}, {attack}", file=sys.stderr, flush=True)
    print(f"{args.config}: pooled AUROC after the last round, {len(hospitals)} hospitals, the first {args.attackers} attacking "
          f"({' '.join(args.set) or 'as configured'})")
    print(f"{'rule':<17}" + "".join(f"{a:>12}" for a in args.attacks))
    for rule, row in results.items():
        print(f"{rule:<17}" + "".join(f"{row[a]:>12.3f}" for a in args.attacks))


if __name__ == "__main__":
    main()
