"""Cross-site mode end to end: three hospitals, each its own service on 127.0.0.1 with its own
certificate, policy and data, federated by a driver that holds none of their data or keys."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from fedward.audit import AUDIT_LOG, read
from fedward.certificates import Identity, revoke
from fedward.channel import call, connect
from fedward.config import parse_config
from fedward.errors import HospitalError
from fedward.pipelines.run import Pipeline
from fedward.pipelines.sites import Site
from tests.conftest import HOSPITALS, ehr_config
from tests.consortium import consortium, enrol, publish

TIMEOUT_S = 20


class Sites:
    """Each hospital's service, started as its operator would: `fedward serve`, its own folders."""

    def __init__(self, root: Path, demo: Path, authority: Path, hosting: dict[str, str]):
        self.root, self.authority = root, authority
        self.processes: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}
        for name in hosting:
            site = root / "sites" / name
            shutil.copytree(demo / name, site / "data", ignore=shutil.ignore_patterns(".fedward"))
            policy = site / "policy.yaml"
            policy.write_text(yaml.safe_dump({"release_floor": 10, "consortium": {
                "identity": str(root / "pki" / name), "roster": list(HOSPITALS), "fewest_hospitals": 2}}))
            command = [str(Path(sys.executable).parent / "fedward"), "serve", "--name", name, "--identity", str(root / "pki" / name),
                       "--address", "127.0.0.1:0", "--data", str(site / "data"), "--work-dir", str(site / "work"), "--policy", str(policy),
                       "--hosting", hosting[name]]
            log = open(site / "service.log", "w")
            self.processes[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        for name, process in self.processes.items():
            line = process.stdout.readline()  # "NAME serving on HOST:PORT", once it listens
            assert "serving on" in line, (root / "sites" / name / "service.log").read_text()
            self.addresses[name] = line.split()[-1]

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def started(tmp_path, demo_data, hosting: dict[str, str]):
    authority, _ = consortium(tmp_path / "pki", [*HOSPITALS, "driver"])
    running = Sites(tmp_path, demo_data, authority, hosting)
    yield running
    running.stop()


@pytest.fixture
def sites(tmp_path, demo_data):
    """All three: one with its hospital a Ray actor on its own Ray, two hosting it in the service."""
    yield from started(tmp_path, demo_data, {"hospital_a": "ray", "hospital_b": "in_process", "hospital_c": "in_process"})


@pytest.fixture
def one_site(tmp_path, demo_data):
    yield from started(tmp_path, demo_data, {"hospital_b": "in_process"})


def test_three_hospital_services_federate_under_a_driver_without_their_data_or_keys(sites, ray_session, tmp_path):
    raw = ehr_config(Path("/nonexistent"), tmp_path / "driver", name="cross-site", rounds=2)
    raw["run"].update({"hosting": "cross_site", "identity": str(tmp_path / "pki" / "driver")})
    raw["hospitals"] = [{"name": h, "address": sites.addresses[h]} for h in HOSPITALS]  # where they are, nothing of what they hold
    raw["privacy"] = {"masking": {"enabled": True}}
    config = parse_config(raw)
    Pipeline(config, progress=False).run()

    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and sorted(records[-1]["hospitals"]) == sorted(HOSPITALS)
    assert records[-1]["pooled"]["auroc"] > 0.7
    ledger = json.loads((config.run_dir / "privacy.json").read_text())
    assert ledger["transport"]["form"] == "masked" and {e["update"] for r in ledger["rounds"] for e in r["hospitals"].values()} == {"masked"}
    driver_files = {p.name for p in (tmp_path / "driver").rglob("*") if p.is_file()}
    assert not driver_files & {"ehr.csv", "data_report.json", "split.json", AUDIT_LOG}  # nothing of a hospital's is at the driver

    for name in HOSPITALS:
        entries = read(tmp_path / "sites" / name / "work" / AUDIT_LOG, Identity(tmp_path / "pki" / name, name).certificate)
        updates = [e for e in entries if e["what"] == "model update, every round"]
        assert [e["round"] for e in updates] == [1, 2] and all(e["protection"] == "sent masked" for e in updates)
        assert all(e["run"].startswith("cross-site-") and e["to"] == "the driver" for e in entries)


def test_a_caller_without_a_valid_certificate_a_revoked_one_another_authoritys_or_not_the_driver_is_refused(one_site, tmp_path):
    sites = one_site
    target = sites.addresses["hospital_b"]
    opening = {"run_id": "r", "config": {}}

    with grpc.secure_channel(target, grpc.ssl_channel_credentials((tmp_path / "pki" / "authority" / "ca.crt").read_bytes()),
                             options=[("grpc.ssl_target_name_override", "127.0.0.1")]) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            call(channel, "Open", opening, TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # no certificate: no handshake

    other = tmp_path / "other"
    consortium(other, [])
    stranger = enrol(other / "authority", other / "driver", "driver")
    shutil.copy(tmp_path / "pki" / "authority" / "ca.crt", stranger.authority_file)  # it trusts ours; ours does not trust it
    with connect(Identity(stranger.folder, "driver"), target, "127.0.0.1") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            call(channel, "Open", opening, TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    with connect(Identity(tmp_path / "pki" / "hospital_a", "hospital_a"), target, "127.0.0.1") as channel:
        assert call(channel, "Open", opening, TIMEOUT_S) == {"error": "hospital_b answers only the driver 'driver', not 'hospital_a'"}

    driver = Identity(tmp_path / "pki" / "driver", "driver")
    revoke(sites.authority, driver.certificate_file)
    publish(sites.authority, tmp_path / "pki" / "hospital_b")  # the hospital's operator installs the new revocation list
    with connect(driver, target, "127.0.0.1") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            call(channel, "Open", opening, TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "was revoked on" in refused.value.details()


def test_the_driver_calls_only_the_hospital_it_means_and_refuses_a_service_its_own_list_revokes(one_site, tmp_path):
    sites = one_site
    address, driver = sites.addresses["hospital_b"], tmp_path / "pki" / "driver"
    opening = {"run_id": "r", "config": {}}
    with pytest.raises(HospitalError, match=r"hospital_a: the service at .* is certified as 'hospital_b'; check hospitals.hospital_a.address"):
        Site("hospital_a", address, driver, "driver", TIMEOUT_S).ask("Open", opening)  # a config that points at the wrong site
    reached = Site("hospital_b", address, driver, "driver", TIMEOUT_S)
    with pytest.raises(HospitalError, match=r"hospital_b: the run's config does not name this hospital once"):  # the service's own answer
        reached.ask("Open", opening)
    revoke(sites.authority, tmp_path / "pki" / "hospital_b" / "hospital_b.crt")
    publish(sites.authority, driver)  # the driver's operator installs the new revocation list
    with pytest.raises(HospitalError, match=r"hospital_b: its service at .* is refused: .*was revoked on"):
        reached.ask("Open", opening)
