"""Model selection reads validation figures only: the best round, its weights, early stopping, resume."""

from __future__ import annotations

import numpy as np
import pytest

from fedward.config import TrainConfig
from fedward.errors import ConfigError
from fedward.pipelines.selection import Selection


def test_the_best_round_is_kept_with_its_weights_and_patience_stops_training(tmp_path):
    train = TrainConfig(validation_fraction=0.2, select="best", patience=2)
    selection = Selection("auroc")
    figures = [0.70, 0.74, 0.73, 0.74, 0.72]  # round 2 stays best: a tie is no improvement
    stops = [selection.observe(tmp_path, train, r, {"auroc": v}, np.full(3, r, np.float32)) for r, v in enumerate(figures[:4], start=1)]
    assert stops == [False, False, False, True] and selection.best_round == 2 and selection.stopped_after == 4
    weights, round = selection.chosen(tmp_path, train, np.zeros(3, np.float32), 4)
    assert round == 2 and np.array_equal(weights, np.full(3, 2, np.float32))
    # A resume after round 4 reads the same; one from before the best round starts afresh.
    assert Selection.resumed(tmp_path, "auroc", 4) == selection
    assert Selection.resumed(tmp_path, "auroc", 1) == Selection("auroc")


def test_an_undefined_figure_never_wins_and_last_keeps_the_last_weights(tmp_path):
    train = TrainConfig(validation_fraction=0.2)
    selection = Selection("r2")
    selection.observe(tmp_path, train, 1, {"r2": float("nan")}, np.zeros(2, np.float32))
    assert selection.best_round is None and not (tmp_path / "best_weights.npy").exists()
    selection.observe(tmp_path, train, 2, {"r2": 0.3}, np.ones(2, np.float32))
    assert selection.chosen(tmp_path, train, np.full(2, 7, np.float32), 2)[1] == 2  # "last": the last round's weights
    assert not (tmp_path / "best_weights.npy").exists()


def test_selection_without_a_validation_part_is_refused():
    with pytest.raises(ConfigError, match="set train.validation_fraction"):
        TrainConfig(select="best")
    with pytest.raises(ConfigError, match="train.validation_fraction: expected a share in"):
        TrainConfig(validation_fraction=0.6)
