"""What `fedward submit` and `fedward run` refuse before anything reaches a cluster, and cluster.yaml."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from fedward.config import load_config
from fedward.errors import ConfigError
from fedward.pipelines.cli import main
from fedward.pipelines.submit import PROJECT, entrypoint, require_cluster_paths

DEMO = PROJECT / "configs" / "demo_ehr.yaml"


def test_the_job_runs_the_shipped_config_with_the_given_settings():
    command = entrypoint(DEMO, ["hospitals=[{name: hospital_a}]", "run.root=/srv/runs"])
    assert shlex.split(command) == [
        "python", "-m", "fedward.pipelines", "run", "configs/demo_ehr.yaml", "--no-progress",
        "--set", "hospitals=[{name: hospital_a}]", "--set", "run.root=/srv/runs",
    ]


def test_a_config_outside_the_shipped_project_is_refused(tmp_path):
    outside = tmp_path / "consortium.yaml"
    outside.write_text(DEMO.read_text())
    with pytest.raises(ConfigError, match="must lie inside the project folder"):
        entrypoint(outside, [])


NAMED_ONLY = "hospitals=[{name: hospital_a}, {name: hospital_b}]"


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (["run.root=runs"], "run.root: 'runs' is not an absolute path"),
        (["run.root=~/runs"], "run.root: '~/runs' is not an absolute path"),  # whose home: the head's or a node's?
        (["run.root=/srv/runs"], "hospitals.hospital_a.data: 'demo-data/hospital_a' is not an absolute path"),
        (["run.root=/srv/runs", NAMED_ONLY, "hospitals.hospital_b.work_dir=state"], "hospitals.hospital_b.work_dir: 'state' is not"),
        (["run.root=/srv/runs", NAMED_ONLY], "explain.truth: 'demo-data/truth.json' is not an absolute path"),
    ],
)
def test_paths_that_mean_nothing_on_another_machine_are_refused(settings, says):
    with pytest.raises(ConfigError, match=says):
        require_cluster_paths(load_config(DEMO, settings))


def test_hospitals_named_only_with_an_absolute_run_root_are_fit_for_a_cluster(capsys):
    require_cluster_paths(load_config(DEMO, ["run.root=/srv/runs", NAMED_ONLY, "explain.truth=null"]))
    # `fedward run` checks the same before connecting anywhere.
    assert main(["run", str(DEMO), "--set", "run.root=runs"]) == 2
    assert "run.root: 'runs' is not an absolute path" in capsys.readouterr().err


def test_submit_wants_the_dashboards_url_not_the_gcs_address(capsys):
    assert main(["submit", str(DEMO), "--address", "10.0.0.10:6379"]) == 2
    assert "--address: '10.0.0.10:6379' is not the dashboard's URL" in capsys.readouterr().err


def test_cluster_yaml_is_a_valid_on_premise_cluster_for_rays_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((PROJECT / "cluster.yaml").read_text())
    prepared = prepare_config(raw)  # the local provider aborts on settings it does not support
    validate_config(prepared)
    assert raw["provider"]["type"] == "local" and len(raw["provider"]["worker_ips"]) == prepared["max_workers"] == 3
    start = " ".join(raw["worker_start_ray_commands"])
    for needed in ("RAY_AUTH_MODE=token", "RAY_USE_TLS=1", "RAY_TLS_SERVER_CERT", "--resources", "FEDWARD_ROLE", "node.env"):
        assert needed in start, needed
    assert Path(PROJECT / "docs" / "deploy.md").is_file()
