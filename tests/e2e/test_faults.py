"""Faults with real processes: a hospital's process killed with a signal mid-run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import ray

from fedward.actors.pool import HostedHospital
from fedward.config import parse_config
from fedward.errors import DeploymentError
from fedward.pipelines.run import Pipeline
from tests.conftest import ehr_config

pytestmark = pytest.mark.e2e


def _kill_after_round(pipeline: Pipeline, hospital: str, round: int, killed: list[int]) -> None:
    metrics = pipeline.run_dir / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= round):
        time.sleep(0.05)
    actor = pipeline.hospitals[hospital]
    process = actor.worker if isinstance(actor, HostedHospital) else actor  # a pool worker dies with all it hosts
    pid = ray.get(process.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)


@pytest.mark.parametrize("hosting", ["pool", "per_hospital"])
def test_a_killed_hospital_is_restarted_reloads_its_state_and_rejoins(ray_session, demo_data, tmp_path, hosting):
    raw = {**ehr_config(demo_data, tmp_path, name="killed", rounds=5, hosting=hosting), "explain": {"enabled": False}, "strategy": {"name": "fedper"}}
    logged: list[str] = []
    pipeline = Pipeline(parse_config(raw), progress=False, log=logged.append)
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_after_round, args=(pipeline, "hospital_a", 1, killed), daemon=True)
    watcher.start()
    pipeline.run()
    watcher.join(5)
    assert killed, "the hospital's process was never killed"
    records = [json.loads(line) for line in (pipeline.run_dir / "metrics.jsonl").read_text().splitlines()]
    back = [r["round"] for r in records if "hospital_a" in r["rejoined"]]
    assert len(back) == 1 and back[0] >= 2, (logged, [(r["round"], r["participants"], r["failures"], r["rejoined"]) for r in records])
    # It came back with its own head (FedPer) as it was after its last round, not a fresh one.
    assert any(f"hospital_a was restarted after its process died; it reloaded its data and its state of round {back[0] - 1}" in line
               or f"hospital_a was restarted after its process died; it reloaded its data and its state of round {back[0] - 2}" in line
               for line in logged), logged
    # Until it rejoined it may have missed a round; from then on it trains and is evaluated again.
    for r in records[back[0] - 1 :]:
        assert "hospital_a" in r["participants"] and "hospital_a" in r["hospitals"]
    assert records[-1]["pooled"]["auroc"] >= 0.75 and records[-1]["hospitals"]["hospital_a"]["auroc"] >= 0.7
    from fedward.explain.report import write_consortium_report

    assert "restarted, it reloaded its data and state and rejoined" in write_consortium_report(pipeline.run_dir).read_text()


def test_a_round_short_of_its_quorum_is_retried_then_stops_resumably(ray_session, demo_data, tmp_path):
    from fedward.errors import QuorumError
    from fedward.checkpoint import load_checkpoint

    raw = {**ehr_config(demo_data, tmp_path, name="quorum", rounds=3, min_hospitals=3, hospital_restarts=0, quorum_wait_s=0.2, round_retries=1),
           "explain": {"enabled": False}}
    logged: list[str] = []
    pipeline = Pipeline(parse_config(raw), progress=False, log=logged.append)
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_after_round, args=(pipeline, "hospital_b", 1, killed), daemon=True)
    watcher.start()
    with pytest.raises(QuorumError, match=r"needed 3 hospitals(.|\n)*hospital_b(.|\n)*failed 2 times\. Checkpointed rounds are kept; run again to resume"):
        pipeline.run()
    assert any("trying again (1 of 1)" in line for line in logged)
    assert load_checkpoint(pipeline.run_dir).round >= 1
    # Run again, with the hospital's process back: it resumes after the last checkpointed round.
    final = Pipeline(parse_config(raw), progress=False, log=lambda msg: None).run()
    assert load_checkpoint(pipeline.run_dir).round == 3 and final.dtype.name == "float32"


def test_a_straggler_s_late_update_counts_weighed_down_in_the_round_it_arrives(ray_session, demo_data, tmp_path):
    # A process of its own: on a pool worker a straggler holds up the hospitals it shares the worker with.
    # Its update (6 s late) must be done before round 1's evaluation gives up on it (2 x 5 s) even on
    # a busy machine, or rounds 2 to 4, quick without it, all end before it arrives.
    raw = {**ehr_config(demo_data, tmp_path, name="straggler", rounds=4, round_timeout_s=5.0, stale_weight=0.5, quorum_wait_s=0, hosting="per_hospital"),
           "explain": {"enabled": False}, "attack": {"hospitals": ["hospital_a"], "kind": "slow", "delay_s": 6.0}}
    logged: list[str] = []
    pipeline = Pipeline(parse_config(raw), progress=False, log=logged.append)
    pipeline.run()
    records = [json.loads(line) for line in (pipeline.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["failures"]["hospital_a"].startswith("no answer within 5 s; it counts")
    late = [(r["round"], r["late"]["hospital_a"]) for r in records if r["late"]]
    assert late and all(arrived > sent for arrived, sent in late), [(r["round"], r["participants"], r["failures"], r["late"], r["seconds"]) for r in records]  # tagged with its own round, never taken for a current one
    for r in records:  # while its update is on the way, it is not asked again
        assert "hospital_a" not in r["participants"] or "hospital_a" in r["late"]
    assert records[-1]["pooled"]["auroc"] >= 0.75


def test_a_hospital_whose_data_folder_is_missing_on_its_node_stops_the_run_before_any_read(ray_session, demo_data, tmp_path):
    raw = {**ehr_config(demo_data, tmp_path, name="misplaced", rounds=2), "explain": {"enabled": False}}
    raw["hospitals"][2]["data"] = str(tmp_path / "not_on_this_node")
    pipeline = Pipeline(parse_config(raw), progress=False, log=lambda _: None)
    with pytest.raises(DeploymentError, match=r"hospitals cannot work where they run:\n  - hospital_c: .*not_on_this_node does not exist on this node"):
        pipeline.run()
    assert not (pipeline.run_dir / "data.json").exists() and not (pipeline.run_dir / "placement.json").exists()
    assert not list((tmp_path / "sites").rglob("data_report.json"))  # no hospital read its data
