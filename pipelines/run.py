"""The driver: a durable pipeline of stages over the hospital actors.

Stages: open the run directory, validate data at each hospital, harmonize, train rounds
(configure, fit, aggregate, evaluate, checkpoint), finish. Each stage's result is a file in the
run directory, and the run directory is the run's identity: running the same config on it again
continues after the last checkpointed round and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import ray
import torch
from tqdm import tqdm

from actors.remote import check_placement, start_hospital
from data_adapters.harmonize import merge_summaries
from fedward.config import FedwardConfig, config_diff, config_hash, config_to_dict
from fedward.errors import CheckpointError, DataError, QuorumError
from fedward.metrics import auprc_from_histograms, auroc_error_bound, auroc_from_histograms
from fedward.types import DataCounts, Evaluation, Layout
from models.flat import flatten
from models.networks import build_model
from pipelines.checkpoint import RunCheckpoint, atomic_write, atomic_write_json, load_checkpoint, save_checkpoint
from pipelines.fedavg import FedAvg
from pipelines.manifest import write_manifest
from pipelines.strategy import Strategy
from privacy.hooks import build_hook

STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}


def gather(futures: Mapping[str, ray.ObjectRef], timeout: float) -> tuple[dict[str, Any], dict[str, str]]:
    """Results of the hospitals that answered in time, and a reason for each that did not."""
    refs = list(futures.values())
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    ready = set(ready)
    results, failures = {}, {}
    for name, ref in futures.items():
        if ref not in ready:
            failures[name] = f"no answer within {timeout:.0f} s"
            ray.cancel(ref)
            continue
        try:
            results[name] = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            failures[name] = f"{type(e.cause).__name__}: {e.cause}"
        except ray.exceptions.RayError as e:
            failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return results, failures


def pooled_metrics(evaluations: list[Evaluation]) -> dict[str, float]:
    pos = sum(e.positive_hist for e in evaluations)
    neg = sum(e.negative_hist for e in evaluations)
    n = sum(e.num_examples for e in evaluations)
    return {
        "n": n,
        "auroc": auroc_from_histograms(pos, neg),
        "auroc_error_bound": auroc_error_bound(pos, neg),
        "auprc": auprc_from_histograms(pos, neg),
        "accuracy": sum(e.accuracy * e.num_examples for e in evaluations) / n,
        "loss": sum(e.loss * e.num_examples for e in evaluations) / n,
    }


def start_ray(config: FedwardConfig, address: str | None) -> bool:
    """Connect to `address`, or start an embedded Ray offering every hospital's resource.

    Returns whether this call started Ray (and so should stop it). An already initialised Ray,
    as in tests, is used as it is.
    """
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(
            num_cpus=os.cpu_count() or 2,
            resources={h.name: 1 for h in config.hospitals},
            include_dashboard=False,
            object_store_memory=500 * 1024**2,
            logging_level="WARNING",
            log_to_driver=False,
        )
    return True


class Pipeline:
    def __init__(self, config: FedwardConfig, *, address: str | None = None, progress: bool = True, log: Callable[[str], None] | None = None):
        self.config = config
        self.address = address
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.run_dir = config.run_dir
        self.strategy = STRATEGIES[config.strategy.name](config)
        self.hook = build_hook("plaintext")
        self.hospitals: dict[str, ray.actor.ActorHandle] = {}

    # -- stages -----------------------------------------------------------------------------------

    def run(self) -> np.ndarray:
        """Run (or resume) the whole pipeline; returns the final global weights."""
        self._open_run_dir()
        started = start_ray(self.config, self.address)
        try:
            check_placement(self.config)
            at_hospitals = self.config.with_paths_from(Path.cwd())
            self.hospitals = {h.name: start_hospital(at_hospitals, h.name) for h in self.config.hospitals}
            counts = self._validate()
            preprocessing = self._harmonize(sorted(counts))
            shapes, failures = gather(
                {h: self.hospitals[h].prepare.remote(preprocessing, self.strategy.personal_keys()) for h in counts},
                self.config.run.round_timeout_s,
            )
            self._require_quorum(0, shapes, failures)
            return self._train(shapes)
        finally:
            for actor in self.hospitals.values():
                ray.kill(actor)
            self.hospitals = {}
            if started:
                ray.shutdown()

    def _open_run_dir(self) -> None:
        identity = self.run_dir / "run.json"
        digest = config_hash(self.config)
        if identity.is_file():
            previous = json.loads(identity.read_text())
            if previous["config_hash"] != digest:
                changes = config_diff(previous["config"], config_to_dict(self.config))
                raise CheckpointError(
                    f"{self.run_dir} belongs to a run with another config; changed: {'; '.join(changes)}. "
                    f"Restore the original config or give run.name a new value."
                )
        else:
            atomic_write_json(identity, {"config_hash": digest, "config": config_to_dict(self.config)})
        write_manifest(self.run_dir, self.config, digest)

    def _validate(self) -> dict[str, DataCounts]:
        counts, failures = gather({n: a.load.remote() for n, a in self.hospitals.items()}, self.config.run.round_timeout_s)
        for name, why in sorted(failures.items()):
            self.log(f"hospital {name} does not join: {why}")
        atomic_write_json(
            self.run_dir / "data.json",
            {"hospitals": {n: asdict(c) for n, c in sorted(counts.items())}, "refused": failures},
        )
        write_manifest(self.run_dir, self.config, config_hash(self.config), counts)
        self._require_quorum(0, counts, failures)
        return counts

    def _harmonize(self, hospitals: list[str]) -> dict | None:
        if self.config.data.kind != "table":
            return None
        saved = self.run_dir / "preprocessing.json"
        if saved.is_file():  # agreed once per run: a resume must not re-derive it from other hospitals
            return json.loads(saved.read_text())
        summaries, failures = gather({h: self.hospitals[h].summarize.remote() for h in hospitals}, self.config.run.round_timeout_s)
        self._require_quorum(0, summaries, failures)
        spec = merge_summaries([summaries[h] for h in sorted(summaries)], self.config.data.table).to_dict()
        atomic_write_json(saved, spec)
        return spec

    def _initial_weights(self, shape: tuple[int, ...]) -> tuple[np.ndarray, Layout]:
        torch.manual_seed(self.config.run.seed)
        return flatten(build_model(self.config.model, shape), self.strategy.personal_keys())

    def _train(self, shapes: dict[str, tuple[int, ...]]) -> np.ndarray:
        cfg = self.config
        if len(set(shapes.values())) != 1:
            raise DataError(f"hospitals prepared inputs of different shapes: {shapes}")
        rng = np.random.default_rng(cfg.run.seed)
        ckpt = load_checkpoint(self.run_dir, warn=self.log)
        if ckpt is None:
            weights, layout = self._initial_weights(next(iter(shapes.values())))
            start = 1
        else:
            weights, layout, start = ckpt.weights, ckpt.layout, ckpt.round + 1
            self.strategy.load_state_dict(ckpt.strategy_state)
            rng.bit_generator.state = ckpt.rng_state
            restored, _ = gather({h: self.hospitals[h].restore.remote(ckpt.round) for h in shapes}, cfg.run.round_timeout_s)
            self.log(f"resuming {cfg.run.name} after round {ckpt.round} (hospital state restored at {sorted(h for h, ok in restored.items() if ok)})")
        self._truncate_metrics(start - 1)
        rounds = range(start, cfg.run.rounds + 1)
        bar = tqdm(rounds, desc=cfg.run.name, unit="round", disable=not self.progress, file=sys.stderr)
        for round in bar:
            began = time.monotonic()
            weights, record = self._round(round, sorted(shapes), weights, layout, rng)
            record["seconds"] = round_seconds = time.monotonic() - began
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(
                self.run_dir,
                RunCheckpoint(round, weights, layout, self.strategy.state_dict(), rng.bit_generator.state, config_hash(cfg)),
            )
            bar.set_postfix(auroc=f"{record['pooled']['auroc']:.3f}", s=f"{round_seconds:.1f}")
        return weights

    def _round(self, round: int, available: list[str], weights: np.ndarray, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        timeout = self.config.run.round_timeout_s
        plans = self.strategy.configure_round(round, available, rng)
        setups = self.hook.setup(round, [p.hospital for p in plans])
        weights_ref = ray.put(weights)  # broadcast once through the object store
        updates, failures = gather(
            {p.hospital: self.hospitals[p.hospital].fit.remote(p, weights_ref, layout, setups[p.hospital]) for p in plans},
            timeout,
        )
        self._require_quorum(round, updates, failures)
        combined = self.hook.finish(round, self.hook.combine(round, [updates[h] for h in sorted(updates)]))
        new = self.strategy.aggregate(round, weights, combined, failures)
        weights = weights if new is None else new
        new_ref = ray.put(weights)
        evaluations, eval_failures = gather({h: self.hospitals[h].evaluate.remote(round, new_ref, layout) for h in available}, timeout)
        for name, why in sorted({**failures, **eval_failures}.items()):
            self.log(f"round {round}: hospital {name} failed: {why}")
        record = {
            "round": round,
            "participants": sorted(updates),
            "failures": failures,
            "hospitals": {
                h: {
                    "n": e.num_examples,
                    "auroc": e.auroc,
                    "auprc": e.auprc,
                    "accuracy": e.accuracy,
                    "loss": e.loss,
                    "train_loss": updates[h].metrics.get("train_loss") if h in updates else None,
                }
                for h, e in sorted(evaluations.items())
            },
            "pooled": pooled_metrics(list(evaluations.values())) if evaluations else {},
            "evaluation_failures": eval_failures,
        }
        return weights, record

    def _require_quorum(self, round: int, answered: Mapping[str, Any], failures: Mapping[str, str]) -> None:
        if len(answered) < self.config.run.min_hospitals:
            raise QuorumError(round, self.config.run.min_hospitals, failures)

    def _truncate_metrics(self, last_round: int) -> None:
        """Drop metric lines of rounds after the checkpoint, which the resumed run will redo."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["round"] <= last_round]
        atomic_write(path, "".join(line + "\n" for line in kept).encode())
