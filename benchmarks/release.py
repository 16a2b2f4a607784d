"""How far a finished run's pooled AUROC, which comes from padded counts of scores in 0.01 slices,
lies from the exact pooled AUROC of every held-out patient's score, computed here inside the
hospitals (their data and the final global model, in this process).

    python benchmarks/release.py configs/demo_ehr.yaml configs/demo_images.yaml   # after `make demo`
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from fedward import metrics
from fedward.actors.hospital import Hospital
from fedward.checkpoint import load_checkpoint, read_metrics
from fedward.config import config_hash, load_config
from fedward.models.training import outputs


def exact_and_released(path: str) -> dict:
    config = load_config(path)
    run_dir = config.run_dir
    ckpt = load_checkpoint(run_dir)
    preprocessing = json.loads((run_dir / "preprocessing.json").read_text()) if (run_dir / "preprocessing.json").is_file() else None
    labels, scores = [], []
    for own in config.hospitals:
        hospital = Hospital(own.name, config, f"{config.run.name}-{config_hash(config)[:12]}")
        hospital.load(record=False)
        hospital.prepare(preprocessing)
        model = hospital._model_with(ckpt.weights, ckpt.layout)
        scores.append(hospital.task.probabilities(outputs(model, hospital.x[hospital.holdout_idx])))
        labels.append(hospital.y[hospital.holdout_idx].numpy())
    pooled = next(r for r in read_metrics(run_dir / "metrics.jsonl") if r["round"] == ckpt.round)["pooled"]
    exact = metrics.auroc(np.concatenate(labels), np.concatenate(scores))
    return {"run": config.run.name, "round": ckpt.round, "released": pooled["auroc"], "bound": pooled["auroc_error_bound"], "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    for path in parser.parse_args().configs:
        r = exact_and_released(path)
        print(f"{r['run']} round {r['round']}: pooled AUROC released {r['released']:.3f} (exact within ±{r['bound']:.4f}), "
              f"exact {r['exact']:.4f}, gap {abs(r['released'] - r['exact']):.4f}")


if __name__ == "__main__":
    main()
