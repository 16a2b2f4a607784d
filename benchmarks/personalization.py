"""What each strategy gives each hospital: AUROC per hospital on its own held-out patients.

Runs a demo config once per strategy through the real pipeline on an embedded Ray (explanations
off), plus the local-only models and FedAvg fine-tuned at each hospital, and a HeteroFL run (FedAvg
with one hospital, `--narrow`, training the half-width sub-model); prints one column per hospital
and the worst hospital and mean over hospitals; raw figures per run come from each run's
personalization.json. A strategy that needs other settings runs with them (FedBN BatchNorm;
SCAFFOLD plain SGD at lr 0.05), which its row then also reflects.

    python benchmarks/personalization.py configs/demo_images.yaml --seeds 0 1 2
    fedward demo-data --out /tmp/renal --renal-unit hospital_b   # hospital_b's outcome model differs
    python benchmarks/personalization.py configs/demo_ehr.yaml --data /tmp/renal --seeds 0 1 2
    python benchmarks/personalization.py configs/demo_ehr.yaml --strategies fedavg fedprox fedper ditto
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedward.config import load_config  # noqa: E402
from fedward.pipelines.run import Pipeline  # noqa: E402

STRATEGIES = ["fedavg", "fedprox", "fedyogi", "scaffold", "fedbn", "fedper", "fedrep", "ditto", "heterofl"]


def run(config_path: Path, root: str, name: str, settings: list[str]) -> dict:
    config = load_config(config_path, [f"run.name={name}", f"run.root={root}", "explain.enabled=false", *settings]).with_paths_from(ROOT)
    Pipeline(config, progress=False).run()
    return json.loads((config.run_dir / "personalization.json").read_text())["models"]


def one_seed(args: argparse.Namespace, root: str, seed: int) -> dict[str, dict[str, float]]:
    """AUROC per strategy and hospital for one run seed (it also draws the hospitals' splits)."""
    columns: dict[str, dict[str, float]] = {}
    for name in args.strategies:
        settings = [f"strategy.name={name}", f"run.seed={seed}", *args.set]
        if name == "heterofl":
            settings = ["strategy.name=fedavg", f"hospitals.{args.narrow}.model.width=0.5", f"run.seed={seed}", *args.set]
        if name == "fedavg":  # the baselines come with the FedAvg run
            settings += [f"strategy.fine_tune_epochs={args.fine_tune_epochs}", "strategy.local_only=true"]
        if name == "fedyogi":
            settings += ["strategy.server_lr=0.01"]
        if name == "fedbn":
            settings += ["model.norm=batch"]
        if name == "scaffold":  # its control update assumes plain SGD steps
            settings += ["train.optimizer=sgd", "train.momentum=0", "train.lr=0.05"]
        models = run(args.config, root, f"{name}-seed{seed}", settings)
        own = "personal" if name == "ditto" else "global"
        columns[name] = {h: m["auroc"] for h, m in models[own]["hospitals"].items()}
        if name == "fedavg":
            columns["local-only"] = {h: m["auroc"] for h, m in models["local_only"]["hospitals"].items()}
            columns["fedavg+fine-tune"] = {h: m["auroc"] for h, m in models["fine_tuned"]["hospitals"].items()}
        print(f"done: {name}, seed {seed}", file=sys.stderr, flush=True)
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--set", action="append", default=[], help="more config settings, as for fedward simulate")
    parser.add_argument("--data", type=Path, help="a demo-data folder to read each hospital's data from instead of the config's")
    parser.add_argument("--fine-tune-epochs", type=int, default=2, help="epochs of fine-tuning FedAvg's model at each hospital")
    parser.add_argument("--narrow", default="hospital_c", help="the hospital that trains a half-width model in the heterofl run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="run seeds; each draws its own initial weights and splits")
    args = parser.parse_args()
    if args.data is not None:
        hospitals = load_config(args.config).hospitals
        args.set = [f"hospitals.{h.name}.data={args.data.resolve() / h.name}" for h in hospitals] + args.set
    with tempfile.TemporaryDirectory() as root:
        by_seed = [one_seed(args, root, seed) for seed in args.seeds]
    hospitals = sorted({h for c in by_seed[0].values() for h in c})
    print(f"{args.config}: AUROC per hospital on its own held-out patients ({' '.join(args.set) or 'as configured'}), "
          f"mean over seeds {args.seeds}; 'worst/seed' is the worst hospital's AUROC per seed, mean ± sd over seeds; "
          f"'vs local-only' and 'vs fedavg' are the paired differences of that per seed")
    print(f"{'':<17}" + "".join(f"{h:>12}" for h in hospitals) + f"{'worst':>8}{'mean':>8}{'worst/seed':>16}{'vs local-only':>18}{'vs fedavg':>18}")
    # A hospital missing from a run (it did not join) does not count as its worst.
    worst = {name: [float(np.nanmin([columns[name].get(h, np.nan) for h in hospitals])) for columns in by_seed] for name in by_seed[0]}
    for name in by_seed[0]:
        row = [statistics.mean(columns[name].get(h, float("nan")) for columns in by_seed) for h in hospitals]
        paired = [_spread(worst[name])]
        for baseline in ("local-only", "fedavg"):
            paired.append(_spread([a - b for a, b in zip(worst[name], worst[baseline])], signed=True) if baseline in worst else "")
        print(f"{name:<17}" + "".join(f"{v:>12.3f}" for v in row) + f"{min(row):>8.3f}{statistics.mean(row):>8.3f}"
              + f"{paired[0]:>16}{paired[1]:>18}{paired[2]:>18}")


def _spread(values: list[float], signed: bool = False) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{'+' if signed else ''}.3f} ± {sd:.3f}"


if __name__ == "__main__":
    main()
