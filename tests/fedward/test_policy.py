"""A hospital's own policy: read only at the hospital, and no shipped config can loosen it."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from fedward.actors.hospital import Hospital
from fedward.config import parse_config
from fedward.data_adapters.harmonize import merge_summaries
from fedward.errors import ConfigError, HospitalError
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from fedward.pipelines.baselines import compare
from fedward.policy import POLICY_ENV, Budget, HospitalPolicy, load_policy, policy_file
from fedward.types import RoundPlan
from tests.conftest import ehr_config

DP = {"dp_sgd": {"enabled": True, "noise_multiplier": 2.0, "epsilon": 50.0}}


def write_policy(work_dir, policy: dict):
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "policy.yaml").write_text(yaml.safe_dump(policy))


def test_a_policy_is_read_from_the_work_area_or_the_node_and_each_bad_field_is_named(tmp_path, monkeypatch):
    assert load_policy(tmp_path / "policy.yaml") == HospitalPolicy(source=f"the default policy (no {tmp_path / 'policy.yaml'})")
    write_policy(tmp_path, {"release_floor": 20, "budget": {"epsilon": 3, "unit": "patient"}, "colluders": 2})
    assert load_policy(policy_file(tmp_path)) == HospitalPolicy(release_floor=20, budget=Budget(3.0), colluders=2, source=str(tmp_path / "policy.yaml"))
    monkeypatch.setenv(POLICY_ENV, str(tmp_path / "node.yaml"))
    assert policy_file(tmp_path) == tmp_path / "node.yaml"
    for bad, says in [({"release_floor": 0}, "release_floor: expected a whole number of patients >= 1, got 0"),
                      ({"budget": {"epsilon": -1}}, "budget.epsilon: expected a number > 0, got -1"),
                      ({"budget": {"epsilon": 1, "delta": 2}}, r"budget.delta: expected a number in \(0, 1\), got 2"),
                      ({"budget": {"epsilon": 1, "unit": "visit"}}, "budget.unit: expected 'patient' or 'sample', got 'visit'"),
                      ({"colluders": -1}, "colluders: expected a whole number of hospitals >= 0, got -1"),
                      ({"sources": {"ehr": {"exports": "/data/ehr", "budget": {"epsilon": 1}}}}, "sources.ehr.exports: expected a list of folder patterns"),
                      ({"sources": {"ehr": {"exports": ["/data/ehr"], "budget": {"epsilon": 0}}}}, "sources.ehr.budget.epsilon: expected a number > 0"),
                      ({"consortium": {"roster": ["a", "b"], "fewest_hospitals": 2}}, "consortium.identity: expected the folder of its key"),
                      ({"consortium": {"identity": "id", "roster": ["a", "a"], "fewest_hospitals": 2}}, "consortium.roster: expected a list of at least two distinct"),
                      ({"consortium": {"identity": "id", "roster": ["a", "b"], "fewest_hospitals": 3}}, "consortium.fewest_hospitals: 3 is more than the 2 hospitals of its roster"),
                      ({"consortium": {"identity": "id", "roster": ["a", "b"]}}, "consortium.fewest_hospitals: expected a whole number of hospitals >= 2, got None"),
                      ({"consortium": {"identity": "id", "roster": ["a", "b"], "fewest_hospitals": 2, "updates": "clear"}}, "consortium.updates: expected 'masked' or 'plain'"),
                      ({"floor": 5}, r"unknown field\(s\) \['floor'\]")]:
        write_policy(tmp_path, bad)
        with pytest.raises(ConfigError, match=f"{tmp_path / 'policy.yaml'}: {says}"):
            load_policy(tmp_path / "policy.yaml")


@pytest.mark.parametrize(
    "policy, sections, says",
    [
        ({}, {"subgroups": {"sex": "sex", "min_count": 5}}, "subgroups.min_count=5 is below its release floor of 10 patients"),
        ({"release_floor": 25}, {"explain": {"enabled": True, "min_bin_count": 20}}, "explain.min_bin_count=20 is below its release floor of 25"),
        ({"budget": {"epsilon": 1}}, {}, "privacy.dp_sgd is off, but its patients' privacy is spent only under DP-SGD"),
        ({"budget": {"epsilon": 1}}, {"privacy": {"dp_sgd": {**DP["dp_sgd"], "unit": "sample"}}}, "privacy.dp_sgd.unit=sample protects rows"),
        ({"budget": {"epsilon": 1, "delta": 1e-6}}, {"privacy": DP}, "privacy.dp_sgd.delta=1e-05 is above its budget's delta 1e-06"),
    ],
)
def test_a_shipped_config_cannot_loosen_the_hospitals_policy(demo_data, tmp_path, policy, sections, says):
    write_policy(tmp_path / "sites" / "hospital_a", policy)
    write_policy(tmp_path / "sites" / "hospital_b", {"release_floor": 1})  # a hospital that allows what the config asks
    config = parse_config({**ehr_config(demo_data, tmp_path), **sections})
    with pytest.raises(HospitalError, match=f"hospital_a: the run asks for less protection than its policy \\({tmp_path}/sites/hospital_a/policy.yaml\\): .*{says}"):
        Hospital("hospital_a", config, "loose").load()
    assert Hospital("hospital_b", config, "loose").load().train_examples > 0


def test_a_hospital_in_cross_site_mode_signs_as_its_certified_self_and_checks_its_own_roster(demo_data, tmp_path):
    from fedward.privacy.masking import Advertise, _advert_message
    from tests.consortium import consortium

    _, identities = consortium(tmp_path / "pki", ["hospital_a", "hospital_b"])
    config = parse_config({**ehr_config(demo_data, tmp_path), "privacy": {"masking": {"enabled": True}}})
    site = tmp_path / "sites" / "hospital_a"
    write_policy(site, {"consortium": {"identity": "../../pki/hospital_a", "roster": ["hospital_a", "hospital_b"], "fewest_hospitals": 2}})
    hospital = Hospital("hospital_a", config, "cross-site")
    hospital.load()
    advert = hospital.hook_respond(1, Advertise())
    assert advert.weight == len(hospital.train_idx)  # its own weight, from its own data
    identities["hospital_b"].check_signature(advert.certificate, advert.signature, _advert_message("cross-site", 1, "hospital_a", advert), "hospital_a")

    plain = parse_config(ehr_config(demo_data, tmp_path))  # a driver that turned masking off
    with pytest.raises(HospitalError, match=r"privacy.masking is off, but in cross-site mode its updates leave only masked"):
        Hospital("hospital_a", plain, "cross-site").load()

    write_policy(site, {"consortium": {"identity": "../../pki/hospital_a", "roster": ["hospital_b", "hospital_c"], "fewest_hospitals": 2}})
    with pytest.raises(HospitalError, match=r"hospital_a: its policy .* has a consortium roster \['hospital_b', 'hospital_c'\] without it"):
        Hospital("hospital_a", config, "cross-site").load()
    write_policy(site, {"consortium": {"identity": "../../pki/nowhere", "roster": ["hospital_a", "hospital_b"], "fewest_hospitals": 2}})
    with pytest.raises(ConfigError, match=r"pki/nowhere/hospital_a.key is missing: cross-site mode needs hospital_a's key and certificate"):
        Hospital("hospital_a", config, "cross-site").load()


def test_a_stricter_config_than_the_policy_runs(demo_data, tmp_path):
    write_policy(tmp_path / "sites" / "hospital_a", {"release_floor": 10, "budget": {"epsilon": 5, "delta": 1e-4}})
    config = parse_config({**ehr_config(demo_data, tmp_path), "subgroups": {"sex": "sex", "min_count": 15}, "privacy": DP})
    assert Hospital("hospital_a", config, "strict").load().train_examples > 0


def one_round(config, hospital_name: str, run_id: str, round: int = 1):
    hospital = Hospital(hospital_name, config, run_id)
    hospital.load()
    weights, layout = flatten(build_model(config.model, hospital.prepare(merge_summaries([hospital.summarize()], config.data.table).to_dict())))
    return hospital.fit(RoundPlan(round, hospital_name, seed=5, local_epochs=2, lr=0.05), weights, layout)


def test_a_second_run_on_the_same_patients_is_charged_on_the_first_runs_spend(demo_data, tmp_path):
    write_policy(tmp_path / "sites" / "hospital_a", {"budget": {"epsilon": 0.8}})
    config = parse_config({**ehr_config(demo_data, tmp_path), "privacy": DP})
    one_round(config, "hospital_a", "first-run")  # one round at this noise spends under 0.8; two spend more
    with pytest.raises(HospitalError, match=r"hospital_a: round 1 would raise its patients' epsilon over every run on its data to .* above the budget 0.8 of its policy"):
        one_round(config, "hospital_a", "second-run-under-another-name")
    spend = (tmp_path / "sites" / "hospital_a" / "privacy_spend.jsonl").read_text().splitlines()
    assert len(spend) == 1 and '"run": "first-run"' in spend[0]  # the refused round spent nothing


def test_a_new_export_of_a_source_inherits_its_spend_and_another_source_keeps_its_own(demo_data, tmp_path, monkeypatch):
    node = tmp_path / "node"
    for export in ("ehr-2026-01", "ehr-2026-06", "registry"):
        shutil.copytree(demo_data / "hospital_a", node / "exports" / export, ignore=shutil.ignore_patterns(".fedward"))
    (node / "policy.yaml").write_text(yaml.safe_dump({
        "sources": {"ehr": {"exports": ["exports/ehr-*"], "budget": {"epsilon": 0.8}},
                    "registry": {"exports": ["exports/registry"], "budget": {"epsilon": 0.8}}},
        "spend_log": "spend.jsonl",
    }))
    monkeypatch.setenv(POLICY_ENV, str(node / "policy.yaml"))

    def config_on(export: str, run: str):
        raw = ehr_config(demo_data, tmp_path / run, name=run)
        raw["hospitals"][0]["data"] = str(node / "exports" / export)
        return parse_config({**raw, "privacy": DP})

    one_round(config_on("ehr-2026-01", "january"), "hospital_a", "january")
    with pytest.raises(HospitalError, match=r"hospital_a: round 1 would raise its patients' epsilon over every run on ehr to .* above the budget 0.8"):
        one_round(config_on("ehr-2026-06", "june"), "hospital_a", "june")  # a new export, a new work area: the same patients
    one_round(config_on("registry", "registry"), "hospital_a", "registry")  # another source: its own budget
    spend = [json.loads(line) for line in (node / "spend.jsonl").read_text().splitlines()]
    assert [(e["source"], e["run"]) for e in spend] == [("ehr", "january"), ("registry", "registry")]


def test_the_comparison_models_which_train_outside_dp_are_refused_under_dp_and_under_a_budget(demo_data, tmp_path):
    (tmp_path / "ehr").mkdir(parents=True)
    (tmp_path / "ehr" / "metrics.jsonl").write_text('{"round": 5, "hospitals": {}, "pooled": {}}\n')  # a finished run to compare with
    with pytest.raises(ConfigError, match=r"privacy.dp_sgd is on: the comparison models \(central and local-only\) would train outside DP-SGD"):
        compare(parse_config({**ehr_config(demo_data, tmp_path), "privacy": DP}))
    write_policy(tmp_path / "sites" / "hospital_a", {"budget": {"epsilon": 3.0}})
    with pytest.raises(HospitalError, match=r"hospital_a: the run asks for less protection than its policy .*privacy.dp_sgd is off"):
        compare(parse_config(ehr_config(demo_data, tmp_path)))
