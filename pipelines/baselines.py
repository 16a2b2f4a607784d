"""Reference points for a federated run on demo data: central and local-only training.

Central training pools every hospital's training rows in one process, which a real consortium
must never do; it exists to show how close federation comes on synthetic data. Every model gets
the same budget as the federated run (rounds x local epochs) and the same initial weights, and is
evaluated on the hospitals' own held-out splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedward.actors.hospital import Hospital
from fedward.data_adapters.harmonize import merge_summaries
from fedward.config import FedwardConfig, config_hash
from fedward.errors import ConfigError, DataError
from fedward.seeds import derived_seed
from fedward.pipelines.selection import reported
from fedward.tasks import build_task
from fedward.models import training
from fedward import pooling
from fedward.models.networks import build_model
from fedward.checkpoint import read_metrics


def compare(config: FedwardConfig) -> dict:
    """Federated, central and local-only figures on the hospitals' held-out splits, by the task's
    headline figure (AUROC, macro AUROC, R²)."""
    metrics = config.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise DataError(f"no federated run at {config.run_dir} to compare with; run `fedward simulate` first")
    records = read_metrics(metrics)
    last = records[-1]
    selected = reported(config.run_dir)
    if last["round"] < config.run.rounds and selected.get("stopped_after") != last["round"]:
        raise DataError(f"the federated run at {config.run_dir} stopped after round {last['round']}; finish it first")
    if config.train.select == "best" and selected.get("best_round"):  # the federated model the run handed on
        last = next(r for r in records if r["round"] == selected["best_round"])
    if config.privacy.dp_sgd.enabled:
        raise ConfigError("privacy.dp_sgd is on: the comparison models (central and local-only) would train outside DP-SGD, and their "
                          "figures would leave the hospitals unaccounted; compare a run without it")
    run_id = f"{config.run.name}-{config_hash(config)[:12]}-baselines"
    study_dir = config.with_paths_from(Path.cwd()).run.study_dir
    task = build_task(config.task, study_dir)
    hospitals = []
    for own in config.hospitals:
        hospital = Hospital(own.name, config, run_id)
        try:
            hospital.load()
        except DataError:  # refused to join the federated run too, for the same reason
            continue
        hospitals.append(hospital)
    preprocessing = None
    if config.data.kind == "table":
        preprocessing = merge_summaries([h.summarize() for h in hospitals], config.data.table).to_dict()
    scale = task.scale([h.summarize_targets() for h in hospitals]) if task.agrees_scale else None
    shapes = {h.prepare(preprocessing, scale) for h in hospitals}
    if len(shapes) != 1:
        raise DataError(f"hospitals prepared inputs of different shapes: {sorted(shapes)}")
    shape = shapes.pop()
    epochs = config.run.rounds * config.train.local_epochs
    figure = task.headline()

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(config.run.seed)
        return build_model(config.model, shape, task.output_size, study_dir)

    def fit(model, x, y, name):
        training.train(model, x, y, epochs=epochs, lr=config.train.lr, seed=derived_seed(config.run.seed, 0, name), config=config.train, task=task)
        return model

    central = fit(
        fresh_model(),
        torch.cat([h.x[h.train_idx] for h in hospitals]),
        torch.cat([h.y[h.train_idx] for h in hospitals]),
        "central",
    )
    by_name = {h.name: h for h in hospitals}
    pooling.deal(sorted(by_name), pooling.in_process([h.evaluation_key for h in hospitals]))

    def pool(evaluations) -> float | str:
        return pooling.pooled([e.padded for e in evaluations], lambda h, summed: by_name[h].open_pooled(summed)).get(figure, "n/a")

    central_evals = [h.evaluate_model(central, 0) for h in hospitals]
    local_evals = [h.evaluate_model(fit(fresh_model(), h.x[h.train_idx], h.y[h.train_idx], h.name), 0) for h in hospitals]

    released = [e for e in local_evals if e.held_back is None]
    return {
        "figure": figure,
        "federated": {"round": last["round"], "pooled": last["pooled"].get(figure, "n/a"),
                      "per_hospital": {h: m.get(figure, m.get("held_back")) for h, m in last["hospitals"].items()}},
        "central": {"pooled": pool(central_evals), "per_hospital": _per_hospital(central_evals, figure)},
        "local_only": {
            "pooled": pool(local_evals),
            "mean": sum(e.figures[figure] for e in released) / len(released) if released else "n/a",
            "per_hospital": _per_hospital(local_evals, figure),
        },
    }


def _per_hospital(evaluations, figure: str) -> dict[str, float | str]:
    """Each hospital's figure, or why it released none."""
    return {e.hospital: e.figures[figure] if e.held_back is None else e.held_back for e in evaluations}


def format_comparison(config: FedwardConfig, result: dict) -> str:
    """The demo's table: federated beside central and local-only, per hospital and pooled."""
    names = sorted(result["federated"]["per_hospital"])
    figure = result["figure"]
    data = config.hospitals[0].data
    truth = Path(data).expanduser().parent / "truth.json" if data else None
    best = ""
    if truth is not None and truth.is_file():
        known = json.loads(truth.read_text())["ehr" if config.data.kind == "table" else "images"]
        ceiling = {"auroc": known["best_auroc"], "macro_auroc": known.get("grade", {}).get("best_macro_auroc"),
                   "r2": known.get("stay", {}).get("best_r2")}.get(figure)
        best = f" (best achievable on all data: {ceiling['pooled']:.3f})" if ceiling else ""
    rows = [
        (f"federated ({config.strategy.name}, {result['federated']['round']} rounds)", result["federated"]),
        ("central (rows pooled: demo only)", result["central"]),
        ("local-only (mean of sites)", {**result["local_only"], "pooled": result["local_only"]["mean"]}),
    ]
    lines = [f"{config.run.name}: {FIGURE_NAMES.get(figure, figure)} on the hospitals' held-out splits{best}",
             f"  {'model':<40}{'pooled':>8}" + "".join(f"{n:>12}" for n in names)]
    for label, r in rows:
        lines.append(f"  {label:<40}{_cell(r['pooled'], 8)}" + "".join(_cell(r['per_hospital'][n], 12) for n in names))
    held_back = sorted({v for r in rows for v in r[1]["per_hospital"].values() if isinstance(v, str)})
    return "\n".join(lines + [f"  *: {v}" for v in held_back])


def _cell(value: float | str, width: int) -> str:
    return f"{value:>{width}.3f}" if isinstance(value, float) else f"{'*':>{width}}"


FIGURE_NAMES = {"auroc": "AUROC", "macro_auroc": "macro AUROC", "r2": "R²"}
