"""One hospital: its data, its copy of the model, its own state. A plain class.

It becomes a Ray actor only in `actors/remote.py`, so tests build it directly. Everything it
returns is an `Update`, an `Evaluation`, counts or summary statistics: raw data, per-patient
scores and file names stay in its own work area (`work_dir`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from blake3 import blake3
from torch import nn

from fedward.actors import attacks, outbound
from fedward.data_adapters.dicom import load_dicom
from fedward.data_adapters.harmonize import PreprocessingSpec, TableSummary, summarize
from fedward.data_adapters.report import DataReport
from fedward.data_adapters.samples import Samples
from fedward.data_adapters.splits import split_by_patient
from fedward.data_adapters.tables import load_table
from fedward.explain.summary import ConsortiumExplanation, ExplanationSummary
from fedward.components import build_versions
from fedward.config import DATA_ROOT_ENV, FedwardConfig, HospitalConfig
from fedward.errors import DataError, DeploymentError, HospitalError
from fedward.files import atomic_torch_save, atomic_write_json
from fedward.policy import SPEND_LOG, HospitalPolicy, load_policy, policy_file
from fedward import approval, outflows, release, subgroups
from fedward.audit import AUDIT_LOG, AuditLog, Release, releases
from fedward.seeds import derived_seed
from fedward.tasks import Task, build_task
from fedward.types import DataCounts, Evaluation, GroupBins, Layout, RoundPlan, SealedUpdate, Update
from fedward.models.flat import flatten, layout_digest, layout_of, load_flat
from fedward import width
from fedward.models import device as devices, export, training
from fedward.models.networks import build_model
from fedward.strategies import build_strategy
from fedward.strategies.base import LocalRound, LocalTraining, Strategy
from fedward.privacy import dp_fedavg, dp_sgd, ledger
from fedward.privacy.accounting import GaussianSteps, epsilon
from fedward.privacy.hooks import AggregationHook, Trust, build_hook
from fedward.certificates import Identity
from fedward.pooling import POOLED_DIGITS, EvaluationKey, EvaluationKeyOffer, PaddedSum

if TYPE_CHECKING:
    from fedward.explain.local import LocalExplanation


def data_folder(own: HospitalConfig) -> Path:
    """The hospital's data folder on this node: as configured, or NAME under the node's data root."""
    if own.data is not None:
        return Path(own.data).expanduser()
    root = os.environ.get(DATA_ROOT_ENV)
    if not root:
        raise DeploymentError(
            f"{own.name}: hospitals.{own.name}.data is not set and this node has no {DATA_ROOT_ENV}; start the "
            f"hospital's Ray node with {DATA_ROOT_ENV}=/its/data/root (holding the folder {own.name}) or set the data path"
        )
    return Path(root).expanduser() / own.name


KEEP_STATES = 3  # rounds of hospital state kept, so a driver resuming a little behind finds its round


class Hospital:
    def __init__(self, name: str, config: FedwardConfig, run_id: str):
        """`run_id` names the run in the hospital's own area (run name and config hash), so two
        runs that share a name never share or prune each other's state."""
        self.name = name
        self.config = config
        self.run_id = run_id
        self.hook: AggregationHook | None = None  # built once it has read its policy and data, which it relies on
        # The study's task and strategy, imported only once its policy allows their code (load).
        self.task: Task | None = None
        self.strategy: Strategy | None = None
        self.local: LocalTraining | None = None  # the strategy's hospital half, with what it keeps here
        self.scale: dict[str, float] | None = None  # the targets' scale the consortium agreed (regression)
        self.samples: Samples | None = None
        self.train_idx = self.holdout_idx = self.validation_idx = np.zeros(0, np.int64)
        self.model: nn.Module | None = None
        self.personal: frozenset[str] = frozenset()
        self.preprocessing: PreprocessingSpec | None = None
        self.device = torch.device("cpu")  # resolved once prepared, in its own process
        self.explanation: LocalExplanation | None = None
        self.residual: np.ndarray | None = None  # top-k compression: what its updates have not sent yet
        self._private_steps: dict[str, float] = {}  # what DP-SGD did in the current round, for the ledger
        self.fine_tuned: nn.Module | None = None  # the global model fine-tuned here after the last round
        self._fitted: int | None = None  # the last round this hospital trained in
        self.notes: dict[str, str] = {}  # the data report's problems that cost no sample
        self.policy = HospitalPolicy()  # its own, read from its node when it loads its data
        self._audit: AuditLog | None = None  # signed once its policy names its identity

    # -- data -------------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return data_folder(self.config.hospital(self.name))

    @property
    def work_dir(self) -> Path:
        own = self.config.hospital(self.name)
        return Path(own.work_dir).expanduser() if own.work_dir else self.data_dir / ".fedward"

    @property
    def run_dir(self) -> Path:
        return self.work_dir / "runs" / self.run_id

    @cached_property
    def evaluation_key(self) -> EvaluationKey:
        self._loaded()  # its policy, which names whom it shares the key with, is read with its data
        identity, roster = self._consortium()
        return EvaluationKey(self.name, self.run_id, self.run_dir, identity, roster)

    def _consortium(self) -> tuple[Identity | None, frozenset[str] | None]:
        """In cross-site mode, the identity it signs with and the roster of hospitals it deals with
        (its own policy's); none in one trust domain."""
        consortium = self.policy.consortium
        if consortium is None:
            return None, None
        if self.name not in consortium.roster:
            raise HospitalError(f"{self.name}: its policy ({self.policy.source}) has a consortium roster {sorted(consortium.roster)} without it")
        return Identity(consortium.identity, self.name), consortium.roster

    def deployment_problem(self) -> str | None:
        """What keeps this hospital from reading its data on this node, if anything."""
        try:
            folder = self.data_dir
        except DeploymentError as e:
            return str(e)
        return None if folder.is_dir() else f"{self.name}: data folder {folder} does not exist on this node"

    @releases("data counts")
    def load(self, record: bool = True) -> DataCounts:
        """Read and check the data, split it by patient; only counts leave the hospital.

        With `record`, the data report and the split are written to the hospital's area; a later
        reader of a finished run (explain-patient) loads without rewriting them.
        """
        problem = self.deployment_problem()
        if problem:
            raise DeploymentError(problem)
        # Its own policy, read here and trusted over the shipped config: refused before any data is read.
        self.policy = load_policy(policy_file(self.work_dir), self.data_dir)
        self.policy.require(self.config, self.name)
        self._import_study()
        report = DataReport(self.name)
        data = self.config.data
        attributes = self.config.subgroups.attributes
        if data.kind == "table":
            samples = load_table(self.data_dir, data.table, report, attributes=attributes, task=self.task)
        else:
            dp = self.config.privacy.dp_sgd
            samples = load_dicom(self.data_dir, data.dicom, report, cache_dir=self.work_dir / "cache", attributes=attributes, task=self.task,
                                 require_patient_id=dp.enabled and dp.unit == "patient")
        if record:
            report.write(self.run_dir / "data_report.json")
        self.notes = report.notes
        usable, lacking = len(samples), self.task.unusable(samples.labels)
        if usable < data.min_samples or lacking:
            found = self.task.target_counts(samples.labels) or f"{len(np.unique(samples.labels))} different values"
            needs = " and ".join([f"at least data.min_samples={data.min_samples} usable samples", *([lacking] if lacking else [])])
            raise DataError(
                f"{self.name}: {usable} usable samples with targets {found}; joining needs {needs}. Skipped per reason: "
                f"{report.counts()}; details in the hospital's report {self.run_dir / 'data_report.json'}"
            )
        self.samples = samples
        self.train_idx, self.holdout_idx = split_by_patient(
            samples.patient_ids, self.task.strata(samples.labels), data.holdout_fraction, self.config.run.seed
        )
        self.validation_idx = np.zeros(0, np.int64)
        if self.config.train.validation_fraction > 0:  # model selection's part of the training patients, by patient too
            fit, check = split_by_patient(
                samples.patient_ids[self.train_idx], self.task.strata(samples.labels[self.train_idx]), self.config.train.validation_fraction,
                derived_seed(self.config.run.seed, 0, f"{self.name}/validation"),
            )
            self.train_idx, self.validation_idx = self.train_idx[fit], self.train_idx[check]
        ids = np.asarray(samples.sample_ids)
        split = {"train": ids[self.train_idx].tolist(), "holdout": ids[self.holdout_idx].tolist()}
        if len(self.validation_idx):
            split["validation"] = ids[self.validation_idx].tolist()
        if record:
            atomic_write_json(self.run_dir / "split.json", split)
        trust = self._trust()
        self._audit = AuditLog(self.work_dir / AUDIT_LOG, self.name, trust.identity)
        self.hook = build_hook(self.config, self.name, self.run_id, trust)
        return DataCounts(
            hospital=self.name,
            train_examples=len(self.train_idx),
            holdout_examples=len(self.holdout_idx),
            train_patients=len(np.unique(samples.patient_ids[self.train_idx])),
            holdout_patients=len(np.unique(samples.patient_ids[self.holdout_idx])),
            targets=release.counts(self.task.target_counts(samples.labels), self.policy.release_floor),
            skipped=release.counts(report.counts(), self.policy.release_floor),
            fingerprint=samples.fingerprint,
            split_fingerprint=hashlib.sha256("\n".join(sorted(split["holdout"])).encode()).hexdigest(),
            validation_examples=len(self.validation_idx),
        )

    def _import_study(self) -> None:
        """Import the study's code: in cross-site mode only code its operator approved, by a digest
        it computes itself before importing anything."""
        study_dir = self.config.run.study_dir
        code = None
        if self.policy.consortium is not None:
            approval.keep_bytecode_out(self.work_dir / "bytecode")
            code = approval.study_code(self.config, study_dir)
            approval.require_approved(code, policy_file(self.work_dir), self.name, self.run_dir / "study_code.json")
        if self.task is None:
            self.task = build_task(self.config.task, study_dir)
            self.strategy = build_strategy(self.config, study_dir)
            self.local = self.strategy.local()
        approval.check_imported(code, study_dir, self.name)

    def _trust(self) -> Trust:
        """What its half of the aggregation protocol relies on: its own policy and data."""
        weight = dp_fedavg.aggregation_weight(self.config, len(self.train_idx))
        record = self.work_dir / "masking_unmasked.jsonl"
        identity, roster = self._consortium()
        fewest = self.policy.consortium.fewest_hospitals if identity else None
        return Trust(weight=weight, colluders=self.policy.colluders, fewest=fewest, roster=roster, identity=identity, record=record)

    def record_release(self, what: str, args: tuple, result: Any) -> None:
        """Its audit log's entry for `result`, about to leave for the driver as `what`."""
        round = next((a.round if isinstance(a, RoundPlan) else a for a in args
                      if isinstance(a, RoundPlan) or (isinstance(a, int) and not isinstance(a, bool))), None)
        protection = outflows.protection(what)
        if what == "model update, every round":
            p = self.config.privacy
            protection = f"sent {self.hook.form}" + "".join(
                f"; {name}" for name, on in (("DP-FedAvg: clipped, with its noise share", p.dp_fedavg.enabled and not self.hook.reveals_individual_updates),
                                             ("DP-FedAvg: clipped, noised by the driver", p.dp_fedavg.enabled and self.hook.reveals_individual_updates),
                                             ("trained under DP-SGD", p.dp_sgd.enabled)) if on)
        if self._audit is None:  # released before it loaded and read its policy: unsigned
            self._audit = AuditLog(self.work_dir / AUDIT_LOG, self.name)
        self._audit.record(Release(self.run_id, round, what, "the driver", protection), result)

    def ready(self) -> bool:
        """Whether it holds its data and model: not in a process Ray has just restarted."""
        return self.model is not None

    @releases("feature summaries for harmonization (tables), before round 1")
    def summarize(self) -> TableSummary | None:
        """Summary statistics of the training split for federated harmonization (tables only)."""
        if self.config.data.kind != "table":
            return None
        return summarize(self._loaded().features.take(self.train_idx), self.config.data.table, self.name)

    @releases("target sums (regression), before round 1")
    def summarize_targets(self) -> dict[str, float] | None:
        """The task's sums over the training split's targets, for the scale the hospitals agree on
        (regression: count, sum, sum of squares); None when the task needs none."""
        return self.task.summary(self._loaded().labels[self.train_idx])

    def prepare(self, preprocessing: dict | None, scale: dict[str, float] | None = None) -> tuple[int, ...]:
        """Apply the agreed preprocessing and target scale and build the local model, whose
        personal layers its own strategy names; returns one sample's shape."""
        samples = self._loaded()
        self.preprocessing = PreprocessingSpec.from_dict(preprocessing) if preprocessing is not None else None
        x = self.preprocessing.apply(samples.features) if self.preprocessing else samples.features
        self.x = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        self.scale = scale
        self.y = self.task.tensor(samples.labels, scale)
        self.device = devices.resolve(self.config.hospital(self.name).gpus, self.name)  # in its own process: what Ray granted it
        if self.device.type != "cpu":  # in its own log: a resume on another device changes the weights (docs/gpus.md)
            precision = self.config.train.precision
            # Before compute capability 8.0 torch emulates bfloat16: it runs, slower than float32.
            slow = precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False)
            print(f"{self.name}: trains on {self.device} ({torch.cuda.get_device_name(self.device)}) in {precision}"
                  + ("; this GPU emulates bfloat16, slower than fp32: fp16 is its fast precision" if slow else ""), file=sys.stderr, flush=True)
        self._fresh_state()  # personal layers start the same on every resume
        self.personal = self.strategy.personal_keys(self.model)
        return tuple(self.x.shape[1:])

    @releases("build report, before round 1")
    def model_report(self) -> dict[str, object]:
        """What this hospital built its model with (versions, the study code's provenance), from
        its own installation: the driver stops a run whose hospitals disagree."""
        layout = layout_of(self.model, self.personal)
        return {**build_versions(self.config, self.config.run.study_dir), "layout": layout_digest(layout)}

    def _loaded(self) -> Samples:
        if self.samples is None:
            raise HospitalError(f"{self.name}: data not loaded; the pipeline calls load() first")
        return self.samples

    # -- training and evaluation ------------------------------------------------------------------

    @releases("model update, every round")
    def fit(self, plan: RoundPlan, weights: np.ndarray, layout: Layout, hook_setup: Any = None, broadcast: Any = None) -> Update | SealedUpdate:
        """Train on the global weights as the strategy's hospital half does and return the change,
        protected as the run's privacy asks. `broadcast` is what the strategy's driver half sends
        every hospital (SCAFFOLD's control variate)."""
        if self._fitted is not None and plan.round <= self._fitted:
            self._rewind(plan.round)
        if self.config.privacy.dp_fedavg.enabled:
            self._charge_hospital_level(plan.round)
        # Until the round's state is saved, a failure leaves the hospital to rewind in whatever round comes next.
        self._fitted = sys.maxsize
        weights, layout = self._own(weights, layout)  # a narrower hospital trains its slice of the global model
        start = _digest(weights, layout)
        model = self._model_with(weights, layout)
        self._private_steps = {}
        round = LocalRound(plan, weights, layout, model, _TrainingSplit(self), broadcast)
        metrics = {**self.local.train(round), **self._private_steps}
        flat, shared = flatten(model, self.personal)
        n = len(self.train_idx)
        update = Update(
            round=plan.round,
            hospital=self.name,
            delta=flat - weights,
            layout=shared,
            num_examples=n,
            weight=dp_fedavg.aggregation_weight(self.config, n),
            metrics=metrics,
        )
        update = self.local.finish(round, update, flat)
        buffers = frozenset(n for n, _ in self.model.named_buffers())
        sending = outbound.Sending(plan.round, plan.seed, hook_setup, layout.size, buffers, start, self.residual)
        sent = outbound.send(update, outbound.steps(self.config, self.hook, self.name, self.policy.colluders), sending)
        self.residual = sending.residual
        self._save_state(plan.round)
        self._fitted = plan.round
        return sent

    def _train(self, model: nn.Module, plan: RoundPlan, *, epochs: int | None = None, seed: int | None = None, **options: Any) -> float:
        """Local training on the training split (its targets flipped by a simulated attacker), or
        DP-SGD's accounted steps; the strategy's `options` go to `models.training.train`."""
        x, y = self.x[self.train_idx], attacks.training_targets(self.config.attack, self.name, self.y[self.train_idx], self.task)
        dp = self.config.privacy.dp_sgd
        if not dp.enabled:
            return training.train(
                model, x, y, epochs=epochs or plan.local_epochs, lr=plan.lr, seed=plan.seed if seed is None else seed,
                config=self.config.train, task=self.task, **options,
            )
        if epochs is not None or seed is not None or options or self._private_steps:
            raise HospitalError(f"{self.name}: DP-SGD accounts for one round of plain local epochs, not {self.config.strategy.name}'s extra training")
        units = self.dp_units()
        planned = dp_sgd.plan_round(self.config, int(units.max()) + 1)
        self._charge_own_budget(plan.round, planned)
        done = dp_sgd.train_private(model, x, y, units, planned, lr=plan.lr, config=self.config.train, max_grad_norm=dp.max_grad_norm, task=self.task)
        # What the optimizer did, for the ledger's accountant: these leave the hospital.
        self._private_steps = {
            "dp_sgd_steps": float(done.steps),
            "dp_sgd_sample_rate": done.sample_rate,
            "dp_sgd_noise_multiplier": done.noise_multiplier,
            "dp_sgd_units": float(done.units),
        }
        return done.loss

    def _charge_hospital_level(self, round: int) -> None:
        """Hospital-level DP's spend, kept here too: a hospital refuses the round that would take
        it past the run's budget, whatever the driver's own accounts say."""
        entry = self._within_run_budget("hospital", round, dp_fedavg.round_steps(self.config), self.config.privacy.dp_fedavg.epsilon)
        ledger.record_spend(self.run_dir / ledger.SPEND_LOG, [entry])

    def _within_run_budget(self, level: str, round: int, steps: GaussianSteps, budget: float | None) -> dict:
        """This round's spend entry at `level`, not yet recorded; refused when, with every earlier
        charge of the run (retries and redone rounds included), it would pass the run's `budget`."""
        entry = {"round": round, "hospital": self.name, "level": level, "steps": asdict(steps)}
        after = ledger.spent(self.config, [*ledger.read_spend(self.run_dir / ledger.SPEND_LOG), entry])[level][self.name]
        if ledger.exceeds(after, budget):
            raise HospitalError(f"{self.name}: round {round} would raise its {level}-level epsilon to {after:.3f}, above its budget {budget:g}; it refuses to train")
        return entry

    def _charge_own_budget(self, round: int, planned: GaussianSteps) -> None:
        """The hospital keeps its own accounts and refuses to train past a budget, whatever the
        driver asks: the run's (from its config), and its policy's over every run on its data."""
        entry = self._within_run_budget("patient", round, planned, self.config.privacy.dp_sgd.epsilon)
        budget, every = self.policy.budget, self.policy.spend_log or self.work_dir / SPEND_LOG
        if budget is not None:
            # Every run's spend on this source, from whichever export of it the run read.
            source = self.policy.data_source
            spent = [GaussianSteps(**e["steps"]) for e in ledger.read_spend(every) if e.get("source", HospitalPolicy.data_source) == source]
            total = epsilon([*spent, planned], budget.delta)
            if ledger.exceeds(total, budget.epsilon):
                raise HospitalError(
                    f"{self.name}: round {round} would raise its patients' epsilon over every run on {source} to {total:.3f}, above "
                    f"the budget {budget.epsilon:g} of its policy ({self.policy.source}); it refuses to train"
                )
            ledger.record_spend(every, [{**entry, "run": self.run_id, "source": source, "data": str(self.data_dir)}])
        ledger.record_spend(self.run_dir / ledger.SPEND_LOG, [entry])

    def dp_units(self) -> np.ndarray:
        """The privacy unit of each training sample: its patient, or itself."""
        if self.config.privacy.dp_sgd.unit == "sample":
            return np.arange(len(self.train_idx))
        return np.unique(self._loaded().patient_ids[self.train_idx], return_inverse=True)[1]

    def evaluate(self, round: int, weights: np.ndarray, layout: Layout) -> Evaluation:
        return self.evaluate_model(self._model_with(weights, layout), round)

    def evaluate_validation(self, round: int, weights: np.ndarray, layout: Layout) -> Evaluation:
        """The model on the validation part of the training split, which model selection reads."""
        if not len(self.validation_idx):
            raise HospitalError(f"{self.name}: no validation part; train.validation_fraction is 0")
        return self.evaluate_model(self._model_with(weights, layout), round, self.validation_idx)

    @releases("evaluation in the clear, every round")
    def evaluate_model(self, model: nn.Module, round: int, rows: np.ndarray | None = None) -> Evaluation:
        """What this hospital releases of `model` on its held-out split (or `rows`), under its own
        release floor; its exact statistics go only padded."""
        rows = self.holdout_idx if rows is None else rows
        outputs, y = training.outputs(model, self.x[rows]), self.y[rows]
        floor = self.policy.release_floor
        released = self.task.release(outputs, y, self.scale, patients=self._loaded().patient_ids[rows], floor=floor)
        # Without the key (a hospital built outside a run) it adds nothing to the pooled figures.
        padded = self.evaluation_key.pad(self.task.statistics(outputs, y, self.scale)) if self.evaluation_key.ready else None
        if released is None:
            return Evaluation(round, self.name, len(rows), {}, {}, padded, held_back=release.held_back(floor))
        return Evaluation(round, self.name, len(rows), released.figures, released.statistics, padded)

    # -- the evaluation key (fedward/pooling.py) ---------------------------------------------------

    @releases("aggregation protocol messages")
    def evaluation_public_key(self) -> EvaluationKeyOffer:
        return self.evaluation_key.public()

    @releases("aggregation protocol messages")
    def evaluation_deal(self, offers: dict[str, EvaluationKeyOffer]) -> dict[str, bytes]:
        return self.evaluation_key.deal(offers)

    def evaluation_accept(self, dealer: EvaluationKeyOffer, sealed: bytes) -> None:
        self.evaluation_key.accept(dealer, sealed)

    @releases("evaluation statistics, every round")
    def open_pooled(self, summed: PaddedSum) -> dict:
        """The pooled figures of hospitals' padded statistics, rounded; nothing else of the sum leaves."""
        return release.rounded(self.task.pooled(self.evaluation_key.open(summed), self.policy.release_floor), POOLED_DIGITS)

    @releases("figures per patient group (`subgroups:`)")
    def open_group_pooled(self, summed: PaddedSum) -> dict:
        """A patient group's pooled figures (fedward/subgroups.py), as `open_pooled`."""
        return release.rounded(subgroups.pooled_figures(self.evaluation_key.open(summed), self.config.subgroups.threshold), POOLED_DIGITS)

    @releases("figures per patient group (`subgroups:`)")
    def evaluate_subgroups(self, weights: np.ndarray, layout: Layout) -> GroupBins:
        """The model's score bins per patient group of the held-out split; groups too small
        to hide their patients stay here."""
        samples, held_out = self._loaded(), self.holdout_idx
        missing = [f"subgroups.{name}" for name in self.config.subgroups.attributes if name not in samples.attributes]
        if missing:
            raise DataError(f"{self.name}: {'; '.join(self.notes.get(m, f'{m}: not in the data') for m in missing)}")
        scores = self.task.probabilities(training.outputs(self._model_with(weights, layout), self.x[held_out]))
        groups = subgroups.group_labels({k: v[held_out] for k, v in samples.attributes.items()}, self.config.subgroups)
        key = self.evaluation_key if self.evaluation_key.ready else None
        return subgroups.at_hospital(self.name, scores, samples.labels[held_out], samples.patient_ids[held_out], groups, self.config.subgroups, key)

    def _rewind(self, round: int) -> None:
        """A round asked again (a retry) starts from the hospital's state before it, not from where
        its first try left its personal layers, control variate or personal model."""
        if self.restore(round - 1) is None:
            self._fresh_state()

    def _fresh_state(self) -> None:
        torch.manual_seed(self.config.run.seed)  # as prepare() built it: personal layers start the same
        self.model = self._build()
        self.residual = None
        self.local.reset()

    def train_own_copy(self, round: int, weights: np.ndarray, layout: Layout, epochs: int, purpose: str) -> Evaluation:
        """A copy of the model from `weights`, trained on this hospital's data alone and evaluated
        on its held-out split: fine-tuning of the global model, or a local-only model from the
        initial weights. A fine-tuned model becomes the hospital's own model for export."""
        if purpose == "local_only":  # a model of its own from the start: no federated personal layers either
            torch.manual_seed(self.config.run.seed)
            model = self._build()
            load_flat(model, *self._own(weights, layout), self.personal)
        else:
            model = copy.deepcopy(self._model_with(weights, layout))
        training.train(model, self.x[self.train_idx], self.y[self.train_idx], epochs=epochs, lr=self.config.train.lr,
                       seed=derived_seed(self.config.run.seed, round, f"{self.name}/{purpose}"), config=self.config.train, task=self.task)
        if purpose == "fine_tuned":
            self.fine_tuned = model
        return self.evaluate_model(model, round)

    def evaluate_personal(self, round: int) -> Evaluation | None:
        """The hospital's own model (Ditto's personal one) on its held-out split; None when it keeps none."""
        own = self.local.own_model()
        return None if own is None else self.evaluate_model(own, round)

    # -- explanations -----------------------------------------------------------------------------

    @releases("explanation aggregates (`explain:`)")
    def explain(self, round: int, weights: np.ndarray, layout: Layout) -> ExplanationSummary:
        """SHAP of the global model on this hospital's held-out patients; only aggregates return."""
        model = self._model_with(weights, layout)
        from fedward.explain.local import explain_at_hospital  # shap: loaded by the hospitals that explain, when they do

        model = copy.deepcopy(model).cpu() if self.device.type != "cpu" else model  # SHAP runs beside the data, on the CPU
        self.explanation = explain_at_hospital(self, model, round, derived_seed(self.config.run.seed, round, self.name))
        return self.explanation.summary

    def write_report(self, identity: dict, metrics: list[dict], consortium: ConsortiumExplanation) -> str:
        """The hospital's own report with its patients' explanations, written in its own area."""
        if self.explanation is None:
            raise HospitalError(f"{self.name}: nothing explained yet; the pipeline calls explain() first")
        from fedward.explain.report import write_hospital_report  # matplotlib: once, at the end of the run

        path = write_hospital_report(
            self.run_dir / "report",
            hospital=self.name,
            run_dir_identity=identity,
            metrics=metrics,
            summary=self.explanation.summary,
            patients=self.explanation.patients,
            consortium=consortium,
        )
        return str(path)

    def export_model(self, round: int, weights: np.ndarray, layout: Layout, run_id: str) -> str:
        """This hospital's own model written into its own area, beside the data it scores: its
        personal model (Ditto), the global model fine-tuned here, or the global weights with its
        personal layers. Only the folder's path returns to the driver."""
        own = [m for m in (self.local.own_model(), self.fine_tuned) if m is not None]
        model = own[0] if own else self._model_with(weights, layout)
        folder = export.export_model(
            self.run_dir / "model",
            model,
            model_config=self.config.model_for(self.name),
            input_shape=tuple(self.x.shape[1:]),
            preprocessing=self.preprocessing.to_dict() if self.preprocessing else None,
            data_config=self.config.data,
            kind="personalized",
            hospital=self.name,
            run_id=run_id,
            round=round,
            task=self.config.task,
            scale=self.scale,
            study_dir=self.config.run.study_dir,
        )
        return str(folder)

    def _build(self) -> nn.Module:
        model = build_model(self.config.model_for(self.name), tuple(self.x.shape[1:]), self.task.output_size, self.config.run.study_dir)
        return model.to(self.device)  # built on the CPU, as every hospital's is: its initial weights do not depend on the device

    def _model_with(self, weights: np.ndarray, layout: Layout) -> nn.Module:
        load_flat(self.model, *self._own(weights, layout), self.personal)
        return self.model

    def _own(self, weights: np.ndarray, layout: Layout) -> tuple[np.ndarray, Layout]:
        """The global weights as this hospital's model holds them: all of them, or at a narrower
        width (HeteroFL) the leading corner of each tensor."""
        if self.model is None:
            raise HospitalError(f"{self.name}: model not prepared; the pipeline calls prepare() first")
        if self.config.hospital(self.name).model.get("width", 1.0) == 1:
            return weights, layout  # load_flat checks that they fit exactly
        own = layout_of(self.model, self.personal)
        return width.take(weights, layout, own), own

    # -- the hospital's own state -----------------------------------------------------------------

    def _state_path(self, round: int) -> Path:
        return self.run_dir / "state" / f"round_{round:04d}.pt"

    def _save_state(self, round: int) -> None:
        # Personal layers and counters (e.g. BatchNorm's) live only here; the driver never sees them.
        # The strategy's own state here (a control variate, a personal model) is the hospital's, like its layers.
        kept = self.local.state_dict()
        clash = sorted(set(kept) & {"round", "model", "residual"})
        if clash:
            raise HospitalError(f"{self.name}: the strategy's hospital half keeps state under {clash}, names the hospital's own state uses")
        state = {"round": round, "model": self.model.state_dict(), **kept}
        if self.residual is not None:
            state["residual"] = torch.from_numpy(self.residual)
        atomic_torch_save(state, self._state_path(round))
        for old in sorted(self._state_path(0).parent.glob("round_*.pt"))[:-KEEP_STATES]:
            old.unlink()

    def restore(self, round: int) -> int | None:
        """Reload the newest own state saved at or before `round` (a hospital not asked in a round
        saved none for it); returns that state's round, or None for a hospital with no state yet."""
        saved = sorted(self._state_path(0).parent.glob("round_*.pt"))
        usable = [p for p in saved if int(p.stem.removeprefix("round_")) <= round]
        if not usable:
            return None
        state = torch.load(usable[-1], weights_only=True, map_location="cpu")  # saved on whatever device it trained on
        self.model.load_state_dict(state["model"])
        self.residual = state["residual"].numpy().copy() if "residual" in state else None
        self.local.load_state_dict(state, self.model)
        return state["round"]

    @releases("aggregation protocol messages")
    def hook_respond(self, round: int, request: Any) -> Any:
        """The hospital's part in an aggregation protocol (set-up, unmasking, decryption)."""
        if self.hook is None:
            raise HospitalError(f"{self.name}: data not loaded; the pipeline calls load() first")
        return self.hook.respond(round, request)


def _digest(weights: np.ndarray, layout: Layout) -> str:
    """What a round's change is trained from, whatever the round's number or seed: the weights this
    hospital trains (its slice of them) and their layout, -0.0 as 0.0, which train the same."""
    digest = blake3(repr((layout.names, layout.shapes)).encode())
    digest.update(np.ascontiguousarray(weights + np.float32(0)).tobytes())
    return digest.hexdigest()


class _TrainingSplit:
    """A hospital's training split as its strategy's hospital half trains on it (`Trainer`)."""

    def __init__(self, hospital: Hospital):
        self.hospital = hospital

    def train(self, model: nn.Module, plan: RoundPlan, **options: Any) -> float:
        return self.hospital._train(model, plan, **options)

    def steps(self, epochs: int) -> int:
        return training.local_steps(len(self.hospital.train_idx), epochs, self.hospital.config.train.batch_size)
