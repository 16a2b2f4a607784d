"""A real multi-node Ray cluster on this machine, as docs/deploy.md sets one up: `ray start` for a
head and one node per hospital on 127.0.0.1, token authentication and TLS on, each hospital's data
root known to its node only; runs are submitted through the Jobs API with `fedward submit`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from fedward.certificates import write_certificates

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def _free_ports(count: int) -> int:
    """The first of `count` consecutive ports nothing listens on, away from Ray's defaults, which
    an embedded Ray of another test may hold."""
    for first in range(46000, 60000, count):
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


NODES = ("head", "hospital_a", "hospital_b")
UP_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420
# The hospitals by name only: each node knows where its own data is.
RUN = ["--set", "hospitals=[{name: hospital_a}, {name: hospital_b}]", "--set", "run.name=cluster", "--set", "run.rounds=2", "--set", "explain.enabled=false",
       "--set", "explain.truth=null"]


class Cluster:
    """Three `ray start --block` processes, each in its own process group, so that stopping them
    ends every Ray process they started and nothing else on the machine (unlike `ray stop`)."""

    def __init__(self, base: Path):
        self.base = base
        self.token = base / "auth_token"
        descriptor = os.open(self.token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(os.urandom(32).hex())
        # One certificate serves every node of this one machine; fedward certs adds the interface address Ray binds.
        write_certificates(base / "certs", {"node": ["127.0.0.1"]})
        self.nodes: dict[str, subprocess.Popen] = {}
        first = _free_ports(100)
        self.gcs_port, dashboard_port, self.client_port = first, first + 1, first + 2
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self.node_ports = {name: first + 10 + 30 * i for i, name in enumerate(NODES)}  # each node's own 30
        # Ray's socket paths must stay under 108 bytes: a short folder of its own, not pytest's deep one.
        self.ray_dir = Path(tempfile.mkdtemp(prefix="fwray-"))

    def client_env(self, **extra: str) -> dict[str, str]:
        """What every process that talks to the cluster needs: the token, and TLS for gRPC."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "FEDWARD_DATA_ROOT"}
        return {
            **env,
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # as ray.env sets it: a job's `python` is this environment's
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token),
            "RAY_USE_TLS": "1",
            "RAY_TLS_CA_CERT": str(self.base / "certs" / "ca.crt"),
            "RAY_TLS_SERVER_CERT": str(self.base / "certs" / "node.crt"),
            "RAY_TLS_SERVER_KEY": str(self.base / "certs" / "node.key"),
            "RAY_USAGE_STATS_ENABLED": "0",
            # A killed node asks the head to drain it first, which never answers once the head is gone.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            **extra,
        }

    def start(self, name: str, data_root: Path) -> None:
        port = self.node_ports[name]
        command = [
            str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
            f"--memory={1500 * 2**20}", f"--object-store-memory={100 * 2**20}", f"--temp-dir={self.ray_dir}",
            "--disable-usage-stats", f"--node-manager-port={port + 1}", f"--object-manager-port={port + 2}",
            f"--dashboard-agent-listen-port={port + 3}", f"--dashboard-agent-grpc-port={port + 4}",
            f"--runtime-env-agent-port={port + 5}", f"--metrics-export-port={port + 6}",
            f"--min-worker-port={port + 10}", f"--max-worker-port={port + 29}",
        ]
        if name == "head":
            command += ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
                        f"--ray-client-server-port={self.client_port}"]
        else:
            command += [f"--address=127.0.0.1:{self.gcs_port}", f"--resources={json.dumps({name: 1})}"]
        log = (self.base / f"{name}.log").open("wb")
        self.nodes[name] = subprocess.Popen(
            command, env=self.client_env(FEDWARD_DATA_ROOT=str(data_root)), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.base,
        )
        log.close()
        # Nodes sharing a session folder on one machine must come up one at a time.
        self.wait_for_nodes(len(self.nodes))

    def alive_nodes(self) -> list[dict]:
        request = urllib.request.Request(
            f"{self.dashboard}/api/v0/nodes?limit=100&detail=true", headers={"Authorization": f"Bearer {self.token.read_text()}"}
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            return [n for n in json.loads(answer.read())["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int) -> None:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, process in self.nodes.items():
                assert process.poll() is None, f"ray start for {name} exited: {(self.base / f'{name}.log').read_text()[-2000:]}"
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except OSError:  # the dashboard is not up yet
                pass
            time.sleep(1)
        raise TimeoutError(f"{count} nodes not alive after {UP_TIMEOUT_S} s; logs in {self.base}")

    def stop(self) -> None:
        for process in self.nodes.values():
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.nodes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process.pid, signal.SIGKILL)  # whatever of the group outlived its parent
            process.wait(timeout=10)
        shutil.rmtree(self.ray_dir, ignore_errors=True)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _submit(cluster: Cluster, *settings: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "fedward"), "submit", "configs/demo_ehr.yaml", "--address", cluster.dashboard, *RUN, *settings],
        cwd=ROOT, env=cluster.client_env(**env), capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def cluster(demo_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    roots = {name: base / f"data-{name}" for name in NODES}
    for name in ("hospital_a", "hospital_b"):  # each machine holds its own hospital's export, nothing else
        (roots[name] / name).mkdir(parents=True)
        shutil.copy(demo_data / name / "ehr.csv", roots[name] / name / "ehr.csv")
    roots["head"].mkdir()
    cluster = Cluster(base)
    cluster.roots = roots
    started = time.monotonic()
    try:
        for name in NODES:
            cluster.start(name, roots[name])
        print(f"cluster of {len(NODES)} nodes up in {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        cluster.stop()
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(cluster.ray_dir) not in left, "a Ray process of the test cluster outlived it"


def test_a_submitted_run_places_each_hospital_on_its_own_node_with_its_own_data(cluster, tmp_path):
    started = time.monotonic()
    done = _submit(cluster, "--set", f"run.root={tmp_path / 'runs'}")
    print(f"job submitted and finished in {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "job SUCCEEDED" in done.stdout
    assert "round 2 of 2 (finished)" in done.stdout  # the job's own output, followed to its end

    run_dir = tmp_path / "runs" / "cluster"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and sorted(records[-1]["hospitals"]) == ["hospital_a", "hospital_b"]
    offering = {name: n["node_id"] for n in cluster.alive_nodes() for name in ("hospital_a", "hospital_b") if name in n["resources_total"]}
    placement = json.loads((run_dir / "placement.json").read_text())
    assert {h: p["node_id"] for h, p in placement.items()} == offering
    assert len(set(offering.values())) == 2
    # Each hospital read and wrote in its own node's data root only; the head's holds nothing.
    for name in ("hospital_a", "hospital_b"):
        assert list((cluster.roots[name] / name / ".fedward" / "runs").glob("cluster-*/data_report.json"))
        assert sorted(p.name for p in cluster.roots[name].iterdir()) == [name]
    assert not any(cluster.roots["head"].iterdir())

    # Submitted again, as Ray's own CLI does it, the job finds the finished run in the run root, not
    # in its temporary working copy.
    again = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--",
         "python", "-m", "fedward.pipelines", "run", "configs/demo_ehr.yaml", *RUN, "--set", f"run.root={tmp_path / 'runs'}"],
        cwd=ROOT, env=cluster.client_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "finished all 2 rounds already" in again.stdout and "succeeded" in again.stdout


def test_a_hospital_no_node_offers_stops_the_job_at_once_and_says_which(cluster, tmp_path):
    hospitals = "hospitals=[{name: hospital_a}, {name: hospital_b}, {name: hospital_c}]"
    done = _submit(cluster, "--set", hospitals, "--set", f"run.root={tmp_path / 'runs'}")
    assert done.returncode == 2
    assert "hospital_c: no node offers its resource" in done.stdout
    assert not (tmp_path / "runs" / "cluster" / "metrics.jsonl").exists()


def test_submissions_without_the_token_or_with_a_wrong_one_are_refused(cluster, tmp_path):
    empty_home = tmp_path / "home"  # no ~/.ray/auth_token to fall back on
    empty_home.mkdir()
    for env in ({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, {"RAY_AUTH_TOKEN": "0" * 64}):
        done = _submit(cluster, "--set", f"run.root={tmp_path / 'runs'}", HOME=str(empty_home), **env)
        assert done.returncode == 2, done.stderr[-2000:]
        assert f"{cluster.dashboard} refused the submission" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_relative_run_root_is_refused_before_anything_is_shipped(cluster):
    done = _submit(cluster, "--set", "run.root=runs")
    assert done.returncode == 2 and "run.root: 'runs' is not an absolute path" in done.stderr


def test_the_embedded_default_starts_its_own_ray_beside_a_running_cluster(cluster, demo_data, tmp_path):
    done = subprocess.run(
        [str(BIN / "fedward"), "simulate", "configs/demo_ehr.yaml", "--no-progress", "--set", "run.rounds=1",
         "--set", f"run.root={tmp_path}", "--set", "explain.enabled=false",
         *[f"--set=hospitals.{h}.data={demo_data / h}" for h in ("hospital_a", "hospital_b", "hospital_c")]],
        cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _gcs_answers(port: int, context: ssl.SSLContext) -> bool:
    """Whether Ray's GCS answers an HTTP/2 (gRPC) client over TLS made with `context`."""
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            return tls.recv(9) != b""  # the server's SETTINGS frame, or the end of the connection
    except (ssl.SSLError, ConnectionError):
        return False


def test_ray_speaks_tls_only_to_holders_of_a_consortium_certificate(cluster):
    certs = cluster.base / "certs"
    member = ssl.create_default_context(cafile=certs / "ca.crt")  # also checks the GCS's certificate names 127.0.0.1
    member.load_cert_chain(certs / "node.crt", certs / "node.key")
    assert _gcs_answers(cluster.gcs_port, member)
    assert not _gcs_answers(cluster.gcs_port, ssl.create_default_context(cafile=certs / "ca.crt"))  # trusts the cluster, shows no certificate
    outsider = cluster.base / "outsider"  # a certificate from another authority
    write_certificates(outsider, {"node": ["127.0.0.1"]})
    foreign = ssl.create_default_context(cafile=certs / "ca.crt")
    foreign.load_cert_chain(outsider / "node.crt", outsider / "node.key")
    assert not _gcs_answers(cluster.gcs_port, foreign)
