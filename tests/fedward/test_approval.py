"""Code approval: a hospital in cross-site mode imports only study code its operator approved, by a
digest it computes itself before importing any of it, and refuses the rest before reading data."""

from __future__ import annotations

import json

import pytest
import yaml

from fedward import approval
from fedward.actors.hospital import Hospital
from fedward.config import parse_config
from fedward.errors import ConfigError, HospitalError
from fedward.pipelines.cli import main
from tests.conftest import ehr_config
from tests.consortium import consortium

HONEST = '''
from math import prod
from pathlib import Path

from torch import nn

Path(__file__).with_name("imported").touch()


def net(input_shape, output_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(prod(input_shape), output_size))
'''
# The same module, altered to run its own code at the hospital as soon as it is imported.
ALTERED = HONEST + '''
Path(__file__).with_name("ran_at_the_hospital").write_text(str(sorted(p.name for p in Path.cwd().iterdir())))
'''


def cross_site_hospital(demo_data, tmp_path, module: str):
    """hospital_a in cross-site mode, running a study whose model is `module`.models:net."""
    study = tmp_path / "study"
    (study / module).mkdir(parents=True)
    (study / module / "__init__.py").write_text("")
    (study / module / "models.py").write_text(HONEST)
    _, identities = consortium(tmp_path / "pki", ["hospital_a", "hospital_b"])
    raw = ehr_config(demo_data, tmp_path, name="approval")
    raw["run"]["study_dir"] = str(study)
    raw["model"] = {"target": f"{module}.models:net"}
    config = parse_config(raw)
    site = tmp_path / "sites" / "hospital_a"
    site.mkdir(parents=True)
    policy = site / "policy.yaml"
    policy.write_text(yaml.safe_dump({"consortium": {"identity": str(identities["hospital_a"].folder), "roster": ["hospital_a", "hospital_b"],
                                                     "fewest_hospitals": 2, "updates": "plain"}}))
    return config, study / module, policy


def refused_digest(config) -> str:
    with pytest.raises(HospitalError, match=r"hospital_a: refuses to run study code its operator has not approved: model.target") as refused:
        Hospital("hospital_a", config, "approval").load()
    return refused.value.args[0].split("digest to ")[1].split(" ")[0]


def test_unapproved_study_code_is_refused_before_it_is_imported_or_any_data_is_read(demo_data, tmp_path, capsys):
    config, module, policy = cross_site_hospital(demo_data, tmp_path, "ward_approved")
    hospital = Hospital("hospital_a", config, "approval")
    with pytest.raises(HospitalError, match=r"refuses to run study code its operator has not approved: model.target 'ward_approved.models:net' "
                                            r"\(2 file\(s\) of the study folder\) digest to sha256:[0-9a-f]{64} .* `fedward approve sha256:"):
        hospital.load()
    assert not (module / "imported").exists()  # not a line of it ran
    assert not (hospital.run_dir / "data_report.json").exists()  # nor was any data read
    covers = json.loads((hospital.run_dir / "study_code.json").read_text())["covers"]
    assert set(covers["model.target"]["files"]) == {"ward_approved/__init__.py", "ward_approved/models.py"}

    digest = refused_digest(config)
    assert main(["approve", digest, "--policy", str(policy), "--note", "reviewed by the ward's ML lead"]) == 0
    assert approval.approved(policy) == {digest}
    assert Hospital("hospital_a", config, "approval").load().train_examples > 0
    assert (module / "imported").exists()

    with pytest.raises(ConfigError, match="expected a digest as a refused run names it"):
        approval.approve(policy, "abc123")

    (module / "helper.cpython-311.pyc").write_bytes(b"compiled")  # code Python would import, which no one can review
    with pytest.raises(ConfigError, match=r"holds compiled code \['ward_approved/helper.cpython-311.pyc'\]; a hospital approves only source"):
        Hospital("hospital_a", config, "approval").load()


def test_an_approved_module_altered_afterwards_is_refused_and_without_the_check_its_code_runs(demo_data, tmp_path, monkeypatch):
    config, module, policy = cross_site_hospital(demo_data, tmp_path, "ward_altered")
    approval.approve(policy, refused_digest(config))
    (module / "models.py").write_text(ALTERED)  # changed after its operator approved it
    altered = refused_digest(config)
    assert altered not in approval.approved(policy)
    assert not (module / "ran_at_the_hospital").exists()

    # The check switched off: the altered module is imported, and its own code runs at the hospital.
    monkeypatch.setattr(approval, "require_approved", lambda *args: None)
    Hospital("hospital_a", config, "approval").load()
    assert (module / "ran_at_the_hospital").exists()
