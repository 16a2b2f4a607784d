"""Compressed changes: what they cost on the wire, what they keep, and forged ones refused."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from fedward.actors.hospital import Hospital
from fedward.data_adapters.harmonize import merge_summaries
from fedward.config import CompressionConfig, parse_config
from fedward.types import CompressedDelta, CompressedUpdate, Layout, RoundPlan, Update
from fedward.models.flat import flatten
from fedward.models.networks import build_model
from fedward import compression
from fedward.pipelines import admission
from tests.conftest import ehr_config

SIZE = 10_000
LAYOUT = Layout(("w",), ((SIZE,),))
NONE = np.zeros(0, np.uint32)  # no running statistics
EXACT = {"indices": NONE, "values": np.zeros(0, np.float32)}  # an int8 change with no entry sent exactly


def change(seed: int = 0) -> Update:
    delta = np.random.default_rng(seed).normal(0, 0.01, SIZE).astype(np.float32)
    delta[::97] *= 20  # a few large entries, as training gives
    return Update(3, "hospital_a", delta, LAYOUT, 40, 40.0, {"train_loss": 0.5})


def test_int8_sends_a_quarter_of_the_bytes_and_its_mean_over_hospitals_is_unbiased():
    update = change()
    sent = [compression.compress(update, CompressionConfig(kind="int8"), seed, None, NONE)[0] for seed in range(400)]
    ratio = len(pickle.dumps(sent[0], protocol=5)) / len(pickle.dumps(update, protocol=5))
    assert 0.25 < ratio < 0.28
    restored = np.stack([compression.restore(s, SIZE).delta for s in sent])
    scales = np.repeat(sent[0].delta.scales, 256)[:SIZE]
    assert (np.abs(restored - update.delta) <= scales * 1.0001).all()  # one step of its block at most
    # Stochastic rounding is unbiased: 400 hospitals' rounding errors average out like 1/sqrt(400).
    assert np.abs(restored.mean(axis=0) - update.delta).max() < 0.2 * scales.max()
    assert np.array_equal(restored[0], compression.restore(compression.compress(update, CompressionConfig(kind="int8"), 0, None, NONE)[0], SIZE).delta)


def test_top_k_sends_its_share_and_error_feedback_sends_every_entry_eventually():
    config = CompressionConfig(kind="top_k", top_k_fraction=0.05)
    residual, sent_total, changes_total = None, np.zeros(SIZE, np.float64), np.zeros(SIZE, np.float64)
    for round in range(30):
        update = change(round)
        sent, residual = compression.compress(update, config, round, residual, NONE)
        assert sent.delta.indices.size == 500 and sent.delta.values.dtype == np.float32
        assert len(pickle.dumps(sent, protocol=5)) < 0.12 * len(pickle.dumps(update, protocol=5))
        sent_total += compression.restore(sent, SIZE).delta
        changes_total += update.delta
    # Nothing is lost: what was sent plus what waits at the hospital is every change made.
    assert np.allclose(sent_total + residual, changes_total, atol=1e-5)
    assert (sent_total != 0).mean() > 0.5  # far more than the 5 % of entries any one round sends


@pytest.mark.parametrize("kind", ["int8", "top_k"])
def test_running_statistics_travel_exactly_and_never_wait_in_the_residual(kind):
    layout = Layout(("conv.weight", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"), ((9990,), (4,), (4,), ()))
    exact = compression.statistics(layout, {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"})
    assert exact.tolist() == list(range(9990, 9999))
    update = dataclasses.replace(change(), layout=layout, delta=change().delta[:9999].copy())
    update.delta[9990:] = [5.0, -3.0, 40.0, 0.5, -7.0, 2.0, 1e-3, 9.0, 4.0]  # far larger than any weight's change
    sent, residual = compression.compress(update, CompressionConfig(kind=kind, top_k_fraction=0.01), 0, None, exact)
    restored = compression.restore(sent, 9999).delta
    assert np.array_equal(restored[9990:], update.delta[9990:])
    if kind == "int8":  # the statistics do not stretch the weights' scales
        assert np.abs(restored[:9990] - update.delta[:9990]).max() < 0.01
    else:
        assert np.count_nonzero(restored[:9990]) == 100 and not residual[9990:].any()


def compressed(**changes) -> CompressedUpdate:
    sent, _ = compression.compress(change(), CompressionConfig(kind="top_k", top_k_fraction=0.01), 0, None, NONE)
    return dataclasses.replace(sent, **changes)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (CompressedDelta("top_k", 10**12, indices=np.zeros(1, np.uint32), values=np.ones(1, np.float32)), "holds 1000000000000 values, not its model's 10000"),
        (CompressedDelta("top_k", SIZE, indices=np.array([5, SIZE], np.uint32), values=np.ones(2, np.float32)), "not ascending, distinct and below 10000"),
        (CompressedDelta("top_k", SIZE, indices=np.array([5, 5], np.uint32), values=np.ones(2, np.float32)), "not ascending, distinct"),
        (CompressedDelta("top_k", SIZE, indices=np.array([5], np.int64), values=np.ones(1, np.float32)), "matching uint32 positions and float32 values"),
        (CompressedDelta("top_k", SIZE, indices=np.array([5], np.uint32), values=np.array([np.nan], np.float32)), "holds 1 NaN or infinite values"),
        (CompressedDelta("int8", SIZE, block=256, codes=np.zeros(SIZE, np.int8), scales=np.ones(3, np.float32)), "scales do not match its blocks"),
        (CompressedDelta("int8", SIZE, block=256, codes=np.zeros(SIZE, np.int16), scales=np.ones(40, np.float32)), "does not hold 10000 int8 codes"),
        (CompressedDelta("int8", SIZE, block=256, codes=np.full(SIZE, 127, np.int8), scales=np.full(40, 3e38, np.float32), **EXACT), "NaN or infinite"),
        (CompressedDelta("zip", SIZE), "compressed as 'zip', not int8 or top_k"),
        (np.zeros(SIZE, np.float32), "its compressed change is a ndarray"),
    ],
)
def test_a_malformed_compressed_change_is_refused_before_it_is_unpacked(payload, reason):
    layouts, examples = {"hospital_a": LAYOUT}, {"hospital_a": 40}
    admitted, refused = admission.admit(3, {"hospital_a": compressed(delta=payload)}, layouts, "compressed", examples)
    assert not admitted and reason in refused["hospital_a"], refused
    admitted, refused = admission.admit(3, {"hospital_a": compressed()}, layouts, "compressed", examples)
    assert type(admitted["hospital_a"]) is Update and np.count_nonzero(admitted["hospital_a"].delta) == 100
    assert "sent a Update, not a compressed update" in admission.admit(3, {"hospital_a": change()}, layouts, "compressed", examples)[1]["hospital_a"]


def test_a_hospital_keeps_its_residual_with_its_state_so_a_retried_round_sends_the_same(demo_data, tmp_path):
    config = parse_config({**ehr_config(demo_data, tmp_path), "compression": {"kind": "top_k", "top_k_fraction": 0.1}})
    hospital = Hospital("hospital_a", config, "topk-1")
    hospital.load()
    shape = hospital.prepare(merge_summaries([hospital.summarize()], config.data.table).to_dict(), frozenset())
    weights, layout = flatten(build_model(config.model, shape))
    first = hospital.fit(RoundPlan(1, "hospital_a", seed=1, local_epochs=1, lr=0.05), weights, layout)
    plan = RoundPlan(2, "hospital_a", seed=2, local_epochs=1, lr=0.05)
    second = hospital.fit(plan, weights, layout)
    left = hospital.residual.copy()
    again = hospital.fit(plan, weights, layout)  # a retry starts from its state after round 1, residual included
    assert np.array_equal(again.delta.indices, second.delta.indices) and np.array_equal(again.delta.values, second.delta.values)
    assert np.array_equal(hospital.residual, left) and not np.array_equal(first.delta.indices, second.delta.indices)
    hospital._fresh_state()
    assert hospital.restore(2) == 2 and np.array_equal(hospital.residual, left)
