"""The rounds of a run, and the faults between them.

`Rounds.run` goes on from the checkpoint: each round asks the hospitals the strategy picks, admits
and combines their updates as they arrive (pipelines/admission.py, the privacy hook, the steps of
pipelines/inbound.py), aggregates, evaluates the new model at every hospital (and on their
validation parts), writes the round's record and checkpoint, and follows model selection. Between
rounds it retries a round whose aggregation failed or fell short of its quorum (with the same
hospitals drawn), brings back hospitals whose process Ray restarted, quarantines hospitals flagged
too often, counts late updates in the round they arrive in, and stops where a privacy budget or
`train.patience` ends training.
"""

from __future__ import annotations

import dataclasses
import pickle
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from fedward import aggregation
from fedward.actors.hospital import Hospital
from fedward.checkpoint import RunCheckpoint, read_metrics, save_checkpoint
from fedward.config import FedwardConfig, TrainConfig
from fedward.errors import AggregationError, DataError, QuorumError
from fedward.files import atomic_write_json
from fedward.pipelines import admission, inbound, records
from fedward.pipelines.calls import arrivals, gather, pooled_figures, require_quorum
from fedward.pipelines.global_model import GlobalModel
from fedward.pipelines.selection import Selection
from fedward.privacy import dp_fedavg
from fedward.privacy.hooks import AggregationHook, Ask
from fedward.privacy.ledger import SPEND_LOG, build_ledger, dp_sgd_steps, over_budget, read_spend, record_spend, spend_entries, spent
from fedward.seeds import derived_seed
from fedward.strategies import Strategy
from fedward.tasks import Task
from fedward.types import DataCounts, Layout, RoundPlan, SealedUpdate, Update

TRUSTED = "trusted_root"  # FLTrust's trusted data, at the driver
READY_TIMEOUT_S = 5.0  # how long the check for restarted hospitals waits for a busy one
RESTART_WAIT_S = 60.0  # and for one Ray is restarting
MAX_ROUNDS_LATE = 3  # a straggler's update older than this is dropped, and the hospital asked again


class _BudgetSpent(Exception):
    """The next round would exceed a configured privacy budget."""


def wire_bytes(message: Any) -> int:
    """What a message costs on the wire: its pickled size, as Ray sends it."""
    return len(pickle.dumps(message, protocol=5))


def privacy_units(config: FedwardConfig, counts: DataCounts) -> int:
    """A hospital's DP-SGD privacy units: its training patients, or its training samples."""
    return counts.train_patients if config.privacy.dp_sgd.unit == "patient" else counts.train_examples


def selection_after(run_dir: Path, task: Task, train: TrainConfig, round: int) -> Selection:
    """Model selection as it stood after `round`, replayed from the checkpointed rounds' records."""
    path = run_dir / "metrics.jsonl"
    kept = [r for r in read_metrics(path) if r["round"] <= round] if round and path.is_file() else []
    return Selection.replayed(task.headline(), train, kept)


class Rounds:
    def __init__(self, config: FedwardConfig, *, run_dir: Path, digest: str, hospitals: Mapping[str, Any], counts: Mapping[str, DataCounts],
                 hook: AggregationHook, strategy: Strategy, task: Task, model: GlobalModel, trusted: Hospital | None,
                 preprocessing: dict | None, scale: dict[str, float] | None, progress: bool, log: Callable[[str], None]):
        self.config, self.run_dir, self.digest, self.hospitals, self.counts = config, run_dir, digest, hospitals, counts
        self.hook, self.strategy, self.task, self.model, self.trusted = hook, strategy, task, model, trusted
        self.preprocessing, self.scale, self.progress, self.log = preprocessing, scale, progress, log
        self.personal = model.personal
        self.wire_form = "compressed" if config.compression.kind != "none" else hook.form  # how updates arrive
        self.start_sent: dict[str, int] = {}  # the hook's set-up bytes, counted toward the next round
        self.expected: dict[str, Layout] = {}  # each hospital's update layout, once training starts
        self.inbound: list[inbound.Step] = []
        self.pending: dict[str, tuple[int, ray.ObjectRef]] = {}  # hospital -> (round, its update still on the way)
        self.quarantine_logged: list[str] = []
        self.selection = selection_after(run_dir, task, config.train, 0)

    def run(self, shapes: dict[str, tuple[int, ...]], ckpt: RunCheckpoint | None) -> tuple[np.ndarray, Layout, int]:
        """Rounds from the checkpoint on; returns the weights, their layout and the last round done."""
        cfg = self.config
        # Key set-up bytes count toward the first round run in this invocation.
        self.hook.start(sorted(shapes), self._asker(0, {}, self.start_sent))
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
        self.selection = selection_after(self.run_dir, self.task, self.config.train, start - 1)
        self._write_ledger()
        last = start - 1
        bar = tqdm(range(start, cfg.run.rounds + 1), desc=cfg.run.name, unit="round", disable=not self.progress, file=sys.stderr)
        for round in bar:
            if self.selection.stopped_after is not None:
                break
            records.check_space(self.run_dir, cfg.run.min_free_mb, f"before round {round}")
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

    def _round_with_retries(self, round: int, available: list[str], weights: np.ndarray, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, dict] | None:
        """A round, tried again when its aggregation fails or too few hospitals answer (after
        `run.quorum_wait_s`, for restarted ones to come back); None when the privacy budget ends training."""
        cfg = self.config.run
        state = rng.bit_generator.state  # a retry selects the same hospitals
        rejoined: list[str] = []
        for attempt in range(cfg.round_retries + 1):
            rng.bit_generator.state = state
            try:
                rejoined += self.rejoin(available, round - 1)
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

    def _round(self, round: int, available: list[str], weights: np.ndarray, layout: Layout, rng: np.random.Generator, attempt: int = 0) -> tuple[np.ndarray, dict]:
        cfg, timeout = self.config, self.config.run.round_timeout_s
        available = [h for h in available if h not in self.pending]  # one still working on a late update is not asked
        plans = self.strategy.configure_round(round, available, rng)
        spend_log = self.run_dir / SPEND_LOG
        units = {p.hospital: privacy_units(self.config, self.counts[p.hospital]) for p in plans} if cfg.privacy.dp_sgd.enabled else {}
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
            require_quorum(self.config, round, updates, failures)  # too few arrived: say so, not how the sum failed
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
            "pooled": pooled_figures(self.hospitals, evaluations, timeout),
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

    def _admitted(self, round: int, arriving: Iterator[tuple[str, Any]], sent: dict[str, int], failures: dict[str, str], updates: dict[str, Any]) -> Iterator[Update | SealedUpdate]:
        """Updates as they arrive and pass admission. Each is also kept in `updates`: whole where
        it is in the clear, and where it is sealed only its counts and metrics, once passed on."""
        for h, answer in arriving:
            sent[h] = sent.get(h, 0) + wire_bytes(answer)
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

    def _trusted_change(self, round: int, weights: np.ndarray, layout: Layout) -> np.ndarray:
        cfg = self.config
        plan = RoundPlan(round, TRUSTED, derived_seed(cfg.run.seed, round, TRUSTED), cfg.train.local_epochs, cfg.train.lr_at(round, cfg.run.rounds))
        return self.trusted.fit(plan, weights, layout).delta

    def rejoin(self, hospitals: list[str], last: int) -> list[str]:
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
                sent[h] = sent.get(h, 0) + wire_bytes(answer)
            return answers

        return ask

    def _validation(self, round: int, hospitals: list[str], weights_ref: ray.ObjectRef, layout: Layout) -> dict:
        """The new global model on each hospital's validation part, pooled: what model selection reads."""
        answers, failures = gather({h: self.hospitals[h].evaluate_validation.remote(round, weights_ref, layout) for h in hospitals},
                                   self.config.run.round_timeout_s)
        return {
            "hospitals": {h: records.figures(e) for h, e in sorted(answers.items())},
            "pooled": pooled_figures(self.hospitals, answers, self.config.run.round_timeout_s),
            "failures": failures,
        }

    def _personal_record(self, round: int, hospitals: list[str]) -> dict:
        """Each hospital's own model (Ditto) on its held-out split, beside the global one's figures."""
        answers, failures = gather({h: self.hospitals[h].evaluate_personal.remote(round) for h in hospitals}, self.config.run.round_timeout_s)
        evaluations = {h: e for h, e in sorted(answers.items()) if e is not None}
        return {
            "hospitals": {h: records.figures(e) for h, e in evaluations.items()},
            "pooled": pooled_figures(self.hospitals, evaluations, self.config.run.round_timeout_s),
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
            fewest = self.hook.fewest_contributors(planned)
            record["dp_fedavg"] = {
                "participants": sorted(updates),
                "steps": asdict(dp_fedavg.round_steps(cfg)),
                "clip_norm": cfg.privacy.dp_fedavg.clip_norm,
                "noise": "central" if central else "distributed",
                "noise_shares": None if central else dp_fedavg.noise_shares(cfg, fewest),
                "fewest": None if central else fewest,
                # Each hospital sizes its share for the colluders its own policy assumes, and says how many.
                "colluders_assumed": {h: int(u.metrics.get("dp_fedavg_colluders", 0)) for h, u in sorted(updates.items())},
            }
        if cfg.privacy.dp_sgd.enabled or cfg.privacy.dp_fedavg.enabled:
            record["epsilon"] = spent(cfg, read_spend(self.run_dir / SPEND_LOG))  # by the end of this round, retries included
        return record
