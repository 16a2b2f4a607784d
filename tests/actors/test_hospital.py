"""A Hospital built directly, without Ray: what it reads, keeps and returns."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from fedward.actors.hospital import Hospital
from fedward.data_adapters.harmonize import merge_summaries
from fedward.config import parse_config
from fedward.errors import DataError, DeploymentError, HospitalError
from fedward.release import ScoreBins
from fedward.types import RoundPlan
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from tests.conftest import ehr_config, image_config


def test_a_table_hospital_trains_and_returns_only_weights_counts_and_aggregates(demo_data, tmp_path):
    config = parse_config(ehr_config(demo_data, tmp_path))
    hospital = Hospital("hospital_a", config, "ehr-1")
    counts = hospital.load()
    assert counts.train_examples + counts.holdout_examples == 900
    assert counts.skipped == {}
    spec = merge_summaries([hospital.summarize()], config.data.table).to_dict()
    shape = hospital.prepare(spec)
    weights, layout = flatten(build_model(config.model, shape))

    update = hospital.fit(RoundPlan(1, "hospital_a", seed=5, local_epochs=1, lr=0.01), weights, layout)
    assert update.delta.dtype == np.float32 and update.delta.shape == weights.shape
    assert update.layout == layout and update.num_examples == update.weight == counts.train_examples
    trained, _ = flatten(hospital.model)
    assert np.array_equal(update.delta, trained - weights) and np.abs(update.delta).max() > 0
    again = hospital.fit(RoundPlan(1, "hospital_a", seed=5, local_epochs=1, lr=0.01), weights, layout)
    assert np.array_equal(again.delta, update.delta)  # same plan, same weights: reproducible

    evaluation = hospital.evaluate(1, weights + update.delta, layout)
    bins = ScoreBins.of(evaluation.statistics)  # in the clear: score bins of at least 10 patients of each outcome
    assert bins.positive.sum() + bins.negative.sum() == counts.holdout_examples and (bins.positive >= 10).all() and (bins.negative >= 10).all()
    assert 0.0 <= evaluation.figures["auroc"] <= 1.0 and evaluation.padded is None  # no evaluation key outside a run
    assert hospital.restore(1) == 1  # its own state for round 1 was saved in its own area
    assert hospital.restore(3) == 1  # a hospital not asked in rounds 2 and 3 resumes from round 1
    assert hospital.restore(0) is None
    report = json.loads((tmp_path / "sites" / "hospital_a" / "runs" / "ehr-1" / "data_report.json").read_text())
    assert report["used"] == 900


def test_an_image_hospital_splits_by_patient(demo_data, tmp_path):
    config = parse_config(image_config(demo_data, tmp_path))
    hospital = Hospital("hospital_b", config, "images-1")
    counts = hospital.load()
    assert counts.train_examples + counts.holdout_examples == 300
    patients = hospital.samples.patient_ids
    assert not set(patients[hospital.train_idx]) & set(patients[hospital.holdout_idx])
    assert counts.train_patients + counts.holdout_patients == len(set(patients))
    assert hospital.prepare(None) == (1, 64, 64)


def test_missing_folder_and_too_few_samples_are_refused_with_the_reason(demo_data, tmp_path):
    raw = ehr_config(demo_data, tmp_path)
    raw["hospitals"][0]["data"] = str(tmp_path / "nowhere")
    with pytest.raises(DeploymentError, match="nowhere does not exist on this node"):
        Hospital("hospital_a", parse_config(raw), "ehr-1").load()

    small = tmp_path / "small"
    small.mkdir()
    lines = (demo_data / "hospital_a" / "ehr.csv").read_text().splitlines()
    (small / "ehr.csv").write_text("\n".join(lines[:31]) + "\n")
    raw["hospitals"][0]["data"] = str(small)
    with pytest.raises(DataError, match=r"30 usable samples .* data.min_samples=50"):
        Hospital("hospital_a", parse_config(raw), "ehr-1").load()


def test_without_a_configured_path_a_hospital_reads_its_folder_under_its_nodes_data_root(demo_data, tmp_path, monkeypatch):
    raw = ehr_config(demo_data, tmp_path)
    del raw["hospitals"][1]["data"], raw["hospitals"][1]["work_dir"]
    hospital = Hospital("hospital_b", parse_config(raw), "ehr-1")
    monkeypatch.delenv("FEDWARD_DATA_ROOT", raising=False)
    assert "this node has no FEDWARD_DATA_ROOT" in hospital.deployment_problem()
    with pytest.raises(DeploymentError, match="hospitals.hospital_b.data is not set"):
        hospital.load()

    monkeypatch.setenv("FEDWARD_DATA_ROOT", str(tmp_path / "other_site"))  # another machine's root: no hospital_b there
    assert hospital.deployment_problem() == f"hospital_b: data folder {tmp_path / 'other_site' / 'hospital_b'} does not exist on this node"
    root = tmp_path / "site_b"
    (root / "hospital_b").mkdir(parents=True)
    shutil.copy(demo_data / "hospital_b" / "ehr.csv", root / "hospital_b")
    monkeypatch.setenv("FEDWARD_DATA_ROOT", str(root))
    assert hospital.deployment_problem() is None
    counts = hospital.load()
    assert counts.train_examples + counts.holdout_examples == 700
    assert (root / "hospital_b" / ".fedward" / "runs" / "ehr-1" / "data_report.json").is_file()


def test_a_hospital_under_dp_sgd_reports_its_steps_and_refuses_to_train_past_its_own_budget(demo_data, tmp_path):
    from fedward.errors import HospitalError
    from fedward.privacy import dp_sgd

    raw = ehr_config(demo_data, tmp_path)
    raw["privacy"] = {"dp_sgd": {"enabled": True, "noise_multiplier": 2.0, "epsilon": 0.8}}
    config = parse_config(raw)
    hospital = Hospital("hospital_a", config, "dp-1")
    counts = hospital.load()
    spec = merge_summaries([hospital.summarize()], config.data.table).to_dict()
    weights, layout = flatten(build_model(config.model, hospital.prepare(spec)))

    update = hospital.fit(RoundPlan(1, "hospital_a", seed=5, local_epochs=2, lr=0.05), weights, layout)
    planned = dp_sgd.plan_round(config, counts.train_patients)
    assert update.metrics["dp_sgd_steps"] == planned.steps == 2 * math.ceil(counts.train_patients / 32)
    assert update.metrics["dp_sgd_sample_rate"] == planned.sample_rate and update.metrics["dp_sgd_noise_multiplier"] == 2.0
    # A second round at this noise would cross 0.8: the hospital itself refuses, whatever the driver asks.
    with pytest.raises(HospitalError, match="hospital_a: round 2 would raise its patient-level epsilon to .* above its budget 0.8"):
        hospital.fit(RoundPlan(2, "hospital_a", seed=6, local_epochs=2, lr=0.05), weights, layout)
    log = tmp_path / "sites" / "hospital_a" / "runs" / "dp-1" / "privacy_spend.jsonl"
    assert len(log.read_text().splitlines()) == 1  # the refused round spent nothing


@pytest.mark.parametrize("name", ["fedper", "fedrep"])
def test_personal_layers_never_leave_the_hospital_and_come_back_after_a_restart(demo_data, tmp_path, name):
    import torch

    from fedward.strategies import STRATEGIES

    raw = ehr_config(demo_data, tmp_path)
    raw["strategy"] = {"name": name}
    config = parse_config(raw)
    strategy = STRATEGIES[name](config)
    hospital = Hospital("hospital_a", config, "fedper-1")
    hospital.load()
    spec = merge_summaries([hospital.summarize()], config.data.table).to_dict()
    shape = hospital.prepare(spec)
    personal = hospital.personal  # its own strategy's head, named by the hospital itself
    assert personal == strategy.personal_keys(build_model(config.model, shape))
    weights, layout = flatten(build_model(config.model, shape), personal)
    assert not set(layout.names) & personal

    initial = {k: v.clone() for k, v in hospital.model.state_dict().items() if k in personal}
    [plan] = strategy.configure_round(1, ["hospital_a"], np.random.default_rng(0))
    update = hospital.fit(plan, weights, layout)
    assert update.layout == layout and update.delta.size == layout.size  # the head is not in what leaves
    assert np.abs(update.delta).max() > 0  # the body trained (FedRep: after its head epochs)
    head = {k: v.clone() for k, v in hospital.model.state_dict().items() if k in personal}
    assert not all(torch.equal(initial[k], v) for k, v in head.items())
    restarted = Hospital("hospital_a", config, "fedper-1")  # a new actor: fresh model, own state on disk
    restarted.load()
    restarted.prepare(spec)
    assert not all(torch.equal(restarted.model.state_dict()[k], v) for k, v in head.items())
    assert restarted.restore(1) == 1
    assert all(torch.equal(restarted.model.state_dict()[k], v) for k, v in head.items())


def test_scaffold_at_a_hospital_starts_as_fedavg_then_corrects_its_drift(demo_data, tmp_path):
    from fedward.models.training import local_steps
    from fedward.strategies.scaffold import CONTROL

    raw = ehr_config(demo_data, tmp_path)
    raw["strategy"] = {"name": "scaffold"}
    raw["train"]["momentum"] = 0.0
    config = parse_config(raw)
    hospital = Hospital("hospital_a", config, "scaffold-1")
    counts = hospital.load()
    spec = merge_summaries([hospital.summarize()], config.data.table).to_dict()
    weights, layout = flatten(build_model(config.model, hospital.prepare(spec)))
    plan = RoundPlan(1, "hospital_a", seed=5, local_epochs=1, lr=0.05)

    fedavg = Hospital("hospital_a", parse_config({**raw, "strategy": {"name": "fedavg"}}), "fedavg-1")
    fedavg.load()
    fedavg.prepare(spec)
    plain = fedavg.fit(plan, weights, layout)  # FedAvg's round
    with pytest.raises(HospitalError, match="SCAFFOLD: the driver's control variate must be 1473 finite values, got NoneType"):
        hospital.fit(plan, weights, layout)
    zero = np.zeros(layout.size, np.float32)  # the MLP's layout holds parameters only
    first = hospital.fit(plan, weights, layout, broadcast=zero)
    assert first.layout.names[: len(layout.names)] == layout.names and first.layout.names[len(layout.names)] == CONTROL + layout.names[0]
    assert np.array_equal(first.delta[: layout.size], plain.delta)  # zero controls: exactly FedAvg
    steps = local_steps(counts.train_examples, 1, config.train.batch_size)
    np.testing.assert_allclose(first.delta[layout.size :], -plain.delta / (steps * 0.05), rtol=1e-5, atol=1e-7)
    assert np.array_equal(hospital.local.control, first.delta[layout.size :])  # c_i = 0 + its change

    after_first = hospital.local.control.copy()
    again = hospital.fit(plan, weights, layout, broadcast=zero)  # round 1 retried: from the state before it
    assert np.array_equal(again.delta, first.delta)
    second = hospital.fit(RoundPlan(2, "hospital_a", seed=5, local_epochs=1, lr=0.05), weights, layout, broadcast=zero)
    assert not np.allclose(second.delta[: layout.size], plain.delta)  # now c - c_i != 0 corrects the steps
    restarted = Hospital("hospital_a", config, "scaffold-1")
    restarted.load()
    restarted.prepare(spec)
    assert restarted.restore(1) == 1 and np.array_equal(restarted.local.control, after_first)


def test_ditto_keeps_a_personal_model_at_the_hospital_pulled_toward_the_global_one(demo_data, tmp_path):
    raw = ehr_config(demo_data, tmp_path)
    raw["strategy"] = {"name": "ditto"}
    config = parse_config(raw)
    hospital = Hospital("hospital_b", config, "ditto-1")
    hospital.load()
    spec = merge_summaries([hospital.summarize()], config.data.table).to_dict()
    weights, layout = flatten(build_model(config.model, hospital.prepare(spec)))
    assert hospital.evaluate_personal(0) is None

    plan = RoundPlan(1, "hospital_b", seed=5, local_epochs=2, lr=0.05)
    plain = Hospital("hospital_b", parse_config({**raw, "strategy": {"name": "fedavg"}}), "fedavg-1")
    plain.load()
    plain.prepare(spec)
    update = hospital.fit(plan, weights, layout)
    assert np.array_equal(update.delta, plain.fit(plan, weights, layout).delta) and update.layout == layout  # what leaves is FedAvg's, nothing personal
    personal = flatten(hospital.local.own_model())[0]
    assert not np.allclose(personal, weights + update.delta)  # a model of its own
    evaluation = hospital.evaluate_personal(1)
    assert evaluation.num_examples == len(hospital.holdout_idx) and 0.5 < evaluation.figures["auroc"] <= 1.0

    # A strong pull, from the hospital's own config, keeps the personal model at the global weights.
    strong = Hospital("hospital_b", parse_config({**raw, "strategy": {"name": "ditto", "ditto_lambda": 5.0}}), "ditto-5")
    strong.load()
    strong.prepare(spec)
    strong.fit(plan, weights, layout)
    pulled = np.abs(flatten(strong.local.own_model())[0] - weights).max()
    assert pulled < 0.5 * np.abs(personal - weights).max()

    restarted = Hospital("hospital_b", config, "ditto-1")
    restarted.load()
    restarted.prepare(spec)
    assert restarted.restore(1) == 1
    assert np.array_equal(flatten(restarted.local.own_model())[0], personal)


def test_model_selection_keeps_a_validation_part_of_the_training_patients_apart_from_both_splits(demo_data, tmp_path):
    raw = ehr_config(demo_data, tmp_path)
    raw["train"]["validation_fraction"] = 0.2
    hospital = Hospital("hospital_a", parse_config(raw), "validation-1")
    counts = hospital.load()
    plain = Hospital("hospital_a", parse_config(ehr_config(demo_data, tmp_path)), "plain-1")
    plain.load()
    assert np.array_equal(hospital.holdout_idx, plain.holdout_idx)  # the held-out split is the same patients
    assert sorted([*hospital.train_idx, *hospital.validation_idx]) == sorted(plain.train_idx)
    patients = hospital.samples.patient_ids
    assert not set(patients[hospital.validation_idx]) & (set(patients[hospital.train_idx]) | set(patients[hospital.holdout_idx]))
    assert counts.validation_examples == len(hospital.validation_idx) and 0.15 < counts.validation_examples / len(plain.train_idx) < 0.25
    assert counts.train_examples == len(hospital.train_idx)  # what the hospital trains on and is weighed by
