"""Model selection reads validation figures only: the best round, its weights, early stopping, resume."""

from __future__ import annotations

import numpy as np
import pytest

from fedward.config import TrainConfig
from fedward.errors import ConfigError
from fedward.pipelines.selection import Selection, weights_file


def validation(value: float, failures: dict | None = None) -> dict:
    return {"pooled": {"auroc": value}, "failures": failures or {}}


def test_the_best_round_is_kept_with_its_weights_and_patience_stops_training(tmp_path):
    train = TrainConfig(validation_fraction=0.2, select="best", patience=2)
    selection = Selection("auroc")
    figures = [0.70, 0.74, 0.73, 0.74]  # round 2 stays best: a tie is no improvement
    stops = [selection.observe(tmp_path, train, r, validation(v), np.full(3, r, np.float32)) for r, v in enumerate(figures, start=1)]
    assert stops == [False, False, False, True] and selection.best_round == 2 and selection.stopped_after == 4
    weights, round = selection.chosen(tmp_path, train, np.zeros(3, np.float32), 4)
    assert round == 2 and np.array_equal(weights, np.full(3, 2, np.float32))
    assert sorted(p.name for p in tmp_path.glob("best_weights_*.npy")) == [weights_file(tmp_path, 2).name]
    # A resume replays the checkpointed rounds' records and chooses exactly the same.
    records = [{"round": r, "validation": validation(v)} for r, v in enumerate(figures, start=1)]
    assert Selection.replayed("auroc", train, records) == selection
    assert Selection.replayed("auroc", train, records[:1]) == Selection("auroc", best_round=1, best_value=0.70)


def test_a_round_missing_a_hospitals_validation_is_neither_chosen_nor_counted(tmp_path):
    train = TrainConfig(validation_fraction=0.2, select="best", patience=1)
    selection = Selection("auroc")
    selection.observe(tmp_path, train, 1, validation(0.70), np.zeros(2, np.float32))
    assert not selection.observe(tmp_path, train, 2, validation(0.90, {"hospital_c": "no answer within 900 s"}), np.ones(2, np.float32))
    assert selection.best_round == 1 and selection.stopped_after is None


def test_an_undefined_figure_never_wins_and_last_keeps_the_last_weights(tmp_path):
    train = TrainConfig(validation_fraction=0.2)
    selection = Selection("r2")
    selection.observe(tmp_path, train, 1, {"pooled": {"r2": float("nan")}, "failures": {}}, np.zeros(2, np.float32))
    assert selection.best_round is None
    selection.observe(tmp_path, train, 2, {"pooled": {"r2": 0.3}, "failures": {}}, np.ones(2, np.float32))
    assert selection.chosen(tmp_path, train, np.full(2, 7, np.float32), 2)[1] == 2  # "last": the last round's weights
    assert not list(tmp_path.glob("best_weights_*.npy"))


def test_selection_without_a_validation_part_is_refused():
    with pytest.raises(ConfigError, match="set train.validation_fraction"):
        TrainConfig(select="best")
    with pytest.raises(ConfigError, match="train.validation_fraction: expected a share in"):
        TrainConfig(validation_fraction=0.6)
