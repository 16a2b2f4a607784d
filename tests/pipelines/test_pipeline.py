"""The driver's own decisions, without Ray: identity of a run, its data, its metrics file."""

import json
import subprocess
import sys

import pytest

from fedward.config import parse_config
from fedward.errors import CheckpointError, ConfigError
from fedward.types import DataCounts
from fedward.checkpoint import read_metrics
from fedward.pipelines import records
from fedward.pipelines.records import own_view
from fedward.pipelines.global_model import GlobalModel
from fedward.pipelines.rounds import Rounds
from fedward.pipelines.run import Pipeline
from fedward.privacy.hooks import build_hook
from fedward.strategies import build_strategy
from fedward.tasks import build_task
from tests.fedward.test_config import raw_config


def counts(name, fingerprint="f" * 64, split="s" * 64):
    return DataCounts(name, 10, 5, 10, 5, 4, {}, fingerprint, split)


def pipeline(tmp_path, **run):
    return Pipeline(parse_config(raw_config(run={"name": "t", "root": str(tmp_path), **run})), progress=False, log=lambda m: None)


def test_a_resume_on_changed_data_is_refused_naming_the_hospital(tmp_path):
    before = {"a": {"fingerprint": "f" * 64, "split_fingerprint": "s" * 64}}
    p = pipeline(tmp_path)
    p._check_same_data(before, {"a": counts("a")}, resuming=True)
    with pytest.raises(CheckpointError, match="a: fingerprint ffffffffffff -> 000000000000"):
        p._check_same_data(before, {"a": counts("a", fingerprint="0" * 64)}, resuming=True)
    with pytest.raises(CheckpointError, match="split_fingerprint"):
        p._check_same_data(before, {"a": counts("a", split="1" * 64)}, resuming=True)
    # Images fingerprinted before their content hashes were BLAKE3 cannot be compared: said so.
    with pytest.raises(CheckpointError, match=r"fingerprinted data another way \(sha256\)"):
        p._check_same_data(before, {"a": counts("a", fingerprint="blake3:" + "f" * 64)}, resuming=True)


def test_the_run_directory_refuses_another_config_and_a_corrupt_identity(tmp_path):
    pipeline(tmp_path, rounds=2)._open_run_dir()
    pipeline(tmp_path, rounds=2)._open_run_dir()  # same config: accepted
    with pytest.raises(CheckpointError, match="run.rounds: 2 -> 3"):
        pipeline(tmp_path, rounds=3)._open_run_dir()
    (tmp_path / "t" / "run.json").write_text("{")
    with pytest.raises(CheckpointError, match="run.json is corrupt"):
        pipeline(tmp_path, rounds=2)._open_run_dir()


def test_metrics_survive_a_torn_last_line_and_a_resume_drops_rounds_after_the_checkpoint(tmp_path):
    p = pipeline(tmp_path)
    p.run_dir.mkdir(parents=True)
    for round in (1, 2, 3):
        records.append_metrics(p.run_dir, {"round": round, "pooled": {"auroc": float("nan")}})
    with open(p.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"round": 4, "poo')  # the driver died mid-write
    assert [r["round"] for r in read_metrics(p.run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert read_metrics(p.run_dir / "metrics.jsonl")[0]["pooled"]["auroc"] is None  # strict JSON, no NaN
    records.truncate_metrics(p.run_dir, 2)
    assert [json.loads(l)["round"] for l in (p.run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_model_the_explainer_cannot_handle_is_refused_before_any_round(tmp_path):
    raw = raw_config(run={"name": "t", "root": str(tmp_path)}, model={"kind": "mlp", "norm": "group", "hidden": [8], "groups": 2, "dropout": 0.2})
    with pytest.raises(ConfigError, match="cannot explain GroupNorm"):
        Pipeline(parse_config(raw), progress=False).model.check((5,), {})
    raw["explain"] = {"enabled": False}
    Pipeline(parse_config(raw), progress=False).model.check((5,), {})


def test_a_hospital_sees_only_its_own_and_the_pooled_figures():
    records = [{"round": 1, "hospitals": {"a": {"n": 3}, "b": {"n": 4}}, "pooled": {"n": 7}}]
    assert own_view(records, "a") == [{"round": 1, "hospitals": {"a": {"n": 3}}, "pooled": {"n": 7}}]


def test_a_failed_aggregation_is_retried_with_the_same_selection_then_stops_the_run(tmp_path):
    import numpy as np

    from fedward.errors import AggregationError, QuorumError

    attempts = []

    class Flaky(Rounds):
        def rejoin(self, hospitals, last):
            return []  # no hospital process to restart here

        def _round(self, round, available, weights, layout, rng, attempt):
            attempts.append(rng.integers(1 << 30))  # what a selection drawn now would see
            if len(attempts) <= failures:
                raise error
            return weights, {"round": round}

    failures, error = 2, AggregationError("a share failed its check")
    config = parse_config(raw_config(run={"name": "t", "root": str(tmp_path), "round_retries": 2, "quorum_wait_s": 0}))
    task, strategy = build_task(config.task), build_strategy(config)
    p = Flaky(config, run_dir=tmp_path, digest="x", hospitals={}, counts={}, hook=build_hook(config, None, "t"), strategy=strategy, task=task,
              model=GlobalModel(config, task, strategy, study_dir=None, started_in=tmp_path, run_dir=tmp_path), trusted=None,
              preprocessing=None, scale=None, progress=False, log=lambda m: None)
    rng = np.random.default_rng(0)
    _, record = p._round_with_retries(1, ["a", "b"], np.zeros(1, np.float32), None, rng)
    assert record == {"round": 1, "rejoined": []}
    assert len(set(attempts)) == 1 and len(attempts) == 3
    attempts.clear()
    failures = 3
    with pytest.raises(AggregationError, match="round 1 failed 3 times. Checkpointed rounds are kept; run again to resume. Last: a share failed its check"):
        p._round_with_retries(1, ["a", "b"], np.zeros(1, np.float32), None, rng)
    attempts.clear()
    error = QuorumError(1, 2, {"b": "no answer within 60 s"})
    with pytest.raises(QuorumError, match=r"needed 2 hospitals;(.|\n)*b: no answer within 60 s\nround 1 failed 3 times"):
        p._round_with_retries(1, ["a", "b"], np.zeros(1, np.float32), None, rng)


def test_an_unwritable_or_full_run_directory_stops_the_run_before_any_round(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a folder cannot be made under a regular file, even as root
    with pytest.raises(CheckpointError, match=r"cannot write .*file/t/run.json"):
        Pipeline(parse_config(raw_config(run={"name": "t", "root": str(blocker)})), progress=False, log=lambda m: None).run()
    full = pipeline(tmp_path, min_free_mb=1e12)  # more than any disk holds: as good as a full one
    with pytest.raises(CheckpointError, match=r"MiB free, below run.min_free_mb=1e\+12; stopped before starting\. Checkpointed rounds are kept"):
        full.run()
    p = pipeline(tmp_path / "metrics")
    p.run_dir.mkdir(parents=True)
    (p.run_dir / "metrics.jsonl").mkdir()  # where the file should be: its append fails
    with pytest.raises(CheckpointError, match=r"cannot write .*metrics.jsonl.*round 4 will be redone when the run is resumed"):
        records.append_metrics(p.run_dir, {"round": 4})


def test_the_driver_starts_without_the_libraries_only_some_runs_need():
    # SHAP, Opacus, TenSEAL and scipy.stats cost a driver seconds at every start; each loads where it is used.
    code = "import sys, fedward.pipelines.run; print(sorted(m for m in ('shap', 'opacus', 'tenseal', 'scipy.stats') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"importing the driver loads {loaded}"
