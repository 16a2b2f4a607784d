"""The driver: a durable pipeline of stages over the hospital actors.

Stages: open the run directory, validate data at each hospital, harmonize, train rounds
(configure, fit, aggregate, evaluate, checkpoint), finish. Each stage's result is a file in the
run directory, and the run directory is the run's identity: running the same config on it again
continues after the last checkpointed round and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from fedward.actors.hospital import Hospital
from fedward.actors.pool import HostedHospital, InProcessHospital, start_in_process, start_pool
from fedward.actors.remote import check_placement, start_hospital
from fedward.data_adapters.harmonize import merge_summaries
from fedward.components import build_versions, load_component
from fedward.config import FedwardConfig, HospitalConfig, config_diff, config_hash, config_identity, config_to_dict
from fedward.errors import AggregationError, CheckpointError, DataError, DeploymentError, QuorumError
from fedward.files import atomic_write_json
from fedward.seeds import derived_seed
from fedward.tasks import build_task
from fedward.types import DataCounts, Layout, RoundPlan, SealedUpdate, Update
from fedward.models.flat import layout_digest, layout_of
from fedward.models.networks import check_factory
from fedward import aggregation
from fedward.pipelines import admission, compatibility, inbound, records
from fedward.pipelines.calls import arrivals, gather
from fedward.pipelines.global_model import GlobalModel
from fedward.pipelines.handover import Handover, explanation_due, models_out, subgroups_due
from fedward.checkpoint import RunCheckpoint, load_checkpoint, read_metrics, save_checkpoint
from fedward.pipelines.selection import Selection
from fedward.pipelines.manifest import record_builds, record_data, record_invocation
from fedward.strategies import build_strategy
from fedward.privacy import dp_fedavg
from fedward.privacy.hooks import Ask, build_hook
from fedward.privacy.ledger import SPEND_LOG, build_ledger, dp_sgd_steps, over_budget, read_spend, record_spend, spend_entries, spent



class _BudgetSpent(Exception):
    """The next round would exceed a configured privacy budget."""


def _wire_bytes(message: Any) -> int:
    """What a message costs on the wire: its pickled size, as Ray sends it."""
    return len(pickle.dumps(message, protocol=5))


TRUSTED = "trusted_root"  # FLTrust's trusted data, at the driver
READY_TIMEOUT_S = 5.0  # how long the check for restarted hospitals waits for a busy one
RESTART_WAIT_S = 60.0  # and for one Ray is restarting
MAX_ROUNDS_LATE = 3  # a straggler's update older than this is dropped, and the hospital asked again
def pooled(config: FedwardConfig, address: str | None) -> bool:
    """Whether the hospitals share a pool of worker processes: a simulation's way, never a cluster's."""
    if address and config.run.hosting in ("pool", "in_process"):
        where = "on shared workers" if config.run.hosting == "pool" else "in the driver's process"
        raise DeploymentError(
            f"run.hosting: {config.run.hosting} puts hospitals together {where}, which only a simulation does; on a cluster "
            f"each hospital runs on the node holding its data: set run.hosting to auto or per_hospital"
        )
    return address is None and config.run.hosting != "per_hospital"


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
        self.wire_form = "compressed" if config.compression.kind != "none" else self.hook.form  # how updates arrive
        self.hospitals: dict[str, ray.actor.ActorHandle | HostedHospital | InProcessHospital] = {}
        self.processes: list[ray.actor.ActorHandle] = []  # the hospitals' actors, or the pool's workers
        self.counts: dict[str, DataCounts] = {}
        self.start_sent: dict[str, int] = {}
        self.expected: dict[str, Layout] = {}  # each hospital's update layout, once training starts
        self.preprocessing: dict | None = None  # the agreed preprocessing spec (tables), once harmonized
        self.trusted: Hospital | None = None  # FLTrust: the driver's trusted data
        self.input_shape: tuple[int, ...] = ()  # one sample's shape, once hospitals prepared
        self.personal: frozenset[str] = frozenset()  # the model's entries that stay at each hospital, once prepared
        self.pending: dict[str, tuple[int, ray.ObjectRef]] = {}
        self.quarantine_logged: list[str] = []  # hospital -> (round, its update still on the way)

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
        self.selection = self._selection_after(ckpt.round if ckpt else 0)
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
            if self.config.run.hosting == "in_process":
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
            self._require_quorum(0, shapes, failures)
            self.input_shape = next(iter(shapes.values()))
            self.personal = self.model.keep_personal(self.input_shape)
            dp_units = {h: self._dp_units(h) for h in sorted(shapes)} if self.config.privacy.dp_sgd.enabled else {}
            self.model.check(self.input_shape, dp_units)
            self._check_builds(sorted(shapes))
            self.trusted = self._trusted_root() if self.config.robust.rule == "fltrust" else None
            # Key set-up bytes count toward the first round run in this invocation.
            self.hook.start(sorted(shapes), self._asker(0, {}, self.start_sent))
            weights, layout, last = self._train(shapes, ckpt)
            weights, chosen = self.selection.chosen(self.run_dir, self.config.train, weights, last)  # the model the run hands on
            self._rejoin(sorted(shapes), last)  # a hospital lost after the last round still gets its own model
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

    def _check_space(self, before: str) -> None:
        """Stop before work whose results could not be saved, not after."""
        free = shutil.disk_usage(self.run_dir).free / 2**20
        if free < self.config.run.min_free_mb:
            raise CheckpointError(
                f"{self.run_dir}: {free:.0f} MiB free, below run.min_free_mb={self.config.run.min_free_mb:g}; stopped {before}. "
                f"Checkpointed rounds are kept: free space and run again to resume"
            )

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
        self._check_space("before starting")

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
        self._require_quorum(0, counts, failures)
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
        self._require_quorum(0, summaries, failures)
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
        self._require_quorum(0, summaries, failures)
        scale = self.task.scale([summaries[h] for h in sorted(summaries)])
        atomic_write_json(saved, scale)
        return scale

    def _check_builds(self, hospitals: list[str]) -> None:
        """Every hospital built the model the driver did, with the same code: one whose versions
        differ would train another model under the same name."""
        reports, failures = gather({h: self.hospitals[h].model_report.remote() for h in hospitals}, self.config.run.round_timeout_s)
        self._require_quorum(0, reports, failures)
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

    def _dp_units(self, hospital: str) -> int:
        c = self.counts[hospital]
        return c.train_patients if self.config.privacy.dp_sgd.unit == "patient" else c.train_examples

    def _train(self, shapes: dict[str, tuple[int, ...]], ckpt: RunCheckpoint | None) -> tuple[np.ndarray, Layout, int]:
        """Rounds from the checkpoint on; returns the weights, their layout and the last round done."""
        cfg = self.config
        if len(set(shapes.values())) != 1:
            raise DataError(f"hospitals prepared inputs of different shapes: {shapes}")
        rng = np.random.default_rng(cfg.run.seed)
        if ckpt is None:
            weights, layout = self.model.initial_weights(next(iter(shapes.values())))
            start = 1
        else:
            weights, layout, start = ckpt.weights, ckpt.layout, ckpt.round + 1
            self.strategy.load_state_dict(ckpt.strategy_state)
            rng.bit_generator.state = ckpt.rng_state
            self._restore_hospitals(sorted(shapes), ckpt.round)
            if self.trusted is not None:  # its own layers (FedBN, FedPer) as they were
                self.trusted.restore(ckpt.round)
        self.strategy.start(self.model.build(next(iter(shapes.values()))), layout)
        self.expected = admission.expected_layouts(cfg, self.strategy, next(iter(shapes.values())), layout, self.task.output_size, self.personal)
        trusted_change = self._trusted_change if self.trusted is not None else None
        self.inbound = inbound.steps(cfg, self.hook, layout.size, trusted_change, self.log)
        records.truncate_metrics(self.run_dir, start - 1)
        self.selection = self._selection_after(start - 1)
        self._write_ledger()
        last = start - 1
        bar = tqdm(range(start, cfg.run.rounds + 1), desc=cfg.run.name, unit="round", disable=not self.progress, file=sys.stderr)
        for round in bar:
            if self.selection.stopped_after is not None:
                break
            self._check_space(f"before round {round}")
            began, began_at = time.monotonic(), time.time()
            quarantined = self._quarantined()
            available = [h for h in sorted(shapes) if h not in quarantined]
            result = self._round_with_retries(round, available, weights, layout, rng)
            if result is None:
                break
            weights, record = result
            record["quarantined"] = quarantined
            record["started"] = began_at  # wall clock (Unix time): when, not only how long
            record["seconds"] = round_seconds = time.monotonic() - began
            records.append_metrics(self.run_dir, record)
            if "validation" in record and self.selection.observe(self.run_dir, cfg.train, round, record["validation"], weights):
                self.log(f"validation {self.task.headline()} has not improved for {cfg.train.patience} rounds since round "
                         f"{self.selection.best_round}: training stops after round {round}")
            save_checkpoint(
                self.run_dir,
                RunCheckpoint(round, weights, layout, self.strategy.state_dict(), rng.bit_generator.state, self.digest),
            )
            self._write_ledger()
            last = round
            headline = self.task.headline()
            bar.set_postfix({headline: f"{record['pooled'].get(headline, float('nan')):.3f}", "s": f"{round_seconds:.1f}"})
        return weights, layout, last

    def _admitted(self, round: int, arriving: Iterator[tuple[str, Any]], sent: dict[str, int], failures: dict[str, str], updates: dict[str, Any]) -> Iterator[Update | SealedUpdate]:
        """Updates as they arrive and pass admission. Each is also kept in `updates`: whole where
        it is in the clear, and where it is sealed only its counts and metrics, once passed on."""
        for h, answer in arriving:
            sent[h] = sent.get(h, 0) + _wire_bytes(answer)
            try:
                update = admission.admitted(round, h, answer, self.expected[h], self.wire_form, self.counts[h].train_examples)
            except admission.Refused as why:
                failures[h] = str(why)
                continue
            updates[h] = update if isinstance(update, Update) else dataclasses.replace(update, payload=None)
            yield update

    def _late_updates(self, round: int, failures: dict[str, str]) -> dict[str, tuple[Update, int]]:
        """Updates of earlier rounds that arrived since (`run.stale_weight` > 0), checked as for
        their own round; with that round. One more than MAX_ROUNDS_LATE rounds late is dropped."""
        arrived = {}
        ready, _ = ray.wait([ref for _, ref in self.pending.values()], num_returns=len(self.pending), timeout=0) if self.pending else ([], [])
        for h in sorted(self.pending):
            sent_in, ref = self.pending[h]
            if ref not in ready:
                if round - sent_in > MAX_ROUNDS_LATE:
                    ray.cancel(ref)
                    del self.pending[h]
                    failures[h] = f"its update of round {sent_in} is more than {MAX_ROUNDS_LATE} rounds late; dropped"
                continue
            del self.pending[h]
            try:
                update = ray.get(ref)
            except ray.exceptions.RayError as e:
                failures[h] = f"its late update of round {sent_in} failed: {type(e).__name__}"
                continue
            try:
                arrived[h] = (admission.admitted(sent_in, h, update, self.expected[h], self.wire_form, self.counts[h].train_examples), sent_in)
            except admission.Refused as why:
                failures[h] = f"its late update of round {sent_in} was {why}"
        return arrived

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

    def _trusted_change(self, round: int, weights: np.ndarray, layout: Layout) -> np.ndarray:
        cfg = self.config
        plan = RoundPlan(round, TRUSTED, derived_seed(cfg.run.seed, round, TRUSTED), cfg.train.local_epochs, cfg.train.lr_at(round, cfg.run.rounds))
        return self.trusted.fit(plan, weights, layout).delta

    def _rejoin(self, hospitals: list[str], last: int) -> list[str]:
        """Hospitals whose process Ray restarted since round `last` (it died) come back: each
        reloads its data, which must be what the run began with, rebuilds its model and restores
        its own state of round `last`. Returns those that rejoined."""
        cfg, timeout = self.config, self.config.run.round_timeout_s
        ready = self._ready([h for h in hospitals if h not in self.pending])
        fresh = sorted(h for h, is_ready in ready.items() if not is_ready)
        if not fresh:
            return []
        counts, failures = gather({h: self.hospitals[h].load.remote(False) for h in fresh}, cfg.run.data_timeout_s)
        same = [h for h, c in counts.items() if c.fingerprints == self.counts[h].fingerprints]
        failures.update({h: "its data changed since the run began" for h in counts if h not in same})
        prepared, more = gather({h: self.hospitals[h].prepare.remote(self.preprocessing, self.scale) for h in same}, timeout)
        failures.update(more)
        restored, more = gather({h: self.hospitals[h].restore.remote(last) for h in prepared}, timeout)
        failures.update(more)
        back = sorted(restored)
        for h in back:
            self.log(f"{h} was restarted after its process died; it reloaded its data and its state of round {restored[h] or 0} and rejoins")
        for h, why in sorted(failures.items()):
            self.log(f"{h} was restarted after its process died but cannot rejoin yet: {why}")
        if back:  # the hook's keys died with the process: set up afresh, with every hospital that may take part
            self.hook.start(sorted(h for h in hospitals if h not in failures), self._asker(last + 1, {}, self.start_sent))
        return back

    def _ready(self, hospitals: list[str]) -> dict[str, bool]:
        """Which hospitals hold their data and model. One still busy with a timed-out task is not
        waited for long; one Ray is restarting is asked again until it is up, within RESTART_WAIT_S."""
        busy_until, up_until = time.monotonic() + READY_TIMEOUT_S, time.monotonic() + RESTART_WAIT_S
        answers: dict[str, bool] = {}
        asking = hospitals
        while asking:
            refs = {h: self.hospitals[h].ready.remote() for h in asking}
            done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=max(0.0, busy_until - time.monotonic()))
            asking = []
            for h, ref in refs.items():
                if ref not in done:
                    ray.cancel(ref)
                    continue
                try:
                    answers[h] = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:
                    asking.append(h)
                except ray.exceptions.RayError:
                    pass  # gone for good, or failing: its round's tasks will say why
            if asking and time.monotonic() < up_until:
                time.sleep(0.5)
                busy_until = time.monotonic() + READY_TIMEOUT_S
            else:
                break
        return answers

    def _quarantined(self) -> list[str]:
        """Hospitals flagged in `robust.quarantine_after` rounds so far: they are asked no more.
        Read from the metric records, so a resumed run quarantines exactly as an uninterrupted one."""
        after = self.config.robust.quarantine_after
        if not after:
            return []
        counts: dict[str, int] = {}
        for record in read_metrics(self.run_dir / "metrics.jsonl"):
            for h in record.get("flagged", []):
                counts[h] = counts.get(h, 0) + 1
        out = sorted(h for h, n in counts.items() if n >= after)
        for h in sorted(set(out) - set(self.quarantine_logged)):
            self.log(f"{h} is quarantined: flagged in {after} rounds, it is asked no more")
        self.quarantine_logged = out
        if len(self.counts) - len(out) < self.config.run.min_hospitals:
            raise QuorumError(0, self.config.run.min_hospitals, {h: "quarantined" for h in out},
                              "quarantine leaves too few hospitals for the quorum; a resume would quarantine them again")
        return out

    def _round_with_retries(self, round: int, available: list[str], weights: np.ndarray, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict] | None:
        """A round, tried again when its aggregation fails or too few hospitals answer (after
        `run.quorum_wait_s`, for restarted ones to come back); None when the privacy budget ends training."""
        cfg = self.config.run
        state = rng.bit_generator.state  # a retry selects the same hospitals
        rejoined: list[str] = []
        for attempt in range(cfg.round_retries + 1):
            rng.bit_generator.state = state
            try:
                rejoined += self._rejoin(available, round - 1)
                weights, record = self._round(round, available, weights, layout, rng, attempt)
                return weights, {**record, "rejoined": sorted(set(rejoined))}
            except _BudgetSpent as spent:
                self.log(f"privacy budget: {spent}; training stops after round {round - 1}")
                self._write_ledger(stopped=f"before round {round}: {spent}")
                return None
            except (AggregationError, QuorumError) as e:
                if attempt == cfg.round_retries:
                    ending = f"round {round} failed {attempt + 1} times. Checkpointed rounds are kept; run again to resume"
                    if isinstance(e, QuorumError):
                        raise QuorumError(round, e.needed, e.failures, ending) from None
                    raise AggregationError(f"{ending}. Last: {e}") from None
                self.log(f"round {round}: {e}; trying again ({attempt + 1} of {cfg.round_retries})")
                if isinstance(e, QuorumError):
                    time.sleep(cfg.quorum_wait_s)

    def _write_ledger(self, stopped: str | None = None) -> None:
        records = read_metrics(self.run_dir / "metrics.jsonl")
        ledger = build_ledger(self.config, self.hook.describe(), records, read_spend(self.run_dir / SPEND_LOG), stopped)
        atomic_write_json(self.run_dir / "privacy.json", ledger)

    def _restore_hospitals(self, hospitals: list[str], round: int) -> None:
        restored, failures = gather({h: self.hospitals[h].restore.remote(round) for h in hospitals}, self.config.run.round_timeout_s)
        fresh = sorted(h for h, r in restored.items() if r is None)
        self.log(f"resuming {self.config.run.name} after round {round}; hospital state restored at "
                 f"{ {h: r for h, r in sorted(restored.items()) if r is not None} }" + (f", none yet at {fresh}" if fresh else ""))
        for name, why in sorted(failures.items()):
            self.log(f"hospital {name} could not restore its state: {why}")

    def _asker(self, round: int, failures: dict[str, str], sent: dict[str, int]) -> Ask:
        """The hook's channel to hospitals; counts the bytes each answer carries."""

        def ask(requests: Mapping[str, Any]) -> Mapping[str, Any]:
            answers, silent = gather({h: self.hospitals[h].hook_respond.remote(round, r) for h, r in requests.items()}, self.config.run.round_timeout_s)
            failures.update(silent)
            for h, answer in answers.items():
                sent[h] = sent.get(h, 0) + _wire_bytes(answer)
            return answers

        return ask

    def _round(self, round: int, available: list[str], weights: np.ndarray, layout: Layout, rng: np.random.Generator, attempt: int = 0) -> tuple[np.ndarray, dict]:
        cfg, timeout = self.config, self.config.run.round_timeout_s
        available = [h for h in available if h not in self.pending]  # one still working on a late update is not asked
        plans = self.strategy.configure_round(round, available, rng)
        spend_log = self.run_dir / SPEND_LOG
        units = {p.hospital: self._dp_units(p.hospital) for p in plans} if cfg.privacy.dp_sgd.enabled else {}
        exceeded = over_budget(cfg, read_spend(spend_log), spend_entries(cfg, round, attempt, [p.hospital for p in plans], units))
        if exceeded:
            raise _BudgetSpent(exceeded)
        failures: dict[str, str] = {}
        sent, self.start_sent = self.start_sent, {}
        ask = self._asker(round, failures, sent)
        setups = self.hook.setup(round, {p.hospital: dp_fedavg.aggregation_weight(cfg, self.counts[p.hospital].train_examples) for p in plans}, ask)
        for p in plans:
            if p.hospital not in setups:
                failures.setdefault(p.hospital, "left out at the privacy hook's set-up")
        record_spend(spend_log, spend_entries(cfg, round, attempt, sorted(setups), units))  # before any training
        weights_ref = ray.put(weights)  # broadcast once through the object store
        extra = self.strategy.broadcast()
        extra_ref = None if extra is None else ray.put(extra)
        late: dict[str, ray.ObjectRef] | None = {} if cfg.run.stale_weight > 0 else None
        futures = {p.hospital: self.hospitals[p.hospital].fit.remote(p, weights_ref, layout, setups[p.hospital], extra_ref) for p in plans if p.hospital in setups}
        arriving = arrivals(futures, timeout, failures, late)
        updates: dict[str, Any] = {}
        try:  # a hook that sums adds each update as it arrives
            combined = self.hook.combine(round, self._admitted(round, arriving, sent, failures, updates))
        except AggregationError:
            self._require_quorum(round, updates, failures)  # too few arrived: say so, not how the sum failed
            raise
        finally:
            arriving.close()
        arrived = self._late_updates(round, failures)
        self.pending.update({h: (round, ref) for h, ref in (late or {}).items()})
        state = inbound.Arrived(round, weights, layout, updates, arrived, combined, failures, set(setups), units, ask)
        for step in self.inbound:
            step.apply(state)
        updates, aggregated, trust = state.updates, state.aggregated, state.trust
        new = self.strategy.aggregate(round, weights, aggregated, failures)
        weights = weights if new is None else new
        new_ref = ray.put(weights)
        evaluations, eval_failures = gather({h: self.hospitals[h].evaluate.remote(round, new_ref, layout) for h in available}, timeout)
        validation = self._validation(round, available, new_ref, layout) if cfg.train.validation_fraction > 0 else None
        for name, why in sorted({**failures, **eval_failures}.items()):
            self.log(f"round {round}: hospital {name} failed: {why}")
        record = {
            "round": round,
            "participants": sorted(updates),
            "failures": failures,
            "hospitals": {h: records.evaluation_record(e, updates[h].metrics.get("train_loss") if h in updates else None) for h, e in sorted(evaluations.items())},
            # A round whose evaluations all failed still trained; it just has no figures.
            "pooled": self.task.pool(list(evaluations.values())) if evaluations else {},
            "evaluation_failures": eval_failures,
            "privacy": self._privacy_record(updates, sent, len(plans)),
            # How far each change lies from the others, for spotting a faulty or hostile hospital
            # (only where changes arrive in the clear).
            # A late change was made from older weights: it would look far off for that alone.
            "anomaly": (anomaly := aggregation.anomaly_scores([u for h, u in updates.items() if isinstance(u, Update) and h not in arrived], layout.size)),
            "flagged": aggregation.flagged(anomaly, cfg.robust.flag_distance),
            "trust": trust,  # FLTrust's weight for each hospital's change
            # Late updates counted in this round, with their own round (an update of this round that
            # arrived while the round was retried is no late one).
            "late": {h: r for h, (_, r) in arrived.items() if r < round},
        }
        if self.strategy.keeps_own_models:
            record["personal"] = self._personal_record(round, available)
        if validation is not None:
            record["validation"] = validation
        return weights, record

    def _selection_after(self, round: int) -> Selection:
        """Model selection as it stood after `round`, replayed from the checkpointed rounds' records."""
        path = self.run_dir / "metrics.jsonl"
        records = [r for r in read_metrics(path) if r["round"] <= round] if round and path.is_file() else []
        return Selection.replayed(self.task.headline(), self.config.train, records)

    def _validation(self, round: int, hospitals: list[str], weights_ref: ray.ObjectRef, layout: Layout) -> dict:
        """The new global model on each hospital's validation part, pooled: what model selection reads."""
        answers, failures = gather({h: self.hospitals[h].evaluate_validation.remote(round, weights_ref, layout) for h in hospitals},
                                   self.config.run.round_timeout_s)
        return {
            "hospitals": {h: records.figures(e) for h, e in sorted(answers.items())},
            "pooled": self.task.pool(list(answers.values())) if answers else {},
            "failures": failures,
        }

    def _personal_record(self, round: int, hospitals: list[str]) -> dict:
        """Each hospital's own model (Ditto) on its held-out split, beside the global one's figures."""
        answers, failures = gather({h: self.hospitals[h].evaluate_personal.remote(round) for h in hospitals}, self.config.run.round_timeout_s)
        evaluations = {h: e for h, e in sorted(answers.items()) if e is not None}
        return {
            "hospitals": {h: records.figures(e) for h, e in evaluations.items()},
            "pooled": self.task.pool(list(evaluations.values())) if evaluations else {},
            "failures": failures,
        }

    def _privacy_record(self, updates: Mapping[str, Any], sent: Mapping[str, int], planned: int) -> dict:
        """This round's facts for the privacy ledger, as the optimizers and protocols reported them."""
        cfg = self.config
        record: dict[str, Any] = {"form": self.hook.form, "sent_bytes": dict(sorted(sent.items())), "protocol": self.hook.describe()}
        if cfg.privacy.dp_sgd.enabled:
            record["dp_sgd"] = {h: asdict(dp_sgd_steps(u.metrics)) for h, u in sorted(updates.items())}
        if cfg.privacy.dp_fedavg.enabled:
            central = self.hook.reveals_individual_updates
            record["dp_fedavg"] = {
                "participants": sorted(updates),
                "steps": asdict(dp_fedavg.round_steps(cfg)),
                "clip_norm": cfg.privacy.dp_fedavg.clip_norm,
                "noise": "central" if central else "distributed",
                "noise_shares": None if central else dp_fedavg.noise_shares(cfg, self.hook.fewest_contributors(planned)),
            }
        if cfg.privacy.dp_sgd.enabled or cfg.privacy.dp_fedavg.enabled:
            record["epsilon"] = spent(cfg, read_spend(self.run_dir / SPEND_LOG))  # by the end of this round, retries included
        return record

    def _require_quorum(self, round: int, answered: Mapping[str, Any], failures: Mapping[str, str]) -> None:
        if len(answered) < self.config.run.min_hospitals:
            raise QuorumError(round, self.config.run.min_hospitals, failures)
