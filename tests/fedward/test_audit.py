"""A hospital's own audit log: every release recorded before it leaves, chained, and signed with
its certified key in cross-site mode; its operator checks it alone."""

from __future__ import annotations

import json

import pytest
import yaml

from fedward.actors.hospital import Hospital
from fedward import wire
from fedward.audit import AUDIT_LOG, read
from fedward.config import parse_config
from fedward.data_adapters.harmonize import merge_summaries
from fedward.errors import ConfigError
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from fedward.pipelines.cli import main
from fedward.types import RoundPlan
from tests.conftest import ehr_config
from tests.consortium import consortium


def test_every_release_is_logged_chained_and_signed_and_an_altered_or_removed_line_is_found(demo_data, tmp_path, capsys):
    _, identities = consortium(tmp_path / "pki", ["hospital_a", "hospital_b"])
    config = parse_config({**ehr_config(demo_data, tmp_path), "privacy": {"dp_sgd": {"enabled": True, "noise_multiplier": 1.0, "epsilon": 50.0}}})
    site = tmp_path / "sites" / "hospital_a"
    site.mkdir(parents=True)
    (site / "policy.yaml").write_text(yaml.safe_dump({"consortium": {"identity": str(identities["hospital_a"].folder),
                                                                     "roster": ["hospital_a", "hospital_b"], "fewest_hospitals": 2, "updates": "plain"}}))
    hospital = Hospital("hospital_a", config, "audited")
    counts = hospital.load()
    summary = hospital.summarize()
    weights, layout = flatten(build_model(config.model, hospital.prepare(merge_summaries([summary], config.data.table).to_dict()), 1))
    update = hospital.fit(RoundPlan(1, "hospital_a", seed=5, local_epochs=1, lr=0.05), weights, layout)
    hospital.evaluate(1, weights, layout)

    log = site / AUDIT_LOG
    certificate = identities["hospital_a"].certificate
    entries = read(log, certificate)
    assert [(e["what"], e["round"]) for e in entries] == [
        ("data counts", None), ("feature summaries for harmonization (tables), before round 1", None),
        ("model update, every round", 1), ("evaluation in the clear, every round", 1),
    ]
    assert entries[2]["protection"] == "sent plain; trained under DP-SGD" and entries[2]["to"] == "the driver"
    assert entries[0]["run"] == "audited" and entries[0]["bytes"] > 0
    assert (entries[0]["blake3"], entries[0]["bytes"]) == wire.digest(counts)  # the driver computes the same from what it received
    assert entries[2]["blake3"] == wire.digest(update)[0] and entries[2]["bytes"] > update.delta.nbytes

    assert main(["audit", str(log), "--certificate", str(identities["hospital_a"].certificate_file)]) == 0
    assert "4 entries; the chain is unbroken; each line signed by the certificate's key" in capsys.readouterr().out

    lines = log.read_text().splitlines()
    altered = json.loads(lines[2])
    altered["protection"] = "sent masked"
    log.write_text("\n".join([*lines[:2], json.dumps(altered, sort_keys=True), *lines[3:]]) + "\n")
    with pytest.raises(ConfigError, match=f"{log}, line 3: the signature is not the hospital's"):
        read(log, certificate)
    log.write_text("\n".join([*lines[:1], *lines[2:]]) + "\n")
    with pytest.raises(ConfigError, match=f"{log}, line 2: the chain is broken"):
        read(log)
    with pytest.raises(ConfigError, match="line 1: the signature is not the hospital's"):
        read(log, identities["hospital_b"].certificate)
