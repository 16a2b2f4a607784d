"""Width slicing (HeteroFL): nested sub-models, their weights and their aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedward.actors.hospital import Hospital
from fedward.data_adapters.harmonize import merge_summaries
from fedward.config import ModelConfig, parse_config
from fedward.errors import AggregationError, ConfigError
from fedward.types import RoundPlan, Update
from fedward import width
from fedward.models.flat import flatten, load_flat
from fedward.models.networks import build_model
from fedward.aggregation import weighted_mean
from fedward.strategies.fedavg import FedAvg
from tests.conftest import ehr_config

MODELS = {
    "cnn": (ModelConfig(kind="cnn", channels=(16, 32, 32), norm="batch"), (1, 32, 32)),
    "mlp": (ModelConfig(kind="mlp", hidden=(32, 16)), (13,)),
}


def _full_and_narrow(kind: str, share: float, seed: int = 0):
    config, shape = MODELS[kind]
    torch.manual_seed(seed)
    full = build_model(config, shape)
    for p in full.parameters():  # random everywhere, so a misplaced slice cannot pass by chance
        p.data.normal_()
    for name, b in full.named_buffers():
        if b.is_floating_point():
            b.copy_(torch.rand_like(b) + 0.5)
    return full, build_model(config.narrowed(share), shape)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_width_slicing_and_reassembly_round_trip_exactly(kind, share):
    full, narrow = _full_and_narrow(kind, share)
    weights, layout = flatten(full)
    sub = flatten(narrow)[1]
    sliced = width.take(weights, layout, sub)
    assert sliced.dtype == np.float32 and sliced.shape == (sub.size,)
    load_flat(narrow, sliced, sub)  # the slice fits the narrower model as it is
    for name, tensor in narrow.state_dict().items():
        if tensor.is_floating_point():
            corner = tuple(slice(0, s) for s in tensor.shape)
            assert torch.equal(tensor, full.state_dict()[name][corner]), name
    placed, held = width.put(sliced, sub, layout)
    assert np.array_equal(placed[held], weights[held]) and not placed[~held].any()
    assert held.sum() == sub.size and held.all() == (share == 1.0)
    assert np.array_equal(width.take(placed, layout, sub), sliced)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_a_sub_model_computes_what_the_global_model_does_with_only_its_units(kind):
    """The leading units of each layer feed the leading units of the next: with every other unit
    silenced, the global model and the sub-model give the same outputs."""
    full, narrow = _full_and_narrow(kind, 0.5)
    weights, layout = flatten(full)
    sub = flatten(narrow)[1]
    load_flat(narrow, width.take(weights, layout, sub), sub)
    load_flat(full, width.put(width.take(weights, layout, sub), sub, layout)[0], layout)
    x = torch.randn(5, *MODELS[kind][1])
    full.eval(), narrow.eval()
    with torch.no_grad():
        assert torch.allclose(full(x), narrow(x), atol=1e-5)


def test_each_entry_is_averaged_over_the_hospitals_that_hold_it(tmp_path):
    full, narrow = _full_and_narrow("mlp", 0.5)
    layout, sub = flatten(full)[1], flatten(narrow)[1]
    rng = np.random.default_rng(0)
    a = Update(1, "a", rng.normal(size=layout.size).astype(np.float32), layout, 30, 30.0)
    b = Update(1, "b", rng.normal(size=layout.size).astype(np.float32), layout, 10, 10.0)
    c = Update(1, "c", rng.normal(size=sub.size).astype(np.float32), sub, 20, 20.0)
    mean = weighted_mean([a, b, c], layout)
    placed, held = width.put(c.delta, sub, layout)
    both = (30 * a.delta[held] + 10 * b.delta[held] + 20 * placed[held]) / 60
    assert np.allclose(mean[held], both, atol=1e-6)
    assert np.allclose(mean[~held], (30 * a.delta[~held] + 10 * b.delta[~held]) / 40, atol=1e-6)
    # Only narrow hospitals: entries nobody holds keep their value.
    strategy = FedAvg(parse_config(ehr_config(tmp_path, tmp_path)))
    strategy.layout = layout
    current = np.ones(layout.size, np.float32)
    moved = strategy.aggregate(1, current, [c], {})
    assert np.array_equal(moved[~held], current[~held]) and np.allclose(moved[held], 1 + placed[held])
    with pytest.raises(AggregationError, match="do not share one layout"):
        weighted_mean([a, c])
    with pytest.raises(AggregationError, match="update from a: entry .* not nested"):
        weighted_mean([Update(1, "a", np.zeros(layout.size, np.float32), layout, 1, 1.0)], sub)


def test_widths_are_checked_per_hospital_at_load(tmp_path):
    def config(**options):
        raw = ehr_config(tmp_path, tmp_path)
        raw["hospitals"][2]["model"] = {"width": 0.5}
        for section, value in options.items():
            raw[section] = value
        return parse_config(raw)

    narrow = config().model_for("hospital_c")
    assert narrow.hidden == (16, 8) and config().model_for("hospital_a").hidden == (32, 16)
    assert parse_config({**ehr_config(tmp_path, tmp_path), "model": {"kind": "mlp", "hidden": [5, 3]}}).model.narrowed(0.5).hidden == (3, 2)
    for bad in (0, 1.5, "half", True):
        raw = ehr_config(tmp_path, tmp_path)
        raw["hospitals"][0]["model"] = {"width": bad}
        with pytest.raises(ConfigError, match=r"hospitals.hospital_a.model.width: expected a share .* in \(0, 1\]"):
            parse_config(raw)
    raw = ehr_config(tmp_path, tmp_path)
    raw["model"] = {"kind": "mlp", "hidden": [32, 16], "norm": "group", "groups": 2}
    raw["hospitals"][1]["model"] = {"width": 0.25}
    with pytest.raises(ConfigError, match=r"hospitals.hospital_b.model.width: GroupNorm .* model.norm 'batch' or 'none'"):
        parse_config(raw)


def test_a_narrow_hospital_trains_its_slice_and_returns_a_change_in_its_own_shape(demo_data, tmp_path):
    raw = ehr_config(demo_data, tmp_path)
    raw["hospitals"][0]["model"] = {"width": 0.5}
    config = parse_config(raw)
    hospital = Hospital("hospital_a", config, "ehr-w")
    hospital.load()
    shape = hospital.prepare(merge_summaries([hospital.summarize()], config.data.table).to_dict(), frozenset())
    weights, layout = flatten(build_model(config.model, shape))
    update = hospital.fit(RoundPlan(1, "hospital_a", seed=3, local_epochs=1, lr=0.05), weights, layout)
    sub = flatten(hospital.model)[1]
    assert update.layout == sub and sub.shapes[0] == (16, shape[0]) and update.delta.size == sub.size < layout.size
    assert np.array_equal(update.delta, flatten(hospital.model)[0] - width.take(weights, layout, sub))
    evaluation = hospital.evaluate(1, weights, layout)  # the global weights, at this hospital's width
    assert evaluation.num_examples == len(hospital.holdout_idx) and 0 <= evaluation.figures["auroc"] <= 1


def test_a_server_optimizer_leaves_entries_no_hospital_sent_and_their_moments_alone(tmp_path):
    from fedward.strategies.fedopt import FedYogi

    full, narrow = _full_and_narrow("mlp", 0.5)
    layout, sub = flatten(full)[1], flatten(narrow)[1]
    strategy = FedYogi(parse_config({**ehr_config(tmp_path, tmp_path), "strategy": {"name": "fedyogi"}}))
    strategy.start(full, layout)
    current = np.zeros(layout.size, np.float32)
    wide = Update(1, "a", np.full(layout.size, 0.1, np.float32), layout, 10, 10.0)
    after = strategy.aggregate(1, current, [wide], {})
    m, v = strategy.m.copy(), strategy.v.copy()
    only_narrow = Update(2, "c", np.full(sub.size, -0.1, np.float32), sub, 10, 10.0)
    again = strategy.aggregate(2, after, [only_narrow], {})
    held = width.covered([sub], layout)
    assert np.array_equal(again[~held], after[~held]) and np.array_equal(strategy.m[~held], m[~held]) and np.array_equal(strategy.v[~held], v[~held])
    assert not np.allclose(again[held], after[held])
