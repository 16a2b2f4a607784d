"""The driver: a durable pipeline of stages over the hospital actors.

Stages: open the run directory, validate data at each hospital, harmonize, check the model, train
rounds (pipelines/rounds.py: configure, fit, aggregate, evaluate, checkpoint), hand over
(pipelines/handover.py). Each stage's result is a file in the
run directory, and the run directory is the run's identity: running the same config on it again
continues after the last checkpointed round and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray

from fedward.actors.hospital import Hospital
from fedward.actors.pool import HostedHospital, InProcessHospital, start_in_process, start_pool
from fedward.actors.remote import check_placement, start_hospital
from fedward.checkpoint import load_checkpoint
from fedward.components import build_versions, load_component
from fedward.config import FedwardConfig, HospitalConfig, config_diff, config_hash, config_identity, config_to_dict
from fedward.data_adapters.harmonize import merge_summaries
from fedward.errors import CheckpointError, DataError, DeploymentError
from fedward.files import atomic_write_json
from fedward.models.flat import layout_digest, layout_of
from fedward.models.networks import check_factory
from fedward.pipelines import admission, compatibility, records
from fedward.pipelines.calls import deal_evaluation_key, gather, require_quorum
from fedward.pipelines.global_model import GlobalModel
from fedward.pipelines.handover import Handover, explanation_due, models_out, subgroups_due
from fedward.pipelines.manifest import record_builds, record_data, record_invocation
from fedward.pipelines.rounds import TRUSTED, Rounds, privacy_units, selection_after
from fedward.pipelines.sites import open_sites
from fedward.privacy.hooks import build_hook
from fedward.strategies import build_strategy
from fedward.tasks import build_task
from fedward.types import DataCounts, Layout, fingerprint_scheme


def pooled(config: FedwardConfig, address: str | None) -> bool:
    """Whether the hospitals share a pool of worker processes: a simulation's way, never a cluster's."""
    if address and config.run.hosting in ("pool", "in_process"):
        where = "on shared workers" if config.run.hosting == "pool" else "in the driver's process"
        raise DeploymentError(
            f"run.hosting: {config.run.hosting} puts hospitals together {where}, which only a simulation does; on a cluster "
            f"each hospital runs on the node holding its data: set run.hosting to auto or per_hospital"
        )
    # A hospital with GPUs needs a process of its own to be granted them.
    return address is None and config.run.hosting != "per_hospital" and not any(h.gpus > 0 for h in config.hospitals)


def start_ray(config: FedwardConfig, address: str | None, pool: bool) -> bool:
    """Connect to `address`, or start an embedded Ray: for hospitals with actors of their own (not
    a `pool`), it offers every hospital's resource.

    Returns whether this call started Ray (and so should stop it). An already initialised Ray,
    as in tests, is used as it is.
    """
    if ray.is_initialized():
        return False
    # Hospital output stays in Ray's logs on the hospital's node, not in the driver's terminal.
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    else:
        # Hospitals with processes of their own may ask for more CPUs than the machine has: they take turns.
        wanted = 0 if pool else math.ceil(sum(h.cpus for h in config.hospitals))
        ray.init(
            address="local",  # a new Ray of its own, even where `ray start` runs another on this machine
            num_cpus=max(os.cpu_count() or 2, wanted),
            resources={} if pool else {h.name: 1 for h in config.hospitals},
            include_dashboard=False,
            object_store_memory=500 * 1024**2,
            logging_level="WARNING",
            log_to_driver=False,
        )
    return True


class Pipeline:
    def __init__(self, config: FedwardConfig, *, address: str | None = None, progress: bool = True, log: Callable[[str], None] | None = None):
        self.config = config
        # Relative paths are read from where the run was started. Taken now: in a Ray job, connecting
        # to the cluster may unpack the job's working directory afresh, under this process's feet.
        self.started_in = Path.cwd()
        self.address = address
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.run_dir = config.run_dir
        self.digest = config_hash(config)
        self.run_id = f"{config.run.name}-{self.digest[:12]}"
        self.study_dir = config.with_paths_from(self.started_in).run.study_dir
        compatibility.check(config, self.study_dir)
        self.strategy = build_strategy(config, self.study_dir)
        self.task = build_task(config.task, self.study_dir)
        self.model = GlobalModel(config, self.task, self.strategy, study_dir=self.study_dir, started_in=self.started_in, run_dir=self.run_dir)
        self.scale: dict[str, float] | None = None  # the targets' scale the hospitals agreed on (regression)
        self.hook = build_hook(config, None, self.run_id)
        self.hospitals: dict[str, ray.actor.ActorHandle | HostedHospital | InProcessHospital] = {}
        self.processes: list[ray.actor.ActorHandle] = []  # the hospitals' actors, or the pool's workers
        self.counts: dict[str, DataCounts] = {}
        self.preprocessing: dict | None = None  # the agreed preprocessing spec (tables), once harmonized
        self.trusted: Hospital | None = None  # FLTrust: the driver's trusted data
        self.input_shape: tuple[int, ...] = ()  # one sample's shape, once hospitals prepared
        self.personal: frozenset[str] = frozenset()  # the model's entries that stay at each hospital, once prepared

    # -- stages -----------------------------------------------------------------------------------

    def run(self) -> np.ndarray:
        """Run (or resume) the whole pipeline; returns the final global weights."""
        self._open_run_dir()
        ckpt = load_checkpoint(self.run_dir, warn=self.log)
        if ckpt is not None and ckpt.config_hash != self.digest:
            raise CheckpointError(f"{self.run_dir}: checkpoint round {ckpt.round} was written under another config")
        record_invocation(self.run_dir, self.digest, ckpt.round if ckpt else 0)
        if self.config.attack.hospitals:
            self.log(f"SIMULATED ATTACK: {', '.join(self.config.attack.hospitals)} {self.config.attack.kind} (config attack); a test of defences, not a model for patients")
        atomic_write_json(self.run_dir / "config.json", config_to_dict(self.config))  # as last run, paths included
        self.selection = selection_after(self.run_dir, self.task, self.config.train, ckpt.round if ckpt else 0)
        trained = ckpt is not None and (ckpt.round >= self.config.run.rounds or self.selection.stopped_after is not None)
        done = trained and models_out(self.run_dir, ckpt.round)
        if done:
            final, chosen = self.selection.chosen(self.run_dir, self.config.train, ckpt.weights, ckpt.round)
            if not subgroups_due(self.config, self.run_dir, chosen) and not explanation_due(self.config, self.run_dir, chosen):
                early = "" if self.selection.stopped_after is None else f", stopped early by train.patience after round {ckpt.round}"
                self.log(f"{self.config.run.name} finished all {ckpt.round} rounds already{early}")
                return final
        if self.config.model.target is not None:  # a study model that cannot be built stops the run before Ray starts
            target = self.config.model.target
            check_factory(load_component(target, "model.target", self.study_dir), target)
        pool = pooled(self.config, self.address)  # a refused hosting stops the run before Ray starts
        started = start_ray(self.config, self.address, pool)
        try:
            at_hospitals = self.config.with_paths_from(self.started_in)
            if self.config.run.hosting == "cross_site":
                self.hospitals = open_sites(at_hospitals, self.run_id)
            elif self.config.run.hosting == "in_process":
                self.hospitals = start_in_process(at_hospitals, self.run_id)
            elif pool:
                self.hospitals, self.processes = start_pool(at_hospitals, self.run_id)
            else:
                check_placement(self.config)
                self.hospitals = {h.name: start_hospital(at_hospitals, h.name, self.run_id) for h in self.config.hospitals}
                self.processes = list(self.hospitals.values())
            unplaced = self._check_deployment()
            counts = self._validate(resuming=ckpt is not None, unplaced=unplaced)
            self.preprocessing = self._harmonize(sorted(counts))
            self.scale = self._agree_scale(sorted(counts))
            shapes, failures = gather(
                {h: self.hospitals[h].prepare.remote(self.preprocessing, self.scale) for h in counts},
                self.config.run.round_timeout_s,
            )
            require_quorum(self.config, 0, shapes, failures)
            for hospital, why in sorted(deal_evaluation_key(self.hospitals, sorted(shapes), self.config.run.round_timeout_s).items()):
                self.log(f"{hospital}: has no evaluation key this session, so its evaluations leave the pooled figures: {why}")
            self.input_shape = next(iter(shapes.values()))
            self.personal = self.model.keep_personal(self.input_shape)
            dp_units = {h: privacy_units(self.config, self.counts[h]) for h in sorted(shapes)} if self.config.privacy.dp_sgd.enabled else {}
            self.model.check(self.input_shape, dp_units)
            self._check_builds(sorted(shapes))
            self.trusted = self._trusted_root() if self.config.robust.rule == "fltrust" else None
            rounds = Rounds(self.config, run_dir=self.run_dir, digest=self.digest, hospitals=self.hospitals, counts=self.counts, hook=self.hook,
                            strategy=self.strategy, task=self.task, model=self.model, trusted=self.trusted, preprocessing=self.preprocessing,
                            scale=self.scale, progress=self.progress, log=self.log)
            weights, layout, last = rounds.run(shapes, ckpt)
            self.selection = rounds.selection
            weights, chosen = self.selection.chosen(self.run_dir, self.config.train, weights, last)  # the model the run hands on
            rounds.rejoin(sorted(shapes), last)  # a hospital lost after the last round still gets its own model
            if last > 0:
                self._hand_over(sorted(shapes), weights, layout, last, chosen)
            return weights
        finally:
            for actor in self.processes:
                ray.kill(actor)
            self.hospitals, self.processes = {}, []
            if started:
                ray.shutdown()

    def _hand_over(self, hospitals: list[str], weights: np.ndarray, layout: Layout, last: int, chosen: int) -> None:
        """The final stage (pipelines/handover.py), for the model of round `chosen`."""
        handover = Handover(self.config, self.run_dir, self.run_id, self.task, self.hospitals,
                            personal=self.personal, scale=self.scale, study_dir=self.study_dir, log=self.log)
        initial = self.model.initial_weights(self.input_shape)[0] if self.config.strategy.local_only else None
        gains = handover.own_models(hospitals, weights, layout, last, initial, chosen)
        handover.export(hospitals, self.input_shape, self.preprocessing, weights, layout, chosen)
        atomic_write_json(self.run_dir / "personalization.json", gains)  # last: its presence says the models are out
        if subgroups_due(self.config, self.run_dir, chosen):
            atomic_write_json(self.run_dir / "subgroups.json", handover.subgroups(hospitals, weights, layout, chosen))
        if explanation_due(self.config, self.run_dir, chosen):
            handover.explain(hospitals, weights, layout, chosen)

    def _open_run_dir(self) -> None:
        identity = self.run_dir / "run.json"
        if identity.is_file():
            try:
                previous = json.loads(identity.read_text())
            except ValueError as e:
                raise CheckpointError(f"{identity} is corrupt ({e}); it is the run's identity, restore it from a backup") from None
            if previous["config_hash"] != self.digest:
                changes = config_diff(previous["identity"], config_identity(self.config))
                raise CheckpointError(
                    f"{self.run_dir} belongs to a run with another config; changed: {'; '.join(changes)}. "
                    f"Restore the original config or give run.name a new value."
                )
        else:
            atomic_write_json(identity, {"config_hash": self.digest, "identity": config_identity(self.config)})
        records.check_space(self.run_dir, self.config.run.min_free_mb, "before starting")

    def _check_deployment(self) -> dict[str, str]:
        """Each hospital's actor must have come up with its data folder on its node: a deployment
        mistake stops the run here, before any data is read, rather than leaving a hospital out.
        A hospital that does not answer in time is only left out; returns why, per hospital."""
        placements, failures = gather({n: a.placement.remote() for n, a in self.hospitals.items()}, self.config.run.data_timeout_s)
        problems = {n: p.problem for n, p in placements.items() if p.problem}
        if problems:
            lines = "\n".join(f"  - {name}: {why}" for name, why in sorted(problems.items()))
            raise DeploymentError(f"hospitals cannot work where they run:\n{lines}")
        atomic_write_json(self.run_dir / "placement.json", {n: {"node_id": p.node_id, "node_ip": p.node_ip} for n, p in sorted(placements.items())})
        return failures

    def _validate(self, resuming: bool, unplaced: Mapping[str, str]) -> dict[str, DataCounts]:
        present = {n: a for n, a in self.hospitals.items() if n not in unplaced}
        counts, failures = gather({n: a.load.remote() for n, a in present.items()}, self.config.run.data_timeout_s)
        failures.update(unplaced)
        for name, why in sorted(failures.items()):
            self.log(f"hospital {name} does not join: {why}")
        path = self.run_dir / "data.json"
        if path.is_file():
            self._check_same_data(json.loads(path.read_text())["hospitals"], counts, resuming)
        else:
            atomic_write_json(path, {"hospitals": {n: asdict(c) for n, c in sorted(counts.items())}, "refused": failures})
        record_data(self.run_dir, counts)
        require_quorum(self.config, 0, counts, failures)
        self.counts = counts
        return counts

    def _check_same_data(self, before: dict[str, dict], now: dict[str, DataCounts], resuming: bool) -> None:
        """A run continues only on the data it began with: same content, same split."""
        changed = [
            f"{name}: {field} {before[name][field][:12]} -> {value[:12]}"
            for name, c in sorted(now.items())
            if name in before
            for field, value in c.fingerprints.items()
            if before[name][field] != value
        ]
        schemes = {fingerprint_scheme(before[name]["fingerprint"]) for name in now if name in before} - {
            fingerprint_scheme(c.fingerprint) for c in now.values()}
        if changed and schemes:
            raise CheckpointError(
                f"{self.run_dir}: the run began under a fedward that fingerprinted data another way ({', '.join(sorted(schemes))}): "
                f"its data cannot be compared; finish it with that version, or start a new run (another run.name)"
            )
        if changed:
            raise CheckpointError(
                f"{self.run_dir}: hospitals' data changed since the run began ({'; '.join(changed)}); "
                f"restore the data or start a new run (another run.name)"
            )
        joined, left = sorted(set(now) - set(before)), sorted(set(before) - set(now))
        if resuming and (joined or left):
            self.log(f"hospitals differ from the run's start: joined {joined}, missing {left}; results will differ from an uninterrupted run")

    def _harmonize(self, hospitals: list[str]) -> dict | None:
        if self.config.data.kind != "table":
            return None
        saved = self.run_dir / "preprocessing.json"
        if saved.is_file():  # agreed once per run: a resume must not re-derive it from other hospitals
            return json.loads(saved.read_text())
        summaries, failures = gather({h: self.hospitals[h].summarize.remote() for h in hospitals}, self.config.run.round_timeout_s)
        require_quorum(self.config, 0, summaries, failures)
        spec = merge_summaries([summaries[h] for h in sorted(summaries)], self.config.data.table).to_dict()
        atomic_write_json(saved, spec)
        return spec

    def _agree_scale(self, hospitals: list[str]) -> dict[str, float] | None:
        """The targets' scale every hospital trains with (regression: the consortium's mean and
        standard deviation), from each hospital's sums over its training targets; agreed once per run."""
        saved = self.run_dir / "target_scale.json"
        if not self.task.agrees_scale:
            return None
        if saved.is_file():
            return json.loads(saved.read_text())
        summaries, failures = gather({h: self.hospitals[h].summarize_targets.remote() for h in hospitals}, self.config.run.round_timeout_s)
        require_quorum(self.config, 0, summaries, failures)
        scale = self.task.scale([summaries[h] for h in sorted(summaries)])
        atomic_write_json(saved, scale)
        return scale

    def _check_builds(self, hospitals: list[str]) -> None:
        """Every hospital built the model the driver did, with the same code: one whose versions
        differ would train another model under the same name."""
        reports, failures = gather({h: self.hospitals[h].model_report.remote() for h in hospitals}, self.config.run.round_timeout_s)
        require_quorum(self.config, 0, reports, failures)
        own = build_versions(self.config, self.study_dir)
        shape, personal = self.input_shape, self.personal
        # One build of the global model; only a narrower hospital's (HeteroFL) is built apart.
        layouts = admission.model_layouts(self.config, shape, layout_of(self.model.build(shape), personal), self.task.output_size, personal)
        expected = {h: {**own, "layout": layout_digest(layouts[h])} for h in reports}
        differ = {h: {k: (v, expected[h].get(k)) for k, v in r.items() if expected[h].get(k) != v} for h, r in sorted(reports.items())}
        differ = {h: d for h, d in differ.items() if d}
        if differ:
            lines = "\n".join(f"  - {h}: " + "; ".join(f"{k} {theirs} (driver: {mine})" for k, (theirs, mine) in d.items()) for h, d in differ.items())
            raise DeploymentError(f"hospitals built the model with other code than the driver:\n{lines}\nInstall the same versions everywhere")
        record_builds(self.run_dir, own)  # refuses code that differs from what the run began with

    def _trusted_root(self) -> Hospital:
        """FLTrust's reference: the driver's own trusted data, read, checked and prepared in this
        process exactly as a hospital's is."""
        cfg = self.config
        root = HospitalConfig(name=TRUSTED, data=cfg.robust.trusted_data, work_dir=str(self.run_dir / TRUSTED))
        config = dataclasses.replace(cfg, hospitals=(*cfg.hospitals, root)).with_paths_from(self.started_in)
        trusted = Hospital(TRUSTED, config, self.run_id)
        try:
            counts = trusted.load()
        except DataError as e:
            raise DataError(f"robust.trusted_data: {e}") from None
        shape = trusted.prepare(self.preprocessing, self.scale)
        if shape != self.input_shape:
            raise DataError(f"robust.trusted_data: its inputs have shape {shape}, the hospitals' {self.input_shape}")
        saved, now = self.run_dir / "trusted.json", counts.fingerprints
        if saved.is_file() and json.loads(saved.read_text()) != now:
            raise CheckpointError(f"robust.trusted_data: {cfg.robust.trusted_data} changed since the run began; restore it or start a new run")
        atomic_write_json(saved, now)
        return trusted
