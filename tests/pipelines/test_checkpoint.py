import json

import numpy as np
import pytest

from fedward.errors import CheckpointError
from fedward.types import Layout
from fedward.files import atomic_write
from fedward.checkpoint import RunCheckpoint, load_checkpoint, save_checkpoint


def checkpoint(round, value):
    rng = np.random.default_rng(round)
    return RunCheckpoint(
        round=round,
        weights=np.full(6, value, np.float32),
        layout=Layout(("a", "b"), ((2, 2), (2,))),
        strategy_state={"m": [1.0, 2.0]},
        rng_state=rng.bit_generator.state,
        config_hash="abc",
    )


def test_round_trip_keeps_every_field(tmp_path):
    saved = checkpoint(3, 0.5)
    save_checkpoint(tmp_path, saved)
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 3 and loaded.layout == saved.layout and loaded.config_hash == "abc"
    assert np.array_equal(loaded.weights, saved.weights)
    assert loaded.strategy_state == {"m": [1.0, 2.0]}
    rng = np.random.default_rng()
    rng.bit_generator.state = loaded.rng_state
    assert rng.random() == np.random.default_rng(3).random()


def test_a_corrupted_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    for r in (1, 2, 3, 4):
        save_checkpoint(tmp_path, checkpoint(r, float(r)))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round_*.pt")) == [
        "round_0002.pt", "round_0003.pt", "round_0004.pt"
    ]
    newest = tmp_path / "checkpoints" / "round_0004.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash mid-copy
    warnings = []
    loaded = load_checkpoint(tmp_path, warn=warnings.append)
    assert loaded.round == 3 and loaded.weights[0] == 3.0
    assert "round_0004.pt" in warnings[0]


def test_no_checkpoint_yet_is_none_and_a_corrupt_index_is_an_error(tmp_path):
    assert load_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="latest.json is corrupt"):
        load_checkpoint(tmp_path)


def test_unwritable_target_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a folder cannot be made under a regular file, even as root
    with pytest.raises(CheckpointError, match="cannot write"):
        atomic_write(blocker / "run" / "state.json", b"{}")
    atomic_write(tmp_path / "ok.json", json.dumps({"a": 1}).encode())
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}


def test_redoing_a_round_after_falling_back_replaces_the_later_entries(tmp_path):
    for r in (1, 2, 3, 4):
        save_checkpoint(tmp_path, checkpoint(r, float(r)))
    save_checkpoint(tmp_path, checkpoint(3, 30.0))  # the run resumed from round 2 and redid round 3
    index = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["checkpoints"]
    assert [e["round"] for e in index] == [2, 3]  # round 1 was already pruned (KEEP = 3)
    assert not (tmp_path / "checkpoints" / "round_0004.pt").exists()
    assert load_checkpoint(tmp_path).weights[0] == 30.0
