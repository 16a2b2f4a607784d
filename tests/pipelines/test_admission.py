"""Answers that cannot enter the aggregate: wrong sender, round, layout, values or counts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedward.config import parse_config
from fedward.types import Layout, SealedUpdate, Update
from models.flat import flatten
from models.networks import build_model
from pipelines import admission
from pipelines.strategies import STRATEGIES
from tests.conftest import ehr_config

LAYOUT = Layout(("w", "b"), ((3, 2), (3,)))


def good(**changes) -> Update:
    update = Update(4, "hospital_a", np.zeros(9, np.float32), LAYOUT, 20, 20.0)
    return dataclasses.replace(update, **changes)


@pytest.mark.parametrize(
    "answer, reason",
    [
        ({"w": 1}, "sent a dict, not an update"),
        (good(hospital="hospital_b"), "labelled as from 'hospital_b'"),
        (good(round=3), "for round 3, not 4 (late or replayed)"),
        (good(layout=Layout(("w",), ((3, 2),)), delta=np.zeros(6, np.float32)), "layout (6 values in 1 entries) is not its model's (9 in 2)"),
        (good(delta=np.zeros(8, np.float32)), "not 9 float32 values"),
        (good(delta=np.zeros(9, np.float64)), "not 9 float32 values"),
        (good(delta=np.array([0, 1, np.nan, 0, np.inf, 0, 0, 0, -np.inf], np.float32)), "holds 3 NaN or infinite values"),
        (good(num_examples=0), "claims 0 training examples"),
        (good(weight=float("nan")), "aggregation weight is nan"),
        (good(weight=-1.0), "aggregation weight is -1.0"),
        (SealedUpdate(4, "hospital_a", "masked", b"", LAYOUT, -5), "claims -5 training examples"),
    ],
)
def test_a_faulty_or_forged_update_is_refused_with_its_reason(answer, reason):
    admitted, refused = admission.admit(4, {"hospital_a": answer, "hospital_b": good(hospital="hospital_b")}, {"hospital_a": LAYOUT, "hospital_b": LAYOUT})
    assert list(admitted) == ["hospital_b"] and reason in refused["hospital_a"]


def test_good_updates_and_sealed_ones_pass_and_strangers_do_not():
    sealed = SealedUpdate(4, "hospital_b", "masked", b"\x00", LAYOUT, 12)
    plain = good()
    admitted, refused = admission.admit(4, {"hospital_a": plain, "hospital_b": sealed, "mallory": good(hospital="mallory")}, {"hospital_a": LAYOUT, "hospital_b": LAYOUT})
    assert admitted["hospital_a"] is plain and admitted["hospital_b"] is sealed and len(admitted) == 2
    assert refused == {"mallory": "rejected: not a hospital of this run"}


def test_each_hospital_is_held_to_its_own_models_layout(tmp_path):
    raw = ehr_config(tmp_path, tmp_path)
    raw["hospitals"][2]["model"] = {"width": 0.5}
    config = parse_config(raw)
    strategy = STRATEGIES["fedavg"](config)
    torch.manual_seed(0)
    layout = flatten(build_model(config.model, (13,)))[1]
    layouts = admission.expected_layouts(config, strategy, (13,), layout)
    assert layouts["hospital_a"] == layouts["hospital_b"] == layout
    assert layouts["hospital_c"].shapes[0] == (16, 13) and layouts["hospital_c"].names == layout.names

    raw = ehr_config(tmp_path, tmp_path)
    raw["strategy"], raw["train"]["momentum"] = {"name": "scaffold"}, 0.0
    scaffold = STRATEGIES["scaffold"](parse_config(raw))
    model = build_model(parse_config(raw).model, (13,))
    scaffold.start(model, layout)
    extended = admission.expected_layouts(parse_config(raw), scaffold, (13,), layout)["hospital_a"]
    assert extended.names[: len(layout.names)] == layout.names and extended.size == 2 * layout.size  # the MLP has no buffers
