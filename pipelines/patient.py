"""`fedward explain-patient`: one patient's explanation, computed and written at their hospital.

Runs on the hospital's own node (its data must be readable here), from the run directory's last
checkpoint; the page is written into the hospital's own area and never into the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedward.actors.hospital import Hospital
from fedward.explain.local import explain_patient
from fedward.explain.report import write_patient_explanation
from fedward.config import config_hash, parse_config
from fedward.errors import CheckpointError
from fedward.seeds import derived_seed
from fedward.checkpoint import load_checkpoint
from fedward.pipelines.selection import reported, weights_file


def explain_patient_at_hospital(run_dir: Path, hospital: str, patient_id: str) -> list[Path]:
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise CheckpointError(f"{run_dir} is not a fedward run directory (no config.json)")
    config = parse_config(json.loads(saved.read_text()), str(saved)).with_paths_from(Path.cwd())
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no round has finished, so there is no model to explain")
    own = Hospital(hospital, config, f"{config.run.name}-{config_hash(config)[:12]}")
    counts = own.load(record=False)
    joined = json.loads((run_dir / "data.json").read_text())["hospitals"].get(hospital)
    if joined is None:
        raise CheckpointError(f"{hospital} did not take part in the run at {run_dir}")
    if (joined["fingerprint"], joined["split_fingerprint"]) != (counts.fingerprint, counts.split_fingerprint):
        raise CheckpointError(f"{hospital}: its data changed since the run at {run_dir}; the model cannot be explained on it")
    spec = run_dir / "preprocessing.json"
    own.prepare(json.loads(spec.read_text()) if config.data.kind == "table" else None)
    own.restore(ckpt.round)  # the layers the strategy keeps at the hospital, as they were after that round
    weights = ckpt.weights
    if config.train.select == "best" and reported(run_dir).get("best_round"):  # the model the run handed on
        weights = np.load(weights_file(run_dir, reported(run_dir)["best_round"]), allow_pickle=False)
    model = own._model_with(weights, ckpt.layout)
    explained = explain_patient(own, model, patient_id, derived_seed(config.run.seed, ckpt.round, hospital))
    return [write_patient_explanation(own.run_dir / "patients", p) for p in explained]
