"""A pool worker built directly, without Ray: hospitals put to sleep on disk and woken again."""

from __future__ import annotations

import numpy as np
import pytest

from fedward.actors.hospital import Hospital
from fedward.actors.pool import HospitalWorker
from fedward.data_adapters.harmonize import merge_summaries
from fedward.config import parse_config
from fedward.types import RoundPlan
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from fedward.strategies import STRATEGIES
from tests.conftest import ehr_config


def test_a_sleeping_hospital_wakes_with_its_data_model_and_hook_and_trains_as_one_kept_in_memory(demo_data, tmp_path):
    raw = ehr_config(demo_data, tmp_path, name="pool")
    config = parse_config({**raw, "strategy": {"name": "fedper"}, "run": {**raw["run"], "resident_hospitals": 1}})
    worker = HospitalWorker(config, "pool-1", threads=1, resident=1)
    alone = Hospital("hospital_a", config, "pool-alone")
    names = ("hospital_a", "hospital_b")
    counts = {h: worker.call(h, "load") for h in names}
    assert worker.hosted() == {"awake": ["hospital_b"], "asleep": ["hospital_a"]}
    asleep = tmp_path / "sites" / "hospital_a" / "asleep" / "pool-1.pkl"
    assert asleep.is_file()
    assert alone.load().fingerprint == counts["hospital_a"].fingerprint

    spec = merge_summaries([worker.call(h, "summarize") for h in names], config.data.table).to_dict()
    shapes = {h: worker.call(h, "prepare", spec) for h in names}
    alone.prepare(spec)
    personal = alone.personal  # its head stays at each hospital
    assert personal == STRATEGIES["fedper"](config).personal_keys(alone.model)
    weights, layout = flatten(build_model(config.model, shapes["hospital_a"]), personal)
    hook = worker.hooks["hospital_a"]
    for round in (1, 2):
        plan = RoundPlan(round, "hospital_a", seed=round, local_epochs=1, lr=0.05)
        slept = worker.call("hospital_a", "fit", plan, weights, layout)
        worker.call("hospital_b", "fit", RoundPlan(round, "hospital_b", seed=round, local_epochs=1, lr=0.05), weights, layout)
        kept = alone.fit(plan, weights, layout)
        # Its personal head trained in round 1 went to disk and came back for round 2.
        assert np.array_equal(slept.delta, kept.delta) and slept.layout == kept.layout
        weights = weights + kept.delta
    assert worker.hosted()["asleep"] == ["hospital_a"] and asleep.is_file()
    assert worker.call("hospital_a", "ready") and not asleep.exists()  # woken: its sleeping copy is gone
    assert worker.awake["hospital_a"].hook is hook  # the same live hook, never written to disk


def test_the_simulation_pools_its_hospitals_and_a_cluster_never_does(demo_data, tmp_path):
    from fedward.errors import DeploymentError
    from fedward.pipelines.run import pooled

    def config(hosting: str):
        return parse_config(ehr_config(demo_data, tmp_path, hosting=hosting))

    assert pooled(config("auto"), None) and pooled(config("pool"), None)
    assert not pooled(config("per_hospital"), None)
    assert not pooled(config("auto"), "auto") and not pooled(config("per_hospital"), "ray://head:10001")
    with pytest.raises(DeploymentError, match="run.hosting: pool .* on a cluster each hospital runs on the node holding its data"):
        pooled(config("pool"), "auto")


def test_a_hospital_in_the_drivers_process_that_fails_costs_its_answer_with_a_reason_that_names_no_value(ray_session, demo_data, tmp_path, capsys):
    from fedward.actors.pool import start_in_process
    from fedward.errors import DataError
    from fedward.pipelines.calls import gather

    config = parse_config(ehr_config(demo_data, tmp_path, name="inprocess"))
    hospitals = start_in_process(config, "inprocess-1")
    hospitals["hospital_b"].hospital.load = lambda: {}["patient 0042's row"]  # a library error quoting a value

    def refuse():
        raise DataError("hospital_c: ehr.csv: no column 'age'")

    hospitals["hospital_c"].hospital.load = refuse  # fedward's own errors name files and fields: they are passed on
    answers, failures = gather({h: hospitals[h].load.remote() for h in sorted(hospitals)}, timeout=60)
    assert sorted(answers) == ["hospital_a"] and answers["hospital_a"].train_examples > 0
    assert failures["hospital_b"] == "KeyError (details in the hospital's log)"
    assert failures["hospital_c"] == "DataError: hospital_c: ehr.csv: no column 'age'" and "0042" not in str(failures)
    assert "patient 0042's row" in capsys.readouterr().err  # the whole traceback, where the debugging user reads it
