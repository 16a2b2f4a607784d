import numpy as np

from fedward.data_adapters.splits import split_by_patient


def test_no_patient_on_both_sides_and_both_classes_on_each_side():
    rng = np.random.default_rng(1)
    patients = np.repeat([f"p{i}" for i in range(200)], rng.integers(1, 4, 200))
    labels = (rng.random(len(patients)) < 0.3).astype(np.int64)
    train, holdout = split_by_patient(patients, labels, 0.25, seed=7)
    assert len(train) + len(holdout) == len(patients)
    assert not set(patients[train]) & set(patients[holdout])
    assert set(labels[train]) == {0, 1} and set(labels[holdout]) == {0, 1}
    share = len(set(patients[holdout])) / 200
    assert 0.2 < share < 0.3


def test_split_is_deterministic_by_seed():
    patients = np.array([f"p{i}" for i in range(50)])
    labels = np.arange(50) % 2
    a = split_by_patient(patients, labels, 0.3, seed=3)
    b = split_by_patient(patients, labels, 0.3, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
